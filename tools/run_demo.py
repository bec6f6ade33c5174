"""The CPU demo: LUFFY vs on-policy GRPO and the paper's baselines on a task the untrained model never solves.

Makes a tiny Qwen2-style model and the synthetic addition task (expert traces in the paper's
``<think>...</think> \\boxed{}`` format) with held-out sets in distribution (``val.parquet``, unseen 2-digit
problems) and out of distribution (``ood.parquet``: 3-digit operands, a column more than training ever shows, and
operands without their zero padding, ``7+85=``; see ``luffy_megatron.data.synthetic``). Trains each arm with
``luffy-train`` (same steps over the same prompts, same seed; the arms run side by side, one CPU thread each),
evaluates each final model on both files with ``luffy-eval`` (avg@4), then writes curves (PNG) and the report: one
table, arm x {in distribution, out of distribution}, with each arm's tokens trained.

Arms: ``luffy`` (policy shaping p/(p+0.1)), ``grpo`` (n_off=0, PPO clip), ``luffy_no_shaping`` (f(p)=p, the paper's
shaping ablation; not run by default), ``luffy_async`` (LUFFY with one-step-off asynchronous rollout and token-level
truncated IS, cap 10; not run by default; it uses two threads, so compare its step time with ``--sequential``),
``luffy_async_no_is`` (the same without the IS correction), ``luffy_on_baseline`` and ``luffy_async_on_baseline``
(``luffy`` and ``luffy_async`` with ``algorithm.on_policy_baseline=on_policy_mean``; not run by default),
``luffy_sglang`` (``luffy`` with rollouts from a real SGLang server on its CPU engine; needs ``make sglang-venv``;
not run by default), ``luffy_moe`` (``luffy`` on a tiny mixture-of-experts model; not run by default),
``rl_sft_loss`` (the paper's "RL w/ SFT loss" baseline: LUFFY's batches, the rollouts' policy gradient with a
baseline from the rollouts alone, the trace's NLL in place of its shaped gradient; not run by default), ``sft``
(imitation: the traces' token-mean NLL, ``trainer.mode=sft``; not run by default), ``sft_rl`` (the paper's "SFT+RL":
``sft`` for ``--sft-fraction`` of the steps, then the ``grpo`` arm's on-policy RL from the SFT checkpoint, two runs;
not run by default).

The budget: every arm takes ``--steps`` steps of ``data.train_batch_size`` prompts, the sampler's same prompts in the
same order, one optimiser step each; the tokens each arm then trains on are its own (SFT trains only the traces, GRPO
skips groups without a reward signal) and the report states them.

Each seed gets its own model, task and runs under ``OUT/seed<S>/``; ``OUT/results.md`` has the table over all seeds
(mean and min-max), ``OUT/seeds.md`` the training curves' numbers per seed.
``--override KEY=VALUE ...`` changes the config of every arm alike (checked before any arm starts).

example:
  python tools/run_demo.py --out outputs/compare --seeds 1 2 3 \\
      --arms luffy luffy_no_shaping grpo sft sft_rl rl_sft_loss
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
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
# The paper's "RL w/ SFT loss" baseline as its released script sets it (exp_scripts/train_rl_sft_loss.sh): LUFFY's
# script with use_off_policy_loss=False, use_sft_multitask_loss=True (sft_loss_coef 1.0) and the grpo_split advantage
# (group statistics of the on-policy samples), everything else alike. Here: the trace's tokens get sft_loss_coeff x
# NLL instead of the shaped policy gradient, and sft_loss implies the on-policy-only baseline (docs/algorithm.md).
ARMS["rl_sft_loss"] = ["algorithm.sft_loss=true", "algorithm.sft_loss_coeff=1.0"]
# On-policy samples centred on the mean of the group's rollouts, traces left out (docs/algorithm.md).
ARMS["luffy_on_baseline"] = ["algorithm.on_policy_baseline=on_policy_mean"]
ARMS["luffy_async_on_baseline"] = [*ARMS["luffy_async"], *ARMS["luffy_on_baseline"]]
# Imitation: SFT on the same traces (trainer.mode=sft and the loss it requires; docs/training.md, "SFT"), the demo's
# optimiser, learning rate and batches otherwise.
ARMS["sft"] = ["trainer.mode=sft", "algorithm.sft_loss=true", "algorithm.loss_agg_mode=token_mean"]
#: Arms of several runs, one after another, each starting from the previous one's checkpoint: the arms (of ``ARMS``)
#: whose options each run takes. ``sft_rl``, the paper's "SFT+RL": SFT on the traces, then on-policy RL from the SFT
#: model. The steps are split by ``--sft-fraction``; every run but the last works in ``OUT/seed<S>/<arm>/<its arm>``.
PHASES = {"sft_rl": ("sft", "grpo")}
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
START = "model.megatron_checkpoint="
SFT_FRACTION = 0.5  # sft_rl: the share of the steps that SFT takes
VAL_KEY = "val/all/avg@1"
STEPS = 700
NUM_VAL = NUM_OOD = 256  # held-out problems: in distribution, and of each out-of-distribution kind
EVAL_SAMPLES = 4  # luffy-eval samples per problem: avg@4
# luffy-eval's response limits: the demo's 28 in distribution (traces of 18-24 tokens after the prompt's <think>, then
# EOS); out of distribution the 3-digit traces are 26-34 tokens (unpadded ones 18-24), so the same 3 spare give 38.
MAX_NEW_TOKENS = {"val": 28, "ood": 38}
EVAL_FOLDERS = {"val": "eval", "ood": "eval_ood"}  # luffy-eval's output folder in OUT/seed<S>/<arm>/, per file
#: The report's columns: the held-out data sources (luffy_megatron.data.synthetic) and their headings.
HELD_OUT = {
    "synthetic_add": "in distribution",
    "synthetic_add_wider": "out of distribution: 3-digit operands",
    "synthetic_add_unpadded": "out of distribution: unpadded operands",
}
# ~0.32M parameters; the tokenizer is byte-level BPE over ASCII with merges from the task's text (under 128 tokens:
# Megatron pads the vocabulary to 128 rows anyway); the compact chat template makes a prompt 9 tokens.
MODEL = dict(
    family="qwen2",
    vocab_size=128,
    ascii_only=True,
    chat_template="compact",
    hidden_size=96,
    layers=2,
    heads=4,
    kv_heads=4,
    intermediate_size=384,
)


#: ``luffy_moe``: LUFFY on a tiny Qwen3-MoE beside the dense model (``OUT/seed<S>/tiny_moe_model``): the same width,
#: heads and tokenizer, Qwen3's attention (QK-norm, no biases), and in each layer 4 SwiGLU experts of half the dense
#: FFN, routed top-2 (the same FFN width per token, twice the FFN parameters) with the load-balancing loss at
#: Qwen3-MoE's coefficient (0.001).
MOE_MODEL = {
    **MODEL,
    "family": "qwen3_moe",
    "moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 192},
}
MODELS = {"tiny_model": MODEL, "tiny_moe_model": MOE_MODEL}  # folder in OUT/seed<S>/ -> make_tiny_model arguments
ARMS["luffy_moe"] = []
MOE_ARMS = {"luffy_moe"}


def prepare(out: Path, seed: int) -> tuple[Path, Path]:
    """The tiny models (dense, and MoE for ``MOE_ARMS``) and the task, made once and reused when present; returns the
    dense model's folder and the task's."""
    from luffy_megatron.data.synthetic import tokenizer_corpus, write_ood, write_task
    from luffy_megatron.models.tiny import make_tiny_model

    model_dir, task_dir = out / "tiny_model", out / "task"
    for folder, spec in MODELS.items():
        if not (out / folder / "config.json").is_file():
            make_tiny_model(out / folder, **spec, corpus=tokenizer_corpus(), seed=seed)
    if not (task_dir / "train.parquet").is_file():
        write_task(task_dir, num_train=9000, num_val=NUM_VAL, seed=seed, system_prompt=None)
    if not (task_dir / "ood.parquet").is_file():  # its own random stream: train and val are the same without it
        write_ood(task_dir, NUM_OOD, seed=seed, system_prompt=None)
    return model_dir, task_dir


def arm_overrides(
    arm: str,
    run_dir: Path,
    model_dir: Path,
    task_dir: Path,
    args: argparse.Namespace,
    seed: int,
    steps: int | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The ``luffy-train`` overrides of one arm of ``ARMS``: the seed's model and task, the run settings (``steps``,
    default ``--steps``), the arm's own options, ``extra``, then ``--override``."""
    from luffy_megatron.platform.ports import free_port_block

    model = model_dir.parent / "tiny_moe_model" if arm in MOE_ARMS else model_dir
    return [
        f"model.hf_path={model}",
        f"data.train_files=[{task_dir / 'train.parquet'}]",
        f"data.val_files=[{task_dir / 'val.parquet'}]",
        f"logging.out_dir={run_dir}",
        "logging.progress_bar=false",  # this driver shows one bar per arm
        f"trainer.total_steps={steps or args.steps}",
        f"trainer.val_interval={args.val_interval}",
        f"trainer.seed={seed}",
        f"rollout.seed={seed}",
        f"data.seed={seed}",
        "checkpoint.export_hf_at_end=true",  # OUT/<arm>/hf_final, for luffy-eval
        *ARMS[arm],
        *([f"rollout.sglang.base_port={free_port_block()}"] if arm == "luffy_sglang" else []),  # ports of its own
        *extra,
        *args.override,
    ]


