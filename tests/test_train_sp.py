"""Sequence parallelism (``parallel.sequence_parallel``): the update with it equals the update without it.

At TP2 (also with QK-norm), TP2 x PP2 (also interleaved) and TP2 x DP2, packed and padded, one policy update on
LUFFY's length mix with SP on and off must give the same loss, grad norm, per-rank gradients, updated weights and
log-probs before and after (fp32, relative 1e-5). With SP every micro-batch's sequence is padded to a multiple of TP,
and ``perf/padding_ratio`` counts it. The layout checks refuse SP without TP, and the megatron-core code SP runs
through on CPU is checked against the pinned 0.19.2.
"""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest
import torch

from luffy_megatron.train.batch import micro_batch_tokens, pack_micro_batch
from luffy_megatron.train.samples import Sample, pack_micro_batches
from luffy_megatron.train.step_batch import StepBatch
from tests import upstream
from tests.dist_utils import run_distributed
from tests.fixtures_models import tiny_checkpoint
from tests.test_train_packed import luffy_like_samples, response_logprobs

REL_TOL = 1e-5
LR = 1e-2
# name: (world, tp, pp, vpp, family). The cases of a layout share one process group.
SP_LAYOUTS = {
    "tp2": (2, 2, 1, None, "llama"),
    "tp2_qk_norm": (2, 2, 1, None, "qwen3"),
    "tp2_pp2": (4, 2, 2, None, "llama"),
    "tp2_pp2_vpp2": (4, 2, 2, 2, "llama"),
    "tp2_dp2": (4, 2, 1, None, "llama"),
}
CASES = [(pack, sp) for pack in (True, False) for sp in (True, False)]
METRICS = ("grad_norm", "actor/loss", "actor/pg_loss", "actor/entropy", "actor/ppo_kl", "train_rollout_logprob_gap")


# ----------------------------------------------------------------------------------------------------------------
# Micro-batch layout and the config
def test_a_packed_row_is_padded_to_a_multiple_of_tp_and_counted():
    samples = [Sample(0, 0, [3, 4, 5], [6, 7], False), Sample(0, 0, [3, 4], [8, 9, 10, 11], False)]  # 5 + 6 tokens
    mb = pack_micro_batch(StepBatch.from_samples(samples), [0, 1], pad_id=0, alignment=4)
    assert mb.tokens.shape == (1, 12) and mb.cu_seqlens.tolist() == [0, 5, 11, 12]
    assert not mb.response_mask[11] and mb.position_ids[0, 11] == 0  # the padding is its own segment, no loss
    plan = pack_micro_batches([5, 6], 100, 1, packed=True, alignment=4)
    assert micro_batch_tokens(plan, [5, 6], packed=True, alignment=4) == [12]
    # Padded rows: the longest row rounded up, and the budget counts the rounded length.
    assert micro_batch_tokens([[[0, 1]]], [5, 6], packed=False, alignment=4) == [2 * 8]
    assert pack_micro_batches([7, 7], 14, 1, alignment=4) == [[[0], [1]]]


def test_sequence_parallel_without_tensor_parallel_is_refused():
    from luffy_megatron.config import ConfigError, ParallelConfig
    from luffy_megatron.config_checks import validate_parallel

    with pytest.raises(ConfigError, match=r"^parallel\.sequence_parallel: .*parallel\.tp > 1"):
        validate_parallel(ParallelConfig(tp=1, sequence_parallel=True), 2, 4, 4, 4)
    for tp, sp, on in ((1, None, False), (1, False, False), (2, None, True), (2, False, False), (2, True, True)):
        parallel = ParallelConfig(tp=tp, sequence_parallel=sp)
        validate_parallel(parallel, 2, 4, 4, 4)
        assert parallel.sequence_parallel_on() is on, (tp, sp)


