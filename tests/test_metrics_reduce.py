"""How the update's metrics combine: every metric is declared once with its reduction, the loss emits each the way
its declaration says, and two mini-batches through the real policy give the step's maximum, sums and means."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from luffy_megatron.algo import GlobalCounts, MetricSums, micro_batch_loss, mixed_policy_loss
from luffy_megatron.config import AlgorithmConfig, RolloutIS, choices
from luffy_megatron.metrics.reduce import METRIC_REDUCTIONS, Reduce, reduce_mini_batches
from luffy_megatron.train.batch import FlatMicroBatch, pack_micro_batch
from luffy_megatron.train.samples import Sample
from luffy_megatron.train.step_batch import StepBatch
from tests.dist_utils import run_distributed
from tests.fixtures_models import tiny_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "luffy_megatron"


def test_two_mini_batches_give_the_steps_maximum_and_totals():
    step = reduce_mini_batches(
        {
            "rollout_is/ratio_max": [3.0, 7.5],
            "train_rollout_logprob_gap_max": [2e-6, 1e-6],
            "trained_samples": [4.0, 5.0],
            "update_skipped": [0.0, 1.0],
            "actor/loss": [1.0, 3.0],
        }
    )
    assert step == {
        "rollout_is/ratio_max": 7.5,
        "train_rollout_logprob_gap_max": 2e-6,
        "trained_samples": 9.0,
        "update_skipped": 1.0,
        "actor/loss": 2.0,
    }


def test_a_metric_without_a_declared_reduction_is_an_error():
    with pytest.raises(KeyError, match=r"METRIC_REDUCTIONS: \['made_up'\]"):
        reduce_mini_batches({"actor/loss": [1.0], "made_up": [2.0]})


def _micro_batch(vocab: int = 40) -> tuple[FlatMicroBatch, list[Sample]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, n in enumerate([4, 9, 2, 7]):
        response = torch.randint(0, vocab, (n,), generator=g).tolist()
        rollout = None if i == 0 else (-torch.rand(n, generator=g)).tolist()
        old = (-torch.rand(n, generator=g)).tolist()
        samples.append(Sample(i, 0, [1, 2, 3], response, i == 0, "stop", rollout, 1.0, float(i) - 1.5, old))
    return pack_micro_batch(StepBatch.from_samples(samples), list(range(4)), pad_id=0), samples


def _emitted(sums: MetricSums) -> dict[str, Reduce]:
    kinds = [(sums.sums, Reduce.MEAN), (sums.totals, Reduce.SUM), (sums.maxes, Reduce.MAX)]
    return {name: kind for table, kind in kinds for name in table}


def test_every_metric_the_loss_emits_is_declared_as_it_combines():
    """Every switch that adds a metric, through the trainer's micro-batch loss (and the KL terms, which only the bare
    loss takes): each name is declared, and combined within an optimiser step as its declaration says."""
    mb, samples = _micro_batch()
    logits = torch.randn(mb.targets.numel(), 40)
    logp = torch.log_softmax(logits, -1).gather(1, mb.targets[:, None]).squeeze(1)
    counts = GlobalCounts(sum(len(s.response_ids) for s in samples), 4, len(samples[0].response_ids))
    base = AlgorithmConfig(off_policy_max_clamp=0.9, off_policy_min_clamp=0.01)
    configs = [base, replace(base, sft_loss=True)] + [replace(base, rollout_is=m) for m in choices(RolloutIS)]
    emitted: dict[str, Reduce] = {}
    for cfg in configs:
        _, sums = micro_batch_loss(mb, logp, -logp, cfg, counts, max_response_length=16, use_old_logprobs=True)
        emitted.update(_emitted(sums))
    kl = replace(base, kl_coeff=0.1)
    weights = mb.response_mask.float()
    _, sums = mixed_policy_loss(
        logp,
        logp,
        mb.advantages,
        mb.response_mask,
        mb.off_policy_mask,
        kl,
        token_weights=weights,
        entropy=-logp,
        ref_log_prob=logp - 0.1,
    )
    emitted.update(_emitted(sums))
    undeclared = sorted(set(emitted) - set(METRIC_REDUCTIONS))
    assert undeclared == [], f"declare these in luffy_megatron.metrics.reduce.METRIC_REDUCTIONS: {undeclared}"
    declared = {k: r.optimiser_step for k, r in METRIC_REDUCTIONS.items()}
    assert {k: (kind, declared[k]) for k, kind in emitted.items() if kind != declared[k]} == {}
    # The rest are the optimiser step's own values (grad_norm, lr, ...), one per step.
    assert {k for k, kind in declared.items() if kind is not None} == set(emitted)


def test_every_declared_metric_is_one_the_trainer_emits():
    source = "\n".join(p.read_text() for p in [*(PACKAGE / "train").glob("*.py"), *(PACKAGE / "algo").glob("*.py")])
    missing = [name for name in METRIC_REDUCTIONS if f'"{name}"' not in source]
    assert missing == [], f"not emitted by the trainer: {missing}"


def two_mini_batches(rank: int, world: int, hf_dir: str) -> dict:
    """The loop's update of one rollout batch of two mini-batches at DP = 2, with several micro-batches per rank;
    the first mini-batch holds a sample that the engine found far less likely than the policy does."""
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.metrics.logger import Timers
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.train.loop import update_policy
    from luffy_megatron.train.policy import MegatronPolicy

    setup_platform()
    init_model_parallel(1, 1, None, seed=1)
    overrides = [
        f"model.hf_path={hf_dir}",
        "model.dtype=float32",
        "parallel.max_tokens_per_micro_batch=40",
        "data.train_batch_size=4",
        "data.mini_batch_size=2",
        "data.max_response_length=16",
        "algorithm.rollout_is=token_tis",
        "algorithm.debug_checks=true",
        "optimizer.lr=1e-2",
    ]
    cfg = load_config(None, overrides)
    spec = model_spec(read_hf_config(hf_dir), 1)
    policy = MegatronPolicy(cfg, spec, pad_id=0)
    load_hf_weights(policy.modules, spec, hf_dir)
    g = torch.Generator().manual_seed(5)
    samples = []
    for group in range(4):
        for j in range(4):
            response = torch.randint(1, spec.vocab_size, (int(torch.randint(3, 12, (), generator=g)),), generator=g)
            rollout = [-30.0 if (group, j) == (0, 1) else -0.5] * len(response) if j < 3 else None
            advantage = float(torch.randn((), generator=g))
            prompt = [1, 2, 3, 4]
            samples.append(Sample(group, group, prompt, response.tolist(), j == 3, "stop", rollout, 0.0, advantage))
    per_mini_batch: list[dict[str, float]] = []
    train = policy.train_mini_batch

    def recorded(mb: StepBatch, use_old_logprobs: bool) -> dict[str, float]:
        per_mini_batch.append(train(mb, use_old_logprobs=use_old_logprobs))
        return per_mini_batch[-1]

    policy.train_mini_batch = recorded
    batch = StepBatch.from_samples(samples)
    step = update_policy(cfg, policy, batch, Timers())
    corrected = batch.response_token_mask() & batch.has_rollout_logprobs[batch.token_sample()]
    ratios = torch.exp(batch.old_logprobs - batch.rollout_logprobs)[corrected]
    top = MetricSums()
    top.add_max("rank", torch.tensor(float(rank)))
    return {
        "step": step,
        "per_mini_batch": per_mini_batch,
        "ratio_max": ratios.max().item(),
        "rank_max": top.all_reduce().compute(),
    }


@pytest.mark.slow
def test_two_mini_batches_through_the_policy_give_the_steps_maximum():
    ranks = run_distributed(two_mini_batches, 2, str(tiny_checkpoint("llama")), timeout_s=300)
    assert ranks[0]["step"] == ranks[1]["step"]
    step, first, second = ranks[0]["step"], *ranks[0]["per_mini_batch"]
    # The largest ratio of the step: over every token of every micro-batch of both ranks and both mini-batches.
    assert first["rollout_is/ratio_max"] > 1e6 > second["rollout_is/ratio_max"]
    assert step["rollout_is/ratio_max"] == first["rollout_is/ratio_max"]
    assert step["rollout_is/ratio_max"] == pytest.approx(ranks[0]["ratio_max"], rel=1e-6)
    # The policy moves only after the first optimiser step: the second mini-batch holds the step's largest shift.
    assert first["policy_shift_max"] < 1e-5 < second["policy_shift_max"]
    assert step["actor/policy_shift_max"] == second["policy_shift_max"]
    # Counts add up; losses, token means and the gradient norm are the mean over the optimiser steps.
    assert step["actor/trained_samples"] == first["trained_samples"] + second["trained_samples"] == 16
    assert step["actor/response_tokens"] == first["actor/response_tokens"] + second["actor/response_tokens"]
    assert step["actor/grad_norm"] == (first["grad_norm"] + second["grad_norm"]) / 2
    for name in ("actor/loss", "actor/entropy", "rollout_is/weight_mean"):
        assert step[name] == (first[name] + second[name]) / 2
    # MetricSums.all_reduce takes the maximum over ranks.
    assert [r["rank_max"] for r in ranks] == [{"rank": 1.0}] * 2
