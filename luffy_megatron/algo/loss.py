"""The LUFFY mixed-policy objective (Yan et al. 2025), per token, on [B, T] or packed [N] token tensors.

For a response token t with advantage A (of its sequence), current log-prob ``logp``, old log-prob ``old_logp``:

on-policy token (``off_policy_mask`` False)::

    d = logp - old_logp, rho = exp(d)
    r = rho                                    on_policy_reshape = no_reshape
        d                                      logp
        rho + gamma * d                        p_logp
        sqrt(rho)                              square_root
        rho ** pow_exp                         pow
        f(p) / f(p_old), f(x) = x / (x+gamma)  p_div_p
    l = -A * r
    clip_ratio: l = max(-A * r, -A * clamp(r, 1 - eps, max(clip_upper, 1 + eps)))
    l = w * l                                  with rollout IS weights w (luffy_megatron.algo.rollout_is), else w = 1

off-policy token (``off_policy_mask`` True; behaviour probability taken as 1)::

    p = exp(logp)
    f = p / (p + gamma)                       off_policy_reshape = p_div_p (LUFFY's policy shaping, gamma = 0.1)
        p | gamma * logp | gamma * logp + p | sqrt(p) | p ** pow_exp
                                               no_reshape | logp | p_logp | square_root | pow
    f = clamp(f, off_policy_min_clamp, off_policy_max_clamp)   (each only when set)
    l = -A * f

Total loss of a micro-batch, with the per-token weights of :mod:`luffy_megatron.algo.aggregation`::

    loss = sum_t w_pg * l  -  entropy_coeff * sum_t w_mean * H  +  kl_coeff * sum_t w_mean * kl(logp, ref_logp)

``kl`` is ``k1 = logp - ref`` or ``k3 = exp(ref - logp) - (ref - logp) - 1`` clamped to [-10, 10] (verl's
``low_var_kl``). With ``sft_loss`` (the "RL with SFT loss" ablation) off-policy tokens get no policy-gradient term;
instead ``sft_loss_coeff * sum_t w_off * (-logp)`` (token-mean NLL over trace tokens) is added.

This is the released ``compute_token_on_off_policy_loss`` / ``compute_sft_pure_loss`` and the way ``mix_actor``
combines them with the entropy and KL terms; see docs/algorithm.md for the line-by-line correspondence and the
differences (only in how the sum is normalised, which is made invariant to micro-batching).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from .aggregation import LossWeights

if TYPE_CHECKING:
    from luffy_megatron.config import AlgorithmConfig

__all__ = ["RESHAPES", "MetricSums", "mixed_policy_loss", "validate_algorithm_config"]

RESHAPES = ("no_reshape", "p_div_p", "logp", "p_logp", "square_root", "pow")
KL_TYPES = ("k1", "k3")


@dataclass
class MetricSums:
    """Metrics that aggregate exactly across micro-batches and ranks.

    ``sums[k] / counts[k]`` is a token mean (e.g. mean off-policy probability over all off-policy tokens of the
    step); ``totals[k]`` is additive (weighted loss contributions: their sum over micro-batches and DP ranks is the
    global-batch value). Combine micro-batches with :meth:`add`, ranks with :meth:`all_reduce`, read with
    :meth:`compute`. Keys depend only on the config, so every rank has the same keys.
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, Tensor] = field(default_factory=dict)
    totals: dict[str, Tensor] = field(default_factory=dict)

    def add_mean(self, key: str, total: Tensor, count: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0) + total.detach().double()
        self.counts[key] = self.counts.get(key, 0) + count.detach().double()

    def add_total(self, key: str, value: Tensor) -> None:
        self.totals[key] = self.totals.get(key, 0) + value.detach().double()

    def add(self, other: MetricSums) -> MetricSums:
        """Accumulate another micro-batch's metrics into this one (in place); returns self."""
        for k, v in other.sums.items():
            self.add_mean(k, v, other.counts[k])
        for k, v in other.totals.items():
            self.add_total(k, v)
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> MetricSums:
        """SUM-reduce every entry over ``group`` (one collective); in place, returns self."""
        keys = sorted(self.sums)
        tkeys = sorted(self.totals)
        flat = [self.sums[k] for k in keys] + [self.counts[k] for k in keys] + [self.totals[k] for k in tkeys]
        if not flat or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self
        buf = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in flat])
        dist.all_reduce(buf, group=group)
        n = len(keys)
        for i, k in enumerate(keys):
            self.sums[k], self.counts[k] = buf[i], buf[n + i]
        for i, k in enumerate(tkeys):
            self.totals[k] = buf[2 * n + i]
        return self

    def compute(self) -> dict[str, float]:
        """Plain floats: token means (0.0 where no token was counted) and totals."""
        out = {k: (float(self.sums[k] / self.counts[k]) if float(self.counts[k]) > 0 else 0.0) for k in self.sums}
        out.update({k: float(v) for k, v in self.totals.items()})
        return out


