#!/usr/bin/env python
"""Policy-update throughput across parallel layouts: seconds/step, tokens/s (and MFU on GPU) of train_mini_batch.

For each layout ``tpXppYdpZ`` (optionally ``tpXppYvppVdpZ``; ``pp``/``dp`` may be left out for 1; a suffix ``sp`` or
``nosp`` turns sequence parallelism on or off, unsuffixed is the trainer's default: on whenever X > 1, so ``tp2`` =
``tp2sp`` = ``tp2pp1dp1sp``) the tool starts ``X*Y*Z`` processes with ``torchrun``
(NCCL + CUDA on a GPU node, gloo on CPU), builds :class:`MegatronPolicy` from an HF folder's architecture (weights are
Megatron's random init: values do not change the work), makes one synthetic LUFFY mini-batch of ``prompts * n``
samples (``n - 1`` on-policy + 1 off-policy trace per prompt; every sample ``prompt_len + response_len`` tokens, or
with ``--length-dist luffy`` LUFFY's length mix, seeded), and times ``warmup + steps`` calls of ``train_mini_batch``
(one optimiser step on the whole batch) and of ``compute_logprobs`` (the old-log-prob forward). Each timed call is
fenced by a barrier (and a CUDA synchronize), so a step is the time of the slowest rank. Writes a JSON report
(machine, method, per-layout numbers) and a bar chart.
Per layout ``tokens`` accounts for one update: ``real_tokens``, ``computed_tokens`` (padding included),
``max_micro_batch_tokens`` against the ``budget``, and what right-padded micro-batches would compute instead.

Without ``--hf-dir`` the model's ``config.json`` (``make_tiny_model``'s config for ``--family`` and the shape
options) is written to a temporary folder; only the architecture matters.

Example (the committed CPU run):
    python tools/bench_throughput.py --family qwen2 --hidden-size 256 --layers 4 --heads 4 --kv-heads 2 \\
        --layouts tp1pp1dp1,tp2pp1dp1,tp1pp2dp1,tp1pp1dp2 --prompts 4 --n 8 --prompt-len 64 --response-len 192 \\
        --steps 3 --warmup 1 --dtype float32 --out docs/results/bench_throughput.json \\
        --plot docs/results/bench_throughput.png
The length mix (docs/results/bench_throughput_luffy.json):
    python tools/bench_throughput.py --family qwen2 --hidden-size 64 --layers 4 --heads 2 --kv-heads 2 \\
        --vocab-size 512 --layouts tp1pp1dp1,tp1pp2dp1,tp1pp2vpp2dp1,tp1pp1dp2 --length-dist luffy --prompts 64 \\
        --n 8 --max-tokens-per-micro-batch 16384 --steps 1 --warmup 0 --dtype float32 \\
        --out docs/results/bench_throughput_luffy.json
On a GPU node (8 GPUs): --hf-dir /models/Qwen2.5-Math-7B --layouts tp4pp1dp2,tp2pp2dp2,tp8pp1dp1 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from luffy_megatron.metrics.perf import PEAK_FLOPS, model_flops, peak_flops  # noqa: E402

LAYOUT_RE = re.compile(r"^tp(\d+)(?:pp(\d+))?(?:vpp(\d+))?(?:dp(\d+))?(sp|nosp)?$")


def parse_layout(text: str) -> dict[str, int | bool | str | None]:
    """``tpXppYvppVdpZ`` with ``pp``, ``vpp`` and ``dp`` optional (1, none, 1) and an ``sp`` / ``nosp`` suffix:
    ``sequence_parallel`` True / False, or None (the trainer's default, on whenever TP > 1)."""
    m = LAYOUT_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"layout {text!r} is not of the form tpXppYdpZ (or tpXppYvppVdpZ; pp/dp optional; suffix sp or nosp)"
        )
    tp, pp, vpp, dp = (int(g) if g else None for g in m.groups()[:4])
    pp, dp = pp or 1, dp or 1
    sp = {"sp": True, "nosp": False, None: None}[m.group(5)]
    return {
        "name": text.strip(),
        "tp": tp,
        "pp": pp,
        "vpp": vpp,
        "dp": dp,
        "sequence_parallel": sp,
        "world": tp * pp * dp,
    }


