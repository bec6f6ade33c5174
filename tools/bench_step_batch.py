#!/usr/bin/env python
"""Moving one RL step's samples from global rank 0 to every rank: pickled objects vs the step batch's tensors.

Two local processes joined by gloo; rank 0 holds a paper-sized batch (by default 128 prompts x 8 = 1,024 samples,
LUFFY's length mix from ``bench_throughput.length_mix``, seeded: prompts of 80-400 tokens, 7 on-policy responses
log-normal with a median of ~1,500 tokens capped at 8,192 with fp32 engine log-probs, 1 trace of 1,500-8,192 tokens
without) and sends it to rank 1:

- ``object``: ``dist.broadcast_object_list`` of the sample list (what ``rank0_call`` did with the whole step);
- ``tensor``: ``luffy_megatron.train.transport.broadcast_batch`` of the step's ``StepBatch``, which rank 0 built
  from the samples beforehand (as the producer does, in the background with asynchronous rollout; its time is
  reported as ``rank0_parts_s.build``). The receivers get the batch's tensors, with no per-sample work.

Also the asynchronous checkpoint's batch in flight (``pending_checkpoint``): rank 0's binary file vs the indented
JSON the trainer state held before, bytes and seconds to write and read.

Seconds: every repeat runs both methods (interleaved, the order alternating), each between two barriers; the median
over repeats is reported (wall clock, the slower rank), with each rank's CPU time of the send (less disturbed by other
jobs on a shared machine) and rank 0's build / pack / local unpack and pickle / unpickle times as a breakdown.
Peak RSS: ``ru_maxrss`` of each rank in a separate pair of processes per method (it only grows), before the send
(after rank 0 built the samples and, for ``tensor``, the batch) and after it.

Example (the numbers in docs/benchmarks.md):
    python tools/bench_step_batch.py --repeats 7 --out docs/results/bench_step_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from luffy_megatron.algo import compute_advantages  # noqa: E402
from luffy_megatron.platform.ports import free_port  # noqa: E402
from luffy_megatron.train.samples import Sample  # noqa: E402
from luffy_megatron.train.step_batch import StepBatch  # noqa: E402
from luffy_megatron.train.transport import broadcast_batch, pack_batch, unpack_batch  # noqa: E402
from tools.bench_throughput import length_mix  # noqa: E402

METHODS = ("object", "tensor")


def step_batch(prompts: int, n: int, seed: int, scale: int = 1, vocab: int = 151_936) -> list[Sample]:
    """Mixed groups as the loop builds them: per prompt ``n - 1`` on-policy samples with fp32 engine log-probs and
    one trace without, all sharing the prompt's list; lengths from LUFFY's mix divided by ``scale`` (1: as is)."""
    lengths = length_mix("luffy", prompts, n, 0, 0, seed)
    rng = np.random.default_rng(seed)
    samples = []
    for g in range(prompts):
        prompt = rng.integers(vocab, size=max(1, lengths[g * n][0] // scale)).tolist()
        for j in range(n):
            off = j == n - 1
            full = lengths[g * n + j][1]
            response = rng.integers(vocab, size=max(1, full // scale)).tolist()
            logprobs = None if off else (-rng.exponential(0.7, size=len(response))).astype(np.float32).tolist()
            reason = "length" if full >= 8192 and not off else "stop"
            reward = float(off or rng.random() < 0.4)
            samples.append(Sample(g, g, prompt, response, off, reason, logprobs, reward))
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    adv = compute_advantages(rewards, torch.tensor([s.group_id for s in samples]))
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return samples


def send(method: str, samples: list[Sample] | None, batch: StepBatch | None) -> list[Sample] | StepBatch:
    """Rank 0's step (``samples``, or for ``tensor`` its ``batch``) on both ranks (the others pass ``None``)."""
    if method == "tensor":
        return broadcast_batch(batch)
    box = [(True, (samples, {}))]  # rank0_call's box: (ok, result)
    dist.broadcast_object_list(box, src=0)
    return box[0][1][0]


def _tokens(step: list[Sample] | StepBatch) -> int:
    return step.num_tokens if isinstance(step, StepBatch) else sum(s.num_tokens for s in step)


