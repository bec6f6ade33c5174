"""Fused vocab-parallel log-probability and entropy of the sampled tokens.

Under tensor parallelism every rank holds a contiguous vocabulary slice ``[vocab_start, vocab_start + V/tp)`` of the
logits. :func:`vocab_parallel_logprob_entropy` computes, for every token ``i`` with target id ``y_i``::

    z_i      = logits_i / T                       (the full row, never materialised on one rank)
    logp_i   = z_i[y_i] - logsumexp(z_i)
    H_i      = -sum_v p_iv log p_iv = logsumexp(z_i) - sum_v p_iv z_iv,     p_i = softmax(z_i)

with two all-reduces over the TP group per chunk of tokens (max, then one fused sum of [sum exp, sum p*z, z[y]]).
The full vocabulary is never gathered. Backward is analytic and recomputes ``p`` chunk by chunk from the logits and
the saved per-token ``logsumexp``; nothing of size [N, V] is saved::

    d logp_i / d z_iv = 1[v = y_i] - p_iv
    d H_i    / d z_iv = -p_iv (log p_iv + H_i)

and ``d/d logits = d/d z / T``. All arithmetic is fp32 whatever the logits dtype; the gradient is returned in the
logits dtype. Temporary memory is bounded by ``2 * chunk_tokens * V/tp`` fp32 values plus the gradient itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["vocab_parallel_logprob_entropy"]


def _world(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _scaled_fp32(chunk: Tensor, temperature: float, buf: Tensor) -> Tensor:
    """``chunk / temperature`` in fp32, written into the front rows of the reusable buffer ``buf``."""
    out = buf[: chunk.shape[0]]
    out.copy_(chunk)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def _local_targets(target: Tensor, vocab_start: int, n_valid: int) -> tuple[Tensor, Tensor]:
    """(mask of tokens whose target lies in this shard's valid slice, their shard-local column index)."""
    local = target - vocab_start
    in_shard = (local >= 0) & (local < n_valid)
    return in_shard, torch.where(in_shard, local, torch.zeros_like(local))


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        target: Tensor,
        tp_group: dist.ProcessGroup | None,
        vocab_start: int,
        temperature: float,
        chunk_tokens: int,
        n_valid: int,
        compute_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        n = logits.shape[0]
        device = logits.device
        lse = torch.empty(n, dtype=torch.float32, device=device)
        logp = torch.empty(n, dtype=torch.float32, device=device)
        entropy = torch.zeros(n, dtype=torch.float32, device=device)
        in_shard, local = _local_targets(target, vocab_start, n_valid)
        distributed = _world(tp_group) > 1
        # Two [chunk, V] fp32 buffers, allocated once and reused by every chunk (no repeated page faults).
        rows_max = min(chunk_tokens, n)
        zbuf = torch.empty(rows_max, n_valid, dtype=torch.float32, device=device)
        ebuf = torch.empty_like(zbuf)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            c = e - s
            z = _scaled_fp32(logits[s:e, :n_valid], temperature, zbuf)  # [c, n_valid] fp32
            if n_valid > 0:
                m = z.max(dim=-1).values
            else:
                m = torch.full((c,), float("-inf"), dtype=torch.float32, device=device)
            if distributed:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            z.sub_(m.unsqueeze(-1))  # z - max: <= 0, finite
            stats = torch.zeros(c, 3, dtype=torch.float32, device=device)
            ez = torch.exp(z, out=ebuf[:c])
            stats[:, 0] = ez.sum(dim=-1)
            if compute_entropy and n_valid > 0:
                stats[:, 1] = torch.bmm(ez.unsqueeze(1), z.unsqueeze(2)).view(c)  # sum_v exp(z) * z, no [c, V] temp
            del ez
            rows = in_shard[s:e]
            stats[:, 2] = torch.where(rows, z.gather(1, local[s:e].unsqueeze(1)).squeeze(1), 0.0) if n_valid else 0.0
            if distributed:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
            log_z = torch.log(stats[:, 0])
            lse[s:e] = m + log_z
            logp[s:e] = stats[:, 2] - log_z
            if compute_entropy:
                entropy[s:e] = log_z - stats[:, 1] / stats[:, 0]
        del zbuf, ebuf
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.meta = (tp_group, vocab_start, temperature, chunk_tokens, n_valid, compute_entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):  # type: ignore[override]
        logits, target, lse, entropy = ctx.saved_tensors
        tp_group, vocab_start, temperature, chunk_tokens, n_valid, compute_entropy = ctx.meta
        grad = torch.zeros_like(logits)  # padded-vocab columns keep a zero gradient
        if grad_logp is None and grad_entropy is None:
            return grad, None, None, None, None, None, None, None
        if grad_entropy is not None and not compute_entropy:
            raise RuntimeError("entropy was not computed (compute_entropy=False) but received a gradient")
        n = logits.shape[0]
        if n_valid == 0:
            return grad, None, None, None, None, None, None, None
        g_lp = grad_logp.float() if grad_logp is not None else torch.zeros(n, device=logits.device)
        in_shard, local = _local_targets(target, vocab_start, n_valid)
        # fp32 logits: work directly in the gradient buffer (no temporary of size [chunk, V] on the log-prob path).
        in_place = logits.dtype == torch.float32
        rows_max = min(chunk_tokens, n)
        lbuf = None if in_place else torch.empty(rows_max, n_valid, dtype=torch.float32, device=logits.device)
        pbuf = (
            None if grad_entropy is None else torch.empty(rows_max, n_valid, dtype=torch.float32, device=logits.device)
        )
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            out = grad[s:e, :n_valid]
            if in_place:
                buf = out
                buf.copy_(logits[s:e, :n_valid])
                if temperature != 1.0:
                    buf.div_(temperature)
            else:
                buf = _scaled_fp32(logits[s:e, :n_valid], temperature, lbuf)
            buf.sub_(lse[s:e].unsqueeze(-1))  # log p  [c, n_valid]
            gl = g_lp[s:e].unsqueeze(-1)
            if grad_entropy is not None:
                p = torch.exp(buf, out=pbuf[: e - s])
                gh = grad_entropy[s:e].float().unsqueeze(-1)
                # dL/dz = g_lp (1[y] - p) - g_H p (log p + H) = p (-g_H log p - (g_lp + g_H H)) + g_lp 1[y]
                buf.mul_(-gh).sub_(gl + gh * entropy[s:e].unsqueeze(-1)).mul_(p)
                del p
            else:
                buf.exp_().mul_(-gl)
            rows = in_shard[s:e]
            buf.scatter_add_(1, local[s:e].unsqueeze(1), torch.where(rows, g_lp[s:e], 0.0).unsqueeze(1))
            if temperature != 1.0:
                buf.div_(temperature)
            if not in_place:
                out.copy_(buf)
            del buf
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    true_vocab_size: int | None = None,
    compute_entropy: bool = True,
    check_targets: bool = True,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probability of ``target`` and entropy of softmax(logits / temperature), from vocab-parallel shards.

    Args:
        logits: [..., V_local] this rank's contiguous vocabulary slice (fp32, bf16 or fp16); ``V_local`` equal on
            all ranks of ``tp_group`` (Megatron pads the vocabulary so that it is).
        target: [...] int64 global token ids (same leading shape as ``logits``).
        tp_group: the tensor-parallel group, or None for TP=1.
        vocab_start: global id of this shard's first column (``tp_rank * V_local`` in Megatron).
        temperature: logits are divided by it before the softmax (the rollout temperature).
        chunk_tokens: tokens processed at a time; temporary memory is ~``2 * chunk_tokens * V_local`` fp32 values.
        true_vocab_size: real vocabulary size when the vocabulary is padded; columns at global id >= it are excluded
            (probability 0, i.e. logit -inf) and get a zero gradient.
        compute_entropy: False skips the entropy (returned as None), e.g. for old/reference log-probs.
        check_targets: raise ValueError on target ids outside the (true) vocabulary (one host sync).
        check_finite: raise ValueError when a NaN/inf logit made a log-prob or entropy non-finite (one host sync on
            the [N] outputs; the logits themselves are not scanned again).

    Returns:
        (log_prob [...] fp32, entropy [...] fp32 or None). Differentiable w.r.t. ``logits``; when entropy is unused
        (no gradient reaches it) its backward terms are skipped. Every rank of ``tp_group`` must call it with the
        same ``target``, and the returned values are identical on all of them.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target: expected an int64/int32 tensor, got {getattr(target, 'dtype', type(target))}")
    if logits.dim() < 1 or tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target: shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}[:-1]")
    if temperature <= 0:
        raise ValueError(f"temperature: must be positive, got {temperature}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens: must be positive, got {chunk_tokens}")
    lead = logits.shape[:-1]
    v_local = logits.shape[-1]
    flat = logits.reshape(-1, v_local)
    tgt = target.reshape(-1).long()
    vocab_total = v_local * _world(tp_group)
    if true_vocab_size is not None:
        if not 0 < true_vocab_size <= vocab_total:
            raise ValueError(f"true_vocab_size: {true_vocab_size} not in (0, {vocab_total}] (V_local * tp)")
        vocab_total = true_vocab_size
    n_valid = max(0, min(v_local, vocab_total - vocab_start))
    if check_targets and tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= vocab_total):
        raise ValueError(f"target: ids must be in [0, {vocab_total}), got [{int(tgt.min())}, {int(tgt.max())}]")
    logp, entropy = _VocabParallelLogProbEntropy.apply(
        flat, tgt, tp_group, int(vocab_start), float(temperature), int(chunk_tokens), n_valid, bool(compute_entropy)
    )
    if check_finite:
        bad = ~torch.isfinite(logp) | ~torch.isfinite(entropy)
        if bool(bad.any()):
            raise ValueError(f"logits: non-finite values (NaN/inf) in {int(bad.sum())} of {bad.numel()} token rows")
    return logp.view(lead), (entropy.view(lead) if compute_entropy else None)