# ------------------------------------------------------------------------------------------------------------------
# Worker: one process of one layout (started by torchrun, or directly at world size 1).
def length_mix(dist: str, prompts: int, n: int, prompt_len: int, response_len: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, response) length of every sample, ``n`` per prompt (the last one the trace).

    ``fixed``: every sample ``prompt_len + response_len``. ``luffy`` (LUFFY's mix, seeded): prompts of 80-400
    tokens, ``n - 1`` on-policy responses log-normal with a median of ~1,500 tokens capped at 8,192, one trace of
    1,500-8,192 tokens.
    """
    import random

    if dist == "fixed":
        return [(prompt_len, response_len)] * (prompts * n)
    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        p = rng.randint(80, 400)
        out += [(p, max(1, min(8192, int(rng.lognormvariate(7.3, 0.7))))) for _ in range(n - 1)]
        out.append((p, rng.randint(1500, 8192)))
    return out


def synthetic_samples(vocab: int, n: int, lengths: list[tuple[int, int]], seed: int):
    """Mixed groups of ``n`` samples of the given (prompt, response) lengths as one ``StepBatch``: ``n - 1``
    on-policy + 1 off-policy trace. The first sample of a group is wrong and the trace right, so every group has an
    advantage and every sample is trained."""
    import random

    import torch

    from luffy_megatron.algo import compute_advantages
    from luffy_megatron.train.samples import Sample
    from luffy_megatron.train.step_batch import StepBatch

    rng = random.Random(seed)
    samples = []
    for g in range(len(lengths) // n):
        prompt = [rng.randrange(vocab) for _ in range(lengths[g * n][0])]
        for j in range(n):
            off = j == n - 1 and n > 1
            response_len = lengths[g * n + j][1]
            response = [rng.randrange(vocab) for _ in range(response_len)]
            logps = None if off else [-rng.random() * 3 for _ in range(response_len)]
            reward = 1.0 if off or (j > 0 and rng.random() < 0.4) else 0.0
            samples.append(Sample(g, g, prompt, response, off_policy=off, rollout_logprobs=logps, reward=reward))
    adv = compute_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([s.group_id for s in samples]))
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return StepBatch.from_samples(samples)


def token_accounting(policy, samples) -> dict:
    """Tokens of one update of ``samples``: real, computed (padding included) and the largest micro-batch, measured on
    the micro-batches every data-parallel rank builds (and checked against the policy's logged ``perf/`` counts);
    with what right-padded micro-batches, and packed rows padded to the budget, would compute instead (counted, not
    run)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from luffy_megatron.platform import device
    from luffy_megatron.train.batch import micro_batch_tokens
    from luffy_megatron.train.samples import pack_micro_batches

    mbs = policy._micro_batches(samples, count_tokens=True)
    logged = policy.take_token_stats()
    built = torch.tensor([float(sum(mb.num_tokens for mb in mbs))], dtype=torch.float64, device=device())
    biggest = torch.tensor([float(max(mb.num_tokens for mb in mbs))], dtype=torch.float64, device=device())
    dist.all_reduce(built, group=ps.get_data_parallel_group())
    dist.all_reduce(biggest, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    lengths = samples.lengths.tolist()
    if (int(built), int(biggest), sum(lengths)) != tuple(
        int(logged[k])
        for k in ("perf/update_computed_tokens", "perf/max_micro_batch_tokens", "perf/update_real_tokens")
    ):
        raise RuntimeError(f"token accounting: built {int(built)}/{int(biggest)} tokens, the policy logged {logged}")
    p = policy.cfg.parallel
    multiple = p.pp if p.vpp else 1
    padded_plan = pack_micro_batches(lengths, p.max_tokens_per_micro_batch, policy.dp_size, count_multiple=multiple)
    padded = micro_batch_tokens(padded_plan, lengths, packed=False, common_shape=p.pp > 1)
    return {
        "pack_sequences": p.pack_sequences,
        "budget": p.max_tokens_per_micro_batch,
        "alignment": policy.alignment,
        "real_tokens": sum(lengths),
        "computed_tokens": int(built),
        "computed_over_real": float(built) / sum(lengths),
        "max_micro_batch_tokens": int(biggest),
        "longest_sample_tokens": max(lengths),
        "micro_batches_per_rank": len(mbs),
        "padded_layout": {
            "computed_tokens": sum(padded),
            "computed_over_real": sum(padded) / sum(lengths),
            "max_micro_batch_tokens": max(padded),
        },
        # The fixed-shape alternative under PP: every packed row padded to the budget (same micro-batch count).
        "budget_rows_layout": {
            "computed_tokens": len(mbs) * policy.dp_size * p.max_tokens_per_micro_batch,
            "computed_over_real": len(mbs) * policy.dp_size * p.max_tokens_per_micro_batch / sum(lengths),
        },
    }


def time_steps(policy, samples, steps: int, warmup: int, cuda: bool) -> tuple[list[float], list[float], dict]:
    """Seconds of ``train_mini_batch`` and of ``compute_logprobs`` per timed step (after ``warmup``), last metrics."""
    import torch
    import torch.distributed as dist

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - t0

    train_s, logprob_s, last_metrics = [], [], {}
    for i in range(warmup + steps):
        holder = {}
        t = timed(lambda: holder.update(policy.train_mini_batch(samples, use_old_logprobs=False)))  # noqa: B023
        last_metrics = holder
        u = timed(lambda: policy.compute_logprobs(samples))
        if i >= warmup:
            train_s.append(t)
            logprob_s.append(u)
    return train_s, logprob_s, last_metrics


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    import torch.distributed as dist

    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import destroy_model_parallel, init_distributed, init_model_parallel
    from luffy_megatron.train.policy import MegatronPolicy

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    layout = parse_layout(args.worker_layout)
    init_distributed()
    init_model_parallel(layout["tp"], layout["pp"], layout["vpp"], seed=1)
    total_len = args.prompt_len + args.response_len
    overrides = [
        f"model.hf_path={args.hf_dir}",
        f"model.dtype={args.dtype}",
        f"model.recompute_activations={str(args.recompute).lower()}",
        f"parallel.tp={layout['tp']}",
        f"parallel.pp={layout['pp']}",
        f"parallel.max_tokens_per_micro_batch={args.max_tokens_per_micro_batch}",
        f"parallel.pack_sequences={str(not args.no_pack_sequences).lower()}",
        f"data.max_response_length={args.response_len}",
        f"data.max_prompt_length={args.prompt_len}",
        f"algorithm.logprob_chunk_tokens={args.logprob_chunk_tokens}",
    ]
    if layout["vpp"]:
        overrides.append(f"parallel.vpp={layout['vpp']}")
    if layout["sequence_parallel"] is not None:
        overrides.append(f"parallel.sequence_parallel={str(layout['sequence_parallel']).lower()}")
    cfg = load_config(None, overrides)
    spec = model_spec(read_hf_config(args.hf_dir), layout["tp"])
    policy = MegatronPolicy(cfg, spec, pad_id=0)
    lengths = length_mix(args.length_dist, args.prompts, args.n, args.prompt_len, args.response_len, args.seed)
    samples = synthetic_samples(spec.vocab_size, args.n, lengths, seed=args.seed)
    tokens = samples.num_tokens

    accounting = token_accounting(policy, samples)
    timing = not args.tokens_only
    train_s, logprob_s, last_metrics = (
        time_steps(policy, samples, args.steps, args.warmup, cuda) if timing else ([], [], {})
    )
    world = dist.get_world_size()
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0])
    gpu_mem = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0.0])
    if cuda:
        rss, gpu_mem = rss.cuda(), gpu_mem.cuda()
    rss_all = [torch.zeros_like(rss) for _ in range(dist.get_world_size())]
    dist.all_gather(rss_all, rss)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    dist.all_reduce(gpu_mem, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        step = statistics.median(train_s) if timing else float("nan")
        fwd = statistics.median(logprob_s) if timing else float("nan")
        flops = model_flops(spec, samples.lengths.tolist())  # training = 3 x forward
        device_name = torch.cuda.get_device_name() if cuda else cpu_name()
        peak = peak_flops(device_name, args.dtype) if cuda else None
        result = {
            "layout": layout["name"],
            "tp": layout["tp"],
            "pp": layout["pp"],
            "vpp": layout["vpp"],
            "dp": layout["dp"],
            "sequence_parallel": cfg.parallel.sequence_parallel_on(),
            "world_size": world,
            "device": device_name,
            "backend": dist.get_backend(),
            "gpus_visible": torch.cuda.device_count() if cuda else 0,
            "tokens_per_step": tokens,
            "samples_per_step": samples.num_samples,
            "train": None
            if not timing
            else {
                "seconds_per_step": step,
                "all_seconds": train_s,
                "tokens_per_s": tokens / step,
                "tokens_per_s_per_process": tokens / step / world,
                "model_tflops_per_step": flops / 1e12,
                "achieved_tflops_per_process": flops / step / world / 1e12,
                "mfu": flops / step / world / peak if peak else None,
            },
            "logprob": None
            if not timing
            else {
                "seconds_per_step": fwd,
                "all_seconds": logprob_s,
                "tokens_per_s": tokens / fwd,
                "tokens_per_s_per_process": tokens / fwd / world,
                "mfu": flops / 3 / fwd / world / peak if peak else None,
            },
            "peak_rss_gb_max_rank": float(rss.item()) / 1e9,
            "peak_rss_gb_per_rank": [float(r.item()) / 1e9 for r in rss_all],
            "peak_gpu_mem_gb_max_rank": float(gpu_mem.item()) / 1e9 if cuda else None,
            "tokens": accounting,
            "grad_norm_last": last_metrics.get("grad_norm"),
            "max_position": total_len,
        }
        Path(args.worker_out).write_text(json.dumps(result))
    destroy_model_parallel()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------------
# Driver.
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    return f"CPU {platform.processor() or platform.machine()}"


def make_model(args: argparse.Namespace, tmp: str) -> str:
    """An HF folder holding only ``config.json`` of the requested shape (``make_tiny_model``'s config).

    The benchmark reads the architecture only (Megatron's random init gives the weights), so no weights or tokenizer
    are written: a 7B shape costs nothing here.
    """
    from luffy_megatron.models.tiny import tiny_hf_config

    config = tiny_hf_config(
        args.family,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size or 4 * args.hidden_size,
        tie_embeddings=False,
        max_position_embeddings=max(4096, args.prompt_len + args.response_len),
    )
    path = Path(tmp) / "model"
    path.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(path / "config.json"))
    return str(path)


