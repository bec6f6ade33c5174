"""Fused vocab-parallel log-prob + entropy vs a full-vocabulary fp64 log_softmax reference, forward and backward, at
TP = 1 (in process) and TP = 2, 4 (gloo processes; the 4-process run lives in test_algo_aggregation.py so
that process start-up is paid once).

Tolerances: fp32 logits 1e-5 absolute on log-prob, entropy and gradient. bf16 logits (math in fp32, gradient returned
in bf16): 1e-4 absolute on log-prob / entropy, gradient within bf16 rounding (rtol 1e-2, atol 1e-3).
"""

from __future__ import annotations

import pytest
import torch

from luffy_megatron.algo import vocab_parallel_logprob_entropy

TOL = {torch.float32: dict(fwd=1e-5, rtol=0.0, atol=1e-5), torch.bfloat16: dict(fwd=1e-4, rtol=1e-2, atol=1e-3)}


def reference(logits64: torch.Tensor, target: torch.Tensor, temperature: float, true_vocab: int | None):
    """fp64 full-vocabulary log_softmax + gather + entropy."""
    z = logits64[..., : true_vocab or logits64.shape[-1]] / temperature
    ls = torch.log_softmax(z, dim=-1)
    lp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    return lp, ent


def check_shard(
    logits_full: torch.Tensor,
    target: torch.Tensor,
    *,
    dtype: torch.dtype,
    tp_group=None,
    tp_rank: int = 0,
    tp_size: int = 1,
    temperature: float = 1.0,
    chunk: int = 5,
    true_vocab: int | None = None,
    entropy_grad: bool = True,
) -> None:
    """Compare this rank's fused result (and gradient of its vocabulary shard) with the full-vocabulary reference."""
    g = torch.Generator().manual_seed(123)
    n, v = logits_full.shape
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_h = torch.randn(n, generator=g, dtype=torch.float64) if entropy_grad else torch.zeros(n, dtype=torch.float64)
    x = logits_full.to(dtype)
    x64 = x.double().requires_grad_()
    ref_lp, ref_h = reference(x64, target, temperature, true_vocab)
    (ref_g,) = torch.autograd.grad((ref_lp * g_lp + ref_h * g_h).sum(), x64)
    vl = v // tp_size
    shard = x[:, tp_rank * vl : (tp_rank + 1) * vl].clone().requires_grad_()
    lp, h = vocab_parallel_logprob_entropy(
        shard,
        target,
        tp_group=tp_group,
        vocab_start=tp_rank * vl,
        temperature=temperature,
        chunk_tokens=chunk,
        true_vocab_size=true_vocab,
    )
    assert lp.dtype == torch.float32 and h.dtype == torch.float32
    tol = TOL[dtype]
    torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=0, atol=tol["fwd"])
    torch.testing.assert_close(h.double(), ref_h.detach(), rtol=0, atol=tol["fwd"])
    loss = (lp * g_lp.float()).sum() + ((h * g_h.float()).sum() if entropy_grad else 0)
    loss.backward()
    assert shard.grad.dtype == dtype
    ref_shard = ref_g[:, tp_rank * vl : (tp_rank + 1) * vl]
    torch.testing.assert_close(shard.grad.double(), ref_shard, rtol=tol["rtol"], atol=tol["atol"])
    if true_vocab is not None:  # padded columns: zero gradient
        pad_from = max(0, true_vocab - tp_rank * vl)
        assert (shard.grad[:, pad_from:] == 0).all()


def _data(n=23, v=64, seed=0, true_vocab=None, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * scale
    target = torch.randint(0, true_vocab or v, (n,), generator=g)
    target[0] = (true_vocab or v) - 1  # the last real token
    return logits, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("true_vocab", [None, 57])
@pytest.mark.parametrize("chunk", [4, 4096])
def test_tp1_matches_full_vocab_reference(dtype, temperature, true_vocab, chunk):
    logits, target = _data(true_vocab=true_vocab)
    check_shard(logits, target, dtype=dtype, temperature=temperature, chunk=chunk, true_vocab=true_vocab)


def test_logprob_only_backward_skips_entropy_terms():
    logits, target = _data()
    check_shard(logits, target, dtype=torch.float32, temperature=0.8, entropy_grad=False)
    x = logits.clone().requires_grad_()
    lp, h = vocab_parallel_logprob_entropy(x, target, compute_entropy=False)
    assert h is None
    lp.sum().backward()
    ref = torch.log_softmax(logits.double(), -1)
    expect = torch.nn.functional.one_hot(target, logits.shape[-1]).double() - ref.exp()
    torch.testing.assert_close(x.grad.double(), expect, rtol=0, atol=1e-6)


def test_leading_dims_and_extreme_logits():
    logits, target = _data(n=12, scale=60.0)  # near-one-hot softmax rows
    x = logits.view(3, 4, -1).clone().requires_grad_()
    lp, h = vocab_parallel_logprob_entropy(x, target.view(3, 4), chunk_tokens=5)
    assert lp.shape == (3, 4) and h.shape == (3, 4)
    ref_lp, ref_h = reference(logits.double(), target, 1.0, None)
    torch.testing.assert_close(lp.reshape(-1).double(), ref_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(h.reshape(-1).double(), ref_h, rtol=0, atol=1e-5)
    (lp.sum() + h.sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_bad_input():
    logits, target = _data()
    with pytest.raises(ValueError, match="target: shape"):
        vocab_parallel_logprob_entropy(logits, target[:-1])
    with pytest.raises(TypeError, match="target: expected an int64"):
        vocab_parallel_logprob_entropy(logits, target.float())
    with pytest.raises(TypeError, match="logits: expected a floating-point"):
        vocab_parallel_logprob_entropy(logits.long(), target)
    with pytest.raises(ValueError, match="target: ids must be in \\[0, 50\\)"):
        vocab_parallel_logprob_entropy(logits, target, true_vocab_size=50)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprob_entropy(logits, target, temperature=0.0)
    with pytest.raises(ValueError, match="true_vocab_size"):
        vocab_parallel_logprob_entropy(logits, target, true_vocab_size=65)
    for bad in (float("nan"), float("inf")):
        x = logits.clone()
        x[3, 5] = bad
        with pytest.raises(ValueError, match="logits: non-finite values \\(NaN/inf\\) in 1 of 23"):
            vocab_parallel_logprob_entropy(x, target)


def tp_worker(rank: int, world_size: int) -> str:
    """TP=2 (groups [0, 1], [2, 3]) and TP=4 checks; run by the 4-process test in tests/test_algo_aggregation.py."""
    import torch.distributed as dist

    groups2 = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    world = dist.group.WORLD
    cases = 0
    for tp_size, group, tp_rank in ((2, groups2[rank // 2], rank % 2), (4, world, rank)):
        for dtype in (torch.float32, torch.bfloat16):
            # true vocab 61 pads the last shard partly; 47 leaves rank 3 of TP=4 with padding only
            for temperature, chunk, true_vocab in ((1.0, 4096, None), (0.7, 6, 61), (1.3, 5, 47)):
                logits, target = _data(n=19, v=64, seed=7, true_vocab=true_vocab)
                check_shard(
                    logits,
                    target,
                    dtype=dtype,
                    tp_group=group,
                    tp_rank=tp_rank,
                    tp_size=tp_size,
                    temperature=temperature,
                    chunk=chunk,
                    true_vocab=true_vocab,
                )
                cases += 1
    return f"rank {rank}: {cases} cases ok"
