"""The update's hot path has no host sync unless ``algorithm.debug_checks`` is on.

One micro-batch, built as the trainer builds it (right-padded rows or one packed row), goes through the calls the
trainer makes per micro-batch: the fused log-prob/entropy, :func:`~luffy_megatron.algo.micro_batch_loss` (the loss
``MegatronPolicy.train_mini_batch`` runs), the count of non-finite losses, backward. A torch-function mode records
every tensor -> Python conversion (``item``, ``tolist``, ``int()``/``float()``/``bool()`` of a tensor, ``.cpu()``): on
a GPU each one waits for the device. Responses have a realistic length mix (a few tokens up to the full budget).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from luffy_megatron.algo import AGG_MODES, GlobalCounts, micro_batch_loss
from luffy_megatron.algo.logprob import vocab_parallel_logprob_entropy
from luffy_megatron.config import AlgorithmConfig, RolloutIS, choices
from luffy_megatron.train.batch import flatten_padded, make_micro_batch, pack_micro_batch
from luffy_megatron.train.samples import Sample
from luffy_megatron.train.step_batch import StepBatch

SYNCS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"}


class HostSyncs(TorchFunctionMode):
    """Records the names of tensor -> host conversions made inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.paused = False  # set around a part that does not run on a GPU (the CPU-only packed core attention)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS and not self.paused:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def micro_batch_update(cfg: AlgorithmConfig, debug: bool, packed: bool = False) -> list[str]:
    """One micro-batch's update with ``algorithm.debug_checks = debug``; ``packed``: one packed row, else right-padded
    rows. The host conversions it made."""
    g = torch.Generator().manual_seed(3)
    lengths = [3, 41, 7, 128, 19, 96, 1, 64]  # response tokens per sample; the first two are traces
    vocab = 50
    samples = []
    for i, n in enumerate(lengths):
        off = i < 2
        response = torch.randint(0, vocab, (n,), generator=g).tolist()
        old = (-torch.rand(n, generator=g) * 2).tolist()
        rollout = None if off else (-torch.rand(n, generator=g) * 2).tolist()
        advantage = float(torch.randn((), generator=g))
        samples.append(Sample(i, i // 4, [1, 2, 3, 4, 5], response, off, "stop", rollout, 0.0, advantage, old))
    ids = list(range(len(samples)))
    batch = StepBatch.from_samples(samples)
    if packed:
        mb = pack_micro_batch(batch, ids, pad_id=0)
    else:
        mb = flatten_padded(make_micro_batch(batch, ids, pad_id=0))
    # This is one of three micro-batches of the mini-batch.
    counts = GlobalCounts(sum(lengths) * 3, len(lengths) * 3, (lengths[0] + lengths[1]) * 3)
    logits = torch.randn(mb.targets.numel(), vocab, generator=g, requires_grad=True)
    cfg = replace(cfg, debug_checks=debug)
    with HostSyncs() as rec:
        logp, ent = vocab_parallel_logprob_entropy(
            logits, mb.targets, chunk_tokens=256, check_targets=debug, check_finite=debug
        )
        loss, _ = micro_batch_loss(mb, logp, ent, cfg, counts, max_response_length=160, use_old_logprobs=packed)
        (~torch.isfinite(loss.detach())).sum()  # the trainer's count of non-finite losses, read once per step
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


class OneRank:
    """A context-parallel group of one (what megatron's RoPE asks of its ``cp_group``)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def packed_rope_inputs(lengths: list[int], heads: int = 3, dim: int = 16) -> tuple:
    """A packed row's query ``[T, heads, dim]``, its ``cu_seqlens``, RoPE frequencies ``[max_len, 1, 1, dim]`` (as
    megatron-core lays them out: the angles twice over) and the config fields RoPE reads."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(sum(lengths), heads, dim, generator=g, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(max(lengths), dtype=torch.float32), inv_freq)
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    return t, cu, freqs, SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False)


@pytest.mark.parametrize("lengths", [[7, 1, 12, 5, 3], [9], [1, 1, 30]])
def test_packed_rope_equals_megatrons_per_sample_rope_without_a_host_sync(lengths):
    """megatron-core's unfused THD RoPE reads ``cu_seqlens`` on the host for q and k in every layer; the project's path
    (installed by the model builder where TE's fused kernel does not run) computes the same values on the device."""
    from megatron.core.models.common.embeddings import rope_utils

    from luffy_megatron.platform.packed_attention import apply_rotary_pos_emb_sync_free

    t, cu, freqs, config = packed_rope_inputs(lengths)
    expected = rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu, cp_group=OneRank())
    with HostSyncs() as rec:
        got = apply_rotary_pos_emb_sync_free(t, freqs, config, cu_seqlens=cu, cp_group=OneRank())
        got.sum().backward()
    assert rec.calls == []
    assert torch.equal(got, expected)
    with HostSyncs() as theirs:
        rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu, cp_group=OneRank())
    assert "tolist" in theirs.calls  # the recorder sees megatron's syncs: the empty list above is no blind spot
