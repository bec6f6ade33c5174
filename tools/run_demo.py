"""The CPU demo: LUFFY vs on-policy GRPO on a task the untrained model never solves.

Makes a tiny Qwen2-style model and the synthetic addition task (expert traces in the paper's
``<think>...</think> \\boxed{}`` format), trains each arm with ``luffy-train`` (same steps, same seed; the arms run
side by side, one CPU thread each), then writes curves (PNG) and a table of held-out greedy accuracy.

Arms: ``luffy`` (policy shaping p/(p+0.1)), ``grpo`` (n_off=0, PPO clip), ``luffy_no_shaping`` (f(p)=p, the paper's
shaping ablation; not run by default), ``luffy_async`` (LUFFY with one-step-off asynchronous rollout and token-level
truncated IS, cap 10; not run by default; it uses two threads, so compare its step time with ``--sequential``),
``luffy_async_no_is`` (the same without the IS correction), ``luffy_on_baseline`` and ``luffy_async_on_baseline``
(``luffy`` and ``luffy_async`` with ``algorithm.on_policy_baseline=on_policy_mean``; not run by default),
``luffy_sglang`` (``luffy`` with rollouts from a real SGLang server on its CPU engine; needs ``make sglang-venv``;
not run by default).

Each seed gets its own model, task and runs under ``OUT/seed<S>/``; ``OUT/results.md`` has the table of all seeds.
``--override KEY=VALUE ...`` changes the config of every arm alike (checked before any arm starts).

example:
  python tools/run_demo.py --out outputs/demo --seeds 1 2 3 --arms luffy grpo
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
    # One-step-off asynchronous rollout: the engine in its own process (one torch thread) generates step k+1's batch
    # while step k trains; per-token IS corrects for the one-update-old weights. The cap is 10, not the usual 2: at
    # this demo's learning rate one update moves a token's probability by up to ~10x, and a cap that binds leaves a
    # bias that feeds the last update back (docs/rollout.md, "Asynchronous rollout").
    "luffy_async": [
        "trainer.async_rollout=true",
        "trainer.async_rollout_threads=1",
        "algorithm.rollout_is=token_tis",
        "algorithm.rollout_is_cap=10",
    ],
    "luffy_async_no_is": ["trainer.async_rollout=true", "trainer.async_rollout_threads=1"],
}
# On-policy samples centred on the mean of the group's rollouts, traces left out (docs/algorithm.md).
ARMS["luffy_on_baseline"] = ["algorithm.on_policy_baseline=on_policy_mean"]
ARMS["luffy_async_on_baseline"] = [*ARMS["luffy_async"], *ARMS["luffy_on_baseline"]]
REPO = Path(__file__).resolve().parents[1]
#: ``luffy_sglang``: LUFFY with rollouts from a real SGLang server that the trainer launches on SGLang's CPU engine
#: (``make sglang-venv``; with the CPU import stand-ins of tests/sglang_cpu) and distributed weight sync over gloo.
#: SGLang ignores sampling seeds on CPU, so these runs do not repeat exactly.
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
ARMS["luffy_sglang"] = [
    "rollout.backend=sglang",
    "rollout.sglang.launch=true",
    "rollout.sglang.weight_sync=distributed",
    "rollout.sglang.device=cpu",
    "rollout.sglang.dtype=float32",
    f"rollout.sglang.python={SGLANG_PYTHON}",
    f"rollout.sglang.env.PYTHONPATH={REPO / 'tests' / 'sglang_cpu'}",
    "rollout.sglang.env.OMP_NUM_THREADS=1",
    "rollout.sglang.extra_args=[--max-total-tokens,32768]",
]
CONFIG = REPO / "configs" / "tiny_cpu_luffy.yaml"
VAL_KEY = "val/all/avg@1"
STEPS = 700
# ~0.32M parameters; the tokenizer is byte-level BPE over ASCII with merges from the task's text (under 128 tokens:
# Megatron pads the vocabulary to 128 rows anyway); the compact chat template makes a prompt 9 tokens.
MODEL = dict(family="qwen2", vocab_size=128, ascii_only=True, chat_template="compact", hidden_size=96, layers=2,
             heads=4, kv_heads=4, intermediate_size=384)  # fmt: skip


def prepare(out: Path, seed: int) -> tuple[Path, Path]:
    """The tiny model and the task (made once; reused when present)."""
    from luffy_megatron.data.synthetic import tokenizer_corpus, write_task
    from luffy_megatron.models.tiny import make_tiny_model

    model_dir, task_dir = out / "tiny_model", out / "task"
    if not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir, **MODEL, corpus=tokenizer_corpus(), seed=seed)
    if not (task_dir / "train.parquet").is_file():
        write_task(task_dir, num_train=9000, num_val=256, seed=seed, system_prompt=None)
    return model_dir, task_dir


def arm_overrides(
    arm: str, run_dir: Path, model_dir: Path, task_dir: Path, args: argparse.Namespace, seed: int
) -> list[str]:
    """The ``luffy-train`` overrides of one arm: the seed's model and task, the run settings, the arm's own options,
    then ``--override``."""
    from luffy_megatron.platform.distributed import free_port

    return [
        f"model.hf_path={model_dir}",
        f"data.train_files=[{task_dir / 'train.parquet'}]",
        f"data.val_files=[{task_dir / 'val.parquet'}]",
        f"logging.out_dir={run_dir}",
        "logging.progress_bar=false",  # this driver shows one bar per arm
        f"trainer.total_steps={args.steps}",
        f"trainer.val_interval={args.val_interval}",
        f"trainer.seed={seed}",
        f"rollout.seed={seed}",
        f"data.seed={seed}",
        "checkpoint.export_hf_at_end=true",  # OUT/<arm>/hf_final, for luffy-eval
        *ARMS[arm],
        *([f"rollout.sglang.base_port={free_port()}"] if arm == "luffy_sglang" else []),  # ports of its own
        *args.override,
    ]


def run_arms(
    arms: list[str], out: Path, model_dir: Path, task_dir: Path, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    """Check every arm's config, then train the arms concurrently (one thread each); returns wall seconds per arm."""
    from luffy_megatron.config import ConfigError, load_config
    from luffy_megatron.config_checks import validate
    from luffy_megatron.platform.distributed import free_port  # each arm's process group needs its own port

    if "luffy_sglang" in arms and not SGLANG_PYTHON.is_file():
        raise SystemExit(f"arm luffy_sglang: {SGLANG_PYTHON} is missing; build it with `make sglang-venv`")
    overrides = {arm: arm_overrides(arm, out / arm, model_dir, task_dir, args, seed) for arm in arms}
    for arm, arm_args in overrides.items():
        try:
            validate(load_config(CONFIG, arm_args), world_size=1)
        except ConfigError as e:
            raise SystemExit(f"arm {arm}: {e}") from None
    procs = {}
    for arm in arms:
        run_dir = out / arm
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "luffy_megatron.train.cli", str(CONFIG), *overrides[arm]]
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
        log = (run_dir / "train.log").open("w")
        procs[arm] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
        print(f"started {arm}: log in {run_dir / 'train.log'}", flush=True)
    finished = _progress(procs, out, args.steps)
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


