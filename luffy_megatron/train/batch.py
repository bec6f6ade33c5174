"""The step batch as flat tensors, and the micro-batches the policy update runs on.

:class:`StepBatch` holds a mini-batch's samples back to back: token ids, per-token log-probs and per-sample values as
tensors with sample offsets (no per-token Python lists). :func:`pack_micro_batch` cuts one *packed* micro-batch out
of it: the chosen samples concatenated in one row (``[1, T]``), positions restarting at every sample, ``cu_seqlens``
marking the boundaries for the attention, and the loss inputs as flat ``[T]`` tensors with a ``seq_index`` naming
each token's sample. The row is padded only up to a multiple of ``alignment``. :func:`flatten_padded` brings the
right-padded micro-batches of :mod:`luffy_megatron.train.samples` (``parallel.pack_sequences=false``) into the same
flat form, so one loss function serves both.

Position ``t`` of a row predicts token ``t + 1`` of the same sample: a sample's last position predicts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from luffy_megatron.train.samples import MicroBatch, Sample, round_up

__all__ = [
    "FlatMicroBatch",
    "StepBatch",
    "flatten_padded",
    "micro_batch_tokens",
    "pack_micro_batch",
    "segment_positions",
]


@dataclass
class StepBatch:
    """Samples of a mini-batch as flat tensors (``S`` samples, ``T`` tokens in all)."""

    sample_ids: list[int]  # [S]: each row's index in the mini-batch
    tokens: Tensor  # [T] int64: every sample's prompt + response, back to back
    offsets: Tensor  # [S + 1] int64: sample i is tokens[offsets[i]:offsets[i + 1]]
    prompt_lengths: Tensor  # [S] int64
    advantages: Tensor  # [S] fp32
    off_policy: Tensor  # [S] bool
    multiplicity: Tensor  # [S] fp32
    has_rollout_logprobs: Tensor  # [S] bool
    old_logprobs: Tensor  # [T] fp32 at each response token's own index (0 on prompts and where unknown)
    rollout_logprobs: Tensor  # [T] fp32, likewise

    @classmethod
    def from_samples(cls, samples: list[Sample], ids: list[int] | None = None) -> StepBatch:
        """``samples[i] for i in ids`` (default: all), in that order; each row remembers its ``i``."""
        ids = list(range(len(samples))) if ids is None else list(ids)
        samples = [samples[i] for i in ids]

        def per_token(attr: str) -> list[float]:
            out: list[float] = []
            for s in samples:
                values = getattr(s, attr) or [0.0] * len(s.response_ids)
                out += [0.0] * len(s.prompt_ids) + list(values)
            return out

        lengths = torch.tensor([s.num_tokens for s in samples], dtype=torch.long)
        return cls(
            sample_ids=ids,
            tokens=torch.tensor([t for s in samples for t in s.prompt_ids + s.response_ids], dtype=torch.long),
            offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            prompt_lengths=torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.long),
            advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
            off_policy=torch.tensor([s.off_policy for s in samples], dtype=torch.bool),
            multiplicity=torch.tensor([float(s.multiplicity) for s in samples], dtype=torch.float32),
            has_rollout_logprobs=torch.tensor([s.rollout_logprobs is not None for s in samples], dtype=torch.bool),
            old_logprobs=torch.tensor(per_token("old_logprobs"), dtype=torch.float32),
            rollout_logprobs=torch.tensor(per_token("rollout_logprobs"), dtype=torch.float32),
        )

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]


@dataclass
class FlatMicroBatch:
    """One micro-batch: the model's input and the loss inputs as flat ``[N]`` tensors (``N = tokens.numel()``).

    ``cu_seqlens`` is set for a packed row (``tokens`` ``[1, T]``) and None for right-padded rows (``[b, L]``).
    ``seq_index`` is each token's position in ``sample_ids`` (``len(sample_ids)`` or more on padding).
    """

    sample_ids: list[int]
    tokens: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor | None
    targets: Tensor
    response_mask: Tensor
    seq_index: Tensor
    off_policy_mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor
    rollout_logprobs: Tensor
    has_rollout_logprobs: Tensor
    multiplicity: Tensor

    @property
    def num_tokens(self) -> int:
        """Tokens computed, padding included."""
        return int(self.tokens.numel())


def pack_micro_batch(batch: StepBatch, ids: list[int], pad_id: int, alignment: int = 1) -> FlatMicroBatch:
    """Rows ``ids`` of ``batch`` in one packed row, padded to a multiple of ``alignment`` (one token if empty); its
    ``sample_ids`` are the rows' mini-batch indices.

    The padding, when there is any, is one more segment of ``cu_seqlens``; it carries no loss.
    """
    sel = torch.tensor(ids, dtype=torch.long)
    starts, lengths = batch.offsets[sel], batch.lengths[sel]
    seq = torch.repeat_interleave(torch.arange(len(ids)), lengths)  # [real] local sample of each token
    index = torch.repeat_interleave(starts, lengths) + _ranges(lengths)  # [real] index into batch.tokens
    real = int(lengths.sum())
    total = round_up(max(real, 1), alignment)
    pad = total - real
    nxt = (index + 1).clamp(max=max(batch.tokens.numel() - 1, 0))
    in_sample = _ranges(lengths) + 1 < lengths[seq]  # position t has a next token t + 1 in its own sample
    resp = in_sample & (_ranges(lengths) + 1 >= batch.prompt_lengths[sel][seq])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)] + ([torch.tensor([total])] if pad else []))

    def padded(values: Tensor, fill: float | int | bool) -> Tensor:
        return torch.cat([values, torch.full((pad,), fill, dtype=values.dtype)])

    def per_sample(values: Tensor) -> Tensor:
        return padded(torch.where(resp, values[sel][seq], torch.zeros((), dtype=values.dtype)), 0)

    def per_token(values: Tensor) -> Tensor:
        return padded(torch.where(resp, values[nxt], 0.0), 0.0)

    return FlatMicroBatch(
        sample_ids=[batch.sample_ids[i] for i in ids],
        tokens=padded(batch.tokens[index], pad_id).unsqueeze(0),
        position_ids=segment_positions(cu).unsqueeze(0),
        cu_seqlens=cu.to(torch.int32),
        targets=padded(torch.where(in_sample, batch.tokens[nxt], pad_id), pad_id),
        response_mask=padded(resp, False),
        seq_index=padded(seq, len(ids)),
        off_policy_mask=per_sample(batch.off_policy),
        advantages=per_sample(batch.advantages),
        old_logprobs=per_token(batch.old_logprobs),
        rollout_logprobs=per_token(batch.rollout_logprobs),
        has_rollout_logprobs=per_sample(batch.has_rollout_logprobs),
        multiplicity=per_sample(batch.multiplicity),
    )


def segment_positions(cu_seqlens: Tensor) -> Tensor:
    """[T] int64 position of every token inside its segment of ``cu_seqlens`` (0 at each segment's first token)."""
    return _ranges(cu_seqlens[1:].long() - cu_seqlens[:-1].long())


def _ranges(lengths: Tensor) -> Tensor:
    """``[0, 1, ..., l_0 - 1, 0, 1, ..., l_1 - 1, ...]``."""
    ends = lengths.cumsum(0)
    return torch.arange(int(ends[-1]) if ends.numel() else 0) - torch.repeat_interleave(ends - lengths, lengths)


def flatten_padded(mb: MicroBatch) -> FlatMicroBatch:
    """A right-padded micro-batch (``[b, L]`` rows) in the flat form; rows are the sequences."""
    b, length = mb.tokens.shape
    return FlatMicroBatch(
        sample_ids=mb.sample_ids,
        tokens=mb.tokens,
        position_ids=mb.position_ids,
        cu_seqlens=None,
        targets=mb.targets.reshape(-1),
        response_mask=mb.response_mask.reshape(-1),
        seq_index=torch.arange(b).repeat_interleave(length),
        off_policy_mask=mb.off_policy_mask.reshape(-1),
        advantages=mb.advantages.reshape(-1),
        old_logprobs=mb.old_logprobs.reshape(-1),
        rollout_logprobs=mb.rollout_logprobs.reshape(-1),
        has_rollout_logprobs=mb.has_rollout_logprobs.reshape(-1),
        multiplicity=mb.multiplicity.reshape(-1),
    )


def micro_batch_tokens(
    plan: list[list[list[int]]], lengths: list[int], *, packed: bool, alignment: int = 1, common_shape: bool = False
) -> list[int]:
    """Tokens computed by every micro-batch of every rank of ``plan`` (padding included), as the policy builds them.

    Packed: the samples' tokens rounded up to ``alignment`` (an empty micro-batch: ``alignment`` tokens). Padded:
    rows x longest row rounded up to ``alignment`` (an empty one: one row of 2), with ``common_shape`` every
    micro-batch padded to the most rows and the longest row of the step (the padded layout under pipeline
    parallelism).
    """
    if packed:
        return [round_up(max(sum(lengths[i] for i in ids), 1), alignment) for rank in plan for ids in rank]
    out: list[int] = []
    for rank in plan:
        shapes = [(max(len(ids), 1), round_up(max((lengths[i] for i in ids), default=2), alignment)) for ids in rank]
        if common_shape and shapes:  # each rank pads its micro-batches to its own largest shape
            shapes = [(max(r for r, _ in shapes), max(n for _, n in shapes))] * len(shapes)
        out += [r * n for r, n in shapes]
    return out
