"""``luffy-eval``: evaluate a checkpoint the way the LUFFY paper does (avg@k per benchmark, pass@k alongside).

examples:
  luffy-eval --model hf_out --data valid.all.parquet --out eval/luffy                  # the paper's settings
  luffy-eval --model ckpt/mcore --data valid.all.parquet --out eval/x --unique --n 32   # avg@32 everywhere
  luffy-eval --model hf_out --data valid.gpqa.parquet --out eval/ood --backend sglang --sglang-launch
  luffy-eval --model hf_out --data valid.all.parquet --out eval/cpu --backend sglang --sglang-launch \
      --sglang-set device=cpu dtype=float32 python=/opt/sglang/bin/python env.OMP_NUM_THREADS=4 \
      'extra_args=[--max-total-tokens,16384]'                                       # SGLang's CPU engine
  luffy-eval --compare eval/luffy eval/grpo                                            # tables side by side
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from luffy_megatron.config import DTYPES, RolloutBackend, SystemPrompt, choices
from luffy_megatron.data import DataError
from luffy_megatron.eval.runner import RESULTS_MD, EvalOptions, compare, run_eval, sglang_config
from luffy_megatron.eval.score import THINK_FORMATS
from luffy_megatron.eval.store import EvalError

_DEFAULTS = EvalOptions(model="", data=[], out="")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="luffy-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = _DEFAULTS
    p.add_argument("--model", help="HF model folder, or a luffy-megatron checkpoint (converted to OUT/hf_model)")
    p.add_argument("--data", nargs="+", default=[], help="parquet files in the LUFFY schema")
    p.add_argument("--out", help="output folder (a rerun into it resumes)")
    p.add_argument("--name", help="row label in the tables (default: the model folder's name)")
    p.add_argument("--sources", nargs="+", default=[], help="only these data_source values")
    p.add_argument("--n", type=int, default=d.n, help="samples per row (default %(default)s, as the paper)")
    p.add_argument("--unique", action="store_true", help="one row per distinct problem (use with --n for avg@n)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="default %(default)s (paper)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="default %(default)s (paper)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="default %(default)s (off)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="default %(default)s (paper)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--system-prompt",
        choices=choices(SystemPrompt),
        default=d.system_prompt,
        help="the rows' system message, as the training config's data.system_prompt (default %(default)s, as the "
        "paper's evaluation; replace: with --system-prompt-text)",
    )
    p.add_argument("--system-prompt-text", help="the system message of --system-prompt replace")
    p.add_argument(
        "--think-format",
        choices=THINK_FORMATS,
        default=d.think_format,
        help="default %(default)s (paper); required: the training reward's check, what validation uses",
    )
    p.add_argument(
        "--no-choice-letters",
        dest="choice_letters",
        action="store_false",
        help="do not match a ground truth A-J as a choice letter (reward.allow_choice_letters=false)",
    )
    p.add_argument("--limit-per-source", type=int, help="only the first N problems of each source")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="rows per generation chunk (resume unit)")
    p.add_argument("--reward-timeout", type=float, default=d.reward_timeout_s, help="seconds per sample")
    p.add_argument("--backend", choices=choices(RolloutBackend), default=d.backend)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per batch of the in-process engine")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="in-process engine")
    p.add_argument("--device", default=d.device, help="in-process engine (cpu, cuda)")
    p.add_argument("--sglang-url", nargs="+", default=[], dest="sglang_urls", help="running SGLang servers")
    p.add_argument("--sglang-launch", action="store_true", help="start SGLang servers for the model")
    p.add_argument("--sglang-servers", type=int, default=1)
    p.add_argument("--sglang-tp", type=int, default=1)
    p.add_argument("--sglang-router", action="store_true", help="put sglang-router in front of the servers")
    p.add_argument(
        "--sglang-set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="any other rollout.sglang setting of the training config, as a training override (the 'rollout.sglang.' "
        "prefix may be left out): e.g. device=cpu, python=PATH (the servers' interpreter), env.NAME=VALUE, "
        "dtype=float32 (launched servers default to bfloat16), base_port=P, router_port=P, "
        "extra_args=[--flag,value] (more server flags), startup_timeout_s=S; applied after the --sglang-* flags; "
        "launched servers log to OUT/sglang_logs",
    )
    p.add_argument("--compare", nargs="+", metavar="DIR", help="print finished runs' tables side by side and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def options(args: argparse.Namespace) -> EvalOptions:
    """Validated options; every problem is one :class:`EvalError` naming the flag."""
    for flag in ("model", "out"):
        if not getattr(args, flag):
            raise EvalError(f"--{flag} is required")
    if not args.data:
        raise EvalError("--data is required (one or more parquet files)")
    checks = [
        ("--n", args.n >= 1),
        ("--temperature", args.temperature >= 0),
        ("--top-p", 0 < args.top_p <= 1),
        ("--max-new-tokens", args.max_new_tokens >= 1),
        ("--chunk-size", args.chunk_size >= 1),
        ("--batch-size", args.batch_size >= 1),
        ("--limit-per-source", args.limit_per_source is None or args.limit_per_source >= 1),
    ]
    for flag, ok in checks:
        if not ok:
            raise EvalError(f"{flag}: invalid value {getattr(args, flag[2:].replace('-', '_'))}")
    if (args.system_prompt == SystemPrompt.REPLACE) != (args.system_prompt_text is not None):
        raise EvalError("--system-prompt-text goes with --system-prompt replace, and only with it")
    if args.backend == "sglang" and not (args.sglang_urls or args.sglang_launch):
        raise EvalError("--backend sglang needs --sglang-url URL... or --sglang-launch")
    keys = set(EvalOptions.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in keys}
    opts = EvalOptions(**values, reward_timeout_s=args.reward_timeout)
    sglang_config(opts)  # a bad --sglang-set fails here, before any model is loaded
    return opts


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.compare:
            print(compare(args.compare), end="")
            return 0
        opts = options(args)
        results = run_eval(opts, progress=not args.quiet)
    except (EvalError, DataError) as e:
        print(f"luffy-eval: error: {e}", file=sys.stderr)
        return 2
    print(f"{results['samples']} samples ({results['generated_this_run']} generated now) -> {opts.out}")
    print((Path(opts.out) / RESULTS_MD).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
