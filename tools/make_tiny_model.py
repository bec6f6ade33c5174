"""Write a tiny random Hugging Face checkpoint (config, safetensors, offline-trained tokenizer) for tests and demos.

Examples:
    python tools/make_tiny_model.py --family qwen2 --out /tmp/tiny-qwen2 --layers 2 --hidden-size 64 --tie-embeddings
    python tools/make_tiny_model.py --family qwen3_moe --out /tmp/tiny-qwen3-moe --num-experts 4 --experts-per-token 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from luffy_megatron.models.tiny import FAMILY_ARCHITECTURES, TINY_MOE, make_tiny_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python tools/make_tiny_model.py --family qwen2 --out /tmp/tiny-qwen2 --tie-embeddings",
    )
    parser.add_argument("--family", choices=sorted(FAMILY_ARCHITECTURES), default="qwen2")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument(
        "--vocab-size", type=int, default=397, help="model vocabulary (default 397, not a multiple of 128)"
    )
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=160)
    parser.add_argument("--head-dim", type=int, default=None, help="default hidden_size / heads")
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--split-digits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one token per digit, as Qwen's pre-tokenizer does (default on)",
    )
    parser.add_argument(
        "--ascii-only",
        action="store_true",
        help="byte-level BPE over printable ASCII only (vocabularies of ~100 tokens; other bytes are dropped)",
    )
    parser.add_argument(
        "--chat-template",
        choices=("chatml", "compact"),
        default="chatml",
        help="chatml: Qwen's template; compact: message texts then <think>\\n (fewer tokens per prompt)",
    )
    parser.add_argument("--rope-theta", type=float, default=None, help="default: the family's usual base")
    parser.add_argument(
        "--randomize-all",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random norms and biases too, so conversion errors show (default on; off: transformers' init)",
    )
    parser.add_argument("--max-position-embeddings", type=int, default=4096)
    moe = parser.add_argument_group("mixture of experts (--family qwen3_moe)")
    moe.add_argument("--num-experts", type=int, default=TINY_MOE["num_experts"], help="routed experts per layer")
    moe.add_argument("--experts-per-token", type=int, default=TINY_MOE["num_experts_per_tok"], help="router top-k")
    moe.add_argument("--moe-intermediate-size", type=int, default=TINY_MOE["moe_intermediate_size"])
    moe.add_argument(
        "--norm-topk-prob",
        action=argparse.BooleanOptionalAction,
        default=TINY_MOE["norm_topk_prob"],
        help="renormalise the top-k router probabilities to sum to 1 (default on, as Qwen3-30B-A3B)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, default=None, help="text file to train the tokenizer on instead")
    return parser.parse_args(argv)


def _moe_fields(args: argparse.Namespace) -> dict:
    return dict(
        num_experts=args.num_experts,
        num_experts_per_tok=args.experts_per_token,
        moe_intermediate_size=args.moe_intermediate_size,
        norm_topk_prob=args.norm_topk_prob,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = make_tiny_model(
        args.out,
        args.family,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        head_dim=args.head_dim,
        tie_embeddings=args.tie_embeddings,
        seed=args.seed,
        corpus=args.corpus.read_text(encoding="utf-8") if args.corpus else None,
        split_digits=args.split_digits,
        ascii_only=args.ascii_only,
        chat_template=args.chat_template,
        rope_theta=args.rope_theta,
        randomize_all=args.randomize_all,
        max_position_embeddings=args.max_position_embeddings,
        moe=_moe_fields(args) if args.family == "qwen3_moe" else None,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
