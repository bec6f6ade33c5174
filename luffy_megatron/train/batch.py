"""The micro-batches the policy update runs on, cut out of a :class:`~luffy_megatron.train.step_batch.StepBatch`.

:func:`pack_micro_batch` cuts one *packed* micro-batch: the chosen samples concatenated in one row (``[1, T]``),
positions restarting at every sample, ``cu_seqlens`` marking the boundaries for the attention, and the loss inputs as
flat ``[T]`` tensors with a ``seq_index`` naming each token's sample. The row is padded only up to a multiple of
``alignment``. :func:`make_micro_batch` cuts right-padded rows (``parallel.pack_sequences=false``) and
:func:`flatten_padded` brings them into the same flat form, so one loss function serves both.

Position ``t`` of a row predicts token ``t + 1`` of the same sample: a sample's last position predicts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from luffy_megatron.train.samples import round_up
from luffy_megatron.train.step_batch import StepBatch, token_ranges

__all__ = [
    "FlatMicroBatch",
    "MicroBatch",
    "flatten_padded",
    "make_micro_batch",
    "micro_batch_tokens",
    "pack_micro_batch",
    "pad_micro_batch",
    "segment_positions",
]


@dataclass
class _MicroBatchFields:
    """What both layouts hold: the model's input and the loss inputs of a few samples (``sample_ids``)."""

    sample_ids: list[int]
    tokens: Tensor
    position_ids: Tensor
    targets: Tensor
    response_mask: Tensor
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


@dataclass
class MicroBatch(_MicroBatchFields):
    """Right-padded tensors of a few samples; position t predicts token t + 1.

    All [b, L] with L the longest sample of this micro-batch (never the max response length): ``tokens``,
    ``position_ids``, ``targets`` (token t + 1), ``response_mask`` (target is a response token), ``off_policy_mask``,
    ``advantages``, ``old_logprobs`` (0 where unknown), ``rollout_logprobs`` (0 where unknown),
    ``has_rollout_logprobs`` and ``multiplicity`` (the row's sample multiplicity, 0 on padding rows).
    """


@dataclass
class FlatMicroBatch(_MicroBatchFields):
    """One micro-batch: the model's input and the loss inputs as flat ``[N]`` tensors (``N = tokens.numel()``).

    ``cu_seqlens`` is set for a packed row (``tokens`` ``[1, T]``) and None for right-padded rows (``[b, L]``).
    ``seq_index`` is each token's position in ``sample_ids`` (``len(sample_ids)`` or more on padding).
    """

    cu_seqlens: Tensor | None
    seq_index: Tensor


@dataclass
class _Cut:
    """The tokens of some samples of a batch, back to back: where each comes from and what it predicts."""

    sel: Tensor  # [n] the samples
    lengths: Tensor  # [n]
    seq: Tensor  # [real] local sample of each token
    pos: Tensor  # [real] position of each token inside its sample
    index: Tensor  # [real] index into batch.tokens
    token_ids: Tensor  # [real] int64: batch.tokens[index]
    targets: Tensor  # [real] int64: the token each predicts, pad_id where in_sample is not
    nxt: Tensor  # [real] index of the token it predicts (clamped; only meaningful where in_sample)
    in_sample: Tensor  # [real] position t has a next token t + 1 in its own sample
    resp: Tensor  # [real] ... and that token is a response token


def _cut(batch: StepBatch, ids: list[int], pad_id: int) -> _Cut:
    sel = torch.tensor(ids, dtype=torch.long)
    lengths = batch.lengths[sel]
    seq = torch.repeat_interleave(torch.arange(len(ids)), lengths)
    pos = token_ranges(lengths)
    index = batch.token_index(sel)
    nxt = (index + 1).clamp(max=max(batch.num_tokens - 1, 0))
    in_sample = pos + 1 < lengths[seq]
    resp = in_sample & (pos + 1 >= batch.prompt_lengths[sel][seq])
    targets = torch.where(in_sample, batch.tokens[nxt].long(), pad_id)
    return _Cut(sel, lengths, seq, pos, index, batch.tokens[index].long(), targets, nxt, in_sample, resp)