def _rank0_step(
    rank: int, args: argparse.Namespace, batch: bool = True
) -> tuple[list[Sample] | None, StepBatch | None]:
    """Rank 0's samples and (with ``batch``) the batch built from them; nothing on the other rank."""
    if rank != 0:
        return None, None
    samples = step_batch(args.prompts, args.n, args.seed, args.scale)
    return samples, StepBatch.from_samples(samples) if batch else None


def time_methods(rank: int, args: argparse.Namespace) -> dict:
    """Both methods ``args.repeats`` times, interleaved; rank 0 adds :func:`rank0_parts`."""
    samples, batch = _rank0_step(rank, args)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    received = {}
    for r in range(args.repeats):
        for method in METHODS if r % 2 == 0 else METHODS[::-1]:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = send(method, samples, batch)
            cpu[method].append(time.process_time() - start_cpu)
            dist.barrier()
            seconds[method].append(time.perf_counter() - start)
            received[method] = (out.num_samples if isinstance(out, StepBatch) else len(out), _tokens(out))
            del out
    result: dict = {"seconds": seconds, "cpu_seconds": cpu, "received": received}
    if rank == 0:
        result.update(rank0_parts(samples, args.repeats))
    return result


def rank0_parts(samples: list[Sample], repeats: int) -> dict:
    """Rank 0's local share of each method (medians): build (the batch from the samples) / pack / unpack and
    pickle / unpickle; the bytes each sends."""
    parts: dict[str, list[float]] = {"build": [], "pack": [], "unpack": [], "pickle": [], "unpickle": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = StepBatch.from_samples(samples)
        t1 = time.perf_counter()
        packed = pack_batch(batch)
        t2 = time.perf_counter()
        rebuilt = unpack_batch(packed.header, packed.buffers)
        t3 = time.perf_counter()
        del rebuilt
        blob = pickle.dumps((True, (samples, {})))
        t4 = time.perf_counter()
        rebuilt = pickle.loads(blob)
        t5 = time.perf_counter()
        del rebuilt  # freeing 4M objects is not part of the rebuild
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[name].append(seconds)
    tensor_bytes = packed.header.nbytes + sum(b.nbytes for b in packed.buffers.values())
    return {
        "parts_s": {k: statistics.median(v) for k, v in parts.items()},
        "bytes": {"object": len(blob), "tensor": tensor_bytes},
        "batch": {
            "samples": len(samples),
            "tokens": _tokens(samples),
            "response_tokens": sum(len(s.response_ids) for s in samples),
            "rollout_logprobs": sum(len(s.rollout_logprobs or []) for s in samples),
            "tensor_dtypes": [str(b.dtype) for b in packed.buffers.values()],
        },
    }


def pending_checkpoint(samples: list[Sample], folder: Path, repeats: int) -> dict:
    """The asynchronous checkpoint's batch in flight (medians over ``repeats``): global rank 0 writing and reading
    ``pending_rollout.npz`` (:meth:`RolloutPrefetcher.save`), vs the indented JSON of the sample list the trainer
    state held before (``json.dumps(asdict(batch), indent=1)``)."""
    from dataclasses import asdict

    from luffy_megatron.train.producer import PENDING_FILE, RolloutPrefetcher

    folder.mkdir(parents=True, exist_ok=True)
    batch = StepBatch.from_samples(samples)
    times: dict[str, list[float]] = {"npz_save": [], "npz_load": [], "json_save": [], "json_load": []}
    for _ in range(repeats):
        writer = RolloutPrefetcher()
        writer.start(2, 1, lambda: (batch, {}))
        writer.wait()  # the batch the run waited for
        t0 = time.perf_counter()
        record = writer.save(folder)
        t1 = time.perf_counter()
        reader = RolloutPrefetcher()
        reader.load(folder, record)
        t2 = time.perf_counter()
        state = {"step": 2, "weights_step": 1, "samples": [asdict(s) for s in samples], "metrics": {}}
        text = json.dumps(state, indent=1)
        (folder / "pending.json").write_text(text)
        t3 = time.perf_counter()
        json.loads((folder / "pending.json").read_text())
        t4 = time.perf_counter()
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(seconds)
        writer.close()
        reader.close()
    return {
        "seconds_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "bytes": {"npz": (folder / PENDING_FILE).stat().st_size, "json": (folder / "pending.json").stat().st_size},
        "json_lines": text.count("\n") + 1,
    }


def peak_rss(rank: int, args: argparse.Namespace) -> dict:
    """ru_maxrss (MiB) of this rank before and after one send of ``args.method``."""
    samples, batch = _rank0_step(rank, args, batch=args.method == "tensor")
    dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = send(args.method, samples, batch)
    dist.barrier()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"before_mib": round(before, 1), "peak_mib": round(after, 1), "tokens": _tokens(out)}