def validate_algorithm_config(config: AlgorithmConfig) -> None:
    """Raise ValueError naming the ``config.<field>`` of any value the loss cannot use."""
    for name in ("off_policy_reshape", "on_policy_reshape"):
        if getattr(config, name) not in RESHAPES:
            raise ValueError(f"config.{name}: {getattr(config, name)!r} is not one of {list(RESHAPES)}")
    if config.kl_type not in KL_TYPES:
        raise ValueError(f"config.kl_type: {config.kl_type!r} is not one of {list(KL_TYPES)}")
    for name in ("off_policy_reshape_gamma", "on_policy_reshape_gamma"):
        if not getattr(config, name) > 0:
            raise ValueError(f"config.{name}: must be positive, got {getattr(config, name)}")
    if config.clip_ratio and not 0 < config.clip_eps < 1:
        raise ValueError(f"config.clip_eps: must be in (0, 1), got {config.clip_eps}")
    for name in ("entropy_coeff", "kl_coeff", "sft_loss_coeff"):
        if getattr(config, name) < 0:
            raise ValueError(f"config.{name}: must be >= 0, got {getattr(config, name)}")


def _on_policy_ratio(logp: Tensor, old_logp: Tensor, c: AlgorithmConfig) -> Tensor:
    d = logp - old_logp
    mode = c.on_policy_reshape
    if mode == "no_reshape":
        return torch.exp(d)
    if mode == "logp":
        return d
    if mode == "p_logp":
        return torch.exp(d) + c.on_policy_reshape_gamma * d
    if mode == "square_root":
        return torch.sqrt(torch.exp(d))
    if mode == "pow":
        return torch.pow(torch.exp(d), c.on_policy_reshape_pow_exp)
    g = c.on_policy_reshape_gamma  # p_div_p
    p, p_old = torch.exp(logp), torch.exp(old_logp)
    return (p / (p + g)) / (p_old / (p_old + g))


def _off_policy_ratio(logp: Tensor, c: AlgorithmConfig) -> Tensor:
    p = torch.exp(logp)
    mode = c.off_policy_reshape
    if mode == "no_reshape":
        return p
    if mode == "logp":
        return logp * c.off_policy_reshape_gamma
    if mode == "p_logp":
        return logp * c.off_policy_reshape_gamma + p
    if mode == "square_root":
        return torch.sqrt(p)
    if mode == "pow":
        return torch.pow(p, c.off_policy_reshape_pow_exp)
    return p / (p + c.off_policy_reshape_gamma)  # p_div_p


def _kl(logp: Tensor, ref: Tensor, kl_type: str) -> Tensor:
    if kl_type == "k1":
        return logp - ref
    d = ref - logp  # k3 (verl's low_var_kl)
    return torch.clamp(torch.exp(d) - d - 1, min=-10.0, max=10.0)


