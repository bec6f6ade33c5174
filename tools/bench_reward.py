#!/usr/bin/env python
"""Reward throughput: RewardPool (N worker processes) vs the in-process serial scorer on a paper-like mix.

Each round scores groups of 8 responses for 64 problems (a LUFFY rollout step's shape) with real ground truths from the
LUFFY eval set when it is present (synthetic answers otherwise): about half correct ``\\boxed{}`` answers in varied
equivalent forms, a third wrong answers, the rest malformed (no ``</think>``, unbalanced braces, no box). Every round
uses fresh problems so neither side profits from math-verify's parse caches more than the other. Writes a JSON report.

Example: python tools/bench_reward.py --workers 2 --rounds 3 --out docs/results/bench_reward.json
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=5.0, help="per-item budget in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "bench_reward.json"))
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    # one untimed warm-up round per side (sympy / math-verify caches fill up as they do in a long run), then the rounds
    all_truths = ground_truths(args.problems, 2 * args.rounds + 2, args.seed)
    rounds = [build_round(t, args.n, rng) for t in all_truths]
    serial_rounds, pool_rounds = rounds[: args.rounds + 1], rounds[args.rounds + 1 :]
    load_before = os.getloadavg()

    score_detailed("<think></think>\\boxed{1}", "1", False, None)  # imports, as a started worker has them
    serial_s, serial_correct = [], 0
    for i, (responses, gts, flags) in enumerate(serial_rounds):
        start = time.perf_counter()
        res = [score_detailed(r, g, f, args.timeout) for r, g, f in zip(responses, gts, flags)]
        if i:
            serial_s.append(time.perf_counter() - start)
            serial_correct += sum(r.score for r in res)

    start = time.perf_counter()
    pool = RewardPool(RewardConfig(num_workers=args.workers, timeout_s=args.timeout))
    pool.score(["<think></think>\\boxed{1}"] * args.workers, ["1"] * args.workers, [False] * args.workers)
    startup_s = time.perf_counter() - start
    pool_s, pool_correct = [], 0
    for i, (responses, gts, flags) in enumerate(pool_rounds):
        start = time.perf_counter()
        scores = pool.score(responses, gts, flags)
        if i:
            pool_s.append(time.perf_counter() - start)
            pool_correct += sum(scores)
    stats = pool.stats.as_dict()
    pool.close()

    items = args.problems * args.n
    serial_med, pool_med = statistics.median(serial_s), statistics.median(pool_s)
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
        "serial_items_per_s": round(items / serial_med, 1),
        "pool_items_per_s": round(items / pool_med, 1),
        "speedup": round(serial_med / pool_med, 2),
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
        f"speedup {report['speedup']}x (load {load_before[0]:.1f} on {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
