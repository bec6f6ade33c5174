"""A step's :class:`~luffy_megatron.train.step_batch.StepBatch` from global rank 0 to every rank as its tensors.

Rank 0 sends a small int64 header (dtype and length of every field), then one broadcast per dtype: the fields of that
dtype back to back, each field in its dtype in the batch (token ids int32 when every id fits), flags as bytes; the old
log-probs do not travel while every one is +0.0 (before the policy computed them). The other ranks' fields are views
into the received buffers: no per-sample work, and every tensor equals rank 0's bit for bit. Rank 0
keeps its own batch. On NCCL the buffers live on the current CUDA device, on gloo in CPU memory; the received batch
lives in CPU memory. Without a process group, or with one process, nothing is sent.

The same flat form is the asynchronous checkpoint's batch in flight (:func:`save_batch`, :func:`load_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from luffy_megatron.platform.rank0 import rank0_call, single_process
from luffy_megatron.train.step_batch import StepBatch, zero_floats

_DTYPES = (torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64)  # a dtype's code is its index here
_FLAGS = ("off_policy", "has_rollout_logprobs")  # bool, sent as bytes
_FIELDS = (  # in send order; the dtype of each is chosen by pack_batch and sent in the header
    "tokens",
    "offsets",
    "prompt_lengths",
    "prompt_index",
    "group_id",
    "finish_reason",
    "multiplicity",
    *_FLAGS,
    "reward",
    "advantage",
    "rollout_logprobs",
    "old_logprobs",  # empty while every value is +0.0
    "reason_bytes",  # the finish reasons, UTF-8, concatenated
    "reason_lengths",
)


@dataclass
class PackedBatch:
    """Rank 0's flat form of a batch: ``header`` = (dtype code, length) per field of ``_FIELDS``, and one buffer per
    dtype code present (the fields of that dtype concatenated in ``_FIELDS`` order)."""

    header: torch.Tensor
    buffers: dict[int, torch.Tensor]


def broadcast_batch(batch: StepBatch | None, what: str = "packing the batch") -> StepBatch:
    """Rank 0's ``batch`` on every rank (collective: every rank calls it, rank 0 with its batch, the others with
    ``None``). Rank 0 gets its own batch back. A failure while rank 0 packs reaches every rank as with
    :func:`~luffy_megatron.platform.rank0_call`."""
    if single_process():
        return batch if batch is not None else StepBatch.from_samples([])
    packed: list[PackedBatch] = []
    rank0_call(lambda: packed.append(pack_batch(batch or StepBatch.from_samples([]))), what)
    return _send(packed[0] if packed else None, batch)


def rank0_batch(fn: Callable[[], tuple[StepBatch, dict]], what: str, note: str = "") -> tuple[StepBatch, dict]:
    """:func:`~luffy_megatron.platform.rank0_call` for a ``(batch, metrics)`` result: ``fn`` runs on global rank 0,
    its metrics travel as an object, its batch as tensors. A failure of ``fn`` (or of packing its batch) raises on
    rank 0 and as :class:`~luffy_megatron.platform.RankFailure` everywhere else, before any tensor is sent."""
    if single_process():
        return fn()
    held: list[tuple[StepBatch, PackedBatch]] = []

    def run() -> dict:
        batch, metrics = fn()
        held.append((batch, pack_batch(batch)))
        return metrics

    metrics = rank0_call(run, what, note)
    batch, packed = held[0] if held else (None, None)
    return _send(packed, batch), metrics


def pack_batch(batch: StepBatch) -> PackedBatch:
    """The flat form of ``batch`` (no collective)."""
    old = batch.old_logprobs if bool(batch.old_logprobs.view(torch.int32).any()) else batch.old_logprobs[:0]
    encoded = [r.encode() for r in batch.reasons]
    fields = {name: getattr(batch, name) for name in _FIELDS if hasattr(batch, name)}
    fields.update({name: fields[name].view(torch.uint8) for name in _FLAGS})
    fields.update(
        old_logprobs=old,
        reason_bytes=torch.tensor(list(b"".join(encoded)), dtype=torch.uint8),
        reason_lengths=torch.tensor([len(e) for e in encoded], dtype=torch.long),
    )
    codes = [_DTYPES.index(fields[k].dtype) for k in _FIELDS]
    header = torch.tensor([(code, fields[k].numel()) for code, k in zip(codes, _FIELDS)], dtype=torch.long)
    buffers = {}
    for code in range(len(_DTYPES)):
        parts = [fields[k].reshape(-1) for c, k in zip(codes, _FIELDS) if c == code and fields[k].numel()]
        if parts:  # one part (the usual case for the big fields) is sent as it is
            buffers[code] = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)
    return PackedBatch(header.reshape(-1), buffers)


def unpack_batch(header: torch.Tensor, buffers: dict[int, torch.Tensor]) -> StepBatch:
    """The batch of a :class:`PackedBatch` layout (no collective; the fields are views into ``buffers``)."""
    fields = _split_fields(header, buffers)
    fields.update({name: fields[name].view(torch.bool) for name in _FLAGS})
    if fields["old_logprobs"].numel() == 0:
        fields["old_logprobs"] = zero_floats(fields["tokens"].numel())
    reason_bytes = fields.pop("reason_bytes").numpy().tobytes()
    ends = fields.pop("reason_lengths").cumsum(0).tolist()
    reasons = tuple(reason_bytes[a:b].decode() for a, b in zip([0, *ends[:-1]], ends))
    return StepBatch(**fields, reasons=reasons)


def save_batch(batch: StepBatch, path: Path) -> None:
    """Write ``batch`` to ``path`` as the binary arrays of its flat form (floats bit-exact)."""
    packed = pack_batch(batch)
    arrays = {f"buffer_{code}": buf.numpy() for code, buf in packed.buffers.items()}
    with open(path, "wb") as f:
        np.savez(f, header=packed.header.numpy(), **arrays)


def load_batch(path: Path) -> StepBatch:
    """The batch :func:`save_batch` wrote to ``path``."""
    with np.load(path) as f:
        buffers = {int(k.removeprefix("buffer_")): torch.from_numpy(f[k]) for k in f.files if k.startswith("buffer_")}
        return unpack_batch(torch.from_numpy(f["header"]), buffers)


def _send(packed: PackedBatch | None, batch: StepBatch | None) -> StepBatch:
    """Broadcast ``packed`` from global rank 0 (which passes it and gets ``batch`` back); the others rebuild."""
    dev = _device()
    header = torch.zeros(2 * len(_FIELDS), dtype=torch.int64, device=dev)
    if packed is not None:
        header.copy_(packed.header)
    dist.broadcast(header, src=0)
    layout = header.cpu()
    sizes = layout.reshape(-1, 2)
    buffers: dict[int, torch.Tensor] = {}
    for code, dtype in enumerate(_DTYPES):
        size = int(sizes[sizes[:, 0] == code, 1].sum())
        if size == 0:
            continue
        if packed is not None:
            dist.broadcast(packed.buffers[code].to(dev), src=0)
            continue
        buf = torch.empty(size, dtype=dtype, device=dev)
        dist.broadcast(buf, src=0)
        buffers[code] = buf.cpu()
    if packed is not None:
        return batch  # type: ignore[return-value]
    return unpack_batch(layout, buffers)


def _split_fields(header: torch.Tensor, buffers: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    offsets = dict.fromkeys(range(len(_DTYPES)), 0)
    fields = {}
    for name, (code, size) in zip(_FIELDS, header.reshape(-1, 2).tolist()):
        start = offsets[code]
        fields[name] = buffers[code][start : start + size] if size else torch.zeros(0, dtype=_DTYPES[code])
        offsets[code] = start + size
    return fields


def _device() -> torch.device:
    """Where the buffers live: NCCL moves only tensors on the current CUDA device, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