def _worker(rank: int, port: int, task, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        queue.put((rank, task(rank, args)))
    finally:
        dist.destroy_process_group()


def run_pair(task, args: argparse.Namespace) -> list[dict]:
    """``task(rank, args)`` in two spawned processes joined by gloo; their results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, task, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=args.timeout_s) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"a benchmark process exited with {p.exitcode}")
    return [results[0], results[1]]


def report(args: argparse.Namespace, timing: list[dict], rss: dict[str, list[dict]]) -> dict:
    rank0, rank1 = timing
    for method in METHODS:
        sent, got = rank0["received"][method], rank1["received"][method]
        if sent != got:
            raise RuntimeError(f"{method}: rank 1 received {got} (samples, tokens), rank 0 sent {sent}")
    # A send ends when both ranks have passed the closing barrier: the slower rank's time counts.
    runs = {m: [max(a, b) for a, b in zip(rank0["seconds"][m], rank1["seconds"][m])] for m in METHODS}
    median = {m: statistics.median(v) for m, v in runs.items()}
    return {
        "command": "python tools/bench_step_batch.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "world_size": 2,
        "backend": "gloo",
        "batch": rank0["batch"],
        "repeats": args.repeats,
        "seconds": {
            m: {"median": round(median[m], 4), "min": round(min(runs[m]), 4), "runs": [round(x, 4) for x in runs[m]]}
            for m in METHODS
        },
        "speedup_object_over_tensor": round(median["object"] / median["tensor"], 2),
        # CPU time of each rank's part (process_time around the send): the work, less sensitive to other jobs.
        "cpu_seconds_median": {
            m: {f"rank{r}": round(statistics.median(t["cpu_seconds"][m]), 4) for r, t in enumerate(timing)}
            for m in METHODS
        },
        "rank0_parts_s": {k: round(v, 4) for k, v in rank0["parts_s"].items()},
        "bytes_sent": rank0["bytes"],
        "peak_rss_mib": {m: {f"rank{r}": rss[m][r] for r in range(2)} for m in METHODS},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128, help="prompts in the batch (default 128)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt, the last one the trace (default 8)")
    ap.add_argument("--scale", type=int, default=1, help="divide every length by this (quick checks; default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed sends per method (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the lengths, tokens and log-probs")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="give up on a process pair after this long")
    ap.add_argument("--out", default="docs/results/bench_step_batch.json", help="JSON report to write")
    args = ap.parse_args(argv)
    for name, low in (("prompts", 1), ("n", 2), ("scale", 1), ("repeats", 1)):
        if getattr(args, name) < low:
            ap.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.timeout_s <= 0:
        ap.error(f"--timeout-s must be positive, got {args.timeout_s}")
    load_before = os.getloadavg()[0]
    timing = run_pair(time_methods, args)
    rss = {}
    for method in METHODS:
        rss[method] = run_pair(peak_rss, argparse.Namespace(**{**vars(args), "method": method}))
    result = report(args, timing, rss)
    with tempfile.TemporaryDirectory() as tmp:
        batch = step_batch(args.prompts, args.n, args.seed, args.scale)
        result["pending_checkpoint"] = pending_checkpoint(batch, Path(tmp), min(args.repeats, 3))
    result["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "speedup_object_over_tensor", "rank0_parts_s")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