def pack_micro_batch(batch: StepBatch, ids: list[int], pad_id: int, alignment: int = 1) -> FlatMicroBatch:
    """Samples ``ids`` of ``batch`` in one packed row, padded to a multiple of ``alignment`` (one token if empty); its
    ``sample_ids`` are ``ids``.

    The padding, when there is any, is one more segment of ``cu_seqlens``; it carries no loss.
    """
    c = _cut(batch, ids, pad_id)
    real = int(c.lengths.sum())
    total = round_up(max(real, 1), alignment)
    pad = total - real
    cu = torch.cat([torch.zeros(1, dtype=torch.long), c.lengths.cumsum(0)] + ([torch.tensor([total])] if pad else []))

    def padded(values: Tensor, fill: float | int | bool) -> Tensor:
        return torch.cat([values, torch.full((pad,), fill, dtype=values.dtype)])

    def per_sample(values: Tensor) -> Tensor:
        return padded(torch.where(c.resp, values[c.sel][c.seq], torch.zeros((), dtype=values.dtype)), 0)

    def per_token(values: Tensor) -> Tensor:
        return padded(torch.where(c.resp, values[c.nxt], 0.0), 0.0)

    return FlatMicroBatch(
        sample_ids=list(ids),
        tokens=padded(c.token_ids, pad_id).unsqueeze(0),
        position_ids=segment_positions(cu).unsqueeze(0),
        cu_seqlens=cu.to(torch.int32),
        targets=padded(c.targets, pad_id),
        response_mask=padded(c.resp, False),
        seq_index=padded(c.seq, len(ids)),
        off_policy_mask=per_sample(batch.off_policy),
        advantages=per_sample(batch.advantage.float()),
        old_logprobs=per_token(batch.old_logprobs),
        rollout_logprobs=per_token(batch.rollout_logprobs),
        has_rollout_logprobs=per_sample(batch.has_rollout_logprobs),
        multiplicity=per_sample(batch.multiplicity.float()),
    )


def make_micro_batch(batch: StepBatch, ids: list[int], pad_id: int) -> MicroBatch:
    """Samples ``ids`` of ``batch`` as right-padded rows (an empty micro-batch, a rank with fewer samples than
    micro-batches: one fully masked row of two padding tokens)."""
    c = _cut(batch, ids, pad_id)
    b, length = max(len(ids), 1), int(c.lengths.max()) if ids else 2

    def rows(values: Tensor, fill: float | int | bool) -> Tensor:
        out = torch.full((b, length), fill, dtype=values.dtype)
        out[c.seq, c.pos] = values
        return out

    def per_row(values: Tensor) -> Tensor:
        return (values[c.sel].float() if ids else torch.zeros(1)).unsqueeze(1)

    resp = rows(c.resp, False)
    return MicroBatch(
        sample_ids=list(ids),
        tokens=rows(c.token_ids, pad_id),
        position_ids=torch.arange(length).unsqueeze(0).expand(b, length).contiguous(),
        targets=rows(c.targets, pad_id),
        response_mask=resp,
        off_policy_mask=resp & per_row(batch.off_policy).bool(),
        advantages=resp * per_row(batch.advantage),
        old_logprobs=rows(torch.where(c.resp, batch.old_logprobs[c.nxt], 0.0), 0.0),
        rollout_logprobs=rows(torch.where(c.resp, batch.rollout_logprobs[c.nxt], 0.0), 0.0),
        has_rollout_logprobs=resp & per_row(batch.has_rollout_logprobs).bool(),
        multiplicity=per_row(batch.multiplicity).expand(b, length).contiguous(),
    )


def pad_micro_batch(mb: MicroBatch, shape: tuple[int, int], pad_id: int) -> MicroBatch:
    """``mb`` right-padded to ``shape`` = (rows, length) with fully masked padding."""
    rows, length = shape
    b, n = mb.tokens.shape

    def pad(t: Tensor, value: float | int | bool) -> Tensor:
        out = torch.full((rows, length), value, dtype=t.dtype)
        out[:b, :n] = t
        return out

    positions = torch.arange(length).unsqueeze(0).expand(rows, length).contiguous()
    return MicroBatch(
        mb.sample_ids,
        pad(mb.tokens, pad_id),
        positions,
        pad(mb.targets, pad_id),
        pad(mb.response_mask, False),
        pad(mb.off_policy_mask, False),
        pad(mb.advantages, 0.0),
        pad(mb.old_logprobs, 0.0),
        pad(mb.rollout_logprobs, 0.0),
        pad(mb.has_rollout_logprobs, False),
        pad(mb.multiplicity, 0.0),
    )


def segment_positions(cu_seqlens: Tensor) -> Tensor:
    """[T] int64 position of every token inside its segment of ``cu_seqlens`` (0 at each segment's first token)."""
    return token_ranges(cu_seqlens[1:].long() - cu_seqlens[:-1].long())


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
