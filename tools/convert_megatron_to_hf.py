"""Convert a Megatron checkpoint (from convert_hf_to_megatron.py or training) into a complete Hugging Face folder.

Writes sharded safetensors with an index, config.json (true vocabulary, no padding), generation config and tokenizer
files; transformers, SGLang and vLLM load the result. Written to a temporary folder next to --out, renamed at the end.
Any layout reads any checkpoint; under torchrun, --tp/--pp split the model across the processes.

Examples:
    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/qwen-7b-mcore --out hf/qwen-7b-luffy --dtype bfloat16
    torchrun --nproc-per-node 4 tools/convert_megatron_to_hf.py --megatron-dir ckpt/32b --out hf/32b --tp 4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("Examples:")[0].strip(),
        epilog="Examples:" + doc.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--megatron-dir", required=True, type=Path, help="checkpoint with luffy_checkpoint.json")
    parser.add_argument("--out", required=True, type=Path, help="HF folder to create")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: the checkpoint's dtype"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size of the reading processes")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the reading processes")
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size (GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing so that --help answers without loading torch and megatron-core.
    from luffy_megatron.config import ConfigError
    from luffy_megatron.convert import ConversionError, convert_megatron_to_hf
    from luffy_megatron.platform import RankFailure, report_error, settle, shutdown_distributed

    try:
        out = convert_megatron_to_hf(
            args.megatron_dir,
            args.out,
            tp=args.tp,
            pp=args.pp,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            progress=not args.no_progress,
        )
    except (ConversionError, ConfigError, RankFailure) as exc:
        report_error("convert_megatron_to_hf", exc)  # one line, from the rank where it happened
        settle()
        return 2
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
