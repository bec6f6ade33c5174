"""One policy update at every parallel layout gives the same gradients, loss and updated weights.

The same tiny HF checkpoint and the same global mini-batch are trained at (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1),
(1,1,2), with interleaved virtual pipeline stages (PP=2 x VPP=2) and with several micro-batch budgets; grad norm,
loss and the log-probs after the optimiser step must agree (fp32).
"""

from __future__ import annotations

import random

import pytest

from luffy_megatron.train.step_batch import StepBatch
from tests.dist_utils import run_distributed
from tests.fixtures_models import tiny_checkpoint
from tests.test_train_packed import response_logprobs

pytestmark = pytest.mark.slow
REL_TOL = 1e-5


def make_samples(vocab: int, seed: int = 0):
    from luffy_megatron.train.samples import Sample

    rng = random.Random(seed)
    samples = []
    for g in range(4):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 7))]
        for j in range(4):
            off = j == 3
            response = [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]
            reward = 1.0 if (off or rng.random() < 0.3) else 0.0
            samples.append(Sample(g, g, prompt, response, off_policy=off, reward=reward))
    import torch

    from luffy_megatron.algo import compute_advantages

    adv = compute_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([s.group_id for s in samples]))
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return samples


def train_once(rank: int, world: int, hf_dir: str, tp: int, pp: int, vpp: int | None, budget: int, mode: str):
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.train.policy import MegatronPolicy

    setup_platform()
    init_model_parallel(tp, pp, vpp, seed=1)
    overrides = [
        f"model.hf_path={hf_dir}",
        "model.dtype=float32",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.max_tokens_per_micro_batch={budget}",
        f"algorithm.loss_agg_mode={mode}",
        "algorithm.entropy_coeff=0.01",
        "algorithm.debug_checks=true",
        "optimizer.lr=1e-2",
        "data.max_response_length=16",
    ]
    if vpp:
        overrides.append(f"parallel.vpp={vpp}")
    cfg = load_config(None, overrides)
    spec = model_spec(read_hf_config(hf_dir), tp)
    policy = MegatronPolicy(cfg, spec, pad_id=0)
    load_hf_weights(policy.modules, spec, hf_dir)
    batch = StepBatch.from_samples(make_samples(spec.vocab_size))
    before = response_logprobs(policy, batch)
    metrics = policy.train_mini_batch(batch, use_old_logprobs=False)
    after = response_logprobs(policy, batch)
    return {"metrics": metrics, "before": before, "after": after}


LAYOUTS = {
    "tp1": (1, 1, 1, None, 10_000),
    "tp1_microbatched": (1, 1, 1, None, 40),
    "tp2": (2, 2, 1, None, 10_000),
    "pp2": (2, 1, 2, None, 60),
    "dp2": (2, 1, 1, None, 60),
    "pp2_vpp2": (2, 1, 2, 2, 60),
}


@pytest.fixture(scope="module")
def results():
    hf_dir = str(tiny_checkpoint("llama"))  # 4 layers, 4 heads: divisible by every layout here
    out = {}
    for name, (world, tp, pp, vpp, budget) in LAYOUTS.items():
        out[name] = run_distributed(train_once, world, hf_dir, tp, pp, vpp, budget, "seq_mean_token_mean")[0]
    return out


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "tp1"])
def test_update_matches_single_process(results, layout):
    ref, got = results["tp1"], results[layout]
    for key in ("grad_norm", "actor/loss", "actor/entropy"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=REL_TOL), key
    for a, b in zip(ref["before"], got["before"]):
        assert b == pytest.approx(a, abs=1e-5)
    for a, b in zip(ref["after"], got["after"]):
        assert b == pytest.approx(a, abs=1e-4)
    # The update moved the weights (the comparison above is not vacuous).
    assert max(abs(x - y) for a, b in zip(ref["before"], ref["after"]) for x, y in zip(a, b)) > 1e-3


