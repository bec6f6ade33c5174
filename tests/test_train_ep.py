"""Expert parallelism (``parallel.ep``): the update at EP = 2 equals the update at EP = 1.

The tiny Qwen3-MoE (4 experts, top-2, auxiliary loss on) at EP2, EP2 x TP2 (with SP), EP2 x PP2 and EP2 x DP2 (expert
DP 2), packed and padded, with the alltoall dispatcher: one policy update on LUFFY's length mix gives the same loss,
grad norm, router metrics (expert load shares, auxiliary loss), per-rank gradients (every expert's by its global
index), updated weights and log-probs before and after as EP = 1 on the same ranks (fp32, relative 1e-5). Every
expert gets a gradient, so the equality is not vacuous.
The layout checks refuse, naming the key and the value, an EP size that does not divide the experts or the
data-parallel size, EP with a dense model, MoE under TP without SP, and the allgather dispatcher where megatron-core
cannot run it. The CPU layer's backward fix is checked on its own: a CUDA placement in any backward works on CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from luffy_megatron.config import ConfigError, ParallelConfig
from luffy_megatron.config_checks import validate_parallel
from tests.dist_utils import run_distributed
from tests.test_train_packed import LR, luffy_like_samples, response_logprobs, update_overrides
from tests.test_train_sp import _rel_diff, assert_same_metrics_and_logprobs

REL_TOL = 1e-5
EXPERTS = 4
# name: (world, tp, pp). One process group per world size runs all of its layouts.
EP_LAYOUTS = {
    "ep2": (2, 1, 1),
    "ep2_tp2": (4, 2, 1),
    "ep2_pp2": (4, 1, 2),
    "ep2_dp2": (4, 1, 1),
}
_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------
# The layout checks
@pytest.mark.parametrize(
    ("parallel", "world", "experts", "key", "words"),
    [
        (dict(ep=3), 3, 4, "parallel.ep", "3 does not divide the 4 experts"),
        (dict(ep=2), 2, 0, "parallel.ep", "2 splits the experts of a mixture-of-experts model; this model is dense"),
        (dict(ep=2, tp=2), 2, 4, "parallel.ep", "2 does not divide the data-parallel size world_size / (tp * pp) = 1"),
        (dict(ep=4, pp=2), 4, 4, "parallel.ep", "4 does not divide the data-parallel size"),
        (dict(ep=0), 2, 4, "parallel.ep", "must be positive, got 0"),
        (dict(tp=2, sequence_parallel=False), 2, 4, "parallel.sequence_parallel", "false: megatron trains MoE"),
        (dict(ep=2, moe_token_dispatcher="allgather"), 2, 4, "parallel.moe_token_dispatcher", "allgather needs"),
        (dict(pp=2, moe_token_dispatcher="allgather"), 2, 4, "parallel.moe_token_dispatcher", "allgather does not"),
        (dict(moe_token_dispatcher="flex"), 1, 4, "parallel.moe_token_dispatcher", "'flex' is not one of"),
    ],
)
def test_bad_expert_layouts_are_refused_by_key_and_value(parallel, world, experts, key, words):
    with pytest.raises(ConfigError) as err:
        validate_parallel(ParallelConfig(**parallel), world, 2, 4, 2, experts)
    assert str(err.value).startswith(f"{key}: ") and words in str(err.value), str(err.value)


def test_good_expert_layouts_pass():
    for parallel, world in (
        (dict(ep=2), 2),
        (dict(ep=2, tp=2), 4),
        (dict(ep=2, pp=2), 4),
        (dict(ep=4), 4),
        (dict(moe_token_dispatcher="allgather"), 2),
        (dict(pp=2, pack_sequences=False, moe_token_dispatcher="allgather"), 2),
    ):
        assert validate_parallel(ParallelConfig(**parallel), world, 2, 4, 2, EXPERTS) == world // (
            parallel.get("tp", 1) * parallel.get("pp", 1)
        )
    # a dense model ignores the dispatcher
    validate_parallel(ParallelConfig(pp=2, moe_token_dispatcher="allgather"), 2, 2, 4, 2, 0)


def test_the_expert_count_is_read_from_the_model_before_anything_is_built(tmp_path: Path):
    """``validate`` reads the experts from config.json under either name."""
    from luffy_megatron.config import load_config
    from luffy_megatron.config_checks import validate

    data = tmp_path / "train.parquet"
    data.write_bytes(b"")
    for name, experts in (("num_experts", 4), ("num_local_experts", 6)):
        model = tmp_path / name
        model.mkdir()
        hf = dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=4096)
        (model / "config.json").write_text(json.dumps({**hf, name: experts}))
        cfg = load_config(None, [f"model.hf_path={model}", f"data.train_files=[{data}]", "parallel.ep=4"])
        cfg.data.max_response_length = 1024
        if experts % 4:
            with pytest.raises(ConfigError, match=rf"^parallel\.ep: 4 does not divide the {experts} experts"):
                validate(cfg, world_size=4)
        else:
            validate(cfg, world_size=4)


# ----------------------------------------------------------------------------------------------------------------
# The CPU layer: a CUDA placement inside a backward
class _AllocatesOnTheDeviceInBackward(torch.autograd.Function):
    """As megatron's tensor- and expert-parallel functions do: the backward allocates on the current CUDA device."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = torch.empty(grad.shape, dtype=grad.dtype, device=torch.cuda.current_device())
        return out.copy_(grad * 2)


