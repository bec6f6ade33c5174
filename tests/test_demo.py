"""The CPU demo driver (``make demo``) end to end at two steps: the arms train, luffy-eval scores them in and out of
distribution, then the report, summary and PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.run_demo import HELD_OUT, MAX_NEW_TOKENS, NUM_OOD, main, phase_steps, table

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ARMS = ("luffy", "grpo", "rl_sft_loss", "sft", "sft_rl")


def test_demo_runs_its_arms_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "tools" / "run_demo.py"), "--out", str(out), "--steps", "2", "--arms", *ARMS]
    cmd += ["--val-interval", "1", "--eval-limit", "16", "--override", "optimizer.lr=2e-3"]
    stale = out / "seed1" / "luffy" / "eval_ood" / "samples.jsonl"  # an earlier run's: a retrained arm drops it
    stale.parent.mkdir(parents=True)
    stale.write_text("{}\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary_seed1.json").read_text())
    assert set(summary["arms"]) == set(ARMS)
    assert summary["overrides"] == ["optimizer.lr=2e-3"]
    for arm in ARMS:  # --override reaches every arm (both runs of sft_rl), after the arm's own options
        rows = [json.loads(line) for line in (out / "seed1" / arm / "metrics.jsonl").open()]
        rows += (
            [json.loads(line) for line in (out / "seed1" / arm / "sft" / "metrics.jsonl").open()]
            if arm == "sft_rl"
            else []
        )
        assert [r["actor/lr"] for r in rows] == [2e-3, 2e-3]
    sft_rows = [json.loads(line) for line in (out / "seed1" / "rl_sft_loss" / "metrics.jsonl").open()]
    assert all(r["actor/sft_nll"] > 0 for r in sft_rows)  # the traces' NLL is trained on at every step
    for arm in summary["arms"].values():
        assert arm["steps"] == 2 and arm["final_val_greedy"] is not None and arm["tokens"] > 0
        assert sorted(arm["held_out"]) == sorted(HELD_OUT)  # in distribution and both OOD kinds
        assert {h["problems"] for h in arm["held_out"].values()} == {16}
    assert stale.read_text() != "{}\n"
    _check_the_sft_arms(out / "seed1", summary)
    assert summary["arms"]["luffy"]["tokens_trained"] > 0 and summary["arms"]["rl_sft_loss"]["tokens_trained"] > 0
    # the untrained model never solves the task, and on-policy GRPO gets no reward to learn from
    assert summary["arms"]["grpo"]["final_train_reward_on_policy"] == 0.0
    assert (out / "curves_seed1.png").stat().st_size > 10_000
    assert all(f"| 1 | {arm} |" in (out / "seeds.md").read_text() for arm in ARMS)
    report = (out / "results.md").read_text()
    assert report in proc.stdout and report.count("| arm |") == 1  # one table
    head = next(line for line in report.splitlines() if line.startswith("| arm |"))
    assert head.endswith(
        "| in distribution, avg@4 (%) | out of distribution: 3-digit operands, avg@4 (%) | "
        "out of distribution: unpadded operands, avg@4 (%) |"
    )
    assert "tokens trained" in head
    assert [line.split(" | ")[0] for line in report.splitlines()[-len(ARMS) :]] == [f"| {arm}" for arm in ARMS]
    assert "sft_rl: 1 steps of sft, then 1 steps of grpo, from its weights." in report
    held_out = (out / "eval_seed1.md").read_text()  # luffy-eval of every arm's final model on both sets
    assert held_out in proc.stdout and "| synthetic_add (avg@4) | Avg. |" in held_out
    assert "| synthetic_add_unpadded (avg@4) | synthetic_add_wider (avg@4) | Avg. |" in held_out
    assert all(f"| {arm} |" in held_out for arm in ARMS)
    config = json.loads((out / "seed1" / "tiny_model" / "config.json").read_text())
    assert config["vocab_size"] == 128 and config["intermediate_size"] > 0
    _check_the_ood_split(out / "seed1")


def _check_the_sft_arms(seed_dir: Path, summary: dict) -> None:
    """``sft`` trains the traces' NLL at every step; ``sft_rl`` runs SFT (its checkpoint and HF export in
    ``sft_rl/sft/ckpt``), then on-policy RL from those weights, and counts both runs' steps and tokens."""
    from luffy_megatron.metrics.logger import read_jsonl

    def trained(rows: list[dict]) -> int:
        return sum(r.get("perf/update_real_tokens", 0) for r in rows)

    sft = read_jsonl(seed_dir / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft] == [1, 2] and all(r["actor/sft_nll"] > 0 for r in sft)
    assert "reward/on_policy" not in sft[-1]  # nothing generated but validation
    assert summary["arms"]["sft"]["tokens_trained"] == trained(sft) > 0
    arm = seed_dir / "sft_rl"
    first, last = read_jsonl(arm / "sft" / "metrics.jsonl"), read_jsonl(arm / "metrics.jsonl")
    assert len(first) == 1 and first[0]["actor/sft_nll"] > 0 and (arm / "sft" / "ckpt" / "step_000001").is_dir()
    assert len(last) == 1 and "reward/on_policy" in last[0] and "actor/sft_nll" not in last[0]  # grpo: on-policy
    row = summary["arms"]["sft_rl"]
    assert row["steps"] == 2 and row["phases"] == {"sft": 1, "grpo": 1}
    assert row["tokens_trained"] == trained(first) + trained(last) > 0
    # the RL run starts from the SFT weights: it trained no sample (no reward yet), so its final model is the SFT one
    assert last[0]["actor/trained_samples"] == 0
    start, sft_model = _weights(seed_dir / "tiny_model"), _weights(arm / "sft" / "ckpt" / "hf_final")
    final = _weights(arm / "hf_final")
    assert sorted(final) == sorted(sft_model) == sorted(start)
    assert all(final[k].equal(v) for k, v in sft_model.items())
    assert not all(start[k].equal(v) for k, v in sft_model.items())


