"""A step's samples as one columnar batch: flat tensors from the rollout result to the loss.

Global rank 0 builds a :class:`StepBatch` once from its scored samples (:meth:`StepBatch.from_samples`); the batch
travels to every rank as its tensors (:mod:`luffy_megatron.train.transport`); the mini-batches, the compacted batch
the update trains and the micro-batches (:mod:`luffy_megatron.train.batch`) are index selections into it, and the
policy's old log-probs are written into its per-token tensor. Per-token values sit at each token's own index
(0 on prompt tokens and where unknown).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from itertools import chain, repeat

import numpy as np
import torch
from torch import Tensor

from luffy_megatron.train.samples import Sample

__all__ = ["StepBatch", "compact_batch", "token_ranges", "zero_floats"]


@dataclass
class StepBatch:
    """``S`` samples with ``T`` tokens in all. Sample ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``: its prompt,
    then its response."""

    tokens: Tensor  # [T] int32 when every id fits, else int64
    offsets: Tensor  # [S + 1] int64
    prompt_lengths: Tensor  # [S] int64
    prompt_index: Tensor  # [S] int64: row of the dataset
    group_id: Tensor  # [S] int64: position of the prompt in the step's batch
    off_policy: Tensor  # [S] bool
    finish_reason: Tensor  # [S] int64: index into ``reasons``
    reward: Tensor  # [S] fp64
    advantage: Tensor  # [S] fp64
    multiplicity: Tensor  # [S] int64: identical samples this row stands for (see compact_batch)
    has_rollout_logprobs: Tensor  # [S] bool: the engine's log-probs are known (not for traces)
    rollout_logprobs: Tensor  # [T] fp32
    old_logprobs: Tensor  # [T] fp32: the policy's before this update, once computed
    reasons: tuple[str, ...] = ()  # the finish reasons that occur

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> StepBatch:
        """The batch of ``samples``, in order (global rank 0, once per step)."""
        prompt_lengths = np.array([len(s.prompt_ids) for s in samples], dtype=np.int64)
        lengths = prompt_lengths + np.array([len(s.response_ids) for s in samples], dtype=np.int64)
        total = int(lengths.sum())
        reasons = list(dict.fromkeys(s.finish_reason for s in samples))
        return cls(
            tokens=torch.from_numpy(_token_ids(samples, total)),
            offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).long(),
            prompt_lengths=torch.from_numpy(prompt_lengths),
            prompt_index=torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
            group_id=torch.tensor([s.group_id for s in samples], dtype=torch.long),
            off_policy=torch.tensor([s.off_policy for s in samples], dtype=torch.bool),
            finish_reason=torch.tensor([reasons.index(s.finish_reason) for s in samples], dtype=torch.long),
            reward=torch.tensor([s.reward for s in samples], dtype=torch.float64),
            advantage=torch.tensor([s.advantage for s in samples], dtype=torch.float64),
            multiplicity=torch.tensor([s.multiplicity for s in samples], dtype=torch.long),
            has_rollout_logprobs=torch.tensor([s.rollout_logprobs is not None for s in samples], dtype=torch.bool),
            rollout_logprobs=_per_token([s.rollout_logprobs for s in samples], samples, total),
            old_logprobs=_per_token([s.old_logprobs for s in samples], samples, total),
            reasons=tuple(reasons),
        )

    @property
    def num_samples(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def lengths(self) -> Tensor:
        """[S] tokens of each sample."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def response_lengths(self) -> Tensor:
        return self.lengths - self.prompt_lengths

    def token_sample(self) -> Tensor:
        """[T] the sample of every token."""
        return torch.repeat_interleave(torch.arange(self.num_samples), self.lengths)

    def response_token_mask(self) -> Tensor:
        """[T] whether each token is a response token."""
        return token_ranges(self.lengths) >= torch.repeat_interleave(self.prompt_lengths, self.lengths)

    def per_response(self, values: Tensor) -> list[Tensor]:
        """Each sample's response part of the per-token ``values`` ([T], e.g. :attr:`old_logprobs`)."""
        return list(values[self.response_token_mask()].split(self.response_lengths.tolist()))

    def token_index(self, ids: Tensor) -> Tensor:
        """Indices into ``tokens`` of the tokens of samples ``ids``, in that order."""
        lengths = self.lengths[ids]
        return torch.repeat_interleave(self.offsets[ids], lengths) + token_ranges(lengths)

    def select(self, ids: Tensor | list[int]) -> StepBatch:
        """Samples ``ids``, in that order, as a batch of their own."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        lengths = self.lengths[ids]
        index = self.token_index(ids)
        per_sample = {f.name: getattr(self, f.name)[ids] for f in fields(self) if f.name not in _NOT_PER_SAMPLE}
        return StepBatch(
            **per_sample,
            tokens=self.tokens[index],
            offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            rollout_logprobs=self.rollout_logprobs[index],
            old_logprobs=self.old_logprobs[index],
            reasons=self.reasons,
        )

    def mini_batch_ids(self, num: int) -> list[Tensor]:
        """The samples of each of ``num`` mini-batches of consecutive groups (a group is never split across
        optimiser steps): groups in order of group id, each keeping its samples' order."""
        order = torch.sort(self.group_id, stable=True).indices
        groups, rank = torch.unique(self.group_id[order], return_inverse=True)
        per = math.ceil(groups.numel() / num) if groups.numel() else 1
        return [order[(rank >= a) & (rank < a + per)] for a in range(0, groups.numel(), per)]


