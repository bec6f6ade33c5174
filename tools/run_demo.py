"""The CPU demo: LUFFY vs on-policy GRPO on a task the untrained model never solves.

Makes a tiny Qwen2-style model and the synthetic addition task (expert traces in the paper's
``<think>...</think> \\boxed{}`` format), trains each arm with ``luffy-train`` (same steps, same seed; the arms run
side by side, one CPU thread each), then writes curves (PNG) and a table of held-out greedy accuracy.

Arms: ``luffy`` (policy shaping p/(p+0.1)), ``grpo`` (n_off=0, PPO clip), ``luffy_no_shaping`` (f(p)=p, the paper's
shaping ablation; not run by default).

example:
  python tools/run_demo.py --out outputs/demo --steps 700 --arms luffy grpo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "luffy": [],
    "grpo": ["rollout.n_off=0", "algorithm.clip_ratio=true"],
    "luffy_no_shaping": ["algorithm.off_policy_reshape=no_reshape"],
}
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu_luffy.yaml"
VAL_KEY = "val/all/avg@1"


def prepare(out: Path, seed: int) -> tuple[Path, Path]:
    """The tiny model and the task (made once; reused when present)."""
    from luffy_megatron.data.synthetic import write_task
    from luffy_megatron.models.tiny import make_tiny_model

    model_dir, task_dir = out / "tiny_model", out / "task"
    if not (model_dir / "config.json").is_file():
        make_tiny_model(
            model_dir, family="qwen2", hidden_size=128, layers=2, heads=4, kv_heads=4, intermediate_size=512, seed=seed
        )
    if not (task_dir / "train.parquet").is_file():
        write_task(task_dir, num_train=9000, num_val=256, seed=seed, system_prompt=None)
    return model_dir, task_dir


def run_arms(arms: list[str], out: Path, model_dir: Path, task_dir: Path, steps: int, seed: int) -> dict[str, float]:
    """Train the arms concurrently (one thread each); returns wall seconds per arm."""
    procs = {}
    for arm in arms:
        run_dir = out / arm
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "luffy_megatron.train.cli",
            str(CONFIG),
            f"model.hf_path={model_dir}",
            f"data.train_files=[{task_dir / 'train.parquet'}]",
            f"data.val_files=[{task_dir / 'val.parquet'}]",
            f"logging.out_dir={run_dir}",
            "logging.progress_bar=false",  # this driver shows one bar per arm
            f"trainer.total_steps={steps}",
            f"trainer.seed={seed}",
            f"rollout.seed={seed}",
            f"data.seed={seed}",
            *ARMS[arm],
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + 17 * len(procs) + seed % 7))
        log = (run_dir / "train.log").open("w")
        procs[arm] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
        print(f"started {arm}: log in {run_dir / 'train.log'}", flush=True)
    finished = _progress(procs, out, steps)
    seconds = {}
    for arm, (proc, start, log) in procs.items():
        code = proc.wait()
        log.close()
        seconds[arm] = finished.get(arm, time.time()) - start
        if code != 0:
            tail = (out / arm / "train.log").read_text().splitlines()[-20:]
            raise SystemExit(f"arm {arm} failed (exit {code}):\n" + "\n".join(tail))
    return seconds


def _progress(procs: dict, out: Path, steps: int) -> dict[str, float]:
    """Progress bars until every arm exits; returns each arm's finishing time."""
    from tqdm import tqdm

    bars = {arm: tqdm(total=steps, desc=arm, position=i, leave=True) for i, arm in enumerate(procs)}
    finished: dict[str, float] = {}
    while len(finished) < len(procs):
        time.sleep(2)
        for arm, (proc, _, _) in procs.items():
            if arm not in finished and proc.poll() is not None:
                finished[arm] = time.time()
        for arm, bar in bars.items():
            path = out / arm / "metrics.jsonl"
            done = sum(1 for _ in path.open()) if path.is_file() else 0
            bar.update(done - bar.n)
    for bar in bars.values():
        bar.close()
    return finished


def summarise(arms: list[str], out: Path, seconds: dict[str, float], seed: int) -> dict:
    from luffy_megatron.metrics.logger import read_jsonl

    rows = {}
    for arm in arms:
        records = read_jsonl(out / arm / "metrics.jsonl")
        vals = [(r["step"], r[VAL_KEY]) for r in records if r.get(VAL_KEY) is not None]
        first_half = next((s for s, v in vals if v > 0.5), None)
        rows[arm] = {
            "final_val_greedy": vals[-1][1] if vals else None,
            "best_val_greedy": max((v for _, v in vals), default=None),
            "first_step_above_50pct": first_half,
            "final_train_reward_on_policy": records[-1].get("reward/on_policy") if records else None,
            "steps": records[-1]["step"] if records else 0,
            "seconds": round(seconds[arm], 1),
        }
    return {"seed": seed, "arms": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="LUFFY vs on-policy GRPO on CPU (tiny model, synthetic addition task).",
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--steps", type=int, default=700, help="RL steps per arm (same budget for every arm)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=["luffy", "grpo"], choices=sorted(ARMS))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, task_dir = prepare(out, args.seed)
    seconds = run_arms(args.arms, out, model_dir, task_dir, args.steps, args.seed)
    summary = summarise(args.arms, out, seconds, args.seed)
    (out / f"summary_seed{args.seed}.json").write_text(json.dumps(summary, indent=1))

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plot_metrics import plot

    png = plot(
        [str(out / a / "metrics.jsonl") for a in args.arms],
        args.arms,
        ["reward/on_policy", VAL_KEY, "actor/entropy", "response/length_mean"],
        str(out / f"curves_seed{args.seed}.png"),
        title=f"tiny CPU demo, seed {args.seed}",
    )
    print("\n| arm | held-out greedy accuracy (final) | best | first step > 50% | train reward (on-policy) | s |")
    print("|---|---|---|---|---|---|")
    for arm, r in summary["arms"].items():
        print(
            f"| {arm} | {r['final_val_greedy']} | {r['best_val_greedy']} | {r['first_step_above_50pct']} | "
            f"{r['final_train_reward_on_policy']} | {r['seconds']} |"
        )
    print(f"\ncurves: {png}\nsummary: {out / f'summary_seed{args.seed}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
