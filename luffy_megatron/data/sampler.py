"""A seeded, resumable sampler of global prompt batches, split into disjoint data-parallel shares.

Epoch ``e`` visits the items in the order ``numpy.random.default_rng(seed + e).permutation(n)`` (or ``0..n-1`` without
shuffling) in consecutive batches of ``batch_size``; a last partial batch is dropped, so every step sees a full batch.
The trainer builds it on global rank 0 only (which owns the data, the rollouts and the rewards) and uses the global
batch; ``local_indices`` is data-parallel rank ``dp_rank``'s contiguous share, for a reader that builds the same sampler
on every rank. ``state_dict()`` is just (epoch, batches consumed in it), so resuming continues with exactly the next
batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SampledBatch:
    """One step's prompts: the global batch and this rank's share of it."""

    epoch: int
    step_in_epoch: int
    indices: list[int]  # global batch (same on every rank)
    local_indices: list[int]  # this data-parallel rank's disjoint share


class PromptSampler:
    """Infinite iterator of :class:`SampledBatch`; epochs reshuffle with ``seed + epoch``."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if batch_size < 1 or batch_size > num_items:
            raise ValueError(f"batch_size must be in [1, num_items={num_items}], got {batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank} dp_size={dp_size}")
        if batch_size % dp_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by dp_size {dp_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.epoch = 0
        self.step_in_epoch = 0  # batches already consumed in the current epoch
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The visiting order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_items)

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> SampledBatch:
        if self.step_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.step_in_epoch * self.batch_size
        indices = [int(i) for i in self._order[start : start + self.batch_size]]
        share = self.batch_size // self.dp_size
        batch = SampledBatch(
            self.epoch, self.step_in_epoch, indices, indices[self.dp_rank * share : (self.dp_rank + 1) * share]
        )
        self.step_in_epoch += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Position and the settings that define the order (checked on load)."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state from a different dataset size, batch size, seed or shuffle."""
        for key in ("num_items", "batch_size", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self._order = None
