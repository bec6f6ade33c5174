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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from luffy_megatron.plan.shapes import ModelShape, chunk_params

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vpp: int | None = None
    dist_opt: bool = True


@dataclass(frozen=True)
class Buffer:
    """One DDP buffer: its dtype, padded numel, and per bucket (start, end, [(param start, param end)])."""

    dtype: str
    numel: int
    buckets: list[tuple[int, int, list[tuple[int, int]]]]


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
    """The DDP buffers of pipeline rank ``pp_rank`` (all its model chunks)."""
    out = []
    for chunk in range(lay.vpp or 1):
        params = chunk_params(m, lay.tp, lay.pp, lay.vpp, pp_rank, chunk)
        tied_pp = m.tied and lay.pp * (lay.vpp or 1) > 1
        groups: dict[str, list[tuple[int, bool]]] = {}
        for name, numel, norm in params:
            key = "float32" if norm and fp32_norms else dtype
            shared = tied_pp and name in ("embedding.word_embeddings.weight", "output_layer.weight")
            groups.setdefault(key, []).append((numel, shared))
        for key, items in groups.items():
            out.append(layout_buffer([n for n, _ in items], [s for _, s in items], lay.dp, lay.dist_opt, key))
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
        owned = owned_numel(buf, lay.dp, dp_rank) if lay.dist_opt else unpadded
        if buf.dtype != "float32":
            master += owned * 4
        adam += owned * 8
    return {"weights": weights, "grads": grads, "master_weights": master, "adam": adam}
