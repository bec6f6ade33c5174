"""GRPO advantages over mixed groups vs a loop re-derivation of verl's grpo / LUFFY's grpo_split estimators."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from luffy_megatron.algo import compute_advantages


def reference_advantages(rewards, index, *, use_std, eps=1e-6, include=None):
    """Loop over samples like verl's compute_grpo_outcome_advantage (include=None) / LUFFY's ..._split."""
    scores = rewards.clone()
    include = [True] * len(rewards) if include is None else include
    by_group = defaultdict(list)
    for i in range(len(rewards)):
        if include[i]:
            by_group[int(index[i])].append(float(rewards[i]))
    mean, std = {}, {}
    for k, v in by_group.items():
        if len(v) == 1:
            mean[k], std[k] = 0.0, 1.0
        else:
            mean[k] = float(torch.tensor(v, dtype=torch.float64).mean())
            std[k] = float(torch.tensor(v, dtype=torch.float64).std())
    for i in range(len(rewards)):
        k = int(index[i])
        scores[i] = (rewards[i] - mean[k]) / (std[k] + eps) if use_std else rewards[i] - mean[k]
    return scores


def test_group_of_eight_only_trace_correct():
    adv = compute_advantages(torch.tensor([0.0, 0, 0, 1, 0, 0, 0, 0]), torch.full((8,), 5))
    expect = torch.full((8,), -1 / 8)
    expect[3] = 7 / 8
    torch.testing.assert_close(adv, expect, rtol=0, atol=0)


@pytest.mark.parametrize("use_std", [False, True])
def test_matches_loop_reference_groups_of_different_sizes(use_std):
    g = torch.Generator().manual_seed(0)
    sizes = [8, 1, 3, 8, 2, 5]
    ids = torch.cat([torch.full((n,), 100 - 7 * i) for i, n in enumerate(sizes)])  # non-contiguous ids
    perm = torch.randperm(len(ids), generator=g)
    ids = ids[perm]
    rewards = torch.randint(0, 2, (len(ids),), generator=g).float()
    rewards[ids == 86] = 1.0  # group of 3 with identical rewards
    rewards[ids == 72] = torch.rand(int((ids == 72).sum()), generator=g)  # non-binary rewards
    adv = compute_advantages(rewards, ids, use_std=use_std)
    ref = reference_advantages(rewards, ids, use_std=use_std)
    torch.testing.assert_close(adv, ref, rtol=1e-6, atol=1e-6)
    assert adv.dtype == rewards.dtype
    assert (adv[ids == 86] == 0).all()  # identical rewards: exactly zero, no NaN
    single = ids == 93  # the group of one: mean 0, std 1
    torch.testing.assert_close(adv[single], rewards[single] / (1 + 1e-6 if use_std else 1))


def test_stat_mask_is_grpo_split():
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    on = torch.tensor([False, True, True, True, False, True, True, True])
    for use_std in (False, True):
        adv = compute_advantages(rewards, ids, use_std=use_std, stat_mask=on)
        torch.testing.assert_close(adv, reference_advantages(rewards, ids, use_std=use_std, include=on.tolist()))
    with pytest.raises(ValueError, match="stat_mask: group 1"):
        compute_advantages(rewards, ids, stat_mask=ids == 0)


def test_identical_rewards_zero_with_std_and_empty_input():
    for r in (0.0, 1.0, 0.1, 0.3):
        adv = compute_advantages(torch.full((7,), r), torch.zeros(7, dtype=torch.long), use_std=True)
        assert torch.isfinite(adv).all() and (adv == 0).all()
    assert compute_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_bad_input():
    with pytest.raises(ValueError, match="rewards: expected a 1-D float"):
        compute_advantages(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids: expected an integer"):
        compute_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="group_ids: shape"):
        compute_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="stat_mask: expected a bool"):
        compute_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), stat_mask=torch.ones(3))
    with pytest.raises(ValueError, match="rewards: 1 non-finite"):
        compute_advantages(torch.tensor([0.0, float("nan"), 1.0]), torch.zeros(3, dtype=torch.long))


def test_on_policy_baseline_centres_on_policy_samples_on_their_own_mean():
    # Group 0: three failed rollouts next to a correct trace (LUFFY's common case). Group 1: one rollout solved it.
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    off = torch.tensor([True, False, False, False, True, False, False, False])
    adv = compute_advantages(rewards, ids, baseline_mask=~off)
    expect = torch.tensor([3 / 4, 0, 0, 0, 1 / 2, 2 / 3, -1 / 3, -1 / 3])
    torch.testing.assert_close(adv, expect, rtol=0, atol=1e-12)
    assert (adv[1:4] == 0).all()  # exactly: no shared advantage when every rollout failed
    luffy = compute_advantages(rewards, ids, use_std=True)
    scaled = compute_advantages(rewards, ids, use_std=True, baseline_mask=~off)
    assert torch.equal(scaled[off], luffy[off])  # traces keep LUFFY's advantage
    std = torch.tensor([0.5, 0.5773502691896258])  # the whole group's, as LUFFY's
    torch.testing.assert_close(scaled[~off], expect[~off] / (std[ids[~off]] + 1e-6))
    with pytest.raises(ValueError, match="baseline_mask: shape"):
        compute_advantages(rewards, ids, baseline_mask=~off[:4])


def _expected_on_policy_gradient(mu, logits, trace_reward, own_baseline):
    """Exact E over m = 3 rollouts y_i ~ mu of sum_i A_i * d log pi(y_i) / d logits, one-token responses with
    reward REWARD[y], in a group with one trace of reward ``trace_reward`` (every outcome enumerated)."""
    pi = torch.softmax(logits, 0)
    reward = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    off = torch.tensor([True, False, False, False])
    grad = torch.zeros_like(logits)
    for ys in itertools.product(range(len(reward)), repeat=3):
        rewards = torch.cat([torch.tensor([trace_reward], dtype=torch.float64), reward[list(ys)]])
        adv = compute_advantages(
            rewards, torch.zeros(4, dtype=torch.long), baseline_mask=~off if own_baseline else None
        )
        p = float(mu[list(ys)].prod())
        for a, y in zip(adv[1:].tolist(), ys):
            grad += p * a * (torch.nn.functional.one_hot(torch.tensor(y), len(reward)).double() - pi)
    return grad


def test_on_policy_baseline_keeps_the_expected_gradient_and_drops_the_traces_share_under_staleness():
    """Fresh rollouts: both baselines give the same expected on-policy gradient up to the factor (1 - 1/m) / (1 - 1/n)
    of each sample's own reward in its baseline (m = 3 rollouts, n = 4 samples). Stale rollouts (mu != pi, no
    rollout IS): LUFFY's gradient moves with the trace's reward by -(m / n) (mu - pi), the on-policy baseline's not."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, generator=g, dtype=torch.float64)
    pi = torch.softmax(logits, 0)
    fresh = [_expected_on_policy_gradient(pi, logits, 1.0, b) for b in (False, True)]
    assert fresh[0].abs().max() > 1e-3
    torch.testing.assert_close(fresh[1], fresh[0] * (1 - 1 / 3) / (1 - 1 / 4), rtol=1e-12, atol=1e-14)
    mu = torch.softmax(logits + torch.randn(5, generator=g, dtype=torch.float64), 0)
    group = [_expected_on_policy_gradient(mu, logits, t, False) for t in (0.0, 1.0)]
    own = [_expected_on_policy_gradient(mu, logits, t, True) for t in (0.0, 1.0)]
    torch.testing.assert_close(group[1] - group[0], -(3 / 4) * (mu - pi), rtol=1e-12, atol=1e-14)
    assert (group[1] - group[0]).abs().max() > 1e-2
    torch.testing.assert_close(own[1], own[0], rtol=0, atol=1e-15)
