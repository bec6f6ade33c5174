"""Split invariance: the same global batch, packed into 1, 2, 4 or uneven micro-batches, or spread over DP = 2 gloo
ranks (gradients SUM-reduced), gives the same gradient for every aggregation mode; and the ``luffy`` mode equals the
released verl normalisation (per micro-batch sum / L_max, divided by gradient accumulation, averaged over ranks)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from luffy_megatron.algo import (
    AGG_MODES,
    GlobalCounts,
    aggregation_weights,
    compute_advantages,
    mixed_policy_loss,
    vocab_parallel_logprob_entropy,
)
from luffy_megatron.config import AlgorithmConfig
from tests.dist_utils import run_distributed
from tests.test_algo_loss import reference_loss

H, V, L_MAX = 6, 11, 9
CONFIGS = {
    "paper": AlgorithmConfig(),
    "clip_kl_k3": AlgorithmConfig(clip_ratio=True, kl_coeff=0.05, kl_type="k3", off_policy_max_clamp=0.8),
    "sft": AlgorithmConfig(sft_loss=True, sft_loss_coeff=0.7),
}


def make_global_batch(seed: int = 0) -> list[dict]:
    """8 sequences (2 groups of 4, one off-policy trace each, one empty response) as dicts of 1-D token tensors."""
    g = torch.Generator().manual_seed(seed)
    resp_lens = [9, 3, 0, 6, 8, 1, 5, 7]
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = compute_advantages(rewards, groups)
    seqs = []
    for i, r in enumerate(resp_lens):
        p = int(torch.randint(1, 4, (1,), generator=g))
        n = p + r
        resp = torch.arange(n) >= p
        seqs.append(
            dict(
                hidden=torch.randn(n, H, generator=g),
                target=torch.randint(0, V, (n,), generator=g),
                resp=resp,
                off=resp & (i in (0, 4)),
                adv=torch.full((n,), float(adv[i])),
                old_shift=0.3 * torch.randn(n, generator=g),
                ref_shift=0.3 * torch.randn(n, generator=g),
            )
        )
    return seqs


def pack(seqs: list[dict]) -> dict:
    out = {k: torch.cat([s[k] for s in seqs]) for k in seqs[0]}
    out["seq_index"] = torch.cat([torch.full((len(s["resp"]),), j, dtype=torch.long) for j, s in enumerate(seqs)])
    return out


def micro_batch_loss(w: torch.Tensor, mb: dict, counts: GlobalCounts, cfg: AlgorithmConfig, mode: str, sums=None):
    logits = mb["hidden"] @ w
    lp, ent = vocab_parallel_logprob_entropy(logits, mb["target"], chunk_tokens=4, temperature=0.9)
    weights = aggregation_weights(
        mode,
        mb["resp"],
        counts,
        max_response_length=L_MAX,
        seq_index=mb["seq_index"],
        off_policy_mask=mb["off"],
        luffy_micro_batch_seqs=3,
    )
    old = lp.detach() + mb["old_shift"]
    ref = lp.detach() + mb["ref_shift"]
    loss, metrics = mixed_policy_loss(
        lp, old, mb["adv"], mb["resp"], mb["off"], cfg, token_weights=weights, entropy=ent, ref_log_prob=ref
    )
    if sums is not None:
        sums.add(metrics)
    return loss


def grad_for_split(w0: torch.Tensor, seqs: list[dict], split: list[list[int]], counts, cfg, mode, sums=None):
    w = w0.clone().requires_grad_()
    for idx in split:
        micro_batch_loss(w, pack([seqs[i] for i in idx]), counts, cfg, mode, sums).backward()
    return w.grad


SPLITS = {
    1: [[0, 1, 2, 3, 4, 5, 6, 7]],
    2: [[0, 1, 2, 3], [4, 5, 6, 7]],
    4: [[6, 1], [2, 3], [4, 5], [0, 7]],
    "uneven": [[3], [0, 1, 2, 4, 5], [6, 7]],
}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_gradient_invariant_to_micro_batching(mode, cfg_name):
    seqs = make_global_batch()
    full = pack(seqs)
    counts = GlobalCounts.from_masks(full["resp"], full["off"], seq_index=full["seq_index"])
    assert counts.num_seqs == 7 and counts.num_tokens == 39 and counts.num_off_policy_tokens == 17
    w0 = torch.randn(H, V, generator=torch.Generator().manual_seed(1))
    ref = grad_for_split(w0, seqs, SPLITS[1], counts, CONFIGS[cfg_name], mode)
    assert ref.abs().sum() > 0
    for name in (2, 4, "uneven"):
        g = grad_for_split(w0, seqs, SPLITS[name], counts, CONFIGS[cfg_name], mode)
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"split {name}: {m}")


def test_luffy_mode_equals_released_verl_normalisation():
    """verl: micro-batches of K padded rows, loss_mb = sum/L_max (+ masked means), loss/G, FSDP mean over DP."""
    from tests.test_algo_loss import make_batch

    cfg = AlgorithmConfig(entropy_coeff=0.0, clip_ratio=True)  # regularisers are token means (documented)
    dp, k, n_seq = 2, 3, 12
    lp, old, adv, resp, off, _, _ = make_batch(B=n_seq, T=L_MAX, seed=4, n_off_rows=3)
    resp[:, 0] = True  # no empty response (verl counts every row)
    grad_accum = n_seq // (k * dp)
    lp_v = lp.clone().requires_grad_()
    paper = 0.0
    for rank in range(dp):
        rows = slice(rank * n_seq // dp, (rank + 1) * n_seq // dp)
        for m in range(grad_accum):
            r = slice(rows.start + m * k, rows.start + (m + 1) * k)
            mb_loss, _ = reference_loss(lp_v[r], old[r], adv[r], resp[r], off[r], cfg, remove_token_mean=True)
            paper = paper + mb_loss / grad_accum / dp
    counts = GlobalCounts.from_masks(resp, off)
    lp_o = lp.clone().requires_grad_()
    ours = 0.0
    for r in (slice(0, 5), slice(5, 12)):  # any split
        wts = aggregation_weights(
            "luffy", resp[r], counts, max_response_length=L_MAX, off_policy_mask=off[r], luffy_micro_batch_seqs=k
        )
        ours = ours + mixed_policy_loss(lp_o[r], old[r], adv[r], resp[r], off[r], cfg, token_weights=wts)[0]
    torch.testing.assert_close(ours.double(), paper.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        torch.autograd.grad(ours, lp_o)[0].double(), torch.autograd.grad(paper, lp_v)[0].double(), rtol=1e-6, atol=1e-9
    )


def test_weights_formulas_and_errors():
    resp = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    off = torch.tensor([[True, True, False], [False, False, False], [False, False, False]])
    c = GlobalCounts.from_masks(resp, off)
    assert (c.num_tokens, c.num_seqs, c.num_off_policy_tokens) == (3, 2, 2)
    w = aggregation_weights("seq_mean_token_mean", resp, c, max_response_length=4, off_policy_mask=off)
    torch.testing.assert_close(w.policy, torch.tensor([[0.25, 0.25, 0], [0.5, 0, 0], [0, 0, 0]]))
    torch.testing.assert_close(w.mean, resp.float() / 3)
    torch.testing.assert_close(w.off_policy_mean, off.float() / 2)
    w = aggregation_weights("luffy", resp, c, max_response_length=4, luffy_micro_batch_seqs=64)
    torch.testing.assert_close(w.policy, resp.float() * 64 / (2 * 4))
    w = aggregation_weights("seq_mean_token_sum", resp, c, max_response_length=4)
    torch.testing.assert_close(w.policy, resp.float() / 2)
    empty = aggregation_weights("token_mean", resp & False, GlobalCounts(0, 0), max_response_length=4)
    assert (empty.policy == 0).all() and torch.isfinite(empty.policy).all()
    with pytest.raises(TypeError, match="response_mask: expected a torch.bool"):
        aggregation_weights("token_mean", resp.long(), c, max_response_length=4)
    with pytest.raises(ValueError, match="seq_index: required"):
        aggregation_weights("seq_mean_token_mean", resp.reshape(-1), c, max_response_length=4)
    with pytest.raises(ValueError, match="counts.num_tokens"):
        aggregation_weights("token_mean", resp, GlobalCounts(1, 1), max_response_length=4)
    with pytest.raises(ValueError, match="off_policy_mask: shape"):
        aggregation_weights("token_mean", resp, c, max_response_length=4, off_policy_mask=off[:2])


def test_metric_sums_aggregate_across_micro_batches():
    seqs = make_global_batch()
    full = pack(seqs)
    counts = GlobalCounts.from_masks(full["resp"], full["off"], seq_index=full["seq_index"])
    w = torch.randn(H, V, generator=torch.Generator().manual_seed(1))

    def metrics(split):
        total = None
        for idx in split:
            mb = pack([seqs[i] for i in idx])
            logits = mb["hidden"] @ w
            lp, ent = vocab_parallel_logprob_entropy(logits, mb["target"])
            wts = aggregation_weights(
                "luffy",
                mb["resp"],
                counts,
                max_response_length=L_MAX,
                seq_index=mb["seq_index"],
                off_policy_mask=mb["off"],
            )
            _, m = mixed_policy_loss(
                lp,
                lp + mb["old_shift"],
                mb["adv"],
                mb["resp"],
                mb["off"],
                CONFIGS["paper"],
                token_weights=wts,
                entropy=ent,
            )
            total = m if total is None else total.add(m)
        return total.compute()

    a, b = metrics(SPLITS[1]), metrics(SPLITS["uneven"])
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def dp_worker(rank: int, world_size: int) -> str:
    """DP = 2 inside groups [0, 1] and [2, 3]: each rank trains on its half, gradients are SUM-reduced."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group, dp_rank = groups[rank // 2], rank % 2
    seqs = make_global_batch(seed=3)
    w0 = torch.randn(H, V, generator=torch.Generator().manual_seed(2))
    mine = [[0, 5, 2], [7]] if dp_rank == 0 else [[1, 3], [4, 6]]
    full = pack(seqs)
    global_counts = GlobalCounts.from_masks(full["resp"], full["off"], seq_index=full["seq_index"])
    local = pack([seqs[i] for mb in mine for i in mb])
    counts = GlobalCounts.from_masks(local["resp"], local["off"], seq_index=local["seq_index"], dp_group=group)
    assert counts == global_counts, (counts, global_counts)
    checked = 0
    for cfg_name, cfg in CONFIGS.items():
        for mode in AGG_MODES:
            g = grad_for_split(w0, seqs, mine, counts, cfg, mode)
            dist.all_reduce(g, group=group)
            ref = grad_for_split(w0, seqs, SPLITS[1], global_counts, replace(cfg), mode)
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7, msg=lambda m, c=cfg_name, o=mode: f"{c}/{o}: {m}")
            checked += 1
    from luffy_megatron.algo import MetricSums

    mine_sums, full_sums = MetricSums(), MetricSums()
    grad_for_split(w0, seqs, mine, counts, CONFIGS["clip_kl_k3"], "luffy", mine_sums)
    grad_for_split(w0, seqs, SPLITS[1], global_counts, CONFIGS["clip_kl_k3"], "luffy", full_sums)
    a, b = mine_sums.all_reduce(group).compute(), full_sums.compute()
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])) for k in a), (a, b)
    return f"rank {rank}: {checked} ok"


def _distributed_worker(rank: int, world_size: int) -> list[str]:
    from tests.test_algo_logprob import tp_worker

    return [tp_worker(rank, world_size), dp_worker(rank, world_size)]


@pytest.mark.slow
def test_distributed_tp2_tp4_logprob_and_dp2_gradient_invariance():
    """One 4-process gloo run (process start-up dominates): TP=2 and TP=4 fused log-prob/entropy vs full-vocab
    reference (see tests/test_algo_logprob.py), and DP=2 gradient invariance for every mode and config."""
    out = run_distributed(_distributed_worker, 4)
    assert all(o[0].endswith("12 cases ok") and o[1].endswith(f"{len(CONFIGS) * len(AGG_MODES)} ok") for o in out)