def _backward_of_a_cuda_placement() -> torch.Tensor:
    x = torch.ones(3, requires_grad=True)
    _AllocatesOnTheDeviceInBackward.apply(x).sum().backward()
    (y,) = torch.autograd.grad(_AllocatesOnTheDeviceInBackward.apply(x).sum(), [x])
    assert torch.equal(y, x.grad)
    return x.grad


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is off where CUDA runs")
def test_a_cuda_placement_in_any_backward_runs_on_cpu():
    """With the platform layer, the backward of any autograd function (here one defined after the layer was set up,
    entered through ``Tensor.backward`` and ``torch.autograd.grad``) runs with CUDA placements mapped to the CPU;
    with torch's own engine entry point back in place, the same backward fails as megatron's did."""
    import torch.autograd.graph

    from luffy_megatron.platform import setup_platform

    setup_platform()
    assert torch.equal(_backward_of_a_cuda_placement(), torch.full((3,), 2.0))
    patched = torch.autograd._engine_run_backward
    original = patched.__wrapped__
    try:
        torch.autograd._engine_run_backward = torch.autograd.graph._engine_run_backward = original
        with pytest.raises(RuntimeError):
            _backward_of_a_cuda_placement()
    finally:
        torch.autograd._engine_run_backward = torch.autograd.graph._engine_run_backward = patched


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is off where CUDA runs")
def test_moe_split_sizes_are_host_lists_on_cpu():
    """The alltoall dispatcher's split sizes reach ``all_to_all_single`` as numpy arrays, as they do from a GPU."""
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
    sizes = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([17, 12]), as_numpy=True)
    assert not torch.is_tensor(sizes) and sizes.tolist() == [17, 12]
    kept = torch.tensor([1.0])
    assert moe_utils.maybe_move_tensor_to_cpu(kept) is kept


# ----------------------------------------------------------------------------------------------------------------
# The update: EP = 2 equals EP = 1
def _global_names(named: list[tuple[str, torch.Tensor]], ep_rank: int, ep: int) -> dict[str, torch.Tensor]:
    """Parameters by name, each local expert renamed by its global index (this EP rank holds a contiguous block)."""
    per_rank = EXPERTS // ep

    def rename(name: str) -> str:
        return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{ep_rank * per_rank + int(m.group(2))}.", name)

    return {rename(n): t for n, t in named}


def train_cases(rank: int, world: int, hf_dir: str, layouts: list[str]) -> dict:
    """For each layout of this world size, packed and padded, EP = 1 and EP = 2: log-probs, one update, log-probs."""
    from megatron.core import parallel_state as ps

    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.train.policy import MegatronPolicy
    from luffy_megatron.train.step_batch import StepBatch

    setup_platform()
    out = {}
    for layout in layouts:
        _, tp, pp = EP_LAYOUTS[layout]
        spec = model_spec(read_hf_config(hf_dir), tp)
        for pack in (True, False):
            for ep in (1, 2):
                init_model_parallel(tp, pp, None, seed=1, ep=ep)
                overrides = update_overrides(hf_dir, tp, pp, pack, f"parallel.ep={ep}")
                policy = MegatronPolicy(load_config(None, overrides), spec, pad_id=0)
                assert policy.tconfig.expert_model_parallel_size == ep
                assert policy.tconfig.moe_token_dispatcher_type == "alltoall"
                load_hf_weights(policy.modules, spec, hf_dir)
                batch = StepBatch.from_samples(luffy_like_samples(spec.vocab_size, seed=3))
                before = response_logprobs(policy, batch)
                metrics = policy.train_mini_batch(batch, use_old_logprobs=True)
                after = response_logprobs(policy, batch)
                named = [(n, p) for m in policy.modules for n, p in m.named_parameters()]
                ep_rank = ps.get_expert_model_parallel_rank()
                out[layout, pack, ep] = {
                    "metrics": metrics,
                    "before": before,
                    "after": after,
                    "params": {n: p.detach().numpy().copy() for n, p in _global_names(named, ep_rank, ep).items()},
                    "grads": {n: p.main_grad.numpy().copy() for n, p in _global_names(named, ep_rank, ep).items()},
                }
                del policy
    return out


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    from luffy_megatron.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("moe_ep")
    return str(make_tiny_model(root / "moe", seed=3, family="qwen3_moe", heads=4, kv_heads=2, head_dim=32, layers=2))


