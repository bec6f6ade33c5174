"""The update's hot path has no host sync unless ``algorithm.debug_checks`` is on.

One micro-batch goes through the calls the trainer makes per micro-batch (fused log-prob/entropy, aggregation
weights, the mixed-policy loss, backward) with the switches the trainer passes. A torch-function mode records every
tensor -> Python conversion (``item``, ``tolist``, ``int()``/``float()``/``bool()`` of a tensor, ``.cpu()``): on a
GPU each one waits for the device. Responses have a realistic length mix (a few tokens up to the full budget).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from luffy_megatron.algo import AGG_MODES, GlobalCounts, aggregation_weights, mixed_policy_loss
from luffy_megatron.algo.logprob import vocab_parallel_logprob_entropy
from luffy_megatron.config import AlgorithmConfig

SYNCS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"}


class HostSyncs(TorchFunctionMode):
    """Records the names of tensor -> host conversions made inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def micro_batch_update(cfg: AlgorithmConfig, debug: bool) -> torch.Tensor:
    """What ``MegatronPolicy.train_mini_batch``'s ``loss_fn`` does for one micro-batch, then backward."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([3, 41, 7, 128, 19, 96, 1, 64])  # response tokens per row
    rows, cols, vocab = len(lengths), int(lengths.max()) + 5, 50
    resp = (torch.arange(cols)[None] >= 5) & (torch.arange(cols)[None] < 5 + lengths[:, None])
    off = torch.zeros_like(resp)
    off[:2] = True
    off &= resp
    counts = GlobalCounts(int(resp.sum()) * 3, rows * 3, int(off.sum()) * 3)  # this is one of three micro-batches
    logits = torch.randn(rows * cols, vocab, generator=g, requires_grad=True)
    target = torch.randint(0, vocab, (rows * cols,), generator=g)
    adv = torch.randn(rows, 1, generator=g).expand(rows, cols) * resp
    mult = torch.ones(rows, cols)
    with HostSyncs() as rec:
        logp, ent = vocab_parallel_logprob_entropy(
            logits, target, chunk_tokens=256, check_targets=debug, check_finite=debug
        )
        logp, ent = logp.view(rows, cols), ent.view(rows, cols)
        weights = aggregation_weights(
            cfg.loss_agg_mode,
            resp,
            counts,
            max_response_length=160,
            off_policy_mask=off,
            luffy_micro_batch_seqs=cfg.luffy_micro_batch_seqs,
            check_counts=debug,
        )
        old = logp.detach()
        loss, _ = mixed_policy_loss(
            logp, old, adv, resp, off, cfg, token_weights=weights, entropy=ent, multiplicity=mult, check_finite=debug
        )
        loss.backward()
    return rec.calls


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clip", [False, True])
def test_no_host_sync_without_debug_checks(mode, clip):
    cfg = replace(AlgorithmConfig(), loss_agg_mode=mode, clip_ratio=clip)
    assert micro_batch_update(cfg, debug=False) == []


def test_debug_checks_do_sync():
    """The recorder sees the checks' syncs (so the empty list above is not a blind spot)."""
    calls = micro_batch_update(AlgorithmConfig(), debug=True)
    assert {"__int__", "__bool__", "tolist"} <= set(calls), calls
