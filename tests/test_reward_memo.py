"""The reward memo: each key scored once, and a full memo never loses a score it was asked for."""

from __future__ import annotations

import pytest

from luffy_megatron.reward import RewardMemo


class Scorer:
    """Scores a key as its length and records each call's keys."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, keys: list[str]) -> list[float]:
        self.calls.append(list(keys))
        return [float(len(k)) for k in keys]


def test_each_key_is_scored_once_across_calls() -> None:
    memo, scorer = RewardMemo(capacity=10), Scorer()
    assert memo.rewards(["bb", "a", "bb", "ccc"], scorer) == [2.0, 1.0, 2.0, 3.0]
    assert memo.rewards(["a", "dddd", "ccc"], scorer) == [1.0, 4.0, 3.0]
    assert memo.rewards(["ccc", "a"], scorer) == [3.0, 1.0]
    assert scorer.calls == [["a", "bb", "ccc"], ["dddd"]] and len(memo) == 4


def test_the_call_that_fills_the_memo_still_returns_the_scores_it_held() -> None:
    """Keys held before the memo starts again (here "a" and "bb") are still answered from it: the step that filled
    the memo used to fail with a KeyError on them."""
    memo, scorer = RewardMemo(capacity=3), Scorer()
    memo.rewards(["a", "bb"], scorer)
    assert memo.rewards(["bb", "ccc", "a", "dddd"], scorer) == [2.0, 3.0, 1.0, 4.0]
    assert scorer.calls == [["a", "bb"], ["ccc", "dddd"]]
    assert len(memo) == 2  # started again with this call's new keys
    assert memo.rewards(["ccc", "a"], scorer) == [3.0, 1.0] and scorer.calls[-1] == ["a"]


def test_a_scorer_that_returns_the_wrong_count_is_an_error_and_a_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RewardMemo().rewards(["a", "b"], lambda keys: [1.0])
    with pytest.raises(ValueError, match="capacity"):
        RewardMemo(capacity=0)