_NOT_PER_SAMPLE = frozenset({"tokens", "offsets", "rollout_logprobs", "old_logprobs", "reasons"})


def compact_batch(batch: StepBatch, drop_zero_advantage: bool) -> StepBatch:
    """The samples the update needs, each once: identical ones merged into one with their count as ``multiplicity``.

    Identical means the same prompt, response, kind (trace or not), advantage and old log-probs, so every loss term
    and metric of the merged sample, weighted by its multiplicity, equals the sum over the copies (the train-vs-rollout
    log-prob gap uses the first copy's engine log-probs). With ``drop_zero_advantage`` samples whose advantage is
    exactly 0 are left out; the caller passes it only when their loss and gradient are provably 0.
    """
    tokens, old = batch.tokens.numpy(), batch.old_logprobs.numpy()
    bounds = batch.offsets.tolist()
    first: dict[tuple, int] = {}  # key -> its slot in kept
    kept: list[int] = []
    counts: list[int] = []
    rows = zip(batch.prompt_lengths.tolist(), batch.off_policy.tolist(), batch.advantage.tolist())
    for i, ((plen, off, adv), mult) in enumerate(zip(rows, batch.multiplicity.tolist())):
        if drop_zero_advantage and adv == 0.0:
            continue
        a, b = bounds[i], bounds[i + 1]
        key = (plen, off, adv, tokens[a:b].tobytes(), old[a:b].tobytes())
        slot = first.setdefault(key, len(kept))
        if slot == len(kept):
            kept.append(i)
            counts.append(0)
        counts[slot] += mult
    out = batch.select(kept)
    return replace(out, multiplicity=torch.tensor(counts, dtype=torch.long))


def _token_ids(samples: list[Sample], total: int) -> np.ndarray:
    """Every sample's prompt then response ids, as int32 when every id fits, else int64 (fromiter raises
    OverflowError for a misfit)."""

    def ids() -> Iterator[int]:
        return chain.from_iterable(part for s in samples for part in (s.prompt_ids, s.response_ids))

    try:
        return np.fromiter(ids(), np.int32, total)
    except OverflowError:
        return np.fromiter(ids(), np.int64, total)


def _per_token(values: list[list[float] | None], samples: list[Sample], total: int) -> Tensor:
    """[T] fp32: each sample's ``values`` at its response tokens, 0 on prompts and where a sample has none."""
    if all(v is None for v in values):
        return zero_floats(total)
    parts = (
        part
        for v, s in zip(values, samples)
        for part in (repeat(0.0, len(s.prompt_ids)), v if v is not None else repeat(0.0, len(s.response_ids)))
    )
    return torch.from_numpy(np.fromiter(chain.from_iterable(parts), np.float32, total))


def zero_floats(n: int) -> Tensor:
    """[n] fp32 zeros whose pages the OS maps on first write (no resident memory until the values are written)."""
    return torch.from_numpy(np.zeros(n, dtype=np.float32))


def token_ranges(lengths: Tensor) -> Tensor:
    """``[0, 1, ..., l_0 - 1, 0, 1, ..., l_1 - 1, ...]``."""
    ends = lengths.cumsum(0)
    return torch.arange(int(ends[-1]) if ends.numel() else 0) - torch.repeat_interleave(ends - lengths, lengths)