# ----------------------------------------------------------------------------------------------------------------
# The update: SP on equals SP off
def train_cases(rank: int, world: int, hf_dir: str, tp: int, pp: int, vpp: int | None) -> dict:
    """Every (packed, SP) case of :data:`CASES` in this process group: a policy, its log-probs, one update."""
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.train.policy import MegatronPolicy

    setup_platform()
    init_model_parallel(tp, pp, vpp, seed=1)
    spec = model_spec(read_hf_config(hf_dir), tp)
    out = {}
    for pack, sp in CASES:
        overrides = [
            f"model.hf_path={hf_dir}",
            "model.dtype=float32",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"parallel.sequence_parallel={str(sp).lower()}",
            f"parallel.pack_sequences={str(pack).lower()}",
            "parallel.max_tokens_per_micro_batch=400",
            "algorithm.loss_agg_mode=seq_mean_token_mean",
            "algorithm.entropy_coeff=0.01",
            f"optimizer.lr={LR}",
            "optimizer.adam_eps=1e-6",  # see test_train_packed: near-zero gradients must not dominate the step
            "data.max_response_length=256",
            *([f"parallel.vpp={vpp}"] if vpp else []),
        ]
        policy = MegatronPolicy(load_config(None, overrides), spec, pad_id=0)
        assert policy.tconfig.sequence_parallel is sp and policy.alignment == (tp if sp else 1)
        load_hf_weights(policy.modules, spec, hf_dir)
        batch = StepBatch.from_samples(luffy_like_samples(spec.vocab_size, seed=3))
        before = response_logprobs(policy, batch)
        metrics = policy.train_mini_batch(batch, use_old_logprobs=True)
        stats = policy.take_token_stats()
        after = response_logprobs(policy, batch)
        named = [(n, p) for m in policy.modules for n, p in m.named_parameters()]
        out[pack, sp] = {
            "metrics": metrics,
            "stats": stats,
            "before": before,
            "after": after,
            "params": {n: p.detach().numpy().copy() for n, p in named},
            "grads": {n: p.main_grad.detach().numpy().copy() for n, p in named},
            "marked": sorted(n for n, p in named if getattr(p, "sequence_parallel", False)),
        }
        del policy
    return out


@pytest.fixture(scope="module")
def sp_results():
    return {}


def layout_results(sp_results: dict, layout: str) -> list[dict]:
    """The per-rank results of ``layout``, run once per module."""
    if layout not in sp_results:
        world, tp, pp, vpp, family = SP_LAYOUTS[layout]
        hf_dir = str(tiny_checkpoint(family))
        sp_results[layout] = run_distributed(train_cases, world, hf_dir, tp, pp, vpp, timeout_s=900)
    return sp_results[layout]


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def assert_same_metrics_and_logprobs(got: dict, ref: dict) -> dict[str, float]:
    """``got``'s update equals ``ref``'s in every metric of ``METRICS`` and in the log-probs before and after it (rel
    ``REL_TOL``); the worst relative difference of each, with ``grads`` at 0 for the caller to raise."""
    worst = {}
    for key in METRICS:
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=REL_TOL), key
        worst[key] = _rel_diff(torch.tensor(got["metrics"][key]), torch.tensor(ref["metrics"][key]))
    for a, b in zip(ref["before"] + ref["after"], got["before"] + got["after"]):
        assert b == pytest.approx(a, rel=REL_TOL, abs=1e-6)
    worst["logprobs"] = max(_rel_diff(torch.tensor(b), torch.tensor(a)) for a, b in zip(ref["after"], got["after"]))
    worst["grads"] = 0.0
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("layout", list(SP_LAYOUTS))
def test_sequence_parallel_update_equals_the_update_without_it(sp_results, layout, pack):
    ranks = layout_results(sp_results, layout)
    on, off = ranks[0][pack, True], ranks[0][pack, False]
    worst = assert_same_metrics_and_logprobs(on, off)
    for rank in ranks:  # every rank's gradients (finalised: SP's norm gradients summed over TP) and updated weights
        on_r, off_r = rank[pack, True], rank[pack, False]
        for name, g_ref in off_r["grads"].items():
            g, g_ref = torch.from_numpy(on_r["grads"][name]), torch.from_numpy(g_ref)
            torch.testing.assert_close(g, g_ref, rtol=REL_TOL, atol=REL_TOL * float(g_ref.abs().max()))
            worst["grads"] = max(worst["grads"], _rel_diff(g, g_ref))
            w, w_ref = (torch.from_numpy(r["params"][name]) for r in (on_r, off_r))
            torch.testing.assert_close(w, w_ref, rtol=REL_TOL, atol=1e-4 * LR)
        assert on_r["marked"] and not off_r["marked"]  # the norms SP shards are summed over TP, only with SP
        assert all("layernorm" in n for n in on_r["marked"]), on_r["marked"]
    moved = max(abs(x - y) for a, b in zip(off["before"], off["after"]) for x, y in zip(a, b))
    assert moved > 1e-3  # the update moved the log-probs: the comparison is not vacuous
    print(f"{layout} {'packed' if pack else 'padded'} max relative differences:", worst)
    # The padding SP needs is counted: each micro-batch is a multiple of TP tokens long, SP off pads nothing extra.
    tp = SP_LAYOUTS[layout][1]
    assert on["stats"]["perf/update_computed_tokens"] % tp == 0
    assert on["stats"]["perf/update_real_tokens"] == off["stats"]["perf/update_real_tokens"]
    if pack:  # LUFFY's mix has rows of an odd length
        assert off["stats"]["perf/padding_ratio"] == 1.0 < on["stats"]["perf/padding_ratio"]


