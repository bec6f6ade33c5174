"""Mixed-group assembly, the step batch's selections (mini-batches, compaction), micro-batch tensors and
token-budget packing."""

import random
from dataclasses import replace

import pytest
import torch

from luffy_megatron.train.batch import make_micro_batch
from luffy_megatron.train.samples import Sample, assemble_groups, pack_micro_batches
from luffy_megatron.train.step_batch import StepBatch, compact_batch


def test_assemble_groups_mixes_rollouts_and_trace_copies():
    samples = assemble_groups(
        prompt_indices=[10, 11],
        prompt_ids=[[1, 2], [3]],
        traces=[[7, 8, 9], None],
        rollouts=[[([4], [-0.5], "stop")] * 3, [([5, 6], [-0.1, -0.2], "length")] * 4],
        n_off=1,
    )
    assert [(s.group_id, s.off_policy) for s in samples] == [(0, False)] * 3 + [(0, True)] + [(1, False)] * 4
    trace = samples[3]
    assert trace.response_ids == [7, 8, 9] and trace.rollout_logprobs is None and trace.prompt_index == 10
    assert samples[4].finish_reason == "length" and samples[4].rollout_logprobs == [-0.1, -0.2]


def test_micro_batch_aligns_targets_with_response_tokens():
    s = Sample(0, 0, [1, 2, 3], [4, 5], off_policy=True, advantage=0.5, old_logprobs=[-1.0, -2.0])
    t = Sample(1, 0, [1], [6, 7, 8], off_policy=False, advantage=-1.0, rollout_logprobs=[-0.1, -0.2, -0.3])
    mb = make_micro_batch(StepBatch.from_samples([s, t]), [0, 1], pad_id=0)
    assert mb.tokens.tolist() == [[1, 2, 3, 4, 5], [1, 6, 7, 8, 0]]
    # Position t predicts token t + 1: the response mask marks positions whose target is a response token.
    assert mb.targets[mb.response_mask].tolist() == [4, 5, 6, 7, 8]
    assert mb.response_mask.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    assert mb.off_policy_mask[mb.response_mask].tolist() == [True, True, False, False, False]
    assert mb.advantages[mb.response_mask].tolist() == [0.5, 0.5, -1.0, -1.0, -1.0]
    assert mb.old_logprobs[0][mb.response_mask[0]].tolist() == [-1.0, -2.0]
    assert mb.rollout_logprobs[1][mb.has_rollout_logprobs[1]].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert not mb.has_rollout_logprobs[0].any()


def test_empty_micro_batch_is_fully_masked():
    mb = make_micro_batch(StepBatch.from_samples([]), [], pad_id=0)
    assert mb.tokens.shape == (1, 2) and not mb.response_mask.any()


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("budget", [64, 200, 10_000])
def test_packing_covers_every_sample_once_within_budget(ranks, budget):
    rng = random.Random(budget * 10 + ranks)
    lengths = [rng.randint(5, 60) for _ in range(37)]
    plan = pack_micro_batches(lengths, budget, ranks)
    assert len(plan) == ranks
    assert len({len(p) for p in plan}) == 1, "every rank needs the same number of micro-batches"
    flat = sorted(i for p in plan for mb in p for i in mb)
    assert flat == list(range(len(lengths)))
    for p in plan:
        for mb in p:
            if len(mb) > 1:
                assert len(mb) * max(lengths[i] for i in mb) <= budget
    loads = [sum(lengths[i] for mb in p for i in mb) for p in plan]
    assert max(loads) - min(loads) <= max(lengths), "ranks get balanced token loads"


def test_packing_pads_ranks_with_empty_micro_batches_when_samples_are_scarce():
    plan = pack_micro_batches([10, 10, 10], max_tokens=10, num_ranks=2)
    assert [len(p) for p in plan] == [2, 2]
    assert sorted(i for p in plan for mb in p for i in mb) == [0, 1, 2]


def test_packing_rejects_bad_budget():
    with pytest.raises(ValueError, match="max_tokens"):
        pack_micro_batches([3], 0, 1)


def test_mini_batches_never_split_a_group():
    samples = [Sample(0, g % 6, [1], [2], off_policy=False) for g in range(18)]  # groups interleaved
    batch = StepBatch.from_samples(samples)
    parts = batch.mini_batch_ids(2)
    assert len(parts) == 2
    assert [sorted(set(batch.group_id[p].tolist())) for p in parts] == [[0, 1, 2], [3, 4, 5]]
    assert parts[0].tolist() == [0, 6, 12, 1, 7, 13, 2, 8, 14]  # groups in order, each keeping its samples' order
    assert torch.tensor([len(p) for p in parts]).sum() == len(samples)