def phase_steps(steps: int, sft_fraction: float) -> tuple[int, int]:
    """A phased arm's steps: (SFT, RL), ``sft_fraction`` of ``steps`` rounded, each at least 1."""
    if steps < 2:
        raise SystemExit(f"--steps {steps}: an arm of two runs ({', '.join(PHASES)}) needs at least 2 steps")
    first = min(max(round(steps * sft_fraction), 1), steps - 1)
    return first, steps - first


def phase_dirs(run_dir: Path, arm: str) -> list[Path]:
    """Each run's output folder, in order: the arm's folder for the last (its ``hf_final`` is the arm's model)."""
    return [run_dir / phase for phase in PHASES.get(arm, ())[:-1]] + [run_dir]


def arm_runs(
    arm: str, run_dir: Path, model_dir: Path, task_dir: Path, args: argparse.Namespace, seed: int
) -> list[list[str]]:
    """The ``luffy-train`` overrides of each run of an arm, in order: one run, or for a phased arm the SFT run (saving
    its checkpoint, and the model in HF format in the checkpoint folder) and the RL run starting from that
    checkpoint's weights."""
    if arm not in PHASES:
        return [arm_overrides(arm, run_dir, model_dir, task_dir, args, seed)]
    (first, last), (sft_dir, _) = PHASES[arm], phase_dirs(run_dir, arm)
    sft_steps, rl_steps = phase_steps(args.steps, args.sft_fraction)
    save = (f"checkpoint.save_dir={sft_dir / 'ckpt'}",)  # and its HF export: ckpt/hf_final
    start = (f"model.megatron_checkpoint={sft_dir / 'ckpt'}",)
    return [
        arm_overrides(first, sft_dir, model_dir, task_dir, args, seed, sft_steps, save),
        arm_overrides(last, run_dir, model_dir, task_dir, args, seed, rl_steps, start),
    ]


