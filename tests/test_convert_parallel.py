"""Conversion under several processes: a checkpoint written at TP=2 reads back at other layouts.

- every family: HF -> Megatron with 2 processes at TP=2, then Megatron -> HF with 2 processes at PP=2; the result is
  bit-identical to the original HF tensors (the TP=1 round trip in test_convert_roundtrip.py is too, so checkpoints
  saved at TP=1 and TP=2 convert back to the same HF weights), and logits after loading the TP=2 checkpoint at
  (TP, PP) = (1, 2) equal transformers' (fp32, 1e-4 absolute);
- qwen2 (tied embeddings, GQA 4): a checkpoint written by 4 processes at TP=2 (DP=2) loaded at (TP, PP) = (2, 2),
  same tolerance (a separate test: deselect it with ``-k "not tp2_pp2"`` to save ~1/3 of this file's time).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.fixtures_models import FAMILIES, build_from_hf, hf_logits, init_parallel, pipeline_logits, sample_tokens
from tests.fixtures_models import tiny_checkpoint as tiny
from tests.test_convert_roundtrip import _hf_tensors

TOL = 1e-4


def _tp2_worker(rank: int, world: int, cases: dict, tmp: Path) -> dict[str, float]:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core import parallel_state as ps

    from luffy_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

    report = {}
    for family, (hf_dir, tokens, ref) in cases.items():
        convert_hf_to_megatron(hf_dir, tmp / f"{family}-tp2", tp=2)
        convert_megatron_to_hf(tmp / f"{family}-tp2", tmp / f"{family}-back", tp=1, pp=2)
        init_parallel(1, 2)
        spec, config, chunks = build_from_hf(hf_dir, 1, 2, ckpt=tmp / f"{family}-tp2")
        logits = pipeline_logits(chunks, config, spec, tokens)
        if ps.is_pipeline_last_stage():
            report[family] = (logits - ref).abs().max().item()
    return report


def _tp2pp2_worker(rank: int, world: int, hf_dir: Path, ckpt: Path, tokens, ref, write: bool) -> float | None:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core import parallel_state as ps

    from luffy_megatron.convert import convert_hf_to_megatron

    if write:  # written by 4 processes at TP=2 (DP=2), read at (2,2)
        convert_hf_to_megatron(hf_dir, ckpt, tp=2)

    init_parallel(2, 2)
    spec, config, chunks = build_from_hf(hf_dir, 2, 2, ckpt=ckpt)
    logits = pipeline_logits(chunks, config, spec, tokens)
    return (logits - ref).abs().max().item() if ps.is_pipeline_last_stage() else None


@pytest.mark.slow
def test_tp2_checkpoint_converts_back_and_reshards(tmp_path: Path) -> None:
    cases = {}
    for family in FAMILIES:
        hf_dir = tiny(family)
        tokens = sample_tokens(hf_dir, seed=1)
        cases[family] = (hf_dir, tokens, hf_logits(hf_dir, tokens))
    reports = run_distributed(_tp2_worker, 2, cases, tmp_path)
    diffs = {f: max(r[f] for r in reports if f in r) for f in FAMILIES}
    print("logits max abs diff at (1,2) from a TP=2 checkpoint:", diffs)
    assert all(d <= TOL for d in diffs.values()), diffs
    for family in FAMILIES:
        orig, back = _hf_tensors(cases[family][0]), _hf_tensors(tmp_path / f"{family}-back")
        assert sorted(orig) == sorted(back)
        assert all(torch.equal(orig[n], back[n]) for n in orig), family


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp2_pp2(tmp_path: Path) -> None:
    """4 processes (the most expensive test here: ~1/3 of this file's time on 2 cores)."""
    hf_dir = tiny("qwen2")
    tokens = sample_tokens(hf_dir, seed=2)
    ref = hf_logits(hf_dir, tokens)
    out = run_distributed(_tp2pp2_worker, 4, hf_dir, tmp_path / "qwen2-tp2", tokens, ref, True)
    diff = max(d for d in out if d is not None)
    print("logits max abs diff at (2,2) from a TP=2 checkpoint:", diff)
    assert diff <= TOL
