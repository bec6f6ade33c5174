"""luffy-plan: layout rules, the recipes rated feasible on 80 GB GPUs, the table and JSON, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from luffy_megatron.plan import cli
from luffy_megatron.plan.memory import layout_buffer, owned_numel
from luffy_megatron.plan.search import GB, PlanInputs, plan
from luffy_megatron.plan.shapes import KNOWN_MODELS, ModelShape

ROOT = Path(__file__).resolve().parents[1]
QWEN7B = ModelShape.from_hf(KNOWN_MODELS["Qwen2.5-Math-7B"], "Qwen2.5-Math-7B")


def test_buffer_layout_padding_and_shards_by_hand():
    # reverse order: 100 at [0, 100), 70 starts at 128 -> [128, 198); end padded to lcm(3, 128) = 384
    buf = layout_buffer([70, 100], [False, False], dp=3, dist_opt=True, dtype="bfloat16")
    assert buf.numel == 384 and buf.buckets == [(0, 384, [(0, 100), (128, 198)])]
    # each rank owns 128 elements: rank 0 [0, 128) holds 100, rank 1 [128, 256) holds 70, rank 2 nothing
    assert [owned_numel(buf, 3, r) for r in range(3)] == [100, 70, 0]
    plain = layout_buffer([70, 100], [False, False], dp=3, dist_opt=False, dtype="bfloat16")
    assert plain.numel == 170 and owned_numel(plain, 1, 0) == 170
    # a shared (tied) embedding gets its own bucket
    shared = layout_buffer([50, 10], [True, False], dp=2, dist_opt=True, dtype="bfloat16")
    assert shared.buckets == [(0, 128, [(0, 10)]), (128, 256, [(128, 178)])]


def test_param_count_of_the_recipes_models():
    # Qwen2.5-Math-7B has 7.62B parameters and Qwen2.5-32B 32.76B (their model cards: 7.61B / 32.5B non-embedding
    # + embeddings); the count here is derived from the config alone.
    assert QWEN7B.num_params() == 7_615_616_512
    assert ModelShape.from_hf(KNOWN_MODELS["Qwen2.5-32B"]).num_params() == 32_763_876_352


def test_infeasible_layouts_come_with_reasons():
    inp = PlanInputs(nodes=1, gpus_per_node=8, gpu_mem_gb=80, vpp=[None, 2])
    result = plan(QWEN7B, inp)
    reasons = {(r["tp"], r["pp"], r["vpp"]): r["reasons"] for r in result["infeasible"]}
    assert reasons[(8, 1, None)] == ["TP 8 does not divide 28 heads / 4 query groups"]
    assert "PP x VPP = 8 does not divide 28 layers" in reasons[(1, 8, None)]
    assert reasons[(1, 1, 2)] == ["VPP needs PP >= 2"]
    assert reasons[(1, 1, None)][0].startswith("needs ") and "> 80 GiB" in reasons[(1, 1, None)][0]
    totals = [r["memory"]["total"] for r in result["feasible"]]
    assert all(t <= 80 * GB for t in totals) and [r["rank"] for r in result["feasible"]] == list(
        range(1, len(totals) + 1)
    )
    # less memory per GPU: fewer layouts fit, and every one that fits at 40 also fits at 80
    small = plan(QWEN7B, PlanInputs(nodes=1, gpus_per_node=8, gpu_mem_gb=40, vpp=[None, 2]))
    fits = lambda res: {(r["tp"], r["pp"], r["vpp"]) for r in res["feasible"]}  # noqa: E731
    assert fits(small) < fits(result)


def test_distributed_optimizer_and_recompute_save_what_they_should():
    base = dict(nodes=1, gpus_per_node=8, gpu_mem_gb=1000)
    on = plan(QWEN7B, PlanInputs(**base))["feasible"]
    off = plan(QWEN7B, PlanInputs(**base, dist_opt=False))["feasible"]
    by = lambda rows: {(r["tp"], r["pp"]): r["memory"] for r in rows}  # noqa: E731
    a, b = by(on)[(2, 1)], by(off)[(2, 1)]  # DP 4
    assert b["adam"] == pytest.approx(4 * a["adam"], rel=1e-3) and b["master_weights"] > 3.9 * a["master_weights"]
    no_rec = by(plan(QWEN7B, PlanInputs(**base, recompute=False))["feasible"])[(2, 1)]
    assert no_rec["activations"] > 5 * a["activations"]


@pytest.mark.parametrize(
    ("recipe", "nodes", "rollout"),
    [
        ("luffy_qwen2.5_math_7b.yaml", 2, 8),
        ("luffy_qwen2.5_32b.yaml", 4, 16),
        ("luffy_qwen2.5_32b_long.yaml", 4, 16),
    ],
)
def test_recipes_layouts_are_rated_feasible_on_80gb(recipe, nodes, rollout, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = [
        "--model",
        str(ROOT / "configs" / recipe),
        "--nodes",
        str(nodes),
        "--rollout-gpus",
        str(rollout),
        "--gpu-mem-gb",
        "80",
        "--json",
        str(out),
    ]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    from luffy_megatron.config import load_config

    p = load_config(str(ROOT / "configs" / recipe), []).parallel
    key = (p.tp, p.pp, p.vpp, p.sequence_parallel_on())
    row = next(r for r in result["feasible"] if (r["tp"], r["pp"], r["vpp"], r["sp"]) == key)
    assert row["memory"]["total"] < 80 * GB
    table = capsys.readouterr().out
    assert f"| {row['rank']} | {p.tp} | on | {p.pp} | - |" in table and "Infeasible:" in table


def test_sequence_parallelism_shards_the_norms_and_is_searched_at_tp_above_one():
    from luffy_megatron.plan.memory import Layout, MicroBatch, head_activation_bytes, layer_activation_bytes

    mb = MicroBatch(4096, 1024)
    for tp in (2, 4):
        off, on = Layout(tp, 1, 1), Layout(tp, 1, 1, sp=True)
        # per token: 6 x hidden (bf16) and two fp32 reciprocal RMS per layer, 3 x hidden and one on the last stage
        saved = mb.tokens * (1 - 1 / tp)
        layer = layer_activation_bytes(QWEN7B, off, mb, 2, True) - layer_activation_bytes(QWEN7B, on, mb, 2, True)
        assert layer == saved * (6 * QWEN7B.hidden * 2 + 8)
        head = head_activation_bytes(QWEN7B, off, mb, 2) - head_activation_bytes(QWEN7B, on, mb, 2)
        assert head == saved * (3 * QWEN7B.hidden * 2 + 4)
    result = plan(QWEN7B, PlanInputs(nodes=1, gpus_per_node=8, gpu_mem_gb=1000))
    sps = {}
    for r in result["feasible"]:
        sps.setdefault((r["tp"], r["pp"]), []).append(r["sp"])
    assert sps[(1, 1)] == [False] and sps[(4, 1)] == [True, False]  # ties: SP on first, as it needs less memory
    only = {"on": {1: [False], 4: [True]}, "off": {1: [False], 4: [False]}}
    for choice, want in only.items():
        rows = plan(QWEN7B, PlanInputs(nodes=1, gpus_per_node=8, gpu_mem_gb=1000, sequence_parallel=choice))
        assert {tp: [r["sp"] for r in rows["feasible"] if (r["tp"], r["pp"]) == (tp, 1)] for tp in want} == want
    # a single sequence longer than the budget is padded to a multiple of TP
    inp = PlanInputs(prompt_len=1000, response_len=1001, micro_batch_tokens=1024)
    assert inp.micro_batch(4).tokens == 2004 and inp.micro_batch().tokens == 2001


def test_bad_input_gives_one_error_line(tmp_path, capsys):
    def error(argv):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "no such config.json" in error(["--model", str(tmp_path / "nope")])
    (tmp_path / "config.json").write_text("{broken")
    assert "not valid JSON" in error(["--model", str(tmp_path)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hf_path: /nowhere/SomeModel\n")
    assert "not one of" in error(["--model", str(recipe)])
    assert "leaves no GPU" in error(
        ["--model", str(ROOT / "configs" / "luffy_qwen2.5_math_7b.yaml"), "--rollout-gpus", "8"]
    )


def test_help_shows_examples():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "luffy_megatron.plan.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: luffy-plan") and "examples:" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# Mixture-of-experts models
MOE = ModelShape.from_hf(KNOWN_MODELS["Qwen3-30B-A3B"], "Qwen3-30B-A3B")


def test_moe_parameters_per_expert_parallel_rank():
    # 30.5B parameters (the model card): 48 x (attention + router + 128 experts of 3 x 2048 x 768) + embeddings
    assert (MOE.experts, MOE.topk, MOE.moe_ffn, MOE.qk_norm) == (128, 8, 768, True)
    assert MOE.num_params() == 30_532_122_624
    from luffy_megatron.plan.shapes import layer_params

    for tp, ep in ((1, 1), (2, 4), (4, 8)):
        params = layer_params(MOE, tp, ep)
        experts = [p for p in params if p.expert]
        assert len(experts) == 2 * 128 // ep  # fc1 and fc2 of each local expert
        assert sum(p.numel for p in experts) == 128 // ep * 3 * 2048 * 768 // tp  # split over TP as dense MLPs are
        (router,) = [p for p in params if p.name == "mlp.router.weight"]
        assert router.numel == 128 * 2048 and not router.expert  # replicated, averaged over the whole DP group


def test_moe_layouts_search_expert_parallelism():
    result = plan(MOE, PlanInputs(nodes=2, gpus_per_node=8, gpu_mem_gb=1000, micro_batch_tokens=8192))
    rows = result["feasible"]
    by = {(r["tp"], r["pp"], r["dp"]): set() for r in rows}
    for r in rows:
        by[r["tp"], r["pp"], r["dp"]].add(r["ep"])
        assert r["tp"] == 1 or r["sp"]  # MoE layers train under TP only with SP
    assert by[(1, 1, 16)] == {1, 2, 4, 8, 16} and by[(2, 1, 8)] == {1, 2, 4, 8}
    # more EP: fewer experts per rank, less static memory at the same TP / PP / DP
    static = {r["ep"]: r["memory"]["weights"] for r in rows if (r["tp"], r["pp"], r["dp"]) == (1, 1, 16)}
    assert static[16] < static[8] < static[4] < static[2] < static[1]
    assert {r["ep"] for r in plan(QWEN7B, PlanInputs(gpu_mem_gb=1000))["feasible"]} == {1}  # dense: EP 1 only
    off = plan(MOE, PlanInputs(gpu_mem_gb=1000, sequence_parallel="off"))["infeasible"]
    assert "TP 2: megatron trains MoE layers under TP only with SP" in next(r for r in off if r["tp"] == 2)["reasons"]
    gather = plan(MOE, PlanInputs(gpu_mem_gb=1000, moe_dispatcher="allgather"))
    assert {r["ep"] for r in gather["feasible"]} == {1}  # the trainer runs allgather at EP 1 only


def test_dispatcher_buffers_by_hand():
    from luffy_megatron.plan.memory import Layout, MicroBatch
    from luffy_megatron.plan.search import dispatcher_bytes

    mb = MicroBatch(4096, 1024)
    lay = Layout(tp=2, pp=1, dp=8, sp=True, ep=4)
    # alltoall: one [tokens x top-k, hidden] copy of the routed tokens (bf16)
    assert dispatcher_bytes(MOE, lay, mb, 2, PlanInputs()) == 4096 * 8 * 2048 * 2
    # allgather: every token of the TP x EP ranks (hidden bf16, probabilities fp32, routing map bool), then the copy
    gathered = 4096 * 4 * (2048 * 2 + 128 * 5)
    assert dispatcher_bytes(MOE, lay, mb, 2, PlanInputs(moe_dispatcher="allgather")) == gathered + 4096 * 8 * 2048 * 2
    assert dispatcher_bytes(QWEN7B, lay, mb, 2, PlanInputs()) == 0


def test_moe_table_names_the_experts_and_has_an_ep_column(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(KNOWN_MODELS["Qwen3-30B-A3B"]))
    argv = ["--model", str(tmp_path), "--nodes", "2", "--gpu-mem-gb", "80", "--moe-dispatcher", "alltoall"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "128 experts, top-8, alltoall dispatcher" in out and "| rank | TP | SP | PP | VPP | DP | EP |" in out
