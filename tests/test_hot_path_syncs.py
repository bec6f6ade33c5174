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
from luffy_megatron.algo.rollout_is import rollout_is_weights
from luffy_megatron.config import AlgorithmConfig, RolloutIS, choices

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


def micro_batch_update(cfg: AlgorithmConfig, debug: bool, packed: bool = False) -> list[str]:
    """What ``MegatronPolicy.train_mini_batch``'s ``loss_fn`` does for one micro-batch, then backward; ``packed``:
    flat [N] tensors with a ``seq_index``, as a packed micro-batch gives them."""
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
    rollout_logp = -torch.rand(rows, cols, generator=g) * 2
    seq = torch.arange(rows)[:, None].expand(rows, cols)
    shape = (-1,) if packed else (rows, cols)
    resp, off, adv, mult, rollout_logp, seq = (t.reshape(shape) for t in (resp, off, adv, mult, rollout_logp, seq))
    with HostSyncs() as rec:
        logp, ent = vocab_parallel_logprob_entropy(
            logits, target, chunk_tokens=256, check_targets=debug, check_finite=debug
        )
        logp, ent = logp.view(shape), ent.view(shape)
        weights = aggregation_weights(
            cfg.loss_agg_mode,
            resp,
            counts,
            max_response_length=160,
            seq_index=seq if packed else None,
            off_policy_mask=off,
            luffy_micro_batch_seqs=cfg.luffy_micro_batch_seqs,
            check_counts=debug,
        )
        old = logp.detach()
        is_w = None
        if cfg.rollout_is is not None:
            is_w = rollout_is_weights(old, rollout_logp, resp & ~off, seq, cfg.rollout_is, cfg.rollout_is_cap)
            is_w.metrics(cfg.rollout_is, resp & ~off, mult)
        loss, _ = mixed_policy_loss(
            logp, old, adv, resp, off, cfg, token_weights=weights, entropy=ent, multiplicity=mult,
            rollout_is_weight=None if is_w is None else is_w.weight, check_finite=debug,
        )  # fmt: skip
        loss.backward()
    return rec.calls


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clip", [False, True])
def test_no_host_sync_without_debug_checks(mode, clip):
    cfg = replace(AlgorithmConfig(), loss_agg_mode=mode, clip_ratio=clip)
    assert micro_batch_update(cfg, debug=False) == []


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("rollout_is", [None, *choices(RolloutIS)])
def test_no_host_sync_in_a_packed_micro_batch_with_rollout_is(mode, rollout_is):
    cfg = replace(AlgorithmConfig(), loss_agg_mode=mode, rollout_is=rollout_is)
    assert micro_batch_update(cfg, debug=False, packed=True) == []


def test_debug_checks_do_sync():
    """The recorder sees the checks' syncs (so the empty list above is not a blind spot)."""
    calls = micro_batch_update(AlgorithmConfig(), debug=True)
    assert {"__int__", "__bool__", "tolist"} <= set(calls), calls
    packed = micro_batch_update(replace(AlgorithmConfig(), loss_agg_mode="seq_mean_token_mean"), True, packed=True)
    assert "__int__" in packed, packed
