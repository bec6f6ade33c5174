"""Split-invariant loss aggregation: per-token weights computed from global (pre-micro-batching) counts.

Every loss term is ``sum_t w_t * l_t`` over the tokens of a micro-batch, with weights that depend only on counts of the
whole global batch (all micro-batches of all data-parallel ranks of one optimiser step) and on the token's own
sequence. Summing the micro-batch losses over micro-batches and DP ranks (``loss.backward()`` per micro-batch, then
a SUM all-reduce of gradients -- Megatron's DDP averages, so scale by the DP size or set its gradient scaling
accordingly) therefore gives exactly the global-batch loss and gradient, whatever the split.

Policy-gradient weights, by ``mode`` (``N_tok``: response tokens, ``N_seq``: sequences with >= 1 response token,
``L_i``: response length of the token's sequence, ``L_max``: ``data.max_response_length``):

- ``token_mean``:           ``1 / N_tok``
- ``seq_mean_token_mean``:  ``1 / (N_seq * L_i)``
- ``seq_mean_token_sum``:   ``1 / N_seq``
- ``luffy``:                ``K / (N_seq * L_max)`` with ``K = luffy_micro_batch_seqs`` (default 64).

Why ``K`` for ``luffy``: the released LUFFY code (``loss_remove_token_mean=True``) computes per micro-batch
``sum_t l_t / L_max`` (``eos_mask.shape[-1]``, the padded response length), divides it by the gradient accumulation
``G = ppo_mini_batch_size / ppo_micro_batch_size`` and FSDP averages over the ``DP`` ranks: the step's loss is
``sum_t l_t / (L_max * G * DP) = K * sum_t l_t / (N_seq * L_max)`` where ``K = N_seq / (G * DP)`` is verl's
per-rank micro-batch size in sequences. In the released run (8 GPUs, ``ppo_mini_batch_size = ppo_micro_batch_size =
64`` prompts, n = 8, both normalised to 64 * 8 / 8 = 64 sequences per rank) ``G = 1`` and the divisor is
``L_max * 8``; ``K = 64`` reproduces it for a 64-prompt (512-sequence) mini-batch. Unlike verl, our value does not
change with the number of GPUs or micro-batches.

Regulariser weights (entropy bonus, KL to the reference): the released code uses ``masked_mean`` per micro-batch
whatever the mode; the split-invariant version is the global token mean ``1 / N_tok``. The SFT-loss ablation's NLL is
a ``masked_mean`` over off-policy tokens: weight ``1 / N_off`` on off-policy tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from luffy_megatron.config import AggMode, choices

__all__ = ["AGG_MODES", "POLICY_WEIGHTS", "GlobalCounts", "LossWeights", "aggregation_weights", "sequence_lengths"]


@dataclass(frozen=True)
class GlobalCounts:
    """Counts over the whole global batch of one optimiser step (all micro-batches, all DP ranks)."""

    num_tokens: int  # response tokens
    num_seqs: int  # sequences with at least one response token
    num_off_policy_tokens: int = 0  # response tokens of off-policy traces

    @classmethod
    def from_masks(
        cls,
        response_mask: Tensor,
        off_policy_mask: Tensor | None = None,
        *,
        seq_index: Tensor | None = None,
        dp_group: dist.ProcessGroup | None = None,
    ) -> GlobalCounts:
        """Count a rank's share of the global batch ([B, T] rows, or packed [N] with ``seq_index``) and SUM-reduce
        over ``dp_group`` (None: no reduction). Call once per optimiser step, before micro-batching."""
        _check_mask("response_mask", response_mask)
        mask = response_mask
        off = torch.zeros_like(mask) if off_policy_mask is None else off_policy_mask & mask
        lengths = sequence_lengths(mask, seq_index)
        t = torch.tensor(
            [float(mask.sum()), float((lengths > 0).sum()), float(off.sum())], dtype=torch.float64, device=mask.device
        )
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(t, group=dp_group)
        return cls(int(t[0]), int(t[1]), int(t[2]))


@dataclass
class LossWeights:
    """Per-token weights (same shape as the token tensors; 0 outside the response mask)."""

    policy: Tensor  # policy-gradient term, by aggregation mode
    mean: Tensor  # entropy / KL terms: 1 / N_tok
    off_policy_mean: Tensor  # SFT NLL term: 1 / N_off on off-policy tokens


def sequence_lengths(response_mask: Tensor, seq_index: Tensor | None = None) -> Tensor:
    """[S] response tokens per sequence: row sums of a [B, T] mask, or ``index_add`` over ``seq_index`` for [N]."""
    if seq_index is None:
        if response_mask.dim() == 1:
            raise ValueError("seq_index: required for a flattened [N] response_mask (which sequence owns each token)")
        return response_mask.reshape(-1, response_mask.shape[-1]).sum(-1)
    _check_seq_index(seq_index, response_mask, check_values=True)
    num = int(seq_index.max()) + 1 if seq_index.numel() else 0
    return _count_per_sequence(response_mask, seq_index, num)


def _count_per_sequence(response_mask: Tensor, seq_index: Tensor, size: int) -> Tensor:
    """[size] response tokens of each sequence index (every index must be below ``size``)."""
    return torch.zeros(size, dtype=torch.long, device=seq_index.device).index_add_(0, seq_index, response_mask.long())


def aggregation_weights(
    mode: str,
    response_mask: Tensor,
    counts: GlobalCounts,
    *,
    max_response_length: int,
    seq_index: Tensor | None = None,
    seq_lengths: Tensor | None = None,
    off_policy_mask: Tensor | None = None,
    luffy_micro_batch_seqs: int = 64,
    check_counts: bool = True,
) -> LossWeights:
    """Per-token loss weights of one micro-batch such that micro-batch losses sum to the global-batch loss.

    Args:
        mode: one of ``AGG_MODES`` (see the module docstring for the formulas).
        response_mask: [B, T] or packed [N] bool, True on response tokens.
        counts: global-batch counts (:meth:`GlobalCounts.from_masks`, before micro-batching).
        max_response_length: ``L_max`` of the ``luffy`` mode (the configured maximum response length).
        seq_index: [N] int64 sequence of each token, indices into ``seq_lengths`` (required for packed [N]; rows of
            a [B, T] mask by default). Without ``seq_lengths`` every index must be below N (true of any numbering of
            the micro-batch's sequences from 0).
        seq_lengths: [S] full response length of each sequence (default: counted from this micro-batch's mask,
            correct when no sequence is split across micro-batches).
        off_policy_mask: same shape bool, True on off-policy (trace) tokens (for the SFT term's weights).
        luffy_micro_batch_seqs: ``K`` of the ``luffy`` mode.
        check_counts: raise ValueError when this micro-batch has more response tokens than ``counts`` or
            ``seq_index`` holds a negative index (host syncs; the trainer passes ``algorithm.debug_checks``).

    Returns:
        :class:`LossWeights` of fp32 tensors shaped like ``response_mask``.
    """
    if mode not in POLICY_WEIGHTS:
        raise ValueError(f"mode: {mode!r} is not one of {list(AGG_MODES)}")
    _check_mask("response_mask", response_mask)
    if off_policy_mask is not None:
        _check_mask("off_policy_mask", off_policy_mask)
        if off_policy_mask.shape != response_mask.shape:
            raise ValueError(
                f"off_policy_mask: shape {tuple(off_policy_mask.shape)} does not match response_mask "
                f"{tuple(response_mask.shape)}"
            )
    if max_response_length <= 0:
        raise ValueError(f"max_response_length: must be positive, got {max_response_length}")
    if luffy_micro_batch_seqs <= 0:
        raise ValueError(f"luffy_micro_batch_seqs: must be positive, got {luffy_micro_batch_seqs}")
    for name in ("num_tokens", "num_seqs", "num_off_policy_tokens"):
        if getattr(counts, name) < 0:
            raise ValueError(f"counts.{name}: must be >= 0, got {getattr(counts, name)}")
    if check_counts:
        local_tokens = int(response_mask.sum())
        if local_tokens > counts.num_tokens:
            raise ValueError(f"counts.num_tokens: {counts.num_tokens} is less than this micro-batch's {local_tokens}")

    mask = response_mask.float()
    zero = torch.zeros_like(mask)

    mean = mask * _inv(counts.num_tokens)
    if off_policy_mask is None:
        off_mean = zero
    else:
        off_mean = (off_policy_mask & response_mask).float() * _inv(counts.num_off_policy_tokens)

    if seq_index is not None:
        _check_seq_index(seq_index, response_mask, check_values=check_counts)
    policy = POLICY_WEIGHTS[mode](
        _PolicyWeightInputs(
            response_mask, mask, counts, max_response_length, luffy_micro_batch_seqs, seq_index, seq_lengths
        )
    )
    return LossWeights(policy=policy, mean=mean, off_policy_mean=off_mean)


def _inv(x: float) -> float:
    return 1.0 / x if x > 0 else 0.0


@dataclass(frozen=True)
class _PolicyWeightInputs:
    """What the policy-gradient weight of each mode may read (arguments of :func:`aggregation_weights`)."""

    response_mask: Tensor  # bool
    mask: Tensor  # the response mask as fp32
    counts: GlobalCounts
    max_response_length: int
    luffy_micro_batch_seqs: int
    seq_index: Tensor | None
    seq_lengths: Tensor | None


def _token_mean(x: _PolicyWeightInputs) -> Tensor:
    return x.mask * _inv(x.counts.num_tokens)


def _seq_mean_token_sum(x: _PolicyWeightInputs) -> Tensor:
    return x.mask * _inv(x.counts.num_seqs)


def _luffy(x: _PolicyWeightInputs) -> Tensor:
    return x.mask * (x.luffy_micro_batch_seqs * _inv(x.counts.num_seqs) / x.max_response_length)


def _seq_mean_token_mean(x: _PolicyWeightInputs) -> Tensor:
    response_mask, seq_index, seq_lengths = x.response_mask, x.seq_index, x.seq_lengths
    if seq_index is None:  # rows of a [B, T] mask: each row's length, broadcast along it (no host sync)
        if response_mask.dim() == 1:
            raise ValueError("seq_index: required for a flattened [N] response_mask in mode seq_mean_token_mean")
        rows = response_mask.reshape(-1, response_mask.shape[-1])
        row_lengths = rows.sum(-1) if seq_lengths is None else seq_lengths
        lengths = row_lengths.to(torch.float64)[:, None].expand(rows.shape).reshape(response_mask.shape)
    else:  # checked by aggregation_weights; sized by the token count, not max(seq_index) (no host sync)
        if seq_lengths is None:
            seq_lengths = _count_per_sequence(response_mask.reshape(-1), seq_index.reshape(-1), seq_index.numel())
        lengths = seq_lengths.to(torch.float64)[seq_index]
    per_tok = torch.where(lengths > 0, 1.0 / lengths.clamp_min(1), torch.zeros_like(lengths))
    return x.mask * (per_tok * _inv(x.counts.num_seqs)).float()


#: ``algorithm.loss_agg_mode`` -> the policy-gradient weight of each token (formulas in the module docstring).
POLICY_WEIGHTS: dict[AggMode, Callable[[_PolicyWeightInputs], Tensor]] = {
    AggMode.LUFFY: _luffy,
    AggMode.TOKEN_MEAN: _token_mean,
    AggMode.SEQ_MEAN_TOKEN_MEAN: _seq_mean_token_mean,
    AggMode.SEQ_MEAN_TOKEN_SUM: _seq_mean_token_sum,
}
#: The aggregation mode names.
AGG_MODES = choices(AggMode)


def _check_mask(name: str, mask: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name}: expected a torch.bool tensor, got {got}")


def _check_seq_index(seq_index: Tensor, response_mask: Tensor, *, check_values: bool) -> None:
    """dtype and shape (free); with ``check_values`` also no negative index (a host sync)."""
    if not isinstance(seq_index, Tensor) or seq_index.dtype != torch.int64:
        raise TypeError(f"seq_index: expected an int64 tensor, got {getattr(seq_index, 'dtype', type(seq_index))}")
    if seq_index.shape != response_mask.shape:
        raise ValueError(
            f"seq_index: shape {tuple(seq_index.shape)} does not match response_mask {tuple(response_mask.shape)}"
        )
    if check_values and seq_index.numel() and int(seq_index.min()) < 0:
        raise ValueError("seq_index: negative sequence index")
