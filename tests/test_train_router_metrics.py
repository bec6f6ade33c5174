"""Router metrics of an MoE update (``train.router_metrics``): expert load shares and the auxiliary loss.

By hand: with routing forced through megatron's router replay, two right-padded samples of 3 and 5 tokens give the
shares a count of their real tokens gives (the padding routed too, but not counted); unforced, the shares equal a
count from the router's own top-k of its inputs, and ``moe/aux_loss`` the Switch loss recomputed from them. Across
layouts, on LUFFY's length mix, packed and padded: the shares at DP2, EP2, PP2 and TP2 (SP) equal one rank's; the
auxiliary loss (per micro-batch, padding included) at EP2 equals EP1 on the same ranks, and at PP2 one rank's with the
same packed micro-batches. A dense model reports none of them. (EP2 x PP2: tests/test_train_ep.py.)
"""

from __future__ import annotations

import pytest
import torch

from luffy_megatron.metrics.reduce import reduce_mini_batches
from luffy_megatron.train.batch import flatten_padded, make_micro_batch, pack_micro_batch
from luffy_megatron.train.router_metrics import load_metrics, real_tokens, router_order
from luffy_megatron.train.samples import Sample
from luffy_megatron.train.step_batch import StepBatch
from tests.dist_utils import run_distributed
from tests.fixtures_models import tiny_checkpoint
from tests.test_train_packed import luffy_like_samples, update_overrides

EXPERTS, TOPK = 4, 2
# name: (world, tp, pp, ep)
LAYOUTS = {"single": (1, 1, 1, 1), "dp2": (2, 1, 1, 1), "ep2": (2, 1, 1, 2), "pp2": (2, 1, 2, 1), "tp2": (2, 2, 1, 1)}


