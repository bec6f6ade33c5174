"""PromptSampler: seeded epochs, disjoint data-parallel shares, exact resume."""

from __future__ import annotations

import itertools

import pytest

from luffy_megatron.data import PromptSampler


def _take(sampler: PromptSampler, n: int) -> list[list[int]]:
    return [b.indices for b in itertools.islice(sampler, n)]


def test_epochs_cover_items_once_and_reshuffle_with_seed_plus_epoch():
    s = PromptSampler(num_items=10, batch_size=3, seed=5, shuffle=True)
    assert s.batches_per_epoch == 3
    batches = list(itertools.islice(s, 6))
    epoch0 = [i for b in batches[:3] for i in b.indices]
    epoch1 = [i for b in batches[3:] for i in b.indices]
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # one item dropped per epoch (drop_last)
    assert [b.epoch for b in batches] == [0, 0, 0, 1, 1, 1]
    assert [b.step_in_epoch for b in batches] == [0, 1, 2, 0, 1, 2]
    assert epoch0 == [int(i) for i in s.epoch_order(0)[:9]] and epoch1 == [int(i) for i in s.epoch_order(1)[:9]]
    assert epoch0 != epoch1
    other_seed = PromptSampler(num_items=10, batch_size=3, seed=6, shuffle=True)
    assert [int(i) for i in other_seed.epoch_order(0)] == [int(i) for i in s.epoch_order(1)]  # seed + epoch
    assert _take(PromptSampler(10, 3, seed=5), 6) == [b.indices for b in batches]  # deterministic


def test_no_shuffle_is_sequential():
    assert _take(PromptSampler(7, 2, seed=0, shuffle=False), 4) == [[0, 1], [2, 3], [4, 5], [0, 1]]


def test_dp_shares_are_disjoint_and_cover_the_global_batch():
    ranks = [PromptSampler(20, 8, seed=1, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(5):
        batches = [next(s) for s in ranks]
        assert all(b.indices == batches[0].indices for b in batches)
        shares = [b.local_indices for b in batches]
        assert all(len(x) == 2 for x in shares)
        assert [i for x in shares for i in x] == batches[0].indices


def test_resume_continues_with_the_exact_next_batch():
    ref = PromptSampler(13, 4, seed=3)
    expected = _take(ref, 10)
    for cut in (0, 1, 3, 4, 7):  # inside an epoch and exactly at epoch boundaries
        s = PromptSampler(13, 4, seed=3)
        head = _take(s, cut)
        state = s.state_dict()
        fresh = PromptSampler(13, 4, seed=3, dp_rank=1, dp_size=2)  # DP layout may change on resume
        fresh.load_state_dict(state)
        assert head + _take(fresh, 10 - cut) == expected, cut


def test_bad_arguments_and_mismatched_state():
    with pytest.raises(ValueError, match="divisible"):
        PromptSampler(10, 3, seed=0, dp_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(3, 4, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        PromptSampler(10, 2, seed=0, dp_rank=2, dp_size=2)
    state = PromptSampler(10, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(10, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        PromptSampler(11, 2, seed=0).load_state_dict(state)