def run_layout(args: argparse.Namespace, layout: dict, hf_dir: str, tmp: str) -> dict:
    from luffy_megatron.platform.ports import free_port

    out = Path(tmp) / f"{layout['name']}.json"
    # The worker's settings travel in a file: torchrun's own parser would take "--n" for one of its options.
    cfg_path = Path(tmp) / f"{layout['name']}.args.json"
    cfg_path.write_text(json.dumps(dict(vars(args), hf_dir=hf_dir, worker_layout=layout["name"], worker_out=str(out))))
    launcher = [
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={layout['world']}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
    ]
    # One process needs no launcher (saves starting one more interpreter): init_distributed defaults to rank 0 of 1.
    cmd = [
        sys.executable,
        *(launcher if layout["world"] > 1 else []),
        str(Path(__file__).resolve()),
        "--worker-config",
        str(cfg_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"layout": layout["name"], "world_size": layout["world"], "error": tail, "wall_s": wall}
    result = json.loads(out.read_text())
    result["wall_s_including_startup"] = wall
    return result


def machine_info(results: list[dict]) -> dict:
    """This host; CUDA facts come from the workers (the driver does not import torch, which keeps it light)."""
    ok = [r for r in results if "error" not in r]
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "cuda_available": bool(ok) and ok[0]["backend"] == "nccl",
    }
    if info["cuda_available"]:
        info["gpus_visible"] = ok[0].get("gpus_visible")
        info["gpu"] = ok[0]["device"]
    with contextlib.suppress(OSError):
        info["loadavg_at_end"] = list(os.getloadavg())
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["megatron_core"] = importlib.metadata.version("megatron-core")
    return info


