"""One policy update at every parallel layout gives the same gradients, loss and updated weights.

The same tiny HF checkpoint and the same global mini-batch are trained at (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1),
(1,1,2), with interleaved virtual pipeline stages (PP=2 x VPP=2) and with several micro-batch budgets; grad norm,
loss and the log-probs after the optimiser step must agree (fp32).
"""

from __future__ import annotations

import random

import pytest

from tests.dist_utils import run_distributed
from tests.fixtures_models import tiny_checkpoint

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
        "optimizer.lr=1e-2",
        "data.max_response_length=16",
    ]
    if vpp:
        overrides.append(f"parallel.vpp={vpp}")
    cfg = load_config(None, overrides)
    spec = model_spec(read_hf_config(hf_dir), tp)
    policy = MegatronPolicy(cfg, spec, pad_id=0)
    load_hf_weights(policy.modules, spec, hf_dir)
    samples = make_samples(spec.vocab_size)
    before = policy.compute_logprobs(samples)
    metrics = policy.train_mini_batch(samples, use_old_logprobs=False)
    after = policy.compute_logprobs(samples)
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
    samples = make_samples(spec.vocab_size, seed=3)
    # Old log-probs from the starting policy: the on-policy ratio moves too (PPO-style epochs on one batch).
    for s, lp in zip(samples, policy.compute_logprobs(samples)):
        s.old_logprobs = lp
    return [policy.train_mini_batch(samples, use_old_logprobs=True) for _ in range(8)]
