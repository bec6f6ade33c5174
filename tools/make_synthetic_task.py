#!/usr/bin/env python
"""Write the synthetic addition task (train.parquet, val.parquet; with --num-ood also ood.parquet, out-of-distribution
problems: operands of one more digit, and operands without their zero padding) in the LUFFY schema for the CPU demo.

Example: python tools/make_synthetic_task.py --out data/synthetic_add --num-train 2000 --num-val 200 --num-ood 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from luffy_megatron.data.synthetic import (  # noqa: E402
    DEFAULT_SYSTEM_PROMPT,
    expert_trace,
    problem_text,
    write_ood,
    write_task,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--num-train", type=int, default=2000, help="training problems (default 2000)")
    p.add_argument("--num-val", type=int, default=200, help="held-out problems, disjoint from training (default 200)")
    p.add_argument(
        "--num-ood",
        type=int,
        default=0,
        help="out-of-distribution problems of each kind (ood.parquet): operands of one more digit, and operands "
        "without their zero padding (default 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--digits", type=int, default=2, help="digits per operand, zero-padded (default 2)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system message (default: a short one)")
    p.add_argument("--no-system-prompt", action="store_true", help="prompts with the user turn only")
    args = p.parse_args(argv)
    system = None if args.no_system_prompt else args.system_prompt
    try:
        train, val = write_task(args.out, args.num_train, args.num_val, args.seed, args.digits, system)
        ood = write_ood(args.out, args.num_ood, args.seed, args.digits, system) if args.num_ood else None
    except ValueError as e:
        p.error(str(e))
    a, b = 47 % 10**args.digits, 85 % 10**args.digits
    print(f"wrote {train} ({args.num_train} rows) and {val} ({args.num_val} rows)")
    if ood is not None:
        print(f"wrote {ood} ({args.num_ood} rows of each kind: {args.digits + 1}-digit operands, unpadded operands)")
    print(f"example: {problem_text(a, b, args.digits)!r} -> {expert_trace(a, b, args.digits)!r}")


if __name__ == "__main__":
    main()
