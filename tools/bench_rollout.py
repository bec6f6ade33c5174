"""Benchmark rollout weight sync and in-process generation on CPU; writes docs/results/bench_rollout.json.

Weight sync uses a randomly initialised model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings) streamed as HF-named tensors:

- ``in_process``: :meth:`HFEngine.update_weights` (copy into the live model).
- ``disk``: :class:`SGLangEngine` in ``disk`` mode against the local SGLang test server (same host): write safetensors
  shards, then the server loads them (``/update_weights_from_disk``), including pause/flush/continue round trips.
- ``tensor``: ``/update_weights_from_tensor`` with ForkingPickler shared-memory handles (same host).

Generation: the in-process engine sampling the CPU demo's batch (32 prompts x 7 samples x 30 tokens) from a ~0.5M
parameter model, EOS disabled so every row runs to the length limit.

Usage: ``python tools/bench_rollout.py [--dtype bfloat16] [--layers 24] [--out docs/results/bench_rollout.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from luffy_megatron.rollout.base import SamplingParams  # noqa: E402
from luffy_megatron.rollout.hf_engine import HFEngine  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def qwen05b_shaped(dtype: torch.dtype, layers: int, seed: int | None) -> torch.nn.Module:
    """A model with Qwen2.5-0.5B's shape (``layers`` may be reduced to save time).

    Built on the meta device and materialised uninitialised (HF's init of 0.5B parameters takes minutes on a busy CPU);
    with a ``seed`` the weights are then filled uniformly at random, without one they stay uninitialised (a
    destination whose values are overwritten anyway). Only the parameters are meaningful: not for a forward pass.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=1e6,
        eos_token_id=1,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty unties lm_head from the embedding
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-0.05, 0.05, generator=gen)
    return model


def hf_stream(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The HF-named tensors a trainer exports: tied duplicates (``lm_head.weight``) appear once, as in safetensors."""
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append((name, t))
    return out


def stream_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in hf_stream(model))


def bench_in_process(src: torch.nn.Module, dst: HFEngine, repeats: int) -> dict:
    nbytes = stream_bytes(src)
    times = []
    for v in range(repeats):
        t0 = time.perf_counter()
        dst.update_weights(hf_stream(src), version=v + 1)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"seconds": best, "all_seconds": times, "bytes": nbytes, "gb_per_s": nbytes / best / 1e9}


def bench_server_sync(src: torch.nn.Module, dst: HFEngine, mode: str, repeats: int, bucket_mb: int) -> dict:
    from luffy_megatron.rollout.sglang.client import SGLangClient
    from luffy_megatron.rollout.sglang.engine import SGLangEngine
    from tests.sglang_test_server import SGLangTestServer

    server = SGLangTestServer(dst)
    server.start()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        engine = SGLangEngine(SGLangClient([server.url]), weight_sync=mode, weight_sync_dir=tmp, bucket_mb=bucket_mb)
        try:
            for v in range(repeats):
                # ForkingPickler moves CPU tensors into shared memory: send copies, keep the source intact.
                stream = [(k, t.clone()) for k, t in hf_stream(src)] if mode == "tensor" else hf_stream(src)
                engine.update_weights(stream, version=v + 1)
                runs.append(dict(engine.last_sync))
        finally:
            engine.close()
            server.stop()
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "all_seconds": [r["seconds"] for r in runs]}


def bench_generation(prompts: int, n: int, tokens: int, repeats: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=18,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    engine = HFEngine(model, eos_token_ids=[], batch_size=prompts * n)
    batch = [[2 + (i * 7 + k) % 16 for k in range(8)] for i in range(prompts)]
    params = SamplingParams(n=n, max_new_tokens=tokens, seed=1)
    engine.generate(batch, params)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(batch, params)
        times.append(time.perf_counter() - t0)
    generated = sum(len(o.output_ids) for row in out for o in row)
    best = min(times)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "prompts": prompts,
        "samples_per_prompt": n,
        "max_new_tokens": tokens,
        "generated_tokens": generated,
        "seconds": best,
        "all_seconds": times,
        "tokens_per_s": generated / best,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  python tools/bench_rollout.py --dtype bfloat16 --out docs/results/bench_rollout.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="dtype of the 0.5B-shaped model")
    ap.add_argument("--layers", type=int, default=24, help="transformer layers of the 0.5B-shaped model (24 = real)")
    ap.add_argument("--repeats", type=int, default=2, help="repeats per measurement (best is reported)")
    ap.add_argument("--bucket-mb", type=int, default=512, help="safetensors shard / tensor bucket size")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--skip-sync", action="store_true", help="only benchmark generation")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "bench_rollout.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results: dict = {
        "host": {
            "machine": platform.machine(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": "cpu",
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if not args.skip_sync:
        dtype = _DTYPES[args.dtype]
        t0 = time.perf_counter()
        src = qwen05b_shaped(dtype, args.layers, seed=1)
        dst = HFEngine(qwen05b_shaped(dtype, args.layers, seed=None), eos_token_ids=[1])
        build_s = time.perf_counter() - t0
        results["weight_sync"] = {
            "model": {
                "shape": "Qwen2.5-0.5B",
                "layers": args.layers,
                "dtype": args.dtype,
                "params": sum(p.numel() for p in src.parameters()),
                "bytes": stream_bytes(src),
                "build_seconds": build_s,
            },
            "in_process": bench_in_process(src, dst, args.repeats),
            "disk": bench_server_sync(src, dst, "disk", args.repeats, args.bucket_mb),
            "tensor": bench_server_sync(src, dst, "tensor", args.repeats, args.bucket_mb),
        }
        del src, dst
    results["generation_in_process"] = bench_generation(32, 7, 30, max(args.repeats, 3))
    results["total_seconds"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