def _weights(model_dir: Path) -> dict:
    """An HF model folder's tensors, over its safetensors shards."""
    from safetensors.torch import load_file

    return {k: v for path in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(path).items()}


def test_sft_rl_splits_the_steps() -> None:
    assert phase_steps(700, 0.5) == (350, 350) and phase_steps(2, 0.5) == (1, 1)
    assert phase_steps(10, 0.0) == (1, 9) and phase_steps(10, 1.0) == (9, 1)  # each run at least one step
    with pytest.raises(SystemExit, match="at least 2 steps"):
        phase_steps(1, 0.5)


def _check_the_ood_split(seed_dir: Path) -> None:
    """The OOD set: kinds training never shows (training pads every operand to 2 digits; OOD operands have 3 digits,
    or one is written without its padding), every trace rewarded, and every trace and prompt within the demo's limits
    in the demo's own tokenizer."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from luffy_megatron.data.dataset import strip_think_prefix
    from luffy_megatron.data.synthetic import OOD_KINDS
    from luffy_megatron.reward.math_reward import score_one

    def operands(row: dict) -> list[str]:
        return row["prompt"][-1]["content"].rstrip("=").split("+")

    train = pq.read_table(seed_dir / "task" / "train.parquet").to_pylist()
    ood = pq.read_table(seed_dir / "task" / "ood.parquet").to_pylist()
    assert {len(x) for r in train for x in operands(r)} == {2}
    wider = [r for r in ood if r["data_source"] == OOD_KINDS["wider"]]
    unpadded = [r for r in ood if r["data_source"] == OOD_KINDS["unpadded"]]
    assert len(wider) == len(unpadded) == NUM_OOD and len(ood) == 2 * NUM_OOD
    wider_operands = [x for r in wider for x in operands(r)]
    assert {len(x) for x in wider_operands} == {3} and not any(x.startswith("0") for x in wider_operands)
    assert all(min(len(x) for x in operands(r)) == 1 for r in unpadded)
    tokenizer = AutoTokenizer.from_pretrained(seed_dir / "tiny_model")
    max_positions = json.loads((seed_dir / "tiny_model" / "config.json").read_text())["max_position_embeddings"]
    for row in ood:
        trace, truth = row["target"][0]["content"], row["reward_model"]["ground_truth"]
        assert score_one(trace, truth, False, None) == 1.0
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        target = strip_think_prefix(trace, prompt)
        response = tokenizer(target, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(response) == target  # representable: the tokens give the text back
        assert len(response) + 1 <= MAX_NEW_TOKENS["ood"]  # and EOS
        assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + MAX_NEW_TOKENS["ood"] <= max_positions


def test_the_report_spreads_each_arm_over_the_seeds(tmp_path: Path) -> None:
    """Several seeds: one row per arm, mean (min-max) of tokens and held-out avg@k; the columns are the task's data
    sources. ``--report-only`` writes the same report from seeds that separate calls finished."""
    from luffy_megatron.data.synthetic import DATA_SOURCE, OOD_KINDS

    assert list(HELD_OUT) == [DATA_SOURCE, *OOD_KINDS.values()]

    def arm(tokens: int, *scores: float) -> dict:
        held_out = {src: {"problems": 256, "k": 4, "avg@k": v} for src, v in zip(HELD_OUT, scores)}
        curve = dict.fromkeys(("final_val_greedy", "best_val_greedy", "final_train_reward_on_policy"), 0.5)
        curve.update(first_step_above_50pct=None, train_seconds_to_50pct=None, seconds=9.0)
        return {"steps": 700, "tokens_trained": tokens, "tokens": 2 * tokens, "held_out": held_out, **curve}

    summaries = [
        {"seed": 1, "arms": {"luffy": arm(1_000_000, 0.70, 0.0, 0.10), "grpo": arm(0, 0.0, 0.0, 0.0)}},
        {"seed": 2, "arms": {"luffy": arm(3_000_000, 0.80, 0.0, 0.30), "grpo": arm(0, 0.0, 0.0, 0.0)}},
    ]
    lines = table(summaries).splitlines()
    assert "seeds 1, 2, mean over seeds (min-max)" in lines[0] and "3-digit operands 256" in lines[0]
    assert (
        lines[-2]
        == "| luffy | 2.00 (1.00-3.00) | 4.00 (2.00-6.00) | 75.0 (70.0-80.0) | 0.0 (0.0-0.0) | 20.0 (10.0-30.0) |"
    )
    assert lines[-1] == "| grpo | 0.00 (0.00-0.00) | 0.00 (0.00-0.00) | 0.0 (0.0-0.0) | 0.0 (0.0-0.0) | 0.0 (0.0-0.0) |"
    assert table(summaries[:1]).splitlines()[-2] == "| luffy | 1.00 | 2.00 | 70.0 | 0.0 | 10.0 |"
    for summary in summaries:
        (tmp_path / f"summary_seed{summary['seed']}.json").write_text(json.dumps(summary))
    assert main(["--out", str(tmp_path), "--report-only", "--seeds", "1", "2"]) == 0
    assert (tmp_path / "results.md").read_text() == table(summaries) + "\n"
    assert "| 2 | grpo |" in (tmp_path / "seeds.md").read_text()
    with pytest.raises(SystemExit, match="summary_seed3.json is missing"):
        main(["--out", str(tmp_path), "--report-only", "--seeds", "1", "3"])


def test_prepare_only_makes_the_paths_the_demo_config_names(tmp_path: Path) -> None:
    """``--prepare-only`` writes seed 1's model and task where ``configs/tiny_cpu_luffy.yaml`` looks for them."""
    from luffy_megatron.config import load_config
    from luffy_megatron.config_checks import expert_count

    cmd = [sys.executable, str(ROOT / "tools" / "run_demo.py"), "--out", "outputs/demo", "--prepare-only"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config(str(ROOT / "configs" / "tiny_cpu_luffy.yaml"), [])
    assert (tmp_path / cfg.model.hf_path / "config.json").is_file()
    for path in (*cfg.data.train_files, *cfg.data.val_files):
        assert (tmp_path / path).is_file(), path
    assert not (tmp_path / "outputs" / "demo" / "seed1" / "luffy").exists()  # nothing was trained
    # luffy_moe's model: the dense one's width, heads and tokenizer, with 4 routed experts of half its FFN, top-2
    seed_dir = tmp_path / "outputs" / "demo" / "seed1"
    dense, moe = (json.loads((seed_dir / m / "config.json").read_text()) for m in ("tiny_model", "tiny_moe_model"))
    assert moe["architectures"] == ["Qwen3MoeForCausalLM"] and moe["num_experts_per_tok"] == 2
    assert expert_count(moe)[1] == 4  # transformers writes it as num_local_experts
    assert 2 * moe["moe_intermediate_size"] == dense["intermediate_size"] and moe["hidden_size"] == dense["hidden_size"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (seed_dir / "tiny_model" / name).read_text() == (seed_dir / "tiny_moe_model" / name).read_text()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimiser.lr=1e-4", "optimiser"),
        ("algorithm.rollout_is=tis", "rollout_is"),
    ],
)
def test_a_bad_override_is_rejected_before_any_arm_trains(tmp_path: Path, override: str, named: str) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "tools" / "run_demo.py"), "--out", str(out), "--override", override]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "arm luffy" in proc.stderr and named in proc.stderr, proc.stderr[-3000:]
    assert not (out / "seed1" / "luffy").exists()


def test_the_sglang_arm_trains_with_a_real_server_it_launches(tmp_path: Path) -> None:
    """``luffy_sglang``: rollouts and validation from the real SGLang server (CPU engine), distributed weight sync;
    after each sync the server's log-probs are the trainer's."""
    from luffy_megatron.metrics.logger import read_jsonl
    from tests.sglang_real import sglang_python

    sglang_python()  # the sglang tier: skipped (or failed under LUFFY_REQUIRE_ALL_TIERS=1) without it
    out = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "tools" / "run_demo.py"), "--out", str(out), "--steps", "2"]
    cmd += ["--val-interval", "2", "--arms", "luffy_sglang"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = read_jsonl(out / "seed1" / "luffy_sglang" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "val/all/avg@1" in rows[-1]
    assert all(r["actor/train_rollout_logprob_gap_max"] < 5e-5 for r in rows)
    assert (out / "seed1" / "luffy_sglang" / "rollout_servers" / "sglang_0.log").is_file()
