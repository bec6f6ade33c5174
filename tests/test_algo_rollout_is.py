"""Rollout importance sampling: the corrected loss against a literal per-token re-derivation, weight 1 when rollout
and old log-probs agree, metrics, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from luffy_megatron.algo import mixed_policy_loss
from luffy_megatron.algo.rollout_is import rollout_is_weights
from luffy_megatron.config import AlgorithmConfig

CAP = 2.0
# A realistic mix: prompt lengths 5-30, response lengths 3-120; row 2 is a trace (no engine log-probs).
PROMPTS = [7, 30, 12, 5, 20]
RESPONSES = [120, 3, 64, 41, 9]
TRACE_ROW = 2


def _batch(seed: int, gap: float):
    """[B, T] tensors with engine log-probs ``gap``-noisy around the old ones; row 3 far off (clipped / masked)."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(PROMPTS), max(p + r for p, r in zip(PROMPTS, RESPONSES))
    resp = torch.zeros(b, t, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        resp[i, p - 1 : p - 1 + r] = True
    off = torch.zeros_like(resp)
    off[TRACE_ROW] = resp[TRACE_ROW]
    old = -torch.rand(b, t, generator=g) * 3
    lp = (old + 0.2 * torch.randn(b, t, generator=g)).clamp(max=-1e-3)
    roll = old + gap * torch.randn(b, t, generator=g)
    roll[3] -= 1.5  # the engine was much less likely to sample row 3: large ratios
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    tw = torch.rand(b, t, generator=g) / 100
    return lp, old, roll, adv, resp, off, tw


def _literal_weight(mode: str, old, roll, resp, off, i: int, t: int) -> float:
    """w of token (i, t), written out from the definition."""
    if not resp[i, t] or off[i, t]:
        return 1.0
    if mode == "token_tis":
        return min(math.exp(float(old[i, t] - roll[i, t])), CAP)
    deltas = [float(old[i, s] - roll[i, s]) for s in range(old.shape[1]) if resp[i, s] and not off[i, s]]
    if mode == "seq_tis":
        return min(math.exp(sum(deltas)), CAP)
    geo = math.exp(sum(deltas) / len(deltas))
    return 1.0 if 1 / CAP <= geo <= CAP else 0.0


def _literal_loss(mode, cfg, lp, old, roll, adv, resp, off, tw) -> float:
    total = 0.0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not resp[i, t]:
                continue
            a = float(adv[i, t])
            if off[i, t]:
                p = math.exp(float(lp[i, t]))
                term = -a * p / (p + cfg.off_policy_reshape_gamma)
            else:
                r = math.exp(float(lp[i, t] - old[i, t]))
                term = -a * r
                if cfg.clip_ratio:
                    upper = max(cfg.clip_upper, 1 + cfg.clip_eps)
                    term = max(term, -a * min(max(r, 1 - cfg.clip_eps), upper))
                term *= _literal_weight(mode, old, roll, resp, off, i, t)
            total += float(tw[i, t]) * term
    return total


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("mode", ["token_tis", "seq_tis", "seq_mask"])
def test_corrected_loss_matches_literal_per_token_derivation(mode, clip) -> None:
    cfg = replace(AlgorithmConfig(entropy_coeff=0.0), clip_ratio=clip, rollout_is=mode, rollout_is_cap=CAP)
    lp, old, roll, adv, resp, off, tw = _batch(seed=3, gap=0.05)
    lp = lp.double().requires_grad_()
    corrected = resp & ~off
    rows = torch.arange(lp.shape[0]).unsqueeze(1).expand(lp.shape)
    w = rollout_is_weights(old, roll, corrected, rows, mode, CAP)
    loss, _ = mixed_policy_loss(
        lp, old.double(), adv.double(), resp, off, cfg, token_weights=tw.double(), rollout_is_weight=w.weight
    )
    expected = _literal_loss(mode, cfg, lp.detach(), old, roll, adv, resp, off, tw)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    weights = [_literal_weight(mode, old, roll, resp, off, i, t) for i in range(5) for t in range(lp.shape[1])]
    assert torch.allclose(w.weight.flatten().double(), torch.tensor(weights, dtype=torch.float64), rtol=1e-5)
    # The cap binds somewhere and the correction changes the loss, so the test can tell the modes apart.
    assert (w.limited & corrected).any()
    plain, _ = mixed_policy_loss(lp, old.double(), adv.double(), resp, off, cfg, token_weights=tw.double())
    assert abs(float(plain.detach()) - float(loss.detach())) > 1e-4
    # Gradient: d loss / d logp of an on-policy token is tw * (-A * ratio) * w without clipping.
    if not clip:
        loss.backward()
        ratio = torch.exp(lp.detach() - old.double())
        ref = torch.where(corrected, tw.double() * -adv.double() * ratio * w.weight.double(), 0.0)
        assert torch.allclose(torch.where(corrected, lp.grad, 0.0), ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis", "seq_mask"])
def test_weight_is_one_when_rollout_and_old_logprobs_agree(mode) -> None:
    cfg = replace(AlgorithmConfig(), rollout_is=mode)
    lp, old, _, adv, resp, off, tw = _batch(seed=5, gap=0.0)
    corrected = resp & ~off
    rows = torch.arange(lp.shape[0]).unsqueeze(1).expand(lp.shape)
    w = rollout_is_weights(old, old.clone(), corrected, rows, mode, CAP)
    assert torch.equal(w.weight, torch.ones_like(w.weight)) and not w.limited.any()
    ent = torch.rand_like(lp)
    a, _ = mixed_policy_loss(lp, old, adv, resp, off, cfg, token_weights=tw, entropy=ent, rollout_is_weight=w.weight)
    b, _ = mixed_policy_loss(lp, old, adv, resp, off, cfg, token_weights=tw, entropy=ent)
    assert torch.equal(a, b)


def test_metrics_count_clipped_tokens_and_report_the_largest_ratio() -> None:
    lp, old, roll, _, resp, off, _ = _batch(seed=7, gap=0.3)
    corrected = resp & ~off
    rows = torch.arange(lp.shape[0]).unsqueeze(1).expand(lp.shape)
    count = torch.ones_like(lp)
    count[0] = 3.0  # row 0 stands for three identical samples
    w = rollout_is_weights(old, roll, corrected, rows, "token_tis", CAP)
    sums, ratio_max = w.metrics("token_tis", corrected, count)
    ratios = torch.exp(old - roll)[corrected]
    mult = count[corrected]
    n = float(mult.sum())
    assert float(sums["rollout_is/clipped_frac"][0]) / n == pytest.approx(float((mult * (ratios > CAP)).sum()) / n)
    assert float(sums["rollout_is/weight_mean"][0]) / n == pytest.approx(
        float((mult * ratios.clamp(max=CAP)).sum()) / n, rel=1e-6
    )
    assert float(ratio_max) == pytest.approx(float(ratios.max()), rel=1e-6) and float(ratio_max) > CAP
    masked, _ = rollout_is_weights(old, roll, corrected, rows, "seq_mask", CAP).metrics("seq_mask", corrected, count)
    assert set(masked) == {"rollout_is/weight_mean", "rollout_is/masked_frac"}


def test_packed_layout_gives_the_same_weights_as_rows() -> None:
    """Sequences identified by ids, not rows: a packed [N] stream of the responses gives the same weights."""
    _, old, roll, _, resp, off, _ = _batch(seed=9, gap=0.2)
    corrected = resp & ~off
    rows = torch.arange(old.shape[0]).unsqueeze(1).expand(old.shape)
    for mode in ("token_tis", "seq_tis", "seq_mask"):
        full = rollout_is_weights(old, roll, corrected, rows, mode, CAP)
        packed = rollout_is_weights(old[resp], roll[resp], corrected[resp], rows[resp], mode, CAP)
        assert torch.allclose(packed.weight, full.weight[resp])


def test_unknown_mode_is_rejected() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rollout_is: 'tis' is not one of"):
        rollout_is_weights(x, x, x.bool(), torch.zeros(2, 3, dtype=torch.long), "tis", CAP)


def _expected_gradient(cap: float | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact expected gradient (w.r.t. the logits) of the on-policy loss of one token position whose token was
    sampled from a stale policy ``mu``, with every on-policy sample of the group at the same advantage -1/8 (LUFFY's
    common case: 7 failed rollouts and a correct trace; the group mean includes the trace).

    The expectation over ``y ~ mu`` is enumerated: every vocabulary entry is one token weighted by ``mu(y)``. The
    current policy ``pi`` is one update away from ``mu``; its ratio ``pi / mu`` is ``1 / 4`` to ``4``. Returns
    (gradient, pi, mu). ``cap=None``: no rollout IS.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = 12
    mu_logits = torch.randn(vocab, generator=g, dtype=torch.float64)
    logits = (mu_logits + torch.linspace(-1.4, 1.4, vocab, dtype=torch.float64)).requires_grad_()
    lp = torch.log_softmax(logits, 0)
    mu_lp = torch.log_softmax(mu_logits, 0)
    resp = torch.ones(vocab, dtype=torch.bool)
    off = torch.zeros(vocab, dtype=torch.bool)
    adv = torch.full((vocab,), -1 / 8, dtype=torch.float64)
    cfg = replace(AlgorithmConfig(entropy_coeff=0.0), rollout_is="token_tis" if cap else None, rollout_is_cap=cap or 2)
    w = None
    if cap is not None:
        w = rollout_is_weights(lp.detach(), mu_lp, resp, torch.zeros(vocab, dtype=torch.long), "token_tis", cap).weight
    # One optimiser step per rollout batch: the old policy is the current one (ratio 1, gradient of log pi).
    loss, _ = mixed_policy_loss(lp, lp.detach(), adv, resp, off, cfg, token_weights=mu_lp.exp(), rollout_is_weight=w)
    (grad,) = torch.autograd.grad(loss, logits)
    return grad, lp.detach().exp(), mu_lp.exp()


def test_token_is_removes_the_bias_of_stale_samples_with_a_shared_advantage() -> None:
    """Why one-step-off LUFFY needs the correction (docs/rollout.md, "Asynchronous rollout"): a GRPO group's
    advantages sum to 0, but the on-policy part of a LUFFY group does not. Pushing down samples of ``pi`` itself has
    expected gradient 0 (sum_y pi(y) grad log pi(y) = 0); pushing down samples of a stale ``mu`` does not: it moves
    ``pi`` further from ``mu``, the direction the last update took. Untruncated per-token IS restores the 0; a cap
    below the largest ratio leaves a bias that raises the tokens whose ratio it truncated."""
    stale, pi, mu = _expected_gradient(cap=None)
    corrected, _, _ = _expected_gradient(cap=1e6)
    truncated, _, _ = _expected_gradient(cap=2.0)
    ratio = pi / mu
    assert float(ratio.max()) > 2.0 and float(ratio.min()) < 0.5
    assert float(stale.norm()) > 1e-3
    assert float(corrected.norm()) < 1e-5 * float(stale.norm())  # the weights are fp32
    # Gradient descent moves the logits along -grad: with no IS towards away-from-mu (the KL(mu || pi) grows) ...
    kl_direction = pi - mu  # d KL(mu || pi) / d logits
    assert float(-stale @ kl_direction) > 0
    # ... and with a cap of 2 the truncated tokens (ratio > 2) gain probability mass: a feedback on the last update.
    clipped = (ratio > 2.0).double()
    mass = float(pi @ clipped)
    mass_direction = pi * clipped - pi * mass  # d (sum of the truncated tokens' pi) / d logits
    assert float(-truncated @ mass_direction) > 0
