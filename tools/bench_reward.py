#!/usr/bin/env python
"""Reward throughput: RewardPool (N worker processes) vs the in-process serial scorer on a paper-like mix.

Each round scores groups of 8 responses for 64 problems (a LUFFY rollout step's shape) with real ground truths from the
LUFFY eval set when it is present (synthetic answers otherwise): about half correct ``\\boxed{}`` answers in varied
equivalent forms, a third wrong answers, the rest malformed (no ``</think>``, unbalanced braces, no box). Both sides
score the same rounds, each round's problems new to both, after one warm-up round. Writes a JSON report.

Example: python tools/bench_reward.py --workers 2 --rounds 5 --out docs/results/bench_reward.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from luffy_megatron.config import RewardConfig  # noqa: E402
from luffy_megatron.reward import RewardPool, score_detailed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVAL_PARQUET = REPO.parent / "shared" / "data" / "luffy_eval" / "valid.all.parquet"
FILLER = (
    "Let me think about this carefully. We set up the equation $x^2 - 5x + 6 = 0$, so $(x-2)(x-3)=0$. "
    "Wait, let me verify the constraint again: since $a + b = 10$ and $ab = 21$, we get $a^2 + b^2 = 58$. "
    "Hmm, that does not match, so reconsider the case analysis. "
)


def ground_truths(n_problems: int, rounds: int, seed: int) -> list[list[str]]:
    """``rounds`` disjoint lists of ``n_problems`` ground truths (eval-set answers, or synthetic integers)."""
    pool: list[str]
    if EVAL_PARQUET.is_file():
        import pyarrow.parquet as pq

        col = pq.read_table(EVAL_PARQUET, columns=["reward_model"]).column("reward_model").to_pylist()
        pool = sorted({r["ground_truth"] for r in col})
    else:
        pool = [str(i) for i in range(10_000)]
    rng = random.Random(seed)
    rng.shuffle(pool)
    need = n_problems * rounds
    pool = (pool * (need // len(pool) + 1))[:need]
    return [pool[i * n_problems : (i + 1) * n_problems] for i in range(rounds)]


def make_response(truth: str, rng: random.Random) -> str:
    """A response shaped like a long-CoT rollout: thinking (1-6 KB), then a final answer of some kind."""
    thinking = "<think>\n" + FILLER * rng.randint(5, 30) + "\n</think>\n"
    kind = rng.random()
    if kind < 0.5:
        answer = rng.choice([f"\\boxed{{{truth}}}", f"The final answer is $\\boxed{{{truth}}}$.", f"So $x = {truth}$."])
        return thinking + "Therefore, " + answer
    if kind < 0.8:
        wrong = rng.choice(["17", "\\frac{3}{7}", "2\\sqrt{5}", "\\pi", "x^2+1", "(1, 2]"])
        return thinking + f"The answer is \\boxed{{{wrong}}}."
    if kind < 0.9:
        return thinking.replace("</think>", "") + f"\\boxed{{{truth}}}"  # never closed its thinking
    return thinking + rng.choice([f"\\boxed{{{truth}", "I could not finish.", "\\boxed{\\frac{1}{"])


def build_round(truths: list[str], n: int, rng: random.Random) -> tuple[list[str], list[str], list[bool]]:
    responses, gts = [], []
    for truth in truths:
        for _ in range(n):
            responses.append(make_response(truth, rng))
            gts.append(truth)
    return responses, gts, [False] * len(responses)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--problems", type=int, default=64, help="problems per round (default 64)")
    p.add_argument("--n", type=int, default=8, help="responses per problem (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--timeout", type=float, default=5.0, help="per-item budget in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "bench_reward.json"))
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    # Both sides score the same rounds, each for the first time in its process(es): one untimed warm-up round
    # (sympy / math-verify caches fill up as in a long run), then the timed rounds of fresh problems.
    rounds = [build_round(t, args.n, rng) for t in ground_truths(args.problems, args.rounds + 1, args.seed)]
    load_before = os.getloadavg()

    score_detailed("<think></think>\\boxed{1}", "1", False, None)  # imports, as a started worker has them
    start = time.perf_counter()
    pool = RewardPool(RewardConfig(num_workers=args.workers, timeout_s=args.timeout))
    pool.score(["<think></think>\\boxed{1}"] * args.workers, ["1"] * args.workers, [False] * args.workers)
    startup_s = time.perf_counter() - start
    # Serial and pool alternate round by round, so load from other jobs hits both alike.
    serial_s, pool_s, serial_correct, pool_correct = [], [], 0.0, 0.0
    serial_cpu, worker_cpu, parent_cpu = [], [], []  # CPU seconds: far less sensitive to other jobs than wall time
    for i, (responses, gts, flags) in enumerate(rounds):
        start, cpu0 = time.perf_counter(), time.process_time()
        res = [score_detailed(r, g, f, args.timeout) for r, g, f in zip(responses, gts, flags)]
        t_serial, c_serial = time.perf_counter() - start, time.process_time() - cpu0
        workers = [psutil.Process(pid) for pid in pool.worker_pids]
        w0 = [sum(w.cpu_times()[:2]) for w in workers]
        start, cpu0 = time.perf_counter(), time.process_time()
        scores = pool.score(responses, gts, flags)
        t_pool, c_parent = time.perf_counter() - start, time.process_time() - cpu0
        try:
            c_workers = [sum(w.cpu_times()[:2]) - c for w, c in zip(workers, w0)]
        except psutil.NoSuchProcess:  # a worker was replaced during the round
            c_workers = [float("nan")] * len(workers)
        if i:  # round 0 is the warm-up
            serial_s.append(t_serial)
            pool_s.append(t_pool)
            serial_cpu.append(c_serial)
            worker_cpu.append(c_workers)
            parent_cpu.append(c_parent)
            serial_correct += sum(r.score for r in res)
            pool_correct += sum(scores)
    stats = pool.stats.as_dict()
    pool.close()

    items = args.problems * args.n
    clean = [(s, w) for s, w in zip(serial_cpu, worker_cpu) if all(x == x for x in w)]  # x != x: NaN
    # Throughput over all timed rounds: rounds differ in content (one may hold a timeout), so each side's total time
    # over the same items is the fair comparison; a ratio of per-side medians would pair different rounds.
    serial_total, pool_total = sum(serial_s), sum(pool_s)
    report = {
        "what": "reward throughput, RewardPool vs serial score_detailed, paper-like long-CoT responses",
        "items_per_round": items,
        "rounds": args.rounds,
        "warmup_rounds": 1,
        "workers": args.workers,
        "timeout_s": args.timeout,
        "ground_truths": "LUFFY eval set" if EVAL_PARQUET.is_file() else "synthetic integers",
        "serial_round_s": [round(x, 3) for x in serial_s],
        "pool_round_s": [round(x, 3) for x in pool_s],
        "serial_items_per_s": round(items * args.rounds / serial_total, 1),
        "pool_items_per_s": round(items * args.rounds / pool_total, 1),
        "speedup": round(serial_total / pool_total, 2),
        "speedup_per_round": [round(a / b, 2) for a, b in zip(serial_s, pool_s)],
        "speedup_median_round": round(statistics.median(a / b for a, b in zip(serial_s, pool_s)), 2),
        "serial_cpu_s": [round(x, 3) for x in serial_cpu],
        "pool_worker_cpu_s": [[round(x, 3) for x in w] for w in worker_cpu],
        "pool_parent_cpu_s": [round(x, 3) for x in parent_cpu],
        # what the pool achieves on idle cores: serial CPU time over the busiest worker's CPU time (the critical path)
        # (rounds in which a worker was replaced have no per-worker CPU time and are left out)
        "cpu_speedup_bound": round(sum(s for s, w in clean) / sum(max(w) for s, w in clean), 2) if clean else None,
        "pool_cpu_overhead": round(sum(sum(w) for s, w in clean) / sum(s for s, w in clean) - 1, 3) if clean else None,
        "pool_startup_s": round(startup_s, 2),
        "accuracy_serial": round(serial_correct / (items * args.rounds), 3),
        "accuracy_pool": round(pool_correct / (items * args.rounds), 3),
        "pool_stats": stats,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "note": "CPUs shared with other jobs; a load average above the CPU count means contention",
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(
        f"serial {report['serial_items_per_s']} items/s, pool({args.workers}) {report['pool_items_per_s']} items/s: "
        f"speedup {report['speedup']}x wall, {report['cpu_speedup_bound']}x by CPU time "
        f"(load {load_before[0]:.1f} on {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