def test_loss_falls_on_a_fixed_batch():
    hf_dir = str(tiny_checkpoint("llama"))
    [history] = run_distributed(train_repeatedly, 1, hf_dir)
    losses = [m["actor/pg_loss"] for m in history]
    probs = [m["actor/off_policy_prob"] for m in history]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses
    assert probs[-1] > 1.5 * probs[0], probs  # the correct traces become more likely


def train_repeatedly(rank: int, world: int, hf_dir: str) -> list[dict]:
    """Eight updates on one batch whose traces are correct: the mixed-policy loss must fall."""
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.train.policy import MegatronPolicy

    setup_platform()
    init_model_parallel(1, 1, None, seed=1)
    cfg = load_config(
        None,
        [
            f"model.hf_path={hf_dir}",
            "model.dtype=float32",
            "optimizer.lr=1e-2",
            "data.max_response_length=16",
            "algorithm.loss_agg_mode=token_mean",
        ],
    )
    spec = model_spec(read_hf_config(hf_dir), 1)
    policy = MegatronPolicy(cfg, spec, pad_id=0)
    load_hf_weights(policy.modules, spec, hf_dir)
    batch = StepBatch.from_samples(make_samples(spec.vocab_size, seed=3))
    # Old log-probs from the starting policy: the on-policy ratio moves too (PPO-style epochs on one batch).
    batch.old_logprobs = policy.compute_logprobs(batch)
    return [policy.train_mini_batch(batch, use_old_logprobs=True) for _ in range(8)]


def make_redundant_samples(vocab: int):
    """Four groups: solved by all (advantage 0), one with repeated wrong answers and a trace, one never solved and
    without a trace (advantage 0), one with a repeated right answer."""
    import torch

    from luffy_megatron.algo import compute_advantages
    from luffy_megatron.train.samples import Sample

    rng = random.Random(7)

    def seq(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    samples = []
    for g, (responses, rewards, has_trace) in enumerate(
        [
            ([seq(5), seq(6), seq(4)], [1, 1, 1], True),
            ([(r := seq(7)), r, seq(3)], [0, 0, 0], True),
            ([(r := seq(6)), r, seq(8), seq(2)], [0, 0, 0, 0], False),
            ([(r := seq(5)), r, seq(9)], [1, 1, 0], True),
        ]
    ):
        prompt = seq(4)
        for resp, reward in zip(responses, rewards):
            logprobs = [-0.5 - 0.1 * t for t in range(len(resp))]
            samples.append(Sample(g, g, prompt, list(resp), False, reward=reward, rollout_logprobs=logprobs))
        if has_trace:
            samples.append(Sample(g, g, prompt, seq(6), True, reward=1.0))
    adv = compute_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([s.group_id for s in samples]))
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return samples


def train_redundant(rank: int, world: int, hf_dir: str, variant: str):
    """One update on :func:`make_redundant_samples`: ``compact`` (the default), ``dedup_only`` (zero-advantage
    samples kept), ``reference`` (every copy trained, compaction disabled); ``all_zero[_reference]``: every
    advantage 0."""
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.train import policy as policy_module

    setup_platform()
    init_model_parallel(1, 1, None, seed=1)
    overrides = [
        f"model.hf_path={hf_dir}",
        "model.dtype=float32",
        "algorithm.entropy_coeff=0.0",
        "optimizer.lr=1e-2",
        "data.max_response_length=16",
        "parallel.max_tokens_per_micro_batch=40",
        f"algorithm.skip_zero_advantage={variant != 'dedup_only'}",
    ]
    compact = policy_module.compact_batch
    if variant.endswith("reference"):  # undone below: the next test body may run in this process
        policy_module.compact_batch = lambda batch, drop_zero_advantage: batch
    try:
        return _train_redundant_variant(hf_dir, variant, overrides)
    finally:
        policy_module.compact_batch = compact


