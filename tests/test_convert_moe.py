"""qwen3_moe conversion HF <-> Megatron at TP1, TP2, PP2 and with the experts split over two EP ranks.

- TP1 (one process): HF -> Megatron -> HF bit-identical; Megatron logits, loss and gradients equal transformers'
  (fp32, 1e-4 absolute; the auxiliary loss off for the gradients, as transformers adds none without
  ``output_router_logits``), with renormalised top-k probabilities (``norm_topk_prob``) and without.
- TP2 / PP2 (two processes): written at TP=2, converted back at PP=2, bit-identical; logits at (TP, PP) = (1, 2).
- EP2 (two processes): each EP rank loads its two experts from HF; logits equal transformers'; the export stream
  gathers the experts bit-identical; a checkpoint saved at EP=2 loads at EP=1 and exports bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.fixtures_models import (
    build_from_hf,
    converted_vs_hf,
    hf_logits,
    hf_loss_and_grads,
    init_parallel,
    pipeline_logits,
    sample_tokens,
)
from tests.test_convert_roundtrip import _hf_tensors

TOL = 1e-4


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3-MoEs (4 experts, top-2, GQA 2, head_dim 32): with and without renormalised top-k probabilities."""
    from luffy_megatron.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("moe")
    kw = dict(family="qwen3_moe", heads=4, kv_heads=2, head_dim=32, layers=2)
    return {
        "norm": make_tiny_model(root / "norm", seed=3, **kw),
        "no_norm": make_tiny_model(root / "no_norm", seed=4, moe={"norm_topk_prob": False}, **kw),
    }


def _tp1_worker(rank: int, world: int, cases: dict, tmp: Path) -> dict:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from luffy_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

    report = {}
    for name, (hf_dir, tokens, ref_logits, ref_loss, ref_grads) in cases.items():
        convert_hf_to_megatron(hf_dir, tmp / f"{name}-megatron")
        convert_megatron_to_hf(tmp / f"{name}-megatron", tmp / f"{name}-hf")
        ckpt = tmp / f"{name}-megatron"
        report[name] = converted_vs_hf(hf_dir, ckpt, tokens, ref_logits, ref_loss, ref_grads, moe_aux_loss_coeff=0.0)
    return report


def _per_expert_grads(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert gradients -> per-expert tensors, named as the checkpoint names them."""
    out = {}
    for name, grad in grads.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":
            for e, g in enumerate(grad):
                gate, up = g.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        elif kind == "down_proj" and prefix.endswith("experts"):
            out.update({f"{prefix}.{e}.down_proj.weight": g for e, g in enumerate(grad)})
        else:
            out[name] = grad
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    orig, got = _hf_tensors(a), _hf_tensors(b)
    assert sorted(orig) == sorted(got)
    for name, tensor in orig.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.slow
def test_tp1_roundtrip_logits_and_gradients(moe_dirs: dict[str, Path], tmp_path: Path) -> None:
    cases = {}
    for name, hf_dir in moe_dirs.items():
        tokens = sample_tokens(hf_dir)
        loss, grads = hf_loss_and_grads(hf_dir, tokens)
        cases[name] = (hf_dir, tokens, hf_logits(hf_dir, tokens), loss, _per_expert_grads(grads))
    (report,) = run_distributed(_tp1_worker, 1, cases, tmp_path)
    print("qwen3_moe at TP1, max |diff| from transformers:", report)
    for name, hf_dir in moe_dirs.items():
        assert report[name]["logits"] <= TOL and report[name]["grads"] <= TOL, (name, report[name])
        assert report[name]["loss"] <= 1e-3, (name, report[name])  # a sum over 22 tokens
        _assert_same_tensors(hf_dir, tmp_path / f"{name}-hf")


def _tp2_worker(rank: int, world: int, hf_dir: Path, tokens, ref, tmp: Path) -> float | None:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core import parallel_state as ps

    from luffy_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

    convert_hf_to_megatron(hf_dir, tmp / "tp2", tp=2)
    convert_megatron_to_hf(tmp / "tp2", tmp / "back", tp=1, pp=2)
    init_parallel(1, 2)
    spec, config, chunks = build_from_hf(hf_dir, 1, 2, ckpt=tmp / "tp2")
    logits = pipeline_logits(chunks, config, spec, tokens)
    return (logits - ref).abs().max().item() if ps.is_pipeline_last_stage() else None


@pytest.mark.slow
def test_tp2_checkpoint_converts_back_at_pp2(moe_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf_dir = moe_dirs["norm"]
    tokens = sample_tokens(hf_dir, seed=1)
    out = run_distributed(_tp2_worker, 2, hf_dir, tokens, hf_logits(hf_dir, tokens), tmp_path)
    diff = max(d for d in out if d is not None)
    print("qwen3_moe logits max |diff| at (TP, PP) = (1, 2) from a TP=2 checkpoint:", diff)
    assert diff <= TOL
    _assert_same_tensors(hf_dir, tmp_path / "back")


def _init_ep(ep: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1)


def _ep2_worker(rank: int, world: int, hf_dir: Path, tokens, ref, tmp: Path) -> dict:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from luffy_megatron.convert import iter_hf_weights, save_megatron_checkpoint

    _init_ep(2)
    spec, config, chunks = build_from_hf(hf_dir, 1, 1, expert_model_parallel_size=2)
    held = sorted({int(n.split(".")[6]) for n, _ in chunks[0].named_parameters() if ".local_experts." in n})
    owned = list(chunks[0].decoder.layers[0].mlp.local_expert_indices)
    logits = pipeline_logits(chunks, config, spec, tokens)
    exported = {n: t.clone() for bucket in iter_hf_weights(chunks, spec, bucket_bytes=4096) for n, t in bucket}
    save_megatron_checkpoint(chunks, spec, tmp / "ep2", dtype="float32", hf_files_from=hf_dir)

    _init_ep(1)
    spec, config, chunks = build_from_hf(hf_dir, 1, 1, ckpt=tmp / "ep2")
    reloaded = {n: t.clone() for bucket in iter_hf_weights(chunks, spec) for n, t in bucket}
    return {
        "local": held,
        "owned": owned,
        "logits": (logits - ref).abs().max().item(),
        "exported": exported,
        "reloaded": reloaded,
    }


@pytest.mark.slow
def test_experts_split_over_two_ep_ranks(moe_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf_dir = moe_dirs["norm"]
    tokens = sample_tokens(hf_dir, seed=2)
    reports = run_distributed(_ep2_worker, 2, hf_dir, tokens, hf_logits(hf_dir, tokens), tmp_path)
    assert [r["owned"] for r in reports] == [[0, 1], [2, 3]]  # two experts per EP rank, in order
    assert all(r["local"] == [0, 1] for r in reports)
    diffs = [r["logits"] for r in reports]
    print("qwen3_moe logits max |diff| at EP=2:", diffs)
    assert max(diffs) <= TOL
    orig = _hf_tensors(hf_dir)
    for r in reports:
        for stream in ("exported", "reloaded"):
            assert sorted(r[stream]) == sorted(orig), stream
            assert all(torch.equal(r[stream][n], orig[n]) for n in orig), stream