def _two_samples() -> StepBatch:
    """Samples of 3 and 5 tokens (right-padded: 2 padding tokens after the first)."""
    return StepBatch.from_samples(
        [
            Sample(0, 0, [5, 6], [7], False, rollout_logprobs=[-1.0], advantage=1.0),
            Sample(1, 0, [8, 9], [10, 11, 12], False, rollout_logprobs=[-1.0] * 3, advantage=-1.0),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# Without processes
def test_real_tokens_in_the_routers_order():
    batch = _two_samples()
    padded = flatten_padded(make_micro_batch(batch, [0, 1], pad_id=0))  # [2, 5]
    real = real_tokens(padded, batch.lengths)
    assert real.view(2, 5).tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    # sequence-first: position s of row b is s * 2 + b
    assert router_order(real, (2, 5), 1, 0).tolist() == [True, True] * 3 + [False, True] * 2
    packed = pack_micro_batch(batch, [1, 0], pad_id=0, alignment=5)  # 5 + 3 tokens padded to 10
    real = real_tokens(packed, batch.lengths)
    assert real.tolist() == [True] * 8 + [False] * 2
    assert router_order(real, (1, 10), 2, 1).tolist() == [True] * 3 + [False] * 2  # the second half of the sequence


def test_shares_from_counts_by_hand():
    sums = torch.tensor([[3.0, 1, 0, 4, 0.9, 2], [2, 2, 2, 2, 0.3, 2]], dtype=torch.float64)
    out = load_metrics(sums, experts=4, aux_loss_on=True)
    assert out == {
        "moe/expert_load_max_share": 0.5,
        "moe/expert_load_min_share": 0.0,
        "moe/layer0/expert_load_max_share": 0.5,
        "moe/layer0/expert_load_min_share": 0.0,
        "moe/layer1/expert_load_max_share": 0.25,
        "moe/layer1/expert_load_min_share": 0.25,
        "moe/aux_loss": pytest.approx((0.9 / 2 + 0.3 / 2) / 2),
    }
    assert "moe/aux_loss" not in load_metrics(sums, experts=4, aux_loss_on=False)
    # over the optimiser steps of an RL step: the worst step's shares, the mean loss
    per_step = {"moe/layer1/expert_load_max_share": [0.3, 0.5], "moe/expert_load_min_share": [0.2, 0.1]}
    step = reduce_mini_batches(per_step)
    assert step == {"moe/layer1/expert_load_max_share": 0.5, "moe/expert_load_min_share": 0.1}


# ----------------------------------------------------------------------------------------------------------------
# One rank, by hand
def _policy(hf_dir: str, tp: int, pp: int, ep: int, pack: bool, *extra: str):
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel
    from luffy_megatron.train.policy import MegatronPolicy

    init_model_parallel(tp, pp, None, seed=1, ep=ep)
    spec = model_spec(read_hf_config(hf_dir), tp)
    cfg = load_config(None, update_overrides(hf_dir, tp, pp, pack, f"parallel.ep={ep}", *extra))
    policy = MegatronPolicy(cfg, spec, pad_id=0)
    load_hf_weights(policy.modules, spec, hf_dir)
    return policy


def _routers(policy) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for c in policy.modules for m in c.modules() if isinstance(m, TopKRouter)]


def forced_routing(policy, batch: StepBatch) -> dict[str, float]:
    """One update whose routing is forced (one micro-batch of rows [2, 5], router order s * 2 + b): layer 0 sends
    every token to experts 0 and 1, layer 1 the first row's tokens to 0 and 1 and the second's to 2 and 3."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    row = torch.arange(10) % 2
    forced = [torch.tensor([[0, 1]] * 10), torch.stack([2 * row, 2 * row + 1], 1)]
    for router, indices in zip(_routers(policy), forced):
        router.router_replay = RouterReplay()
        router.router_replay.set_target_indices(indices)
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        return policy.train_mini_batch(batch, use_old_logprobs=True)
    finally:
        for router in _routers(policy):
            router.router_replay = None
        RouterReplay.clear_global_router_replay_instances()


def direct_count(policy, batch: StepBatch) -> tuple[dict[str, float], list, list]:
    """One update with the routers' inputs recorded: the metrics, and per layer the inputs and real-token masks of
    every micro-batch (right-padded rows) in the router's order."""
    inputs: list[list[torch.Tensor]] = [[], []]
    masks: list[torch.Tensor] = []
    hooks = [
        r.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach().clone()))
        for i, r in enumerate(_routers(policy))
    ]
    before = policy.router_load.before_forward

    def record(chunk, mb):
        masks.append(router_order(real_tokens(mb, batch.lengths), tuple(mb.tokens.shape), 1, 0))
        before(chunk, mb)

    policy.router_load.before_forward = record
    try:
        metrics = policy.train_mini_batch(batch, use_old_logprobs=True)
    finally:
        policy.router_load.before_forward = before
        for h in hooks:
            h.remove()
    return metrics, inputs, masks


def by_hand(rank: int, world: int, hf_dir: str, dense_dir: str) -> dict:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    policy = _policy(hf_dir, 1, 1, 1, False)
    forced = forced_routing(policy, _two_samples())
    # unforced, several micro-batches of right-padded rows
    small = _policy(hf_dir, 1, 1, 1, False, "parallel.max_tokens_per_micro_batch=120")
    batch = StepBatch.from_samples(luffy_like_samples(397, prompts=2, seed=5))
    weights = [r.weight.detach().clone() for r in _routers(small)]  # before the optimiser step
    metrics, inputs, masks = direct_count(small, batch)
    dense = _policy(dense_dir, 1, 1, 1, True).train_mini_batch(_two_samples(), use_old_logprobs=True)
    return {"forced": forced, "metrics": metrics, "inputs": inputs, "masks": masks, "weights": weights, "dense": dense}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    from luffy_megatron.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("router_metrics")
    return str(make_tiny_model(root / "moe", seed=3, family="qwen3_moe", heads=4, kv_heads=2, head_dim=32, layers=2))