def _train_redundant_variant(hf_dir: str, variant: str, overrides: list[str]) -> dict:
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.train import policy as policy_module

    cfg = load_config(None, overrides)
    spec = model_spec(read_hf_config(hf_dir), 1)
    policy = policy_module.MegatronPolicy(cfg, spec, pad_id=0)
    load_hf_weights(policy.modules, spec, hf_dir)
    samples = make_redundant_samples(spec.vocab_size)
    if variant.startswith("all_zero"):  # nothing carries gradient: no forward, the optimizer still steps
        for s in samples:
            s.advantage = 0.0
    if variant == "nan":  # one sample's loss is NaN; debug_checks is off, so only the per-step check can see it
        samples[-1].advantage = float("nan")
    batch = StepBatch.from_samples(samples)
    before = response_logprobs(policy, batch)
    try:
        metrics = policy.train_mini_batch(batch, use_old_logprobs=False)
    except FloatingPointError as e:
        metrics = {"error": str(e)}
    return {"metrics": metrics, "before": before, "after": response_logprobs(policy, batch)}


@pytest.fixture(scope="module")
def redundant_results():
    hf_dir = str(tiny_checkpoint("llama"))
    variants = {"reference": 1, "dedup_only": 1, "compact": 1, "compact_dp2": 2, "all_zero": 1, "all_zero_reference": 1}
    variants.update(nan=1, nan_dp2=2)
    results = {}
    for name, world in variants.items():
        ranks = run_distributed(train_redundant, world, hf_dir, name.removesuffix("_dp2"))
        results[name], results[name + "/ranks"] = ranks[0], ranks
    return results


def test_merging_and_skipping_samples_keeps_the_update(redundant_results):
    ref = redundant_results["reference"]
    assert ref["metrics"]["trained_samples"] == 16
    assert redundant_results["dedup_only"]["metrics"]["trained_samples"] == 13  # three repeated responses merged
    assert redundant_results["compact"]["metrics"]["trained_samples"] == 6  # and two zero-advantage groups left out
    for name in ("dedup_only", "compact", "compact_dp2"):
        got = redundant_results[name]
        for key in ("grad_norm", "actor/loss", "actor/pg_loss"):
            assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=REL_TOL), (name, key)
        for a, b in zip(ref["after"], got["after"]):
            assert b == pytest.approx(a, abs=1e-5), name
    # Merged copies count with their multiplicity in every token metric.
    for key in (
        "actor/entropy",
        "actor/off_policy_prob",
        "actor/on_pg_loss",
        "actor/ppo_kl",
        "actor/response_tokens",
        "train_rollout_logprob_gap",
    ):
        assert redundant_results["dedup_only"]["metrics"][key] == pytest.approx(ref["metrics"][key], rel=REL_TOL), key
    assert ref["metrics"]["grad_norm"] > 0


def test_a_step_without_gradient_runs_no_forward_and_keeps_the_weights(redundant_results):
    got = redundant_results["all_zero"]
    assert got["metrics"]["trained_samples"] == 0
    assert got["metrics"]["grad_norm"] == 0.0 and got["metrics"]["actor/loss"] == 0.0
    assert "actor/entropy" not in got["metrics"]  # no token was trained, so no token metric is logged
    # The optimizer still steps (weight decay moves the weights) exactly as after a zero-gradient backward pass.
    ref = redundant_results["all_zero_reference"]
    assert ref["metrics"]["trained_samples"] == 16 and ref["metrics"]["grad_norm"] == 0.0
    assert got["after"] == ref["after"] and got["after"] != got["before"]


def test_a_nan_loss_stops_every_rank_before_the_update(redundant_results):
    """With ``algorithm.debug_checks`` off no micro-batch syncs with the host, yet a NaN loss (one sample's advantage)
    is found once per step, on every rank (only one DP rank holds the sample), before the weights change."""
    for name in ("nan/ranks", "nan_dp2/ranks"):
        for rank in redundant_results[name]:
            assert rank["metrics"]["error"].startswith("1 micro-batch loss(es) of this step are NaN/inf"), rank
            assert rank["after"] == rank["before"]
