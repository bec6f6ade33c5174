"""Peak memory and time of the fused log-prob + entropy vs the naive full-vocabulary path, forward + backward, on CPU.

Naive: ``z = logits.float() / T; ls = log_softmax(z); logp = ls.gather(y); H = -(exp(ls) * ls).sum(-1)`` with
autograd. Fused: :func:`luffy_megatron.algo.vocab_parallel_logprob_entropy` (TP = 1, chunked). Both backpropagate
``sum(g1 * logp + g2 * H)``.

Each (implementation, dtype) runs in a fresh subprocess. Peak extra memory = peak resident set size during the
forward + backward minus the resident set size just before it (inputs already allocated and touched). The peak is
the kernel's high-water mark ``VmHWM`` from /proc/self/status, reset just before the measured region by writing "5"
to /proc/self/clear_refs (Linux); where that is unavailable, the maximum of psutil RSS samples taken every 1 ms in a
thread. (tracemalloc cannot see torch's allocations.)

    python tools/bench_logprob.py                       # 4096 tokens x 151,936 vocab, fp32 and bf16
    python tools/bench_logprob.py --tokens 512 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "bench_logprob.json"


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Max RSS sampled every ``period`` seconds (psutil)."""

    def __init__(self, period: float = 0.001) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.period = period
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def worker(impl: str, dtype_name: str, tokens: int, vocab: int, chunk: int, temperature: float, threads: int) -> dict:
    """Measure one implementation in this (fresh) process."""
    import torch

    from luffy_megatron.algo import vocab_parallel_logprob_entropy

    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=g) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=g)
    g1, g2 = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)

    def naive():
        z = logits.float() / temperature
        ls = torch.log_softmax(z, dim=-1)
        lp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        ent = -(ls.exp() * ls).sum(-1)
        return lp, ent

    def fused():
        return vocab_parallel_logprob_entropy(logits, target, temperature=temperature, chunk_tokens=chunk)

    fn = naive if impl == "naive" else fused
    baseline = _rss_bytes()
    hwm_ok = _reset_hwm() and _hwm_bytes() <= baseline + (1 << 20)
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    lp, ent = fn()
    t1 = time.perf_counter()
    (lp * g1 + ent * g2).sum().backward()
    t2 = time.perf_counter()
    sampled = sampler.stop()
    peak = _hwm_bytes() if hwm_ok else sampled
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    return {
        "impl": impl,
        "dtype": dtype_name,
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "total_s": t2 - t0,
        "baseline_rss_bytes": baseline,
        "peak_extra_bytes": peak - baseline,
        "peak_extra_bytes_sampled": sampled - baseline,
        "peak_method": "VmHWM after clear_refs" if hwm_ok else "psutil RSS sampling (1 ms)",
        "logp_checksum": float(lp.double().sum()),
        "entropy_checksum": float(ent.double().sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="example:\n  python tools/bench_logprob.py --tokens 4096 --vocab 151936",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int, default=4096, help="tokens (rows of the logits)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5: 151,936)")
    p.add_argument("--chunk", type=int, default=512, help="chunk_tokens of the fused function")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each measured process")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        res = worker(
            args.worker[0], args.worker[1], args.tokens, args.vocab, args.chunk, args.temperature, args.threads
        )
        print(json.dumps(res))
        return 0

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results, rows = [], []
    for dtype in args.dtypes:
        pair = {}
        for impl in ("fused", "naive"):
            cmd = [sys.executable, __file__, "--worker", impl, dtype]
            cmd += ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--chunk", str(args.chunk)]
            cmd += ["--temperature", str(args.temperature), "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{impl}/{dtype} failed:\n{out.stderr[-3000:]}")
            pair[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(pair[impl])
        f, n = pair["fused"], pair["naive"]
        rel = abs(f["logp_checksum"] - n["logp_checksum"]) / max(1.0, abs(n["logp_checksum"]))
        row = {
            "dtype": dtype,
            "fused_peak_extra_mib": f["peak_extra_bytes"] / 2**20,
            "naive_peak_extra_mib": n["peak_extra_bytes"] / 2**20,
            "memory_ratio_naive_over_fused": n["peak_extra_bytes"] / max(1, f["peak_extra_bytes"]),
            "fused_s": f["total_s"],
            "naive_s": n["total_s"],
            "speedup_naive_over_fused": n["total_s"] / f["total_s"],
            "logp_checksum_rel_diff": rel,
        }
        rows.append(row)
        print(
            f"{dtype:9s} peak extra: fused {row['fused_peak_extra_mib']:8.0f} MiB, "
            f"naive {row['naive_peak_extra_mib']:8.0f} MiB ({row['memory_ratio_naive_over_fused']:.2f}x less) | "
            f"fwd+bwd: fused {row['fused_s']:.2f} s, naive "
            f"{row['naive_s']:.2f} s ({row['speedup_naive_over_fused']:.2f}x faster)",
            flush=True,
        )
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "method": (
            "fresh subprocess per (impl, dtype); peak extra = VmHWM (reset via /proc/self/clear_refs) minus RSS "
            "before forward; fallback psutil RSS sampling every 1 ms; time = one forward + backward, wall clock"
        ),
        "summary": rows,
        "runs": results,
    }
    report["config"]["out"] = str(args.out.name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
