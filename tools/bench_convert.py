"""Benchmark HF -> Megatron -> HF conversion of a random model with Qwen2.5-0.5B's shape (memory and speed).

Each direction runs in its own fresh process (single process, TP=PP=1). Memory method: peak resident set size of that
process (``getrusage(RUSAGE_SELF).ru_maxrss``, which includes file pages mapped by the process) and, separately,
that peak minus the RSS measured just before the conversion starts (after imports); both divided by the checkpoint's
tensor bytes. Speed: checkpoint bytes / seconds of the conversion call (imports excluded). The round trip is then
checked bit for bit, one tensor at a time.

Example:
    python tools/bench_convert.py --workdir /tmp/bench-convert --out docs/results/bench_convert.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25_05B = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
    use_sliding_window=False,
    dtype="bfloat16",
)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def make_random_checkpoint(out: Path, dtype_name: str) -> tuple[int, int]:
    """Write a random HF checkpoint tensor by tensor (never the whole model in memory); return (bytes, parameters)."""
    import torch

    from luffy_megatron.convert.hf_io import StreamingSafetensorsWriter
    from luffy_megatron.convert.load import expected_hf_shapes
    from luffy_megatron.convert.mapping import conversion_plan, hf_names
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.models.family import torch_dtype

    config = dict(QWEN25_05B, dtype=dtype_name)
    out.mkdir(parents=True, exist_ok=True)
    spec = model_spec(config)
    shapes = expected_hf_shapes(spec)
    dtype = torch_dtype(dtype_name)
    names = hf_names(conversion_plan(spec))
    writer = StreamingSafetensorsWriter(out, [(n, shapes[n], dtype) for n in names], max_shard_bytes=2 * 1024**3)
    # Random values are drawn once (16M of them) and every tensor takes a different window of them: fast to write,
    # and still no two tensors (nor rows) alike, so a misplaced tensor fails the bit-for-bit check.
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(dtype)
    total = params = 0
    for i, name in enumerate(names):
        n = math.prod(shapes[name])
        start = (i * 7919 + 12345) % pool.numel()
        reps = -(-(start + n) // pool.numel())
        t = (pool.repeat(reps)[start : start + n] if reps > 1 else pool[start : start + n]).reshape(shapes[name])
        writer.write(name, t)
        total += t.numel() * t.element_size()
        params += t.numel()
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return total, params


def run_stage(stage: str, src: str, dst: str) -> None:
    """Child process: one conversion; prints a JSON line with seconds and memory."""
    from luffy_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from luffy_megatron.platform import setup_platform

    setup_platform()
    import megatron.core  # noqa: F401  (imports counted in the baseline, not the peak increase)
    import transformers  # noqa: F401

    base = _rss_bytes()
    start = time.perf_counter()
    if stage == "hf_to_megatron":
        convert_hf_to_megatron(src, dst, progress=True)
    else:
        convert_megatron_to_hf(src, dst, progress=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"seconds": seconds, "baseline_rss": base, "peak_rss": peak}
    if stage == "megatron_to_hf":
        result["stream_seconds"] = _time_stream(src)
    print("RESULT " + json.dumps(result), flush=True)


def _time_stream(ckpt: str) -> float:
    """Seconds for one pass of iter_hf_weights over the loaded model (what rollout weight sync runs every step)."""
    from luffy_megatron.convert import iter_hf_weights, load_megatron_checkpoint, read_checkpoint_metadata
    from luffy_megatron.convert.checkpoint import build_model
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel

    meta = read_checkpoint_metadata(ckpt)
    spec = model_spec(meta["hf_config"])
    init_model_parallel(1, 1)
    chunks = build_model(spec, 1, 1, meta["dtype"])
    load_megatron_checkpoint(chunks, ckpt)
    for _ in iter_hf_weights(chunks, spec):  # warm-up: builds the cached HF shapes
        pass
    start = time.perf_counter()
    n = sum(t.numel() for bucket in iter_hf_weights(chunks, spec) for _, t in bucket)
    assert n > 0
    return time.perf_counter() - start


def _child(stage: str, src: Path, dst: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, __file__, "--stage", stage, "--src", str(src), "--dst", str(dst)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-4000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def compare(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors that differ), streaming one tensor at a time."""
    import torch

    from luffy_megatron.convert.hf_io import HFCheckpointReader

    with HFCheckpointReader(a) as ra, HFCheckpointReader(b) as rb:
        if sorted(ra.names()) != sorted(rb.names()):
            return len(ra.names()), -1
        differ = sum(not torch.equal(ra.read(n), rb.read(n)) for n in ra.names())
        return len(ra.names()), differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("Example:")[0].strip(),
        epilog="Example:" + (__doc__ or "").split("Example:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", type=Path, default=Path("bench-convert-work"), help="scratch folder (removed)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_convert.json"))
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--stage", choices=["hf_to_megatron", "megatron_to_hf"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args.stage, args.src, args.dst)
        return 0

    load_at_start = os.getloadavg()[0]  # the host may be shared: speeds scale with the CPU time actually obtained
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    model_bytes, params = make_random_checkpoint(work / "hf", args.dtype)
    print(f"random checkpoint: {model_bytes / 1e9:.3f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {}
    for stage, src, dst in (
        ("hf_to_megatron", work / "hf", work / "megatron"),
        ("megatron_to_hf", work / "megatron", work / "hf_back"),
    ):
        r = _child(stage, src, dst)
        results[stage] = {
            "seconds": round(r["seconds"], 2),
            "gb_per_s": round(model_bytes / r["seconds"] / 1e9, 3),
            "peak_rss_gb": round(r["peak_rss"] / 1e9, 3),
            "baseline_rss_gb": round(r["baseline_rss"] / 1e9, 3),
            "peak_rss_over_model": round(r["peak_rss"] / model_bytes, 3),
            "peak_rss_increase_over_model": round((r["peak_rss"] - r["baseline_rss"]) / model_bytes, 3),
        }
        if "stream_seconds" in r:
            results["iter_hf_weights"] = {
                "seconds": round(r["stream_seconds"], 3),
                "gb_per_s": round(model_bytes / r["stream_seconds"] / 1e9, 3),
                "note": "one pass over the loaded model at TP=PP=1, 256 MiB buckets, no file I/O; at TP=1 most tensors "
                "are views of the parameters (no copy); TP/PP > 1 adds all-gathers and broadcasts",
            }
        print(stage, results[stage], flush=True)
    n, differ = compare(work / "hf", work / "hf_back")
    report = {
        "model": "random, Qwen2.5-0.5B shape (hidden 896, 24 layers, 14/2 heads, ffn 4864, vocab 151936, tied)",
        "dtype": args.dtype,
        "parameters": params,
        "model_bytes": model_bytes,
        "layout": "single process, TP=1 PP=1 (CPU, gloo)",
        "memory_method": "peak = getrusage(RUSAGE_SELF).ru_maxrss of the converting process; baseline = VmRSS after "
        "imports, just before the conversion call; ratios divide by the checkpoint's tensor bytes",
        "speed_method": "model_bytes / wall seconds of the conversion call (imports excluded)",
        "host": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "host_load_average_1min_at_start": round(load_at_start, 2),
        "roundtrip_tensors": n,
        "roundtrip_tensors_differing": differ,
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
