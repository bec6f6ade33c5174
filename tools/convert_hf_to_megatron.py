"""Convert a Hugging Face checkpoint folder into a Megatron distributed checkpoint (loads at any TP/PP).

The output is megatron-core dist_checkpointing (torch_dist) plus luffy_checkpoint.json (family, HF config, true
vocabulary, dtype) and hf/ (config, generation config, tokenizer), so it is self-contained. It is written to a
temporary folder next to --out and renamed at the end. Single process is enough for any later layout; run under
torchrun (world size a multiple of tp * pp) when the model does not fit one process's memory.

Examples:
    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-Math-7B --out ckpt/qwen-7b-mcore
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-32B --out ckpt/32b --tp 4
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
    parser.add_argument("--hf-dir", required=True, type=Path, help="HF folder: config.json, *.safetensors, tokenizer")
    parser.add_argument("--out", required=True, type=Path, help="Megatron checkpoint folder to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size of the writing processes")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the writing processes")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: the HF config's dtype"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing so that --help answers without loading torch and megatron-core.
    from luffy_megatron.config import ConfigError
    from luffy_megatron.convert import ConversionError, convert_hf_to_megatron
    from luffy_megatron.platform import RankFailure, report_error, settle, shutdown_distributed

    try:
        out = convert_hf_to_megatron(
            args.hf_dir,
            args.out,
            tp=args.tp,
            pp=args.pp,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ConversionError, ConfigError, RankFailure) as exc:
        report_error("convert_hf_to_megatron", exc)  # one line, from the rank where it happened
        settle()
        return 2
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
