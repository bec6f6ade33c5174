"""``luffy-train CONFIG.yaml [key=value ...]``: the LUFFY trainer (single process, torchrun or srun)."""

from __future__ import annotations

import argparse
import sys

from luffy_megatron.config import ConfigError, load_config, validate

EPILOG = """examples:
  luffy-train configs/tiny_cpu_luffy.yaml trainer.total_steps=50
  torchrun --nproc-per-node 2 -m luffy_megatron.train.cli configs/tiny_cpu_luffy.yaml parallel.tp=2
  srun torchrun ... -m luffy_megatron.train.cli configs/luffy_qwen2.5_math_7b.yaml model.hf_path=/models/qwen
Every key of the config tree can be overridden; `--print-config` shows them all."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="luffy-train",
        description="Train a policy with LUFFY (mixed-policy GRPO) on Megatron-core.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML run configuration (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2 rollout.n=8")
    parser.add_argument("--print-config", action="store_true", help="print the merged configuration and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            return 0
        # Everything that can be checked is checked before any process group or model exists.
        validate(cfg)
    except ConfigError as e:
        print(f"luffy-train: configuration error: {e}", file=sys.stderr)
        return 2
    from luffy_megatron.train.loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