@pytest.fixture(scope="module")
def ep_results(moe_dir):
    """Per world size, the per-rank results of all its layouts, run once per module."""
    cache: dict[int, list[dict]] = {}

    def results(layout: str) -> list[dict]:
        world = EP_LAYOUTS[layout][0]
        if world not in cache:
            layouts = [name for name, (w, _, _) in EP_LAYOUTS.items() if w == world]
            cache[world] = run_distributed(train_cases, world, moe_dir, layouts, timeout_s=1200)
        return cache[world]

    return results


@pytest.mark.slow
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("layout", list(EP_LAYOUTS))
def test_expert_parallel_update_equals_the_update_at_ep1(ep_results, layout, pack):
    ranks = ep_results(layout)
    ep2, ep1 = ranks[0][layout, pack, 2], ranks[0][layout, pack, 1]
    worst = assert_same_metrics_and_logprobs(ep2, ep1)
    routing = sorted(k for k in ep1["metrics"] if k.startswith("moe/"))  # router metrics (train.router_metrics)
    assert "moe/aux_loss" in routing and routing == sorted(k for k in ep2["metrics"] if k.startswith("moe/"))
    want = {k: ep1["metrics"][k] for k in routing}
    assert {k: ep2["metrics"][k] for k in routing} == pytest.approx(want, rel=REL_TOL)
    experts_seen: set[str] = set()
    for rank in ranks:  # every rank's finalised gradients and updated weights, experts by their global index
        r2, r1 = rank[layout, pack, 2], rank[layout, pack, 1]
        assert set(r2["grads"]) <= set(r1["grads"]) and len(r2["grads"]) < len(r1["grads"])  # EP2 holds half
        for name, g in r2["grads"].items():
            g, g_ref = torch.from_numpy(g), torch.from_numpy(r1["grads"][name])
            torch.testing.assert_close(g, g_ref, rtol=REL_TOL, atol=REL_TOL * float(g_ref.abs().max()))
            worst["grads"] = max(worst["grads"], _rel_diff(g, g_ref))
            w, w_ref = (torch.from_numpy(r["params"][name]) for r in (r2, r1))
            torch.testing.assert_close(w, w_ref, rtol=REL_TOL, atol=1e-4 * LR)
            if ".local_experts." in name:
                assert g.abs().max() > 0, name  # every expert of every layer was routed tokens and learned
                experts_seen.add(name)
    assert {_LOCAL_EXPERT.search(n).group(2) for n in experts_seen} == {str(e) for e in range(EXPERTS)}
    moved = max(abs(x - y) for a, b in zip(ep1["before"], ep1["after"]) for x, y in zip(a, b))
    assert moved > 1e-3  # the update moved the log-probs: the comparison is not vacuous
    assert ep1["metrics"]["grad_norm"] > 0
    print(f"{layout} {'packed' if pack else 'padded'} max relative differences EP2 vs EP1:", worst)


def uneven_collectives(rank: int, world: int) -> bool:
    """Torch's list all-gather and reduce-scatter with blocks of different sizes, under the CPU layer on gloo."""
    import torch.distributed as dist

    from luffy_megatron.platform import setup_platform

    setup_platform()
    blocks = [torch.full((2 + r, 3), float(r + 1)) for r in range(world)]
    gathered = [torch.empty(2 + r, 3) for r in range(world)]
    dist.all_gather(gathered, blocks[rank])
    mine = torch.empty(2 + rank, 3)
    dist.reduce_scatter(mine, [b * (rank + 1) for b in blocks])
    total = sum(range(1, world + 1))
    return all(torch.equal(g, b) for g, b in zip(gathered, blocks)) and torch.equal(mine, blocks[rank] * total)


@pytest.mark.slow
def test_gloo_runs_uneven_token_collectives_exactly():
    """What the alltoall dispatcher calls under TP: gloo alone refuses the uneven all-gather."""
    assert run_distributed(uneven_collectives, 2) == [True] * 2
