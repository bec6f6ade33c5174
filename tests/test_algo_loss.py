"""The mixed-policy loss against a literal per-token re-derivation of the released LUFFY code, hand-computed cases,
edge cases and bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from luffy_megatron.algo import GlobalCounts, LossWeights, aggregation_weights, mixed_policy_loss
from luffy_megatron.config import AlgorithmConfig

# ---------------------------------------------------------------------------------------------------------------------
# Literal reference: one verl micro-batch of [B, T] tensors, written token by token following the released
# mix_core_alg.compute_token_on_off_policy_loss / compute_sft_pure_loss and mix_actor.update_policy (G = 1, DP = 1).
# ---------------------------------------------------------------------------------------------------------------------


def _reshape_off(lp, c: AlgorithmConfig):
    p = torch.exp(lp)
    m = c.off_policy_reshape
    if m == "no_reshape":
        f = p
    elif m == "logp":
        f = lp * c.off_policy_reshape_gamma
    elif m == "p_logp":
        f = lp * c.off_policy_reshape_gamma + p
    elif m == "square_root":
        f = torch.sqrt(p)
    elif m == "pow":
        f = torch.pow(p, c.off_policy_reshape_pow_exp)
    else:
        f = p / (p + c.off_policy_reshape_gamma)
    if c.off_policy_max_clamp is not None:
        f = torch.clamp(f, max=c.off_policy_max_clamp)
    if c.off_policy_min_clamp is not None:
        f = torch.clamp(f, min=c.off_policy_min_clamp)
    return f


def _reshape_on(lp, old, c: AlgorithmConfig):
    d = lp - old
    m = c.on_policy_reshape
    if m == "no_reshape":
        return torch.exp(d)
    if m == "logp":
        return d
    if m == "p_logp":
        return torch.exp(d) + c.on_policy_reshape_gamma * d
    if m == "square_root":
        return torch.sqrt(torch.exp(d))
    if m == "pow":
        return torch.pow(torch.exp(d), c.on_policy_reshape_pow_exp)
    g = c.on_policy_reshape_gamma
    p, po = torch.exp(lp), torch.exp(old)
    return (p / (p + g)) / (po / (po + g))


def reference_loss(lp, old, adv, resp, off, c: AlgorithmConfig, *, remove_token_mean: bool, entropy=None, ref=None):
    """Released-code loss of one micro-batch ([B, T]); ``remove_token_mean`` is ``loss_remove_token_mean``."""
    B, T = lp.shape
    lp_d = lp.detach()
    pg_sum, n_tok, n_on_tok = 0.0, 0, 0
    sft_sum, n_sft = 0.0, 0
    ent_sum, kl_sum = 0.0, 0.0
    stats = {"on_loss": [], "off_loss": [], "clipped": [], "ppo_kl": [], "on_prob": [], "off_prob": [], "f": []}
    for b in range(B):
        row_off = bool(off[b][resp[b]].any())  # verl's sequence-level off_policy_mask = prefix_mask.any(-1)
        for t in range(T):
            if not resp[b, t]:
                continue
            n_tok += 1
            a = adv[b, t]
            stats["ppo_kl"].append(float(old[b, t] - lp[b, t].detach()))
            if entropy is not None:
                ent_sum = ent_sum + entropy[b, t]
            if ref is not None:
                if c.kl_type == "k1":
                    kl = lp[b, t] - ref[b, t]
                else:
                    d = ref[b, t] - lp[b, t]
                    kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
                kl_sum = kl_sum + kl
            if off[b, t]:
                f = _reshape_off(lp[b, t], c)
                stats["off_prob"].append(float(torch.exp(lp_d[b, t])))
                stats["f"].append(float(f.detach()))
                loss = -a * f
                stats["off_loss"].append(float(loss.detach()))
                if c.sft_loss:
                    assert row_off
                    sft_sum = sft_sum - lp[b, t]
                    n_sft += 1
                    continue
            else:
                r = _reshape_on(lp[b, t], old[b, t], c)
                loss = -a * r
                if c.clip_ratio:
                    upper = max(c.clip_upper, 1.0 + c.clip_eps)
                    loss2 = -a * torch.clamp(r, 1.0 - c.clip_eps, upper)
                    stats["clipped"].append(float(loss2 > loss))
                    loss = torch.maximum(loss, loss2)
                else:
                    stats["clipped"].append(0.0)
                stats["on_loss"].append(float(loss.detach()))
                stats["on_prob"].append(float(torch.exp(old[b, t])))
                n_on_tok += 1
            pg_sum = pg_sum + loss
    pg = pg_sum / T if remove_token_mean else pg_sum / max(n_tok, 1)
    total = pg
    if c.sft_loss and n_sft:
        total = total + c.sft_loss_coeff * sft_sum / n_sft
    if entropy is not None:
        total = total - c.entropy_coeff * ent_sum / n_tok
    if ref is not None and c.kl_coeff > 0:
        total = total + c.kl_coeff * kl_sum / n_tok
    return total, stats


def make_batch(B=4, T=7, seed=0, n_off_rows=1, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    resp = torch.arange(T)[None, :] < lengths[:, None]
    off = torch.zeros(B, T, dtype=torch.bool)
    off[:n_off_rows] = True
    off &= resp
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.01
    lp = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    adv = (rewards - rewards.mean())[:, None].expand(B, T).clone() * resp
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return lp, old, adv, resp, off, entropy, ref


def weights_for(mode, resp, off, *, k=None):
    counts = GlobalCounts.from_masks(resp, off)
    return aggregation_weights(
        mode,
        resp,
        counts,
        max_response_length=resp.shape[-1],
        off_policy_mask=off,
        luffy_micro_batch_seqs=k if k is not None else counts.num_seqs,
    )


BASE = AlgorithmConfig()
CASES = [
    ("paper_default", {}),
    *[(f"off_{m}", {"off_policy_reshape": m}) for m in ("no_reshape", "p_div_p", "logp", "p_logp", "square_root")],
    ("off_pow", {"off_policy_reshape": "pow", "off_policy_reshape_pow_exp": 0.3}),
    ("off_gamma_0.5", {"off_policy_reshape_gamma": 0.5}),
    *[(f"on_{m}_clip", {"on_policy_reshape": m, "clip_ratio": True}) for m in ("no_reshape", "p_logp", "square_root")],
    ("on_p_div_p", {"on_policy_reshape": "p_div_p"}),
    ("on_logp", {"on_policy_reshape": "logp"}),
    ("on_pow_clip", {"on_policy_reshape": "pow", "on_policy_reshape_pow_exp": 0.7, "clip_ratio": True}),
    ("clip_upper_bound", {"clip_ratio": True, "clip_upper": 1.5}),
    ("off_clamps", {"off_policy_max_clamp": 0.6, "off_policy_min_clamp": 0.2}),
    ("sft_loss", {"sft_loss": True, "sft_loss_coeff": 0.5}),
    ("kl_k1", {"kl_coeff": 0.05, "kl_type": "k1"}),
    ("kl_k3", {"kl_coeff": 0.05, "kl_type": "k3"}),
    ("no_entropy", {"entropy_coeff": 0.0}),
    ("grpo_baseline", {"clip_ratio": True, "entropy_coeff": 0.0}),
]


# The released SFT variant normalises its PG term by on-policy tokens only, so its token_mean form has no literal
# counterpart (documented in docs/algorithm.md); it is compared in the luffy mode.
REFERENCE_CASES = [
    (mode, name, overrides)
    for mode in ("luffy", "token_mean")
    for name, overrides in CASES
    if not (overrides.get("sft_loss") and mode == "token_mean")
]


@pytest.mark.parametrize("mode,name,overrides", REFERENCE_CASES, ids=[f"{c[1]}-{c[0]}" for c in REFERENCE_CASES])
def test_loss_matches_literal_reference(name, overrides, mode):
    cfg = replace(BASE, **overrides)
    lp, old, adv, resp, off, entropy, ref = make_batch(seed=len(name))
    lp_a = lp.clone().requires_grad_()
    ent_a = entropy.clone().requires_grad_()
    use_ref = cfg.kl_coeff > 0
    loss, metrics = mixed_policy_loss(
        lp_a,
        old,
        adv,
        resp,
        off,
        cfg,
        token_weights=weights_for(mode, resp, off),
        entropy=ent_a,
        ref_log_prob=ref if use_ref else None,
    )
    lp_b = lp.clone().requires_grad_()
    ent_b = entropy.clone().requires_grad_()
    expect, stats = reference_loss(
        lp_b, old, adv, resp, off, cfg, remove_token_mean=mode == "luffy", entropy=ent_b, ref=ref if use_ref else None
    )
    torch.testing.assert_close(loss.double(), expect.double(), rtol=1e-6, atol=1e-7)
    g_a = torch.autograd.grad(loss, (lp_a, ent_a), allow_unused=True)
    g_b = torch.autograd.grad(expect, (lp_b, ent_b), allow_unused=True)
    for x, y in zip(g_a, g_b):
        x = torch.zeros_like(lp) if x is None else x
        y = torch.zeros_like(lp) if y is None else y
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-5, atol=1e-7)
    m = metrics.compute()

    def mean(v):
        return sum(v) / len(v) if v else 0.0

    assert m["actor/on_pg_loss"] == pytest.approx(mean(stats["on_loss"]), rel=1e-5, abs=1e-7)
    assert m["actor/off_pg_loss"] == pytest.approx(mean(stats["off_loss"]), rel=1e-5, abs=1e-7)
    assert m["actor/pg_clipfrac"] == pytest.approx(mean(stats["clipped"]), abs=1e-7)
    assert m["actor/ppo_kl"] == pytest.approx(mean(stats["ppo_kl"]), rel=1e-5, abs=1e-7)
    assert m["actor/on_policy_prob"] == pytest.approx(mean(stats["on_prob"]), rel=1e-5)
    assert m["actor/off_policy_prob"] == pytest.approx(mean(stats["off_prob"]), rel=1e-5)
    assert m["actor/off_ratio_mean"] == pytest.approx(mean(stats["f"]), rel=1e-5, abs=1e-7)
    assert m["actor/loss"] == pytest.approx(float(expect.detach()), rel=1e-5, abs=1e-7)
    assert m["actor/entropy"] == pytest.approx(float(entropy[resp].mean()), rel=1e-5)


def test_clipping_is_active_in_clip_cases():
    """Sanity check of the test data: the clip cases really clip some tokens."""
    cfg = replace(BASE, clip_ratio=True)
    lp, old, adv, resp, off, entropy, _ = make_batch(seed=3, spread=1.0)
    _, metrics = mixed_policy_loss(
        lp, old, adv, resp, off, cfg, token_weights=weights_for("luffy", resp, off), entropy=entropy
    )
    assert 0 < metrics.compute()["actor/pg_clipfrac"] < 1


def test_hand_computed_group_of_eight_only_trace_correct():
    """8 one-token responses; the trace (p = 0.3) is the only correct one: A = 7/8 for it, -1/8 for the others."""
    from luffy_megatron.algo import compute_advantages

    rewards = torch.tensor([1.0] + [0.0] * 7)
    adv = compute_advantages(rewards, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(adv, torch.tensor([7 / 8] + [-1 / 8] * 7))
    lp = torch.tensor([math.log(0.3)] + [math.log(0.5)] * 7, requires_grad=True)
    old = torch.tensor([math.log(0.9)] + [math.log(0.5)] * 7)  # the trace's old log-prob is not used
    resp = torch.ones(8, dtype=torch.bool)
    off = torch.tensor([True] + [False] * 7)
    cfg = replace(BASE, entropy_coeff=0.0)
    w = aggregation_weights(
        "luffy",
        resp,
        GlobalCounts(8, 8, 1),
        max_response_length=1,
        seq_index=torch.arange(8),
        off_policy_mask=off,
        luffy_micro_batch_seqs=8,
    )
    loss, m = mixed_policy_loss(lp, old, adv, resp, off, cfg, token_weights=w)
    # trace: -7/8 * 0.3 / 0.4 = -0.65625; on-policy: 7 * (1/8 * 1) = 0.875
    assert loss.item() == pytest.approx(0.875 - 0.65625, abs=1e-7)
    (g,) = torch.autograd.grad(loss, lp)
    # d/dlogp of -A p/(p+g) = -A g p / (p+g)^2 ; d/dlogp of -A exp(logp - old) = -A at ratio 1
    assert float(g[0]) == pytest.approx(-(7 / 8) * 0.1 * 0.3 / 0.4**2, rel=1e-6)
    torch.testing.assert_close(g[1:], torch.full((7,), 1 / 8))
    mm = m.compute()
    assert mm["actor/off_policy_prob"] == pytest.approx(0.3, rel=1e-6)
    assert mm["actor/on_policy_prob"] == pytest.approx(0.5, rel=1e-6)
    assert mm["actor/off_ratio_mean"] == pytest.approx(0.75, rel=1e-6)


def test_packed_equals_padded():
    cfg = replace(BASE, clip_ratio=True, kl_coeff=0.1)
    lp, old, adv, resp, off, entropy, ref = make_batch(seed=11)
    B, T = lp.shape
    seq_index = torch.arange(B)[:, None].expand(B, T)
    for mode in ("luffy", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        w2 = weights_for(mode, resp, off)
        loss2, _ = mixed_policy_loss(lp, old, adv, resp, off, cfg, token_weights=w2, entropy=entropy, ref_log_prob=ref)
        # pack the response tokens plus one fake "prompt" token per sequence, in a shuffled order
        sel = torch.cat([torch.nonzero(resp.reshape(-1))[:, 0], torch.nonzero(~resp.reshape(-1))[:, 0][:3]])
        sel = sel[torch.randperm(len(sel), generator=torch.Generator().manual_seed(0))]

        def flat(x, sel=sel):
            return x.reshape(-1)[sel]

        counts = GlobalCounts.from_masks(flat(resp), flat(off), seq_index=flat(seq_index))
        w1 = aggregation_weights(
            mode,
            flat(resp),
            counts,
            max_response_length=T,
            seq_index=flat(seq_index),
            off_policy_mask=flat(off),
            luffy_micro_batch_seqs=counts.num_seqs,
        )
        loss1, _ = mixed_policy_loss(
            flat(lp),
            flat(old),
            flat(adv),
            flat(resp),
            flat(off),
            cfg,
            token_weights=w1,
            entropy=flat(entropy),
            ref_log_prob=flat(ref),
        )
        torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-8)


def test_multiplicity_equals_repeated_rows():
    """A row with multiplicity k gives the loss, gradient and metrics of k identical rows."""
    cfg = replace(BASE, clip_ratio=True, kl_coeff=0.05, entropy_coeff=0.01)
    lp, old, adv, resp, off, entropy, ref = make_batch(B=4, seed=12, n_off_rows=1)
    repeats = torch.tensor([2, 1, 3, 1])
    for mode in ("luffy", "token_mean", "seq_mean_token_mean"):
        expanded = [x.repeat_interleave(repeats, dim=0) for x in (lp, old, adv, resp, off, entropy, ref)]
        results = []
        for (_, old_, adv_, resp_, off_, ent_, ref_), mult in (
            (expanded, None),
            ((lp, old, adv, resp, off, entropy, ref), repeats[:, None].expand_as(lp).double()),
        ):
            # Weights come from the global counts of all copies (as the trainer computes them before merging).
            counts = GlobalCounts.from_masks(expanded[3], expanded[4])
            w = aggregation_weights(
                mode, resp_, counts, max_response_length=lp.shape[-1], off_policy_mask=off_, luffy_micro_batch_seqs=8
            )
            leaf = lp.clone().requires_grad_()
            lp_in = leaf.repeat_interleave(repeats, dim=0) if mult is None else leaf
            loss, sums = mixed_policy_loss(
                lp_in, old_, adv_, resp_, off_, cfg, token_weights=w, entropy=ent_, ref_log_prob=ref_, multiplicity=mult
            )
            (grad,) = torch.autograd.grad(loss, leaf)
            results.append((loss, grad, sums.compute()))
        (loss_a, grad_a, m_a), (loss_b, grad_b, m_b) = results
        # The loss runs in fp32: the two forms differ only by summation order.
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-8)
        assert m_a.keys() == m_b.keys()
        for k in m_a:
            assert m_b[k] == pytest.approx(m_a[k], rel=1e-5, abs=1e-8), (mode, k)
        assert grad_a.abs().sum() > 0


# --------------------------------------------------------------------------------------------------- edge cases


def _run(cfg, lp, old, adv, resp, off, entropy=None, mode="luffy"):
    lp = lp.clone().requires_grad_()
    loss, m = mixed_policy_loss(
        lp, old, adv, resp, off, cfg, token_weights=weights_for(mode, resp, off, k=4), entropy=entropy
    )
    (g,) = torch.autograd.grad(loss, lp, allow_unused=False)
    return loss, g, m.compute()


def test_empty_response_row_and_all_masked_micro_batch():
    lp, old, adv, resp, off, entropy, _ = make_batch(seed=5)
    resp[2] = False  # an empty response
    loss, g, m = _run(BASE, lp, old, adv, resp, off, entropy)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[2] == 0).all()
    none = torch.zeros_like(resp)
    lp_nan = lp.clone()
    lp_nan[~none] = float("nan")  # values outside the response mask are ignored, even NaN
    for mode in ("luffy", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        loss, g, m = _run(BASE, lp_nan, old, adv, none, off & none, entropy, mode=mode)
        assert loss.item() == 0.0 and (g == 0).all()
        assert all(math.isfinite(v) for v in m.values())


def test_identical_rewards_give_zero_policy_gradient():
    from luffy_megatron.algo import compute_advantages

    lp, old, _, resp, off, _, _ = make_batch(seed=6)
    for r in (0.0, 1.0):
        adv_seq = compute_advantages(torch.full((4,), r), torch.zeros(4, dtype=torch.long), use_std=True)
        assert (adv_seq == 0).all()
        adv = adv_seq[:, None].expand_as(lp).double()
        loss, g, _ = _run(replace(BASE, entropy_coeff=0.0), lp, old, adv, resp, off)
        assert loss.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("logp", [-80.0, -30.0, -1e-9, 0.0])
def test_probabilities_near_zero_and_one(logp):
    lp, old, adv, resp, off, entropy, _ = make_batch(seed=7)
    lp = torch.full_like(lp, logp)
    for cfg in (BASE, replace(BASE, off_policy_reshape="logp", on_policy_reshape="p_div_p", clip_ratio=True)):
        loss, g, m = _run(cfg, lp, old, adv, resp, off, entropy)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        assert all(math.isfinite(v) for v in m.values())


def test_off_policy_mask_on_every_token():
    lp, old, adv, resp, _, entropy, _ = make_batch(seed=8)
    off = resp.clone()
    for cfg in (BASE, replace(BASE, sft_loss=True)):
        lp_a = lp.clone().requires_grad_()
        loss, m = mixed_policy_loss(
            lp_a, old, adv, resp, off, cfg, token_weights=weights_for("luffy", resp, off), entropy=entropy
        )
        lp_b = lp.clone().requires_grad_()
        expect, _ = reference_loss(lp_b, old, adv, resp, off, cfg, remove_token_mean=True, entropy=entropy)
        torch.testing.assert_close(loss.double(), expect.double(), rtol=1e-6, atol=1e-8)
        mm = m.compute()
        assert mm["actor/on_pg_loss"] == 0.0 and mm["actor/on_policy_prob"] == 0.0


# --------------------------------------------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_argument():
    lp, old, adv, resp, off, entropy, _ = make_batch(seed=9)
    w = weights_for("luffy", resp, off)

    def call(**kw):
        args = dict(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=resp, off_policy_mask=off, config=BASE)
        args.update(token_weights=w, entropy=entropy)
        args.update(kw)
        return mixed_policy_loss(**args)

    with pytest.raises(ValueError, match="old_log_prob: shape"):
        call(old_log_prob=old[:, :-1])
    with pytest.raises(ValueError, match="advantages: shape"):
        call(advantages=adv.reshape(-1))
    with pytest.raises(TypeError, match="response_mask: expected a torch.bool"):
        call(response_mask=resp.float())
    with pytest.raises(TypeError, match="off_policy_mask: expected a torch.bool"):
        call(off_policy_mask=off.long())
    with pytest.raises(ValueError, match="config.off_policy_reshape"):
        call(config=replace(BASE, off_policy_reshape="p_div_p_0.1"))
    with pytest.raises(ValueError, match="config.on_policy_reshape"):
        call(config=replace(BASE, on_policy_reshape="nope"))
    with pytest.raises(ValueError, match="config.kl_type"):
        call(config=replace(BASE, kl_type="k2"))
    with pytest.raises(ValueError, match="entropy: required"):
        call(entropy=None)
    with pytest.raises(ValueError, match="ref_log_prob: required"):
        call(config=replace(BASE, kl_coeff=0.1))
    with pytest.raises(ValueError, match="mode: 'bogus'"):
        aggregation_weights("bogus", resp, GlobalCounts(1, 1), max_response_length=4)
    with pytest.raises(TypeError, match="token_weights"):
        call(token_weights=[1.0])
    for name, bad_value in (("log_prob", float("nan")), ("advantages", float("inf")), ("entropy", float("-inf"))):
        t = {"log_prob": lp, "advantages": adv, "entropy": entropy}[name].clone()
        t[0, 0] = bad_value
        with pytest.raises(ValueError, match=f"{name}: 1 non-finite"):
            call(**{name: t})
    bad_w = LossWeights(policy=w.policy.clone(), mean=w.mean, off_policy_mean=w.off_policy_mean)
    bad_w.policy[0, 0] = float("nan")
    with pytest.raises(ValueError, match="token_weights.policy: 1 non-finite"):
        call(token_weights=bad_w)