def mixed_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    off_policy_mask: Tensor,
    config: AlgorithmConfig,
    *,
    token_weights: LossWeights | Tensor,
    entropy: Tensor | None = None,
    ref_log_prob: Tensor | None = None,
    multiplicity: Tensor | None = None,
    rollout_is_weight: Tensor | None = None,
    check_finite: bool = True,
) -> tuple[Tensor, MetricSums]:
    """LUFFY's mixed on/off-policy loss of one micro-batch (formulas in the module docstring).

    Args:
        log_prob: [B, T] or packed [N] current-policy log-prob of each token (differentiable).
        old_log_prob: same shape, log-prob under the policy before this update (treated as a constant).
        advantages: same shape, the sequence's advantage broadcast to its tokens.
        response_mask: same shape, torch.bool, True on response tokens (prompt / padding tokens are ignored, their
            values may be anything).
        off_policy_mask: same shape, torch.bool, True on tokens of off-policy traces.
        config: the algorithm switches (:class:`luffy_megatron.config.AlgorithmConfig`).
        token_weights: :class:`LossWeights` from :func:`aggregation_weights` (a bare tensor is used for every term).
        entropy: same shape, per-token entropy (differentiable); required when ``config.entropy_coeff > 0``.
        ref_log_prob: same shape, reference-policy log-prob; required when ``config.kl_coeff > 0``.
        multiplicity: same shape, how many identical samples each token's row stands for (duplicates merged before
            the forward); scales the loss weights and every metric, so the result equals that of the copies. None: 1.
        rollout_is_weight: same shape, rollout importance-sampling weight of each on-policy token (a constant, from
            :func:`~luffy_megatron.algo.rollout_is.rollout_is_weights`). None: 1.
        check_finite: raise ValueError when a response token has a NaN/inf input (one host sync).

    Returns:
        (scalar fp32 loss of this micro-batch -- summing it over micro-batches and DP ranks gives the global-batch
        loss --, :class:`MetricSums`).
    """
    validate_algorithm_config(config)
    weights = _as_weights(token_weights)
    ref_shape = tuple(log_prob.shape) if isinstance(log_prob, Tensor) else None
    named: list[tuple[str, Tensor | None, bool]] = [
        ("log_prob", log_prob, True),
        ("old_log_prob", old_log_prob, True),
        ("advantages", advantages, True),
        ("entropy", entropy, False),
        ("ref_log_prob", ref_log_prob, False),
        ("token_weights.policy", weights.policy, True),
        ("token_weights.mean", weights.mean, True),
        ("token_weights.off_policy_mean", weights.off_policy_mean, True),
        ("multiplicity", multiplicity, False),
        ("rollout_is_weight", rollout_is_weight, False),
    ]
    for name, t, required in named:
        if t is None and not required:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {_describe(t)}")
        if tuple(t.shape) != ref_shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match log_prob {ref_shape}")
    for name, m in (("response_mask", response_mask), ("off_policy_mask", off_policy_mask)):
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError(f"{name}: expected a torch.bool tensor, got {_describe(m)}")
        if tuple(m.shape) != ref_shape:
            raise ValueError(f"{name}: shape {tuple(m.shape)} does not match log_prob {ref_shape}")
    if config.entropy_coeff > 0 and entropy is None:
        raise ValueError("entropy: required when config.entropy_coeff > 0")
    if config.kl_coeff > 0 and ref_log_prob is None:
        raise ValueError("ref_log_prob: required when config.kl_coeff > 0")
    mask = response_mask
    if check_finite:
        _check_finite(((n, t) for n, t, _ in named if t is not None), mask)

    # Sanitise: values outside the sets that use them are replaced by 0, so that nothing (not even a gradient of
    # 0 * inf) leaks from padding or from the branch a token does not take.
    off = off_policy_mask & mask
    on = ~off_policy_mask & mask
    zero = torch.zeros((), dtype=torch.float32, device=log_prob.device)
    lp = torch.where(mask, log_prob.float(), zero)
    old = torch.where(mask, old_log_prob.float(), zero).detach()
    adv = torch.where(mask, advantages.float(), zero).detach()
    # Every sum below counts a token `count` times: 1, or the number of identical samples its row stands for.
    count = mask.float() if multiplicity is None else torch.where(mask, multiplicity.float(), zero).detach()
    w_pg = torch.where(mask, weights.policy.float(), zero).detach() * count
    w_mean = torch.where(mask, weights.mean.float(), zero).detach() * count
    w_off = torch.where(off, weights.off_policy_mean.float(), zero).detach() * count
    n_on, n_off, n_tok = (on * count).sum(), (off * count).sum(), count.sum()
    metrics = MetricSums()

    # On-policy tokens.
    lp_on = torch.where(on, lp, zero)
    old_on = torch.where(on, old, zero)
    ratio = _on_policy_ratio(lp_on, old_on, config)
    pg_on = -adv * ratio
    if config.clip_ratio:
        upper = max(config.clip_upper, 1.0 + config.clip_eps)
        pg_on2 = -adv * torch.clamp(ratio, 1.0 - config.clip_eps, upper)
        clipped = (pg_on2 > pg_on) & on
        pg_on = torch.maximum(pg_on, pg_on2)
    else:
        clipped = torch.zeros_like(on)
    if rollout_is_weight is not None:
        pg_on = pg_on * torch.where(on, rollout_is_weight.detach().float(), zero + 1.0)
    pg_on = torch.where(on, pg_on, zero)

    # Off-policy tokens.
    lp_off = torch.where(off, lp, zero)
    f = _off_policy_ratio(lp_off, config)
    max_c, min_c = config.off_policy_max_clamp, config.off_policy_min_clamp
    if max_c is not None:
        f = torch.clamp(f, max=max_c)
        metrics.add_mean("actor/off_ratio_max_clip_frac", (((f == max_c) & off) * count).sum(), n_off)
    if min_c is not None:
        f = torch.clamp(f, min=min_c)
        metrics.add_mean("actor/off_ratio_min_clip_frac", (((f == min_c) & off) * count).sum(), n_off)
    pg_off = torch.where(off, -adv * f, zero)

    if config.sft_loss:
        per_token = pg_on
        nll = torch.where(off, -lp, zero)
        sft_loss = config.sft_loss_coeff * (nll * w_off).sum()
        metrics.add_mean("actor/sft_nll", (nll * count).sum(), n_off)
        metrics.add_total("actor/sft_loss", sft_loss)
    else:
        per_token = pg_on + pg_off
        sft_loss = zero
    pg_loss = (per_token * w_pg).sum()
    loss = pg_loss + sft_loss
    metrics.add_total("actor/pg_loss", pg_loss)

    if entropy is not None:
        ent = torch.where(mask, entropy.float(), zero)
        metrics.add_mean("actor/entropy", (ent * count).sum(), n_tok)
        if config.entropy_coeff > 0:
            ent_loss = -config.entropy_coeff * (ent * w_mean).sum()
            loss = loss + ent_loss
            metrics.add_total("actor/entropy_loss", ent_loss)
    if ref_log_prob is not None:
        ref = torch.where(mask, ref_log_prob.float(), zero).detach()
        kld = torch.where(mask, _kl(lp, ref, config.kl_type), zero)
        metrics.add_mean("actor/kl_ref", (kld * count).sum(), n_tok)
        if config.kl_coeff > 0:
            kl_loss = config.kl_coeff * (kld * w_mean).sum()
            loss = loss + kl_loss
            metrics.add_total("actor/kl_loss", kl_loss)
    metrics.add_total("actor/loss", loss)

    with torch.no_grad():
        metrics.add_mean("actor/on_pg_loss", (pg_on * count).sum(), n_on)
        metrics.add_mean("actor/off_pg_loss", (pg_off * count).sum(), n_off)
        metrics.add_mean("actor/pg_clipfrac", (clipped * count).sum(), n_on)
        metrics.add_mean("actor/ppo_kl", (torch.where(mask, old - lp, zero) * count).sum(), n_tok)
        metrics.add_mean("actor/on_policy_prob", (torch.where(on, torch.exp(old_on), zero) * count).sum(), n_on)
        metrics.add_mean("actor/off_policy_prob", (torch.where(off, torch.exp(lp_off), zero) * count).sum(), n_off)
        metrics.add_mean("actor/off_ratio_mean", (torch.where(off, f, zero) * count).sum(), n_off)
        metrics.add_total("actor/response_tokens", n_tok)
    return loss, metrics


def _as_weights(w: LossWeights | Tensor) -> LossWeights:
    if isinstance(w, LossWeights):
        return w
    if isinstance(w, Tensor):
        return LossWeights(policy=w, mean=w, off_policy_mean=w)
    raise TypeError(f"token_weights: expected LossWeights or a tensor, got {type(w).__name__}")


def _check_finite(tensors: Iterable[tuple[str, Tensor]], mask: Tensor) -> None:
    named = list(tensors)
    bad = torch.stack([(~torch.isfinite(t.detach()) & mask).sum() for _, t in named]).tolist()  # one host sync
    for (name, _), nbad in zip(named, bad):
        if nbad:
            raise ValueError(f"{name}: {nbad} non-finite value(s) (NaN/inf) on response tokens")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
