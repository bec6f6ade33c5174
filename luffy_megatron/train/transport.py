"""A step's samples from global rank 0 to every rank as a few flat tensors (tensor collectives, no pickling).

Rank 0 flattens the token ids (each distinct prompt list once), the per-token floats and the per-sample scalars into
one buffer per dtype; a first int64 broadcast carries the layout (dtype and length of every field), then one
broadcast per dtype moves the data. Token ids travel as int32 when every id fits, else as int64; a per-token float
field as fp32 when every value survives fp64 -> fp32 -> fp64 unchanged, else as fp64; the per-sample integers as
int64, rewards and advantages as fp64. Every rank then holds samples equal to rank 0's field by field (floats
bit-exact), with samples that shared one prompt list on rank 0 sharing one list again. On NCCL the buffers live on
the current CUDA device, on gloo in CPU memory. Without a process group, or with one process, nothing is sent.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from luffy_megatron.platform.rank0 import rank0_call, single_process
from luffy_megatron.train.samples import Sample

_DTYPES = (np.int32, np.int64, np.float32, np.float64)  # a field's dtype code is its index here
_TORCH_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)
_FIELDS = (  # in send order; the dtype of each is chosen by pack_samples and sent in the header
    "tokens",  # the distinct prompt lists, then the responses, concatenated: int32 when every id fits, else int64
    "prompt_lengths",  # int64, as the next three
    "sample_ints",  # [n, 9]: the _INT_COLUMNS of every sample
    "reason_bytes",  # the distinct finish reasons, UTF-8, concatenated
    "reason_lengths",
    "rollout_logprobs",  # of the samples that have them, concatenated: fp32 when every value is exact in fp32
    "old_logprobs",  # (engines and the policy produce fp32 values), else fp64
    "sample_floats",  # [n, 2]: reward, advantage; fp64
)
# Per sample; a log-prob length of -1 means None.
_INT_COLUMNS = ("prompt_index", "group_id", "prompt", "response", "rollout", "old", "multiplicity", "off", "reason")


@dataclass
class PackedSamples:
    """Rank 0's flat form of a sample list: ``header`` = (dtype code, length) per field of ``_FIELDS``, and one
    buffer per dtype code present (the fields of that dtype concatenated in ``_FIELDS`` order)."""

    header: np.ndarray
    buffers: dict[int, np.ndarray]


def broadcast_samples(samples: list[Sample] | None, what: str = "packing the samples") -> list[Sample]:
    """Rank 0's ``samples`` on every rank (collective: every rank calls it, rank 0 with its list, the others with
    ``None``). Rank 0 gets its own list back. A failure while rank 0 packs reaches every rank as with
    :func:`~luffy_megatron.platform.rank0_call`."""
    if single_process():
        return samples if samples is not None else []
    packed: list[PackedSamples] = []
    rank0_call(lambda: packed.append(pack_samples(samples or [])), what)
    return _send(packed[0] if packed else None, samples)


def rank0_batch(fn: Callable[[], tuple[list[Sample], dict]], what: str, note: str = "") -> tuple[list[Sample], dict]:
    """:func:`~luffy_megatron.platform.rank0_call` for a ``(samples, metrics)`` result: ``fn`` runs on global rank 0,
    its metrics travel as an object, its samples as flat tensors. A failure of ``fn`` (or of packing its samples)
    raises on rank 0 and as :class:`~luffy_megatron.platform.RankFailure` everywhere else, before any tensor is
    sent."""
    if single_process():
        return fn()
    held: list[tuple[list[Sample], PackedSamples]] = []

    def run() -> dict:
        samples, metrics = fn()
        held.append((samples, pack_samples(samples)))
        return metrics

    metrics = rank0_call(run, what, note)
    samples, packed = held[0] if held else (None, None)
    return _send(packed, samples), metrics


def pack_samples(samples: list[Sample]) -> PackedSamples:
    """The flat form of ``samples`` (rank 0; no collective)."""
    prompt_slot: dict[int, int] = {}  # id(prompt list) -> its slot: shared lists are sent once
    prompts: list[list[int]] = []
    reasons: dict[str, int] = {}
    rows = []
    for s in samples:
        slot = prompt_slot.setdefault(id(s.prompt_ids), len(prompts))
        if slot == len(prompts):
            prompts.append(s.prompt_ids)
        reason = reasons.setdefault(s.finish_reason, len(reasons))
        rows.append(
            (
                s.prompt_index,
                s.group_id,
                slot,
                len(s.response_ids),
                _length(s.rollout_logprobs),
                _length(s.old_logprobs),
                s.multiplicity,
                int(s.off_policy),
                reason,
            )
        )
    encoded = [r.encode() for r in reasons]
    fields = {
        "tokens": _token_ids(prompts + [s.response_ids for s in samples]),
        "prompt_lengths": np.array([len(p) for p in prompts], dtype=np.int64),
        "sample_ints": np.array(rows, dtype=np.int64).reshape(-1),
        "reason_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64),
        "reason_lengths": np.array([len(e) for e in encoded], dtype=np.int64),
        "rollout_logprobs": _floats([s.rollout_logprobs for s in samples if s.rollout_logprobs is not None]),
        "old_logprobs": _floats([s.old_logprobs for s in samples if s.old_logprobs is not None]),
        "sample_floats": np.array([(s.reward, s.advantage) for s in samples], dtype=np.float64).reshape(-1),
    }
    codes = [_DTYPES.index(fields[k].dtype.type) for k in _FIELDS]
    header = np.array([(code, fields[k].size) for code, k in zip(codes, _FIELDS)], dtype=np.int64).reshape(-1)
    buffers = {}
    for code, dtype in enumerate(_DTYPES):
        parts = [fields[k].astype(dtype, copy=False) for c, k in zip(codes, _FIELDS) if c == code and fields[k].size]
        if parts:  # one part (the usual case for the big fields) is sent as it is
            buffers[code] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return PackedSamples(header, buffers)


def unpack_samples(header: np.ndarray, buffers: dict[int, np.ndarray]) -> list[Sample]:
    """The samples of a :class:`PackedSamples` layout (no collective)."""
    fields = _split_fields(header, buffers)
    cols = fields["sample_ints"].reshape(-1, len(_INT_COLUMNS))
    prompt_lengths = fields["prompt_lengths"]
    prompt_tokens = int(prompt_lengths.sum())
    prompts = _split(fields["tokens"][:prompt_tokens], prompt_lengths)
    responses = _split(fields["tokens"][prompt_tokens:], cols[:, 3])
    rollout = _split(fields["rollout_logprobs"], cols[:, 4])
    old = _split(fields["old_logprobs"], cols[:, 5])
    reason_bytes = fields["reason_bytes"].astype(np.uint8).tobytes()
    ends = np.cumsum(fields["reason_lengths"]).tolist()
    reasons = [reason_bytes[a:b].decode() for a, b in zip([0, *ends[:-1]], ends)]
    floats = fields["sample_floats"].reshape(-1, 2).tolist()
    return [
        Sample(pidx, gid, prompts[slot], response, bool(off), reasons[reason], roll, reward, adv, old_lp, mult)
        for (pidx, gid, slot, _, _, _, mult, off, reason), response, roll, old_lp, (reward, adv) in zip(
            cols.tolist(), responses, rollout, old, floats
        )
    ]


def _send(packed: PackedSamples | None, samples: list[Sample] | None) -> list[Sample]:
    """Broadcast ``packed`` from global rank 0 (which passes it and gets ``samples`` back); the others rebuild."""
    dev = _device()
    header = torch.zeros(2 * len(_FIELDS), dtype=torch.int64, device=dev)
    if packed is not None:
        header.copy_(torch.from_numpy(packed.header))
    dist.broadcast(header, src=0)
    layout = header.cpu().numpy().reshape(-1, 2)
    buffers: dict[int, np.ndarray] = {}
    for code in range(len(_DTYPES)):
        size = int(layout[layout[:, 0] == code, 1].sum())
        if size == 0:
            continue
        if packed is not None:
            dist.broadcast(torch.from_numpy(packed.buffers[code]).to(dev), src=0)
            continue
        buf = torch.empty(size, dtype=_TORCH_DTYPES[code], device=dev)
        dist.broadcast(buf, src=0)
        buffers[code] = buf.cpu().numpy()
    if packed is not None:
        return samples  # type: ignore[return-value]
    return unpack_samples(layout.reshape(-1), buffers)


def _split_fields(header: np.ndarray, buffers: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    layout = header.reshape(-1, 2)
    offsets = dict.fromkeys(range(len(_DTYPES)), 0)
    fields = {}
    for name, (code, size) in zip(_FIELDS, layout.tolist()):
        start = offsets[code]
        fields[name] = buffers[code][start : start + size] if size else np.zeros(0, _DTYPES[code])
        offsets[code] = start + size
    return fields


def _split(flat: np.ndarray, lengths: np.ndarray) -> list:
    """``flat`` cut into consecutive Python lists of ``lengths`` (a length of -1: ``None``, taking nothing)."""
    taken = np.maximum(lengths, 0)
    parts = np.split(flat, np.cumsum(taken)[:-1]) if len(taken) else []
    return [part.tolist() if n >= 0 else None for part, n in zip(parts, lengths.tolist())]


def _token_ids(lists: list[list[int]]) -> np.ndarray:
    """The concatenated ids as int32 when every id fits, else int64 (fromiter raises OverflowError for a misfit)."""
    total = sum(len(v) for v in lists)
    try:
        return np.fromiter(itertools.chain.from_iterable(lists), np.int32, total)
    except OverflowError:
        return np.fromiter(itertools.chain.from_iterable(lists), np.int64, total)


def _floats(lists: list[list[float]]) -> np.ndarray:
    """The concatenated values as fp32 when every one is exact in fp32 (engines return fp32 log-probs), else fp64."""
    values = np.fromiter(itertools.chain.from_iterable(lists), np.float64, sum(len(v) for v in lists))
    as32 = values.astype(np.float32)
    return as32 if bool((as32 == values).all()) else values  # a NaN compares unequal: fp64, exact as well


def _length(values: list | None) -> int:
    return -1 if values is None else len(values)


def _device() -> torch.device:
    """Where the buffers live: NCCL moves only tensors on the current CUDA device, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
