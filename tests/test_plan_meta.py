"""The planner's per-rank static memory equals, to the byte, what megatron-core allocates when the recipes' models are
built at full size (on the meta device, one process per rank of a fake process group of the recipe's world size).

Compared per rank: weights (parameter storage: the DDP param buffers with the distributed optimizer), the fp32
gradient buffers, fp32 master weights and Adam's two moments (created with megatron's own ``init_state_fn``). The
builds use the local layer spec (norm weights in fp32), so the planner is asked for that. Building a rank also proves
the recipe's layout builds (heads, query groups, layers and vocabulary divide as configured). A tiny MoE model is
checked the same way at EP 1, 2 and 4 (also under TP 2 x PP 2).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from luffy_megatron.config import load_config
from luffy_megatron.models.tiny import tiny_hf_config
from luffy_megatron.plan.memory import Layout, rank_buffers, static_bytes
from luffy_megatron.plan.shapes import KNOWN_MODELS, ModelShape

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "plan_meta_worker.py"
GPUS_PER_NODE = 8
# (recipe, training nodes): the training side of examples/run_7b.sh and run_32b.sh.
RECIPES = {"luffy_qwen2.5_math_7b.yaml": 1, "luffy_qwen2.5_32b.yaml": 2}


def _measure(hf: dict, tmp: Path, lay: Layout, ranks: list[int], dtype: str) -> list[dict]:
    path = tmp / "config.json"
    path.write_text(json.dumps(hf))
    world = lay.tp * lay.pp * lay.dp
    args = [str(path), lay.tp, lay.pp, lay.vpp or 0, world, ",".join(map(str, ranks)), int(lay.dist_opt), dtype, lay.ep]
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x[len("RESULT ") :]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]


def _check(hf: dict, tmp: Path, lay: Layout, ranks: list[int], dtype: str) -> list[dict]:
    reals = _measure(hf, tmp, lay, ranks, dtype)
    assert len(reals) == len(ranks)
    shape = ModelShape.from_hf(hf)
    for rank, real in zip(ranks, reals):
        planned = static_bytes(shape, lay, real["pp_rank"], real["dp_rank"], dtype, fp32_norms=True)
        assert {k: real[k] for k in planned} == planned, (lay, rank)
        bufs = [[b.dtype, b.numel] for b in rank_buffers(shape, lay, real["pp_rank"], dtype, fp32_norms=True)]
        assert bufs == real["buffers"]
    return reals


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("dist_opt", [True, False])
def test_recipe_ranks_allocate_what_the_planner_says(recipe, dist_opt, tmp_path):
    cfg = load_config(str(ROOT / "configs" / recipe), [])
    hf = KNOWN_MODELS[Path(cfg.model.hf_path).name]
    p = cfg.parallel
    world = RECIPES[recipe] * GPUS_PER_NODE
    lay = Layout(p.tp, p.pp, world // (p.tp * p.pp), p.vpp, dist_opt)
    # first rank; another TP shard of it; the first rank of the last pipeline stage; the very last rank.
    ranks = sorted({0, p.tp - 1, world - p.tp, world - 1})
    reals = _check(hf, tmp_path, lay, ranks, cfg.model.dtype)
    assert {r["pp_rank"] for r in reals} == set(range(p.pp))


@pytest.mark.slow
def test_tied_embeddings_under_interleaved_pp_and_odd_dp(tmp_path):
    """Shared embedding buckets (tied weights under PP), VPP chunks and lcm(3, 128) bucket padding, every rank kind."""
    hf = tiny_hf_config(
        "qwen2",
        vocab_size=397,
        hidden_size=64,
        intermediate_size=160,
        layers=4,
        heads=8,
        kv_heads=2,
        tie_embeddings=True,
        eos_token_id=1,
        pad_token_id=0,
    ).to_dict()
    for dist_opt in (True, False):
        lay = Layout(tp=2, pp=2, dp=3, vpp=2, dist_opt=dist_opt)
        _check(hf, tmp_path, lay, [0, 3, 6, 11], "bfloat16")
    _check(hf, tmp_path, Layout(tp=1, pp=1, dp=2, dist_opt=True), [1], "float32")


@pytest.mark.slow
def test_moe_ranks_at_every_expert_layout(tmp_path):
    """A tiny Qwen3-MoE (8 experts): its router and experts at EP 1 (experts in the dense buffers), EP 2 and EP 4
    (expert buffers sharded over DP / EP ranks, padded to lcm(DP / EP, 128)), under TP 2 and PP 2, every rank kind."""
    hf = tiny_hf_config(
        "qwen3_moe",
        vocab_size=397,
        hidden_size=64,
        intermediate_size=160,
        layers=4,
        heads=4,
        kv_heads=2,
        tie_embeddings=False,
        moe=dict(num_experts=8, moe_intermediate_size=48),
    ).to_dict()
    for dist_opt in (True, False):
        for lay in (Layout(tp=1, pp=1, dp=2, ep=1), Layout(tp=1, pp=1, dp=6, ep=2), Layout(tp=2, pp=2, dp=4, ep=4)):
            lay = replace(lay, dist_opt=dist_opt)
            world = lay.tp * lay.pp * lay.dp
            _check(hf, tmp_path, lay, sorted({0, min(lay.tp, world - 1), world // 2, world - 1}), "bfloat16")
