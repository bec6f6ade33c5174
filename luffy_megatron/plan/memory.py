"""Per-GPU memory of one rank of a training layout: the static part exactly as megatron-core allocates it, and the
activations of the policy update as a model of what autograd keeps.

Static part (bytes Megatron allocates, reproduced rule by rule from megatron-core 0.19's DDP and optimizers):

* Parameters are grouped per model chunk into buffers by dtype (the local layer spec keeps norm weights in fp32;
  transformer-engine's in the training dtype). Gradients live in one fp32 buffer per group
  (``grad_reduce_in_fp32``).
* With the distributed optimizer each parameter starts at a multiple of 64 elements, a tied embedding / output
  weight under PP gets its own bucket, and each bucket ends at a multiple of lcm(DP, 128). The parameters are
  re-mapped into a param buffer of the same size. Each DP rank owns 1/DP of every bucket; the optimizer holds, for the
  parameter elements in its range, fp32 master copies (for bf16/fp16 parameters) and Adam's two moments.
* Without it, buffers are unpadded and every rank keeps master copies and moments of all its parameters.
* With expert parallelism (EP > 1) the expert weights have buffers of their own, after the chunk's others, laid out
  and sharded as above over the expert-data-parallel group (DP / EP ranks: data-parallel rank ``r`` is expert-DP rank
  ``r // EP``); at EP 1 they share the dense buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from luffy_megatron.models.family import TORCH_DTYPES, VOCAB_PARAMS, padded_vocab_size
from luffy_megatron.plan.shapes import ModelShape, chunk_params

DTYPE_BYTES = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vpp: int | None = None
    dist_opt: bool = True
    sp: bool = False  # sequence parallelism (TP > 1): norms, residuals and dropout keep 1/TP of the sequence
    ep: int = 1  # expert parallelism (MoE): each rank holds experts / EP experts of every layer

    def group(self, expert: bool) -> tuple[int, int]:
        """(size, this rank's index from its data-parallel rank ``r``) of the group a buffer is sharded over: the
        data-parallel group, or for an expert buffer the expert-data-parallel group (rank ``r // EP``)."""
        return (self.dp // self.ep, self.ep) if expert else (self.dp, 1)


@dataclass(frozen=True)
class Buffer:
    """One DDP buffer: its dtype, padded numel, and per bucket (start, end, [(param start, param end)])."""

    dtype: str
    numel: int
    buckets: list[tuple[int, int, list[tuple[int, int]]]]
    expert: bool = False  # an expert-parallel buffer (EP > 1)


def _pad(value: int, divisor: int) -> int:
    return math.ceil(value / divisor) * divisor


def layout_buffer(numels: list[int], shared: list[bool], dp: int, dist_opt: bool, dtype: str) -> Buffer:
    """Megatron's buffer layout of parameters given in registration order (laid out in reverse)."""
    buckets: list[tuple[int, int, list[tuple[int, int]]]] = []
    start = bucket_start = 0
    current: list[tuple[int, int]] = []
    divisor = math.lcm(dp, 128)
    for numel, is_shared in zip(numels[::-1], shared[::-1]):
        if dist_opt:
            start = _pad(start, 64)
            if is_shared and current:
                end = _pad(start, divisor)
                buckets.append((bucket_start, end, current))
                bucket_start = start = end
                current = []
        current.append((start, start + numel))
        start += numel
        if dist_opt and is_shared:
            end = _pad(start, divisor)
            buckets.append((bucket_start, end, current))
            bucket_start = start = end
            current = []
    if current:
        buckets.append((bucket_start, _pad(start, divisor) if dist_opt else start, current))
    return Buffer(dtype, buckets[-1][1] if buckets else 0, buckets)


def owned_numel(buf: Buffer, dp: int, dp_rank: int) -> int:
    """Parameter elements of ``buf`` in the distributed optimizer's range of ``dp_rank``."""
    total = 0
    for b_start, b_end, params in buf.buckets:
        size = (b_end - b_start) // dp
        lo, hi = b_start + dp_rank * size, b_start + min(b_end - b_start, (dp_rank + 1) * size)
        total += sum(max(0, min(hi, e) - max(lo, s)) for s, e in params)
    return total


def rank_buffers(m: ModelShape, lay: Layout, pp_rank: int, dtype: str, fp32_norms: bool) -> list[Buffer]:
    """The DDP buffers of pipeline rank ``pp_rank`` (all its model chunks; per chunk the dense ones, then the expert
    ones, each kind by dtype in order of first parameter)."""
    out = []
    for chunk in range(lay.vpp or 1):
        params = chunk_params(m, lay.tp, lay.pp, lay.vpp, pp_rank, chunk, lay.ep)
        tied_pp = m.tied and lay.pp * (lay.vpp or 1) > 1
        groups: dict[tuple[bool, str], list[tuple[int, bool]]] = {}
        for p in params:
            key = (p.expert and lay.ep > 1, "float32" if p.norm and fp32_norms else dtype)
            shared = tied_pp and p.name in VOCAB_PARAMS
            groups.setdefault(key, []).append((p.numel, shared))
        for (expert, key), items in sorted(groups.items(), key=lambda kv: kv[0][0]):  # stable: dense first
            size, _ = lay.group(expert)
            buf = layout_buffer([n for n, _ in items], [s for _, s in items], size, lay.dist_opt, key)
            out.append(replace(buf, expert=expert))
    return out


def static_bytes(
    m: ModelShape, lay: Layout, pp_rank: int, dp_rank: int, dtype: str, fp32_norms: bool
) -> dict[str, int]:
    """Weights, gradient buffer, fp32 master weights and Adam moments of one rank, in bytes."""
    weights = grads = master = adam = 0
    for buf in rank_buffers(m, lay, pp_rank, dtype, fp32_norms):
        unpadded = sum(e - s for _, _, ps in buf.buckets for s, e in ps)
        weights += (buf.numel if lay.dist_opt else unpadded) * DTYPE_BYTES[buf.dtype]
        grads += buf.numel * 4
        size, per = lay.group(buf.expert)
        owned = owned_numel(buf, size, dp_rank // per) if lay.dist_opt else unpadded
        if buf.dtype != "float32":
            master += owned * 4
        adam += owned * 8
    return {"weights": weights, "grads": grads, "master_weights": master, "adam": adam}


@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch of a step: ``tokens`` (padded rows x length) with sequences of up to ``length``."""

    tokens: int
    length: int


def sp_share(tokens: int, lay: Layout) -> float:
    """Tokens of a micro-batch whose sequence-sharded activations one rank keeps: all, or 1/TP with SP."""
    return tokens / lay.tp if lay.sp else tokens


def layer_activation_bytes(m: ModelShape, lay: Layout, mb: MicroBatch, act_bytes: int, flash: bool) -> int:
    """Bytes autograd keeps for backward of one transformer layer and micro-batch.

    Per token: each RMSNorm keeps its input, the normalised values and its output (the next linear's input): 6 x
    hidden for the two norms, plus their fp32 reciprocal RMS. With sequence parallelism (``lay.sp``) these are kept for
    1/TP of the tokens: the norms run on the rank's slice and a column-parallel linear keeps its input before the
    all-gather. Attention keeps the context (the output projection's input) and, unfused (megatron's local spec on
    CPU), the query and the key and value expanded to every query head (without grouped queries the value stays a view
    of the whole fused QKV output), the softmax output (heads x length per token) and, per packed sequence, the
    causal mask (length^2 bytes) and RoPE's cos / sin for query and key; flash attention (transformer-engine) keeps
    query, key and value unexpanded and no score matrix. The SwiGLU MLP keeps the fc1 output (2 x ffn), the GLU's two
    intermediate results (2 x ffn) and the fc2 input (ffn); an MoE layer keeps :func:`moe_activation_bytes` instead.
    QK-norm (Qwen3) keeps the normalised query and key with their fp32 reciprocal RMS per head and, unfused with
    grouped queries, the query's norm input (a reshaped copy) and the whole fused QKV output (the key's norm input is a
    view of it). Measured breakdown: docs/plan.md.
    """
    tp = lay.tp
    h, q, kv, f = m.hidden, m.heads * m.head_dim // tp, m.kv_heads * m.head_dim // tp, m.ffn // tp
    per_token = q + (0 if m.experts else 5 * f)
    # RoPE's cos / sin for query and key, per token of every packed sequence
    extra = 4 * mb.tokens * m.head_dim * act_bytes
    if m.qk_norm:  # the normalised query and key, with their fp32 reciprocal RMS per head
        per_token += q + kv
        extra += mb.tokens * ((m.heads + m.kv_heads) // tp) * 4
        if m.kv_heads != m.heads and not flash:
            # the query's norm input is a reshaped copy; the key's is a view of the fused QKV output, kept whole
            per_token += q + q + 2 * kv
    if flash:
        per_token += q + 2 * kv
    else:
        # without grouped queries the value is not expanded: it stays a view of the fused QKV output, which is kept
        per_token += 2 * q + (q + 2 * kv if m.kv_heads == m.heads else q)
        # sequences x heads x length^2 scores and length^2 mask bytes: at most tokens x length for any packing
        extra += mb.tokens * (m.heads // tp) * mb.length * act_bytes + mb.tokens * mb.length
    norms = math.ceil(sp_share(mb.tokens, lay) * (6 * h * act_bytes + 2 * 4))
    return mb.tokens * per_token * act_bytes + extra + norms + moe_activation_bytes(m, lay, mb, act_bytes)


def moe_activation_bytes(m: ModelShape, lay: Layout, mb: MicroBatch, act_bytes: int) -> int:
    """What an MoE layer keeps for backward (0 for a dense model), with balanced routing.

    The router runs on this rank's tokens (1/TP of them with SP; its input is the norm output counted above) and
    keeps, per token, the fp32 softmax over all experts (the auxiliary loss's), the top-k's int64 indices and fp32
    probabilities, and the permutation's int64 sort over tokens x experts and its top-k row indices: 12 x experts +
    20 x top-k bytes. The experts of this rank compute ``tokens x top-k`` routed tokens: the all-to-all brings this
    rank's experts their tokens from the EP ranks (as many as it sends when balanced), and the all-gather over TP the
    whole sequence's. Per routed token they keep the input (hidden), the fc1 output (2 x ffn / TP), the GLU's two
    intermediate results (2 x ffn / TP), its output and the probability-scaled fc2 input (ffn / TP each) and the fp32
    probability. Measured breakdown: docs/plan.md.
    """
    if not m.experts:
        return 0
    routed = mb.tokens * m.topk
    router = math.ceil(sp_share(mb.tokens, lay) * (12 * m.experts + 20 * m.topk))
    return routed * ((m.hidden + 6 * (m.moe_ffn // lay.tp)) * act_bytes + 4) + router


def head_activation_bytes(m: ModelShape, lay: Layout, mb: MicroBatch, act_bytes: int) -> int:
    """The last stage's final norm (input, normalised, output and its fp32 reciprocal RMS, for 1/TP of the tokens
    with SP), the logits the fused log-prob keeps, and 51 bytes per token of bookkeeping: the log-prob's targets
    (int64) and log-sum-exp (fp32), and the loss's seven fp32 and three bool per-token tensors and the int64 token
    ids."""
    vocab = padded_vocab_size(m.vocab, lay.tp) // lay.tp
    norm = math.ceil(sp_share(mb.tokens, lay) * (3 * m.hidden * act_bytes + 4))
    return mb.tokens * (vocab * act_bytes + 51) + norm


def logprob_chunk_bytes(m: ModelShape, tp: int, chunk_tokens: int) -> int:
    """Temporary fp32 memory of the fused log-prob / entropy: two [chunk, V/tp] blocks (algo/logprob.py)."""
    return 2 * chunk_tokens * (padded_vocab_size(m.vocab, tp) // tp) * 4


def in_flight(lay: Layout, pp_rank: int, num_micro_batches: int) -> int:
    """Micro-batch chunks whose activations a pipeline rank holds at once under 1F1B (interleaved with VPP)."""
    if lay.vpp:
        warmup = (lay.pp - pp_rank - 1) * 2 + (lay.vpp - 1) * lay.pp
        return min(warmup + 1, num_micro_batches * lay.vpp)
    return min(lay.pp - pp_rank, num_micro_batches)


def activation_bytes(
    m: ModelShape,
    lay: Layout,
    pp_rank: int,
    mb: MicroBatch,
    num_micro_batches: int,
    act_bytes: int,
    recompute: bool,
    flash: bool,
) -> int:
    """Peak activation bytes of a pipeline rank over a step (what autograd holds, as measured in the tests)."""
    chunk_layers = m.layers // (lay.pp * (lay.vpp or 1))
    layer = layer_activation_bytes(m, lay, mb, act_bytes, flash)
    held = in_flight(lay, pp_rank, num_micro_batches)
    if recompute:  # each layer keeps its input (sequence-sharded with SP); backward rebuilds one layer at a time
        total = held * chunk_layers * math.ceil(sp_share(mb.tokens, lay) * m.hidden * act_bytes) + layer
    else:
        total = held * chunk_layers * layer
    if pp_rank == lay.pp - 1:
        total += head_activation_bytes(m, lay, mb, act_bytes)
    return total