def arm_records(run_root: Path, arm: str) -> list[dict]:
    """An arm's metrics rows; a phased arm's runs one after another, steps counted on over the runs, each row with
    its ``phase``."""
    from luffy_megatron.metrics.logger import read_jsonl

    if arm not in PHASES:
        return read_jsonl(run_root / arm / "metrics.jsonl")
    rows: list[dict] = []
    for phase, folder in zip(PHASES[arm], phase_dirs(run_root / arm, arm)):
        offset = rows[-1]["step"] if rows else 0
        rows += [{**r, "step": r["step"] + offset, "phase": phase} for r in read_jsonl(folder / "metrics.jsonl")]
    return rows


def run_arms(
    arms: list[str], out: Path, model_dir: Path, task_dir: Path, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    """Check every arm's config, then train the arms concurrently (one thread each); returns wall seconds per arm."""
    from luffy_megatron.config import ConfigError, load_config
    from luffy_megatron.config_checks import validate
    from luffy_megatron.platform.ports import free_port  # each arm's process group needs its own port

    if "luffy_sglang" in arms and not SGLANG_PYTHON.is_file():
        raise SystemExit(f"arm luffy_sglang: {SGLANG_PYTHON} is missing; build it with `make sglang-venv`")
    runs = {arm: arm_runs(arm, out / arm, model_dir, task_dir, args, seed) for arm in arms}
    for arm, arm_args in runs.items():
        for run_args in arm_args:  # a later run's starting checkpoint is not there yet: checked when it starts
            try:
                validate(load_config(CONFIG, [a for a in run_args if not a.startswith(START)]), world_size=1)
            except ConfigError as e:
                raise SystemExit(f"arm {arm}: {e}") from None
    procs = {}
    for arm in arms:
        run_dir = out / arm
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        for folder in [*EVAL_FOLDERS.values(), *PHASES.get(arm, ())[:-1]]:  # no earlier samples, runs or checkpoints
            shutil.rmtree(run_dir / folder, ignore_errors=True)
        cmds = [[sys.executable, "-m", "luffy_megatron.train.cli", str(CONFIG), *a] for a in runs[arm]]
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
        if len(cmds) > 1:  # one after another, each with its own port, stopping at the first that fails
            cmds = [["sh", "-c", " && ".join(f"MASTER_PORT={free_port()} {shlex.join(c)}" for c in cmds)]]
        log = (run_dir / "train.log").open("w")
        procs[arm] = (subprocess.Popen(cmds[0], stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
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
            paths = [folder / "metrics.jsonl" for folder in phase_dirs(out / arm, arm)]
            done = sum(sum(1 for _ in path.open()) for path in paths if path.is_file())
            bar.update(done - bar.n)
    for bar in bars.values():
        bar.close()
    return finished


def summarise(arms: list[str], run_root: Path, seconds: dict[str, float]) -> dict:
    """Per arm: held-out greedy accuracy (final, best), when it first passed 50% (step and seconds), train reward, and
    the budget: ``tokens_trained`` (sum of ``perf/update_real_tokens``: the tokens the updates computed on, prompts
    included; a step that trained no sample adds 0) and ``tokens`` (sum of ``perf/tokens``: every sample's tokens),
    over all of a phased arm's runs, whose steps per run ``phases`` gives."""
    rows = {}
    for arm in arms:
        records = arm_records(run_root, arm)
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
            "tokens_trained": int(sum(r.get("perf/update_real_tokens", 0) for r in records)),
            "tokens": int(sum(r.get("perf/tokens", 0) for r in records)),
        }
        if arm in PHASES:
            rows[arm]["phases"] = {p: sum(r["phase"] == p for r in records) for p in PHASES[arm]}
    return rows


def evaluate_arms(arms: list[str], run_root: Path, task_dir: Path, limit: int | None = None) -> tuple[str, dict]:
    """luffy-eval on each arm's final model over ``val.parquet`` and ``ood.parquet`` (the paper's temperature 0.6 and
    top-p 1.0, ``EVAL_SAMPLES`` samples per problem, ``MAX_NEW_TOKENS``; ``limit``: each data source's first problems
    only). Returns the arms' tables side by side and, per arm and data source, problems, k and avg@k."""
    from luffy_megatron.eval import EvalOptions, compare, run_eval

    scores: dict[str, dict] = {arm: {} for arm in arms}
    tables = []
    for split, folder in EVAL_FOLDERS.items():
        for arm in arms:
            opts = EvalOptions(
                str(run_root / arm / "hf_final"),
                [str(task_dir / f"{split}.parquet")],
                str(run_root / arm / folder),
                name=arm,
                n=EVAL_SAMPLES,
                max_new_tokens=MAX_NEW_TOKENS[split],
                limit_per_source=limit,
            )
            for source, res in run_eval(opts, progress=False)["sources"].items():
                scores[arm][source] = {key: res[key] for key in ("problems", "k", "avg@k")}
        tables.append(compare([str(run_root / arm / folder) for arm in arms]))
    return "\n".join(tables), scores


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One seed: its own model, task and arm folders under ``out/seed<S>``; writes its summary and curves."""
    run_root = out / f"seed{seed}"
    model_dir, task_dir = prepare(run_root, seed)
    groups = [[a] for a in args.arms] if args.sequential else [args.arms]
    seconds = {}
    for arms in groups:
        seconds.update(run_arms(arms, run_root, model_dir, task_dir, args, seed))
    summary = {"seed": seed, "overrides": args.override, "arms": summarise(args.arms, run_root, seconds)}
    held_out, scores = evaluate_arms(args.arms, run_root, task_dir, args.eval_limit)
    for arm, arm_scores in scores.items():
        summary["arms"][arm]["held_out"] = arm_scores
    (out / f"summary_seed{seed}.json").write_text(json.dumps(summary, indent=1))
    (out / f"eval_seed{seed}.md").write_text(held_out)
    print(f"\nseed {seed}, held-out problems, luffy-eval of the final models:\n\n{held_out}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plot_metrics import plot

    plot(
        [curve_file(run_root, a) for a in args.arms],
        args.arms,
        ["reward/on_policy", VAL_KEY, "actor/entropy", "response/length_mean"],
        str(out / f"curves_seed{seed}.png"),
        title=f"tiny CPU demo, seed {seed}",
    )
    return summary


def read_summary(out: Path, seed: int) -> dict:
    """A finished seed's summary (``OUT/summary_seed<S>.json``)."""
    path = out / f"summary_seed{seed}.json"
    if not path.is_file():
        raise SystemExit(f"--report-only: {path} is missing: seed {seed} has not finished in {out}")
    return json.loads(path.read_text())


def curve_file(run_root: Path, arm: str) -> str:
    """The metrics file the curves plot: a phased arm's runs one after another (``metrics_phases.jsonl``)."""
    if arm not in PHASES:
        return str(run_root / arm / "metrics.jsonl")
    path = run_root / arm / "metrics_phases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in arm_records(run_root, arm)))
    return str(path)


def seed_table(summaries: list[dict]) -> str:
    """The training curves' numbers, one row per seed and arm (``OUT/seeds.md``)."""
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


def _spread(values: list[float], spec: str) -> str:
    """``mean (min-max)`` over seeds, or the one value."""
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(sum(values) / len(values), spec)} ({format(min(values), spec)}-{format(max(values), spec)})"


def table(summaries: list[dict]) -> str:
    """The report (``OUT/results.md``): one row per arm with its budget in tokens and its final model's held-out avg@k
    in and out of distribution (%, columns ``HELD_OUT``), each the mean over the seeds (min-max when there are
    several)."""
    arms = list(dict.fromkeys(arm for s in summaries for arm in s["arms"]))
    first = summaries[0]["arms"][arms[0]]
    held = first["held_out"]
    seeds = [str(s["seed"]) for s in summaries]
    over = f"seeds {', '.join(seeds)}, mean over seeds (min-max)" if len(seeds) > 1 else f"seed {seeds[0]}"
    counts = ", ".join(f"{HELD_OUT[src].split(': ')[-1]} {held[src]['problems']}" for src in HELD_OUT)
    phased = "".join(
        f" {arm}: " + ", then ".join(f"{n} steps of {p}" for p, n in row["phases"].items()) + ", from its weights."
        for arm, row in summaries[0]["arms"].items()
        if "phases" in row
    )
    lines = [
        f"Each arm's final model after {first['steps']} steps, {over}. The budget: the same steps over the same "
        f"prompts in the same order for every arm, one optimiser step each; the tokens trained follow.{phased} "
        "Held-out avg@k: luffy-eval, temperature 0.6, "
        f"k samples per problem, on unseen 2-digit problems (val.parquet) and on kinds of problem training never "
        f"shows (ood.parquet); problems: {counts}. Tokens trained: the sum of perf/update_real_tokens (the tokens the "
        "updates computed on, prompts included; samples whose loss is provably 0 are skipped); tokens in batches: "
        "the sum of perf/tokens (every rollout and trace).",
        "",
        "| arm | tokens trained (M) | tokens in batches (M) | "
        + " | ".join(f"{HELD_OUT[src]}, avg@{held[src]['k']} (%)" for src in HELD_OUT)
        + " |",
        "|---" * (3 + len(HELD_OUT)) + "|",
    ]
    for arm in arms:
        runs = [s["arms"][arm] for s in summaries if arm in s["arms"]]
        cells = [
            _spread([r["tokens_trained"] / 1e6 for r in runs], ".2f"),
            _spread([r["tokens"] / 1e6 for r in runs], ".2f"),
            *(_spread([100 * r["held_out"][src]["avg@k"] for r in runs], ".1f") for src in HELD_OUT),
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="LUFFY vs on-policy GRPO on CPU (tiny model, synthetic addition task).",
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument(
        "--steps", type=int, default=STEPS, help=f"steps per arm, the same for every arm; sft_rl splits them ({STEPS})"
    )
    parser.add_argument(
        "--sft-fraction",
        type=float,
        default=SFT_FRACTION,
        help=f"sft_rl: the share of --steps that SFT takes before on-policy RL ({SFT_FRACTION})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds, run one after another (default 1)")
    parser.add_argument("--arms", nargs="+", default=["luffy", "grpo"], choices=sorted([*ARMS, *PHASES]))
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
        "--eval-limit",
        type=int,
        default=None,
        metavar="N",
        help=f"luffy-eval on the first N problems of each held-out data source only (default: all {NUM_VAL})",
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="only make each seed's model and task (OUT/seed<S>/), then stop"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite OUT/results.md and OUT/seeds.md from the finished seeds' OUT/summary_seed<S>.json "
        "(seeds run by separate calls)",
    )
    args = parser.parse_args(argv)
    if any(arm in PHASES for arm in args.arms):
        phase_steps(args.steps, args.sft_fraction)  # enough steps for both runs, before anything starts
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        for seed in args.seeds:
            model_dir, task_dir = prepare(out / f"seed{seed}", seed)
            print(f"seed {seed}: model {model_dir}, task {task_dir}")
        return 0
    if args.report_only:
        summaries = [read_summary(out, seed) for seed in args.seeds]
    else:
        summaries = [run_seed(args, seed, out) for seed in args.seeds]
    seeds, report = seed_table(summaries), table(summaries)
    (out / "seeds.md").write_text(seeds + "\n")
    (out / "results.md").write_text(report + "\n")
    print(f"\n{seeds}\n\n{report}")
    print(f"\ncurves: {out}/curves_seed<S>.png  summaries: {out}/summary_seed<S>.json  report: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