def test_compact_samples_merges_identical_samples_and_drops_zero_advantages():
    a = Sample(0, 0, [1, 2], [3, 4], off_policy=False, advantage=-0.25, rollout_logprobs=[-1.0, -2.0])
    same = Sample(0, 0, [1, 2], [3, 4], off_policy=False, advantage=-0.25, rollout_logprobs=[-1.0, -2.0])
    other_response = Sample(0, 0, [1, 2], [3, 5], off_policy=False, advantage=-0.25)
    trace = Sample(0, 0, [1, 2], [3, 4], off_policy=True, advantage=0.75)  # same tokens, but a trace
    other_group = Sample(1, 1, [1, 2], [3, 4], off_policy=False, advantage=0.5)  # same tokens, other advantage
    solved = Sample(2, 2, [9], [8], off_policy=False, advantage=0.0)
    batch = StepBatch.from_samples([a, same, other_response, trace, other_group, solved, replace(solved)])

    kept = compact_batch(batch, drop_zero_advantage=False)
    responses = [kept.tokens[kept.offsets[i] + kept.prompt_lengths[i] : kept.offsets[i + 1]].tolist() for i in range(5)]
    assert list(zip(responses, kept.off_policy.tolist(), kept.advantage.tolist(), kept.multiplicity.tolist())) == [
        ([3, 4], False, -0.25, 2),
        ([3, 5], False, -0.25, 1),
        ([3, 4], True, 0.75, 1),
        ([3, 4], False, 0.5, 1),
        ([8], False, 0.0, 2),
    ]
    assert kept.num_samples == 5 and int(kept.multiplicity.sum()) == batch.num_samples
    assert batch.multiplicity.tolist() == [1] * 7  # the input is left as it was
    assert kept.rollout_logprobs[2:4].tolist() == [-1.0, -2.0]  # the first copy's engine log-probs
    dropped = compact_batch(batch, drop_zero_advantage=True)
    assert dropped.multiplicity.tolist() == [2, 1, 1, 1]
    # Different old log-probs (a later mini-batch epoch) are not merged; merged multiplicities add up.
    x, y = replace(a, old_logprobs=[-1.0, -2.0], multiplicity=2), replace(a, old_logprobs=[-1.0, -2.5])
    assert compact_batch(StepBatch.from_samples([x, y]), drop_zero_advantage=False).num_samples == 2
    assert compact_batch(StepBatch.from_samples([x, x]), drop_zero_advantage=False).multiplicity.tolist() == [4]
    mb = make_micro_batch(kept, [0, 4], pad_id=0)
    assert mb.multiplicity.tolist() == [[2.0] * 4, [2.0] * 4]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # LUFFY: every sample, the trace included, is centred on its group's mean (0.25 and 0.75).
        ({}, [-0.25, -0.25, -0.25, 0.75, 0.25, -0.75, 0.25, 0.25]),
        # on-policy baseline: rollouts centred on their own mean (0 and 2/3), the trace keeps LUFFY's advantage.
        ({"on_policy_baseline": "on_policy_mean"}, [0, 0, 0, 0.75, 1 / 3, -2 / 3, 1 / 3, 0.25]),
        # "RL with SFT loss": statistics over the rollouts only, for every sample.
        ({"sft_loss": True}, [0, 0, 0, 1, 1 / 3, -2 / 3, 1 / 3, 1 / 3]),
        # divided by the unbiased std of each group (0.5 and 0.5) plus eps.
        ({"adv_use_std": True, "adv_eps": 0.0}, [-0.5, -0.5, -0.5, 1.5, 0.5, -1.5, 0.5, 0.5]),
    ],
)
def test_assign_advantages_follows_the_algorithm_config(options: dict, expected: list[float]) -> None:
    """The loop's advantages of two mixed groups (three rollouts + one correct trace each) under each option."""
    from luffy_megatron.config import AlgorithmConfig
    from luffy_megatron.train.producer import assign_advantages

    rollout = ([4], [-0.5], "stop")
    samples = assemble_groups([0, 1], [[1], [2]], [[7], [8]], [[rollout] * 3, [rollout] * 3], n_off=1)
    rewards = [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assign_advantages(AlgorithmConfig(**options), samples, rewards)
    assert [s.reward for s in samples] == rewards
    assert [s.advantage for s in samples] == pytest.approx(expected, abs=1e-12)
