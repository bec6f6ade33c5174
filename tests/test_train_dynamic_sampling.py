"""Dynamic sampling: the signal rule and its switch, refilling over rounds, group renumbering, metrics."""

from __future__ import annotations

import pytest

from luffy_megatron.train.dynamic_sampling import collect_groups, has_signal, round_seed
from luffy_megatron.train.samples import Sample


def _group(gid: int, on_rewards: list[float], trace_reward: float | None = None, prompt: int = 0) -> list[Sample]:
    out = [Sample(prompt, gid, [5, 6], [7, 1], False, reward=r) for r in on_rewards]
    if trace_reward is not None:
        out.append(Sample(prompt, gid, [5, 6], [8, 1], True, reward=trace_reward))
    return out


def test_signal_rule_and_the_trace_switch() -> None:
    seven_failures_correct_trace = _group(0, [0.0] * 7, trace_reward=1.0)
    assert not has_signal(seven_failures_correct_trace, "on_policy")
    assert has_signal(seven_failures_correct_trace, "group")
    all_correct = _group(0, [1.0] * 7, trace_reward=1.0)
    assert not has_signal(all_correct, "on_policy") and not has_signal(all_correct, "group")
    mixed = _group(0, [1.0, 0.0, 0.0], trace_reward=1.0)
    assert has_signal(mixed, "on_policy") and has_signal(mixed, "group")
    assert has_signal(_group(0, [0.0, 0.5]), "on_policy")  # no trace: both rules are DAPO's
    with pytest.raises(ValueError, match="'trace' is not one of"):
        has_signal(mixed, "trace")


def _rounds(plan: list[list[bool]]):
    """A fake generation: round k has one group per entry of plan[k], with signal where True (prompt = 100k + g)."""
    calls: list[int] = []

    def draw(k: int):
        calls.append(k)
        samples: list[Sample] = []
        for g, signal in enumerate(plan[k]):
            samples += _group(g, [1.0, 0.0] if signal else [0.0, 0.0], trace_reward=1.0, prompt=100 * k + g)
        return samples, {"rollout/samples_generated": 2.0 * len(plan[k])}

    return draw, calls


def test_refills_until_full_then_cuts_to_the_batch_and_renumbers() -> None:
    draw, calls = _rounds([[True, False, False, True], [False, True, True, False], [True] * 4])
    samples, m = collect_groups(draw, target=4, max_rounds=5, signal="on_policy")
    assert calls == [0, 1]  # two rounds give 4 groups with signal: the third never runs
    assert sorted({s.group_id for s in samples}) == [0, 1, 2, 3]
    assert [s.prompt_index for s in samples if not s.off_policy][::2] == [0, 3, 101, 102]
    assert all(has_signal([s for s in samples if s.group_id == g], "on_policy") for g in range(4))
    assert m == {
        "rollout/samples_generated": 16.0,
        "dynamic_sampling/groups_filtered": 4.0,
        "dynamic_sampling/rounds": 2.0,
        "dynamic_sampling/prompts_consumed": 8.0,
        "dynamic_sampling/groups_padded": 0.0,
    }
    # More than needed in the last round: cut to the batch size.
    draw, _ = _rounds([[True, False, False, False], [True] * 4])
    samples, m = collect_groups(draw, target=4, max_rounds=5, signal="on_policy")
    assert len({s.group_id for s in samples}) == 4 and m["dynamic_sampling/rounds"] == 2.0


def test_round_cap_tops_up_with_filtered_groups_of_the_last_round() -> None:
    draw, calls = _rounds([[False, False, True, False], [False, False, False, False], [True] * 4])
    samples, m = collect_groups(draw, target=4, max_rounds=2, signal="on_policy")
    assert calls == [0, 1]
    assert m["dynamic_sampling/groups_padded"] == 3.0 and m["dynamic_sampling/groups_filtered"] == 7.0
    assert sorted({s.group_id for s in samples}) == [0, 1, 2, 3]
    assert [s.prompt_index for s in samples if not s.off_policy][::2] == [2, 100, 101, 102]
    # With the trace counted, every one of these groups (failed rollouts, correct trace) has signal.
    draw, calls = _rounds([[False, False, True, False]])
    _, m = collect_groups(draw, target=4, max_rounds=2, signal="group")
    assert calls == [0] and m["dynamic_sampling/groups_filtered"] == 0.0


def test_each_round_has_its_own_seed_and_round_zero_keeps_the_steps() -> None:
    base = 1 * 1_000_003 + 7
    seeds = [round_seed(base, k) for k in range(4)]
    assert seeds[0] == base and len(set(seeds)) == 4
    assert round_seed(base + 1, 1) != seeds[1]