def summarise(arms: list[str], run_root: Path, seconds: dict[str, float]) -> dict:
    """Per arm: held-out greedy accuracy (final, best), when it first passed 50% (step and seconds), train reward."""
    from luffy_megatron.metrics.logger import read_jsonl

    rows = {}
    for arm in arms:
        records = read_jsonl(run_root / arm / "metrics.jsonl")
        vals = [r for r in records if r.get(VAL_KEY) is not None]
        first = next((r for r in vals if r[VAL_KEY] > 0.5), None)
        started = records[0]["time"] - records[0].get("perf/step_s", 0.0) if records else 0.0
        rows[arm] = {
            "final_val_greedy": vals[-1][VAL_KEY] if vals else None,
            "best_val_greedy": max((r[VAL_KEY] for r in vals), default=None),
            "first_step_above_50pct": first["step"] if first else None,
            "train_seconds_to_50pct": round(first["time"] - started, 1) if first else None,
            "final_train_reward_on_policy": records[-1].get("reward/on_policy") if records else None,
            "steps": records[-1]["step"] if records else 0,
            "mean_step_s": round(sum(r["perf/step_s"] for r in records) / len(records), 4) if records else None,
            "seconds": round(seconds[arm], 1),
        }
    return rows


def evaluate_arms(arms: list[str], run_root: Path, task_dir: Path) -> str:
    """luffy-eval on each arm's final model over the held-out problems (the paper's temperature 0.6 and top-p 1.0,
    4 samples each, the demo's 28-token response limit); the arms' tables side by side."""
    from luffy_megatron.eval import EvalOptions, compare, run_eval

    dirs = [run_root / arm / "eval" for arm in arms]
    for arm, out in zip(arms, dirs):
        data = [str(task_dir / "val.parquet")]
        opts = EvalOptions(str(run_root / arm / "hf_final"), data, str(out), name=arm, n=4, max_new_tokens=28)
        run_eval(opts, progress=False)
    return compare([str(d) for d in dirs])


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One seed: its own model, task and arm folders under ``out/seed<S>``; writes its summary and curves."""
    run_root = out / f"seed{seed}"
    model_dir, task_dir = prepare(run_root, seed)
    groups = [[a] for a in args.arms] if args.sequential else [args.arms]
    seconds = {}
    for arms in groups:
        seconds.update(run_arms(arms, run_root, model_dir, task_dir, args, seed))
    summary = {"seed": seed, "overrides": args.override, "arms": summarise(args.arms, run_root, seconds)}
    (out / f"summary_seed{seed}.json").write_text(json.dumps(summary, indent=1))
    held_out = evaluate_arms(args.arms, run_root, task_dir)
    (out / f"eval_seed{seed}.md").write_text(held_out)
    print(f"\nseed {seed}, held-out problems, luffy-eval of the final models:\n\n{held_out}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plot_metrics import plot

    plot(
        [str(run_root / a / "metrics.jsonl") for a in args.arms],
        args.arms,
        ["reward/on_policy", VAL_KEY, "actor/entropy", "response/length_mean"],
        str(out / f"curves_seed{seed}.png"),
        title=f"tiny CPU demo, seed {seed}",
    )
    return summary


def table(summaries: list[dict]) -> str:
    """Markdown table: one row per seed and arm."""
    lines = [
        "| seed | arm | held-out greedy accuracy (final) | best | first step > 50% | train s to 50% | "
        "train reward (on-policy, last step) | mean step s | s (whole run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for summary in summaries:
        for arm, r in summary["arms"].items():
            cells = [
                fmt(r["final_val_greedy"], ".3f"),
                fmt(r["best_val_greedy"], ".3f"),
                fmt(r["first_step_above_50pct"], "d"),
                fmt(r["train_seconds_to_50pct"], ".0f"),
                fmt(r["final_train_reward_on_policy"], ".2f"),
                fmt(r.get("mean_step_s"), ".3f"),
                fmt(r["seconds"], ".0f"),
            ]
            lines.append(f"| {summary['seed']} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="LUFFY vs on-policy GRPO on CPU (tiny model, synthetic addition task).",
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"RL steps per arm, the same for every arm ({STEPS})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds, run one after another (default 1)")
    parser.add_argument("--arms", nargs="+", default=["luffy", "grpo"], choices=sorted(ARMS))
    parser.add_argument(
        "--sequential", action="store_true", help="run the arms one after another (for step times), not side by side"
    )
    parser.add_argument("--val-interval", type=int, default=50, help="held-out evaluation every N steps")
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every arm, after the arm's own (e.g. optimizer.lr=2.5e-4)",
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="only make each seed's model and task (OUT/seed<S>/), then stop"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        for seed in args.seeds:
            model_dir, task_dir = prepare(out / f"seed{seed}", seed)
            print(f"seed {seed}: model {model_dir}, task {task_dir}")
        return 0
    summaries = [run_seed(args, seed, out) for seed in args.seeds]
    report = table(summaries)
    (out / "results.md").write_text(report + "\n")
    print("\n" + report)
    print(f"\ncurves: {out}/curves_seed<S>.png  summaries: {out}/summary_seed<S>.json  table: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