# ----------------------------------------------------------------------------------------------------------------
# The megatron-core 0.19.2 code SP runs through on CPU
def test_megatron_sequence_parallel_contract():
    """What the builder and the CPU path rely on in megatron-core 0.19.2: the torch norm of the local spec refuses SP
    (hence LocalNorm), ``finalize_model_grads`` sums the gradients of parameters marked ``sequence_parallel`` over
    TP, the block takes its final norm from ``TransformerBlockSubmodules.layer_norm``, the SP backward allocates on
    ``torch.cuda.current_device()`` (hence the CPU layer's patch of every backward pass), and the collectives are
    torch's ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (gloo has both since torch 2.3; checked below)."""
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.transformer import TransformerConfig, torch_norm, transformer_block
    from megatron.core.transformer.identity_op import IdentityOp

    assert importlib.metadata.version("megatron-core") == upstream.pinned_version("megatron-core")
    assert "assert not config.sequence_parallel" in inspect.getsource(torch_norm.WrappedTorchNorm.__new__)
    assert "sequence_parallel" in TransformerConfig.__dataclass_fields__  # a ModelParallelConfig field
    plain = get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm").submodules
    assert plain.self_attention.submodules.q_layernorm is IdentityOp
    qk = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm").submodules
    assert {qk.input_layernorm, qk.pre_mlp_layernorm, qk.self_attention.submodules.q_layernorm} == {
        torch_norm.WrappedTorchNorm
    }
    linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    assert "device=torch.cuda.current_device()" in inspect.getsource(linear.backward)
    assert hasattr(torch.autograd._engine_run_backward, "__wrapped__")  # patched by the platform layer
    src = inspect.getsource(importlib.import_module("megatron.core.distributed.finalize_model_grads"))
    assert 'config.sequence_parallel and getattr(param, "sequence_parallel", False)' in src
    # A TransformerBlockSubmodules spec is used as given, its layer_norm builds the final norm.
    blocks = inspect.getsource(transformer_block._get_block_submodules)
    assert "if isinstance(spec, TransformerBlockSubmodules):\n        return spec" in blocks
    assert "self.final_layernorm = not_none(self.submodules.layer_norm)(" in inspect.getsource(transformer_block)
    assert inspect.signature(transformer_block.get_num_layers_to_build).parameters.keys() >= {"config", "vp_stage"}
    fields = transformer_block.TransformerBlockSubmodules.__dataclass_fields__
    assert {"layer_specs", "layer_norm"} <= fields.keys()
    for module in (layers, mappings):
        assert module.dist_all_gather_func is torch.distributed.all_gather_into_tensor
        assert module.dist_reduce_scatter_func is torch.distributed.reduce_scatter_tensor


def gloo_sp_collectives(rank: int, world: int) -> bool:
    """megatron's SP collectives on a gloo sub-group of ranks {0, 2} / {1, 3}, sync and async: exact."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group, peers = groups[rank % 2], [rank % 2, rank % 2 + 2]
    me = dist.get_rank(group)
    ok = True
    for async_op in (False, True):
        x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(rank))
        xs = [torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(p)) for p in peers]
        gathered, scattered = torch.empty(8, 2, 3), torch.empty(2, 2, 3)
        works = [
            dist.all_gather_into_tensor(gathered, x, group=group, async_op=async_op),
            dist.reduce_scatter_tensor(scattered, x, group=group, async_op=async_op),
        ]
        for w in works:
            if async_op:
                w.wait()
        ok &= torch.equal(gathered, torch.cat(xs)) and torch.equal(scattered, (xs[0] + xs[1])[2 * me : 2 * me + 2])
    return ok


@pytest.mark.slow
def test_gloo_runs_the_sequence_parallel_collectives_exactly():
    assert run_distributed(gloo_sp_collectives, 4) == [True] * 4
