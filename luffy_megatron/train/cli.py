"""``luffy-train CONFIG.yaml [key=value ...]``: the LUFFY trainer (single process, torchrun or srun)."""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from luffy_megatron.config import ConfigError, RunConfig, load_config
from luffy_megatron.config_checks import validate

PROG = "luffy-train"
EPILOG = """examples:
  luffy-train configs/tiny_cpu_luffy.yaml trainer.total_steps=50
  torchrun --nproc-per-node 2 -m luffy_megatron.train.cli configs/tiny_cpu_luffy.yaml parallel.tp=2
  srun torchrun ... -m luffy_megatron.train.cli configs/luffy_qwen2.5_math_7b.yaml model.hf_path=/models/qwen
Every key of the config tree can be overridden; `--print-config` shows them all."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a policy with LUFFY (mixed-policy GRPO) on Megatron-core.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML run configuration (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2 rollout.n=8")
    parser.add_argument("--print-config", action="store_true", help="print the merged configuration and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 for a configuration error (one line, from rank 0 only: every rank finds the same error before
    any process group exists), 1 for a failed run (one line from the rank where it happened), 0 otherwise."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            return 0
        # Everything that can be checked is checked before any process group or model exists.
        validate(cfg)
    except ConfigError as e:
        from luffy_megatron.platform import read_dist_env  # torch: imported only on this path, see run()

        if read_dist_env().rank == 0:
            print(f"{PROG}: configuration error: {e}", file=sys.stderr)
        return 2
    return run(cfg)


def run(cfg: RunConfig) -> int:
    """Train; a failure of the run's inputs or services is one line on stderr and exit status 1 (a traceback would
    only repeat it), anything else is a bug and keeps its traceback."""
    # Imported only once the configuration is valid, so that --help and configuration errors answer at once: the
    # trainer imports torch, megatron-core and transformers (about 6 s).
    from luffy_megatron.convert import ConversionError
    from luffy_megatron.data import DataError
    from luffy_megatron.platform import RankFailure, report_error, settle, shutdown_distributed
    from luffy_megatron.rollout.base import RolloutError, WeightSyncError
    from luffy_megatron.train.checkpoint import CheckpointError
    from luffy_megatron.train.loop import train

    try:
        train(cfg)
    except (ConfigError, DataError, ConversionError, CheckpointError, RolloutError, WeightSyncError, RankFailure) as e:
        report_error(PROG, e)  # on the rank where it happened
        settle()
        return 1
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
