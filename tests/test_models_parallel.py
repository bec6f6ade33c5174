"""Megatron models of every family at (TP, PP, DP) = (2,1,1), (1,2,1), (1,1,2) and PP=2 x VPP=2, in gloo processes.

The same HF weights are loaded at every layout (``load_hf_weights``) into megatron-DDP-wrapped chunks, and forward and
backward run through megatron's ``get_forward_backward_func()`` with ``finalize_model_grads`` (as in training). Every
number is compared with ``transformers`` on the same tokens in fp32: logits within 1e-4 absolute, the summed
next-token cross-entropy (22 tokens) within 1e-3, gradients (exported through the Megatron -> HF stream, so TP shards
are gathered and fused tensors split) within 1e-4 absolute. The export stream itself, with 64 KiB buckets (several
per stage, so PP broadcasts and bucket splitting run), must reproduce the HF tensors exactly. (1,1,1) is covered by
tests/test_convert_roundtrip.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.fixtures_models import (
    FAMILIES,
    build_from_hf,
    grads_as_hf,
    hf_logits,
    hf_loss_and_grads,
    init_parallel,
    pipeline_logits,
    pipeline_train_loss,
    sample_tokens,
    tiny_checkpoint,
)

TOL = 1e-4
BUCKET_BYTES = 64 * 1024


def _max_grad_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], scale: float) -> float:
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))[:5]
    return max((got[n] * scale - ref[n]).abs().max().item() for n in ref)


def _layouts_worker(rank: int, world: int, hf_dir, tokens, ref_logits, ref_loss, ref_grads, vpp: bool):
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from luffy_megatron.convert import iter_hf_weights

    hf_weights = load_file(Path(hf_dir) / "model.safetensors")
    report: dict[str, float] = {}
    # (tp, pp, vpp, name, this rank's batch rows, microbatches). The schedule divides each microbatch's loss by the
    # number of microbatches and DDP averages over data-parallel ranks: gradients are ref / (microbatches * dp).
    layouts = [(2, 1, None, "tp2", slice(None), 1), (1, 2, None, "pp2", slice(None), 2)]
    layouts.append((1, 1, None, "dp2", slice(rank, rank + 1), 1))
    if vpp:
        layouts.append((1, 2, 2, "vpp2", slice(None), 2))
    for tp, pp, vp, name, rows, micro in layouts:
        init_parallel(tp, pp, vp)
        spec, config, chunks = build_from_hf(hf_dir, tp, pp, vpp=vp, ddp=True)
        assert len(chunks) == (vp or 1)
        logits = pipeline_logits(chunks, config, spec, tokens, num_microbatches=pp)
        loss = pipeline_train_loss(chunks, config, spec, tokens[rows], num_microbatches=micro)
        # the export stream with small buckets (several per stage): exact HF tensors, bounded bucket sizes
        buckets = list(iter_hf_weights(chunks, spec, bucket_bytes=BUCKET_BYTES))
        report[f"{name}_export"] = max((t - hf_weights[n]).abs().max().item() for b in buckets for n, t in b)
        assert sorted(n for b in buckets for n, _ in b) == sorted(hf_weights)
        for b in buckets:  # over the limit only when one fused parameter (q/k/v or gate/up) alone exceeds it
            size = sum(t.numel() * t.element_size() for _, t in b)
            assert size <= BUCKET_BYTES or len({n.rsplit(".", 2)[0] for n, _ in b}) == 1, [n for n, _ in b]
        assert len(buckets) > pp
        dp = ps.get_data_parallel_world_size()
        report[f"{name}_grads"] = _max_grad_diff(grads_as_hf(chunks, spec), ref_grads, float(micro * dp))
        if dp > 1:
            losses = [None] * dp
            torch.distributed.all_gather_object(losses, loss, group=ps.get_data_parallel_group())
            loss = sum(losses)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            report[f"{name}_logits"] = (logits - ref_logits).abs().max().item()
            report[f"{name}_loss"] = abs(loss - ref_loss)
        del chunks
    return report


def _all_families_worker(rank: int, world: int, cases: dict) -> dict[str, dict[str, float]]:
    """One pair of processes for all families (process start-up and imports dominate the cost)."""
    return {family: _layouts_worker(rank, world, *args) for family, args in cases.items()}


@pytest.mark.slow
def test_layouts_match_transformers() -> None:
    cases = {}
    for family in FAMILIES:
        hf_dir = tiny_checkpoint(family)
        tokens = sample_tokens(hf_dir)
        ref_logits = hf_logits(hf_dir, tokens)
        ref_loss, ref_grads = hf_loss_and_grads(hf_dir, tokens)
        cases[family] = (hf_dir, tokens, ref_logits, ref_loss, ref_grads, family == "llama")
    reports = run_distributed(_all_families_worker, 2, cases)
    failures = {}
    for family in FAMILIES:
        merged: dict[str, float] = {}
        for r in reports:
            for k, v in r[family].items():
                merged[k] = max(merged.get(k, 0.0), v)
        print(family, {k: f"{v:.2e}" for k, v in sorted(merged.items())})
        names = ("tp2", "pp2", "dp2", "vpp2") if family == "llama" else ("tp2", "pp2", "dp2")
        expected = {f"{n}_{what}" for n in names for what in ("logits", "loss", "grads", "export")}
        assert set(merged) == expected, family
        # losses are sums over 22 tokens of O(6) each: 1e-3 absolute is ~1e-5 relative
        limits = {"_loss": 1e-3, "_export": 0.0}
        bad = {k: v for k, v in merged.items() if not v <= next((x for e, x in limits.items() if k.endswith(e)), TOL)}
        if bad:
            failures[family] = bad
    assert not failures, f"differences above tolerance: {failures}"