def plot_label(result: dict) -> str:
    """A bar's label: the layout, its sequence parallelism (TP > 1), peak RSS per rank and computed / real tokens."""
    sp = "" if result["tp"] == 1 else (" SP on" if result.get("sequence_parallel") else " SP off")
    rss = result.get("peak_rss_gb_per_rank") or [result["peak_rss_gb_max_rank"]]
    mem = f"{max(rss):.2f}" if max(rss) - min(rss) < 0.005 else f"{min(rss):.2f}-{max(rss):.2f}"
    return f"{result['layout']}{sp}\n{mem} GB RSS/rank\ncomputed/real {result['tokens']['computed_over_real']:.3f}"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "error" not in r and r["train"] is not None]
    names = [plot_label(r) for r in rows]
    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(rows) + 2), 4.6))
    train = [r["train"]["tokens_per_s"] for r in rows]
    fwd = [r["logprob"]["tokens_per_s"] for r in rows]
    b1 = ax.bar([i - width / 2 for i in x], train, width, label="policy update (fwd+bwd+optimizer)")
    b2 = ax.bar([i + width / 2 for i in x], fwd, width, label="log-prob forward")
    for bars in (b1, b2):
        for bar in bars:
            ax.annotate(
                f"{bar.get_height():,.0f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("tokens / s (whole layout)")
    cfg = report["config"]
    device = rows[0]["device"] if rows else ""
    ax.set_title(
        f"{report['model']['description']}, {cfg['dtype']}\n"
        f"{cfg['prompts']}x{cfg['n']} samples of {cfg['prompt_len']}+{cfg['response_len']} tokens; {device}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Example") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--hf-dir", help="HF model folder (only its architecture is used); else a random model is made")
    ap.add_argument("--family", default="qwen2", choices=["qwen2", "llama", "qwen3"])
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=None, help="default 4 x hidden size")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument(
        "--layouts",
        default="tp1pp1dp1",
        help="comma-separated tpXppYdpZ or tpXppYvppVdpZ (pp/dp optional), suffix sp / nosp: sequence parallelism "
        "on / off (default: on whenever TP > 1)",
    )
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (one of them the off-policy trace)")
    ap.add_argument("--prompt-len", type=int, default=64, help="with --length-dist fixed (luffy: up to 400)")
    ap.add_argument("--response-len", type=int, default=192, help="with --length-dist fixed (luffy: up to 8192)")
    ap.add_argument("--length-dist", default="fixed", choices=["fixed", "luffy"], help="lengths (see length_mix)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the samples and of the luffy length mix")
    ap.add_argument("--no-pack-sequences", action="store_true", help="right-padded micro-batches instead of packed")
    ap.add_argument(
        "--tokens-only", action="store_true", help="token accounting only: build the micro-batches, no steps"
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-tokens-per-micro-batch", type=int, default=4096)
    ap.add_argument("--logprob-chunk-tokens", type=int, default=4096)
    ap.add_argument("--recompute", action="store_true", help="recompute activations in backward")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU (OMP_NUM_THREADS)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per layout")
    ap.add_argument("--out", default="bench_throughput.json")
    ap.add_argument("--plot", default=None, help="PNG bar chart of tokens/s per layout")
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.length_dist == "luffy":  # the caps of the mix: the model's positions and the config's maxima
        args.prompt_len, args.response_len = 400, 8192
    if args.worker_config:
        worker(argparse.Namespace(**json.loads(Path(args.worker_config).read_text())))
        return 0

    from tqdm import tqdm

    from luffy_megatron.config import ParallelConfig, read_hf_config
    from luffy_megatron.config_checks import validate_parallel

    layouts = [parse_layout(t) for t in args.layouts.split(",") if t.strip()]
    loadavg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        hf_dir = args.hf_dir or make_model(args, tmp)
        hf = read_hf_config(hf_dir)
        heads = hf["num_attention_heads"]
        groups = hf.get("num_key_value_heads") or heads
        for lay in layouts:  # fail before starting any process
            validate_parallel(
                ParallelConfig(tp=lay["tp"], pp=lay["pp"], vpp=lay["vpp"], sequence_parallel=lay["sequence_parallel"]),
                lay["world"],
                hf["num_hidden_layers"],
                heads,
                groups,
            )
        results = []
        bar = tqdm(layouts, desc="layouts", unit="layout")
        for lay in bar:
            bar.set_postfix_str(lay["name"])
            res = run_layout(args, lay, hf_dir, tmp)
            results.append(res)
            if "error" in res:
                tqdm.write(f"{lay['name']}: FAILED\n{res['error']}")
            else:
                tok = res["tokens"]
                line = (
                    f"{lay['name']} (SP {'on' if res['sequence_parallel'] else 'off'}): computed/real tokens "
                    f"{tok['computed_over_real']:.3f}, peak RSS/rank {res['peak_rss_gb_max_rank']:.2f} GB, "
                    f"largest micro-batch {tok['max_micro_batch_tokens']:,} (budget {tok['budget']:,})"
                )
                if res["train"] is not None:
                    train, fwd = res["train"], res["logprob"]
                    line += (
                        f"; update {train['seconds_per_step']:.3f} s/step, {train['tokens_per_s']:,.0f} tok/s; "
                        f"log-prob {fwd['tokens_per_s']:,.0f} tok/s"
                    )
                tqdm.write(line)
    if args.hf_dir:
        description = f"{Path(args.hf_dir).name} ({hf.get('architectures', ['?'])[0]})"
    else:
        description = (
            f"random {args.family}, hidden {args.hidden_size}, {args.layers} layers, "
            f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab_size}"
        )
    report = {
        "what": "policy update (train_mini_batch) and log-prob forward (compute_logprobs) throughput per layout",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python tools/bench_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {
            "description": description,
            "hidden_size": hf["hidden_size"],
            "layers": hf["num_hidden_layers"],
            "heads": heads,
            "kv_heads": groups,
            "intermediate_size": hf["intermediate_size"],
            "vocab_size": hf["vocab_size"],
        },
        "config": {
            k: getattr(args, k)
            for k in (
                "prompts",
                "n",
                "prompt_len",
                "response_len",
                "length_dist",
                "seed",
                "no_pack_sequences",
                "tokens_only",
                "steps",
                "warmup",
                "dtype",
                "max_tokens_per_micro_batch",
                "recompute",
                "threads",
            )
        },
        "method": (
            "one torchrun launch per layout (a plain process at world size 1; NCCL+CUDA on GPU, gloo on CPU); "
            "sequence_parallel: the layout's sp/nosp suffix, else on whenever tp > 1; "
            "MegatronPolicy with Megatron's random init; one synthetic mini-batch of prompts*n samples (n-1 "
            "on-policy + 1 trace per prompt), all of length prompt_len+response_len or (length_dist luffy) LUFFY's "
            "seeded length mix; tokens: the micro-batches every data-parallel rank builds for one update (summed over "
            "DP; padded_layout: right-padded micro-batches on the same plan, budget_rows_layout: the packed rows "
            "padded to the budget, both counted, not run); with tokens_only no step is run; warmup+steps iterations "
            "of train_mini_batch (one optimiser step on the whole "
            "batch, no old log-probs) then compute_logprobs, each fenced by barriers (+cuda synchronize): time of the "
            "slowest rank; median over the timed steps; tokens = prompt+response tokens per step; peak RSS: "
            "ru_maxrss of each rank at the end (peak_rss_gb_per_rank, by global rank); MFU = "
            "luffy_megatron.metrics.perf.model_flops (3x forward for the update, 1x for log-probs) / s / world size / "
            "dense peak of the GPU for the dtype (PEAK_FLOPS table; null on CPU)"
        ),
        "peak_flops_table": PEAK_FLOPS,
        "machine": dict(
            machine_info(results),
            loadavg_at_start=loadavg_start,
            note="load average above the CPU count = CPUs shared with other jobs; timings are then noisy",
        ),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