@pytest.mark.slow
def test_shares_and_aux_loss_equal_a_direct_count(moe_dir):
    (got,) = run_distributed(by_hand, 1, moe_dir, str(tiny_checkpoint("llama")), timeout_s=600)
    forced = got["forced"]
    # layer 0: 8 real tokens to experts 0 and 1 each; layer 1: the first row's 3 to 0 and 1, the second's 5 to 2, 3
    assert {k: v for k, v in forced.items() if "share" in k} == {
        "moe/expert_load_max_share": 0.5,
        "moe/expert_load_min_share": 0.0,
        "moe/layer0/expert_load_max_share": 0.5,
        "moe/layer0/expert_load_min_share": 0.0,
        "moe/layer1/expert_load_max_share": 5 / 16,
        "moe/layer1/expert_load_min_share": 3 / 16,
    }
    metrics, masks = got["metrics"], got["masks"]
    assert len(masks) > 1 and not all(bool(m.all()) for m in masks)  # several micro-batches, with padding
    aux_per_layer = []
    for layer, (inputs, weight) in enumerate(zip(got["inputs"], got["weights"])):
        assert len(inputs) == len(masks)
        counts, aux = torch.zeros(EXPERTS, dtype=torch.float64), []
        for x, real in zip(inputs, masks):
            logits = x.reshape(-1, x.shape[-1]).double() @ weight.double().t()
            chosen = torch.zeros_like(logits).scatter(1, logits.topk(TOPK, dim=1).indices, 1.0)
            counts += (chosen * real[:, None]).sum(0)
            scores = torch.softmax(logits, -1)  # Switch loss over every routed token, padding included
            aux.append(EXPERTS / (TOPK * len(real) ** 2) * float((scores.sum(0) * chosen.sum(0)).sum()))
        share = counts / counts.sum()
        assert metrics[f"moe/layer{layer}/expert_load_max_share"] == pytest.approx(float(share.max()), rel=1e-12)
        assert metrics[f"moe/layer{layer}/expert_load_min_share"] == pytest.approx(float(share.min()), rel=1e-12)
        assert float(share.max()) > 0.3  # not balanced: the comparison is not vacuous
        aux_per_layer.append(sum(aux) / len(aux))
    assert metrics["moe/aux_loss"] == pytest.approx(sum(aux_per_layer) / len(aux_per_layer), rel=1e-5)
    assert not any(k.startswith("moe/") for k in got["dense"])


# ----------------------------------------------------------------------------------------------------------------
# Layouts
def layout_metrics(rank: int, world: int, hf_dir: str, layouts: list[str]) -> dict:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    out = {}
    for name in layouts:
        _, tp, pp, ep = LAYOUTS[name]
        for pack in (True, False):
            policy = _policy(hf_dir, tp, pp, ep, pack)
            batch = StepBatch.from_samples(luffy_like_samples(397, seed=3))
            out[name, pack] = policy.train_mini_batch(batch, use_old_logprobs=True)
            del policy
    return out


@pytest.fixture(scope="module")
def layout_results(moe_dir) -> tuple[dict, list[dict]]:
    """The one-rank results and the two ranks' results of the world-2 layouts, run once per module."""
    (single,) = run_distributed(layout_metrics, 1, moe_dir, ["single"], timeout_s=600)
    two = run_distributed(layout_metrics, 2, moe_dir, [n for n, v in LAYOUTS.items() if v[0] == 2], timeout_s=900)
    return single, two


@pytest.mark.slow
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_the_metrics_do_not_depend_on_the_layout(layout_results, pack):
    single, two = layout_results
    assert two[0] == two[1]  # every rank reports the step's values
    ref = single["single", pack]
    shares = sorted(k for k in ref if "share" in k)
    assert len(shares) == 6 and ref["moe/expert_load_max_share"] > 0.3
    for name in ("dp2", "ep2", "pp2", "tp2"):
        got = two[0][name, pack]
        assert {k: got[k] for k in shares} == pytest.approx({k: ref[k] for k in shares}, rel=1e-12), name
    # the auxiliary loss is per micro-batch: equal where the micro-batches are
    assert two[0]["ep2", pack]["moe/aux_loss"] == pytest.approx(two[0]["dp2", pack]["moe/aux_loss"], rel=1e-5)
    if pack:  # PP pads right-padded rows to one shape per step
        assert two[0]["pp2", pack]["moe/aux_loss"] == pytest.approx(ref["moe/aux_loss"], rel=1e-5)
    # padding is not counted: packed and right-padded rows of the same batch give the same shares
    assert {k: single["single", not pack][k] for k in shares} == pytest.approx({k: ref[k] for k in shares}, rel=1e-12)
