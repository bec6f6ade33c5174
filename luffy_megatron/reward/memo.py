"""Rewards memoised on their inputs: a group's repeated answers, and answers seen at earlier steps, are scored once."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

__all__ = ["RewardMemo"]


class RewardMemo:
    """Scores of hashable keys (e.g. response text, ground truth, think flag), kept until ``capacity`` keys are held;
    then the memo starts again empty. Not thread-safe: one caller at a time."""

    def __init__(self, capacity: int = 200_000) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity: must be positive, got {capacity}")
        self.capacity = capacity
        self._scores: dict[Hashable, float] = {}

    def __len__(self) -> int:
        return len(self._scores)

    def rewards(self, keys: Sequence[Hashable], score: Callable[[list], Sequence[float]]) -> list[float]:
        """The score of every key; ``score`` is called once, on the keys not held (sorted, each once), if any."""
        todo = sorted({k for k in keys if k not in self._scores})
        fresh = dict(zip(todo, score(todo), strict=True)) if todo else {}
        out = [float(fresh[k] if k in fresh else self._scores[k]) for k in keys]
        if len(self._scores) + len(fresh) > self.capacity:
            self._scores.clear()
        self._scores.update(fresh)
        return out
