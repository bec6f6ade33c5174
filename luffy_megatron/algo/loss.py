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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from .aggregation import LossWeights
from .options import KL_PENALTIES, OFF_POLICY_RESHAPES, ON_POLICY_RESHAPES

if TYPE_CHECKING:
    from luffy_megatron.config import AlgorithmConfig

__all__ = ["MetricSums", "mixed_policy_loss"]


@dataclass
class MetricSums:
    """Metrics that aggregate exactly across micro-batches and ranks.

    ``sums[k] / counts[k]`` is a token mean (e.g. mean off-policy probability over all off-policy tokens of the
    step); ``totals[k]`` is additive (weighted loss contributions: their sum over micro-batches and DP ranks is the
    global-batch value); ``maxes[k]`` is a maximum. Combine micro-batches with :meth:`add`, ranks with
    :meth:`all_reduce`, read with :meth:`compute`. Keys depend on the config and on which inputs the loss was given;
    ranks that compute no loss (off the last pipeline stage) hold none, so :meth:`all_reduce` suits a group whose
    ranks all ran the same loss (e.g. data-parallel ranks of the last stage), and the trainer gathers across all ranks
    by key instead. :data:`luffy_megatron.metrics.reduce.METRIC_REDUCTIONS` declares which kind each metric is.
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, Tensor] = field(default_factory=dict)
    totals: dict[str, Tensor] = field(default_factory=dict)
    maxes: dict[str, Tensor] = field(default_factory=dict)

    def add_mean(self, key: str, total: Tensor, count: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0) + total.detach().double()
        self.counts[key] = self.counts.get(key, 0) + count.detach().double()

    def add_total(self, key: str, value: Tensor) -> None:
        self.totals[key] = self.totals.get(key, 0) + value.detach().double()

    def add_max(self, key: str, value: Tensor) -> None:
        """Keep the larger of ``value`` and what ``key`` holds (a NaN stays NaN)."""
        value = value.detach().double()
        self.maxes[key] = torch.maximum(self.maxes[key], value) if key in self.maxes else value

    def add(self, other: MetricSums) -> MetricSums:
        """Accumulate another micro-batch's metrics into this one (in place); returns self."""
        for k, v in other.sums.items():
            self.add_mean(k, v, other.counts[k])
        for k, v in other.totals.items():
            self.add_total(k, v)
        for k, v in other.maxes.items():
            self.add_max(k, v)
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> MetricSums:
        """SUM-reduce the means and totals over ``group`` (one collective), MAX-reduce the maxima (one more); in
        place, returns self."""
        keys, tkeys, mkeys = sorted(self.sums), sorted(self.totals), sorted(self.maxes)
        flat = [self.sums[k] for k in keys] + [self.counts[k] for k in keys] + [self.totals[k] for k in tkeys]
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self
        if flat:
            buf = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in flat])
            dist.all_reduce(buf, group=group)
            n = len(keys)
            for i, k in enumerate(keys):
                self.sums[k], self.counts[k] = buf[i], buf[n + i]
            for i, k in enumerate(tkeys):
                self.totals[k] = buf[2 * n + i]
        if mkeys:
            top = torch.stack([self.maxes[k] for k in mkeys])
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            self.maxes.update(zip(mkeys, top))
        return self

    def compute(self) -> dict[str, float]:
        """Plain floats: token means (0.0 where no token was counted), totals and maxima."""
        out = {k: (float(self.sums[k] / self.counts[k]) if float(self.counts[k]) > 0 else 0.0) for k in self.sums}
        out.update({k: float(v) for k, v in self.totals.items()})
        out.update({k: float(v) for k, v in self.maxes.items()})
        return out


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
        config: the algorithm switches (:class:`luffy_megatron.config.AlgorithmConfig`), validated at load
            (:mod:`luffy_megatron.config_checks`); a name missing from the tables of :mod:`luffy_megatron.algo.options`
            still raises ValueError.
        token_weights: :class:`LossWeights` from :func:`aggregation_weights` (a bare tensor is used for every term).
        entropy: same shape, per-token entropy (differentiable); required when ``config.entropy_coeff > 0``.
        ref_log_prob: same shape, reference-policy log-prob; required when ``config.kl_coeff > 0``.
        multiplicity: same shape, how many identical samples each token's row stands for (duplicates merged before
            the forward); scales the loss weights and every metric, so the result equals that of the copies. None: 1.
        rollout_is_weight: same shape, rollout importance-sampling weight of each on-policy token (a constant, from
            :func:`~luffy_megatron.algo.rollout_is.rollout_is_weights`). None: 1.
        check_finite: raise ValueError when a response token has a NaN/inf input (one host sync; the trainer passes
            ``config.debug_checks``).

    Returns:
        (scalar fp32 loss of this micro-batch -- summing it over micro-batches and DP ranks gives the global-batch
        loss --, :class:`MetricSums`).
    """
    on_reshape = _option(ON_POLICY_RESHAPES, "on_policy_reshape", config)
    off_reshape = _option(OFF_POLICY_RESHAPES, "off_policy_reshape", config)
    kl_penalty = _option(KL_PENALTIES, "kl_type", config)
    weights = _as_weights(token_weights)
    named = _check_inputs(
        {
            "log_prob": log_prob,
            "old_log_prob": old_log_prob,
            "advantages": advantages,
            "entropy": entropy,
            "ref_log_prob": ref_log_prob,
            "token_weights.policy": weights.policy,
            "token_weights.mean": weights.mean,
            "token_weights.off_policy_mean": weights.off_policy_mean,
            "multiplicity": multiplicity,
            "rollout_is_weight": rollout_is_weight,
        },
        response_mask,
        off_policy_mask,
        config,
    )
    if check_finite:
        _check_finite(named, response_mask)
    t = _Tokens.prepare(log_prob, old_log_prob, advantages, response_mask, off_policy_mask, weights, multiplicity)
    metrics = MetricSums()
    pg_on, clipped = _on_policy_term(t, on_reshape, config, rollout_is_weight)
    pg_off, f = _off_policy_term(t, off_reshape, config, metrics)
    loss = _policy_gradient_loss(t, pg_on, pg_off, config, metrics)
    loss = _add_regularisers(loss, t, entropy, ref_log_prob, kl_penalty, config, metrics)
    metrics.add_total("actor/loss", loss)
    _token_metrics(t, pg_on, pg_off, clipped, f, metrics)
    return loss, metrics


@dataclass
class _Tokens:
    """The sanitised fp32 inputs of one micro-batch: values outside the sets that use them are replaced by 0, so
    that nothing (not even a gradient of 0 * inf) leaks from padding or from the branch a token does not take.

    Every sum counts a token ``count`` times: 1, or the number of identical samples its row stands for.
    """

    mask: Tensor  # response tokens
    on: Tensor  # on-policy response tokens
    off: Tensor  # off-policy response tokens
    zero: Tensor  # fp32 scalar 0 on the tokens' device
    lp: Tensor  # log-prob (differentiable)
    old: Tensor  # old log-prob (constant)
    adv: Tensor  # advantage (constant)
    count: Tensor
    w_pg: Tensor  # policy-gradient weight * count
    w_mean: Tensor  # entropy / KL weight * count
    w_off: Tensor  # SFT NLL weight * count, on off-policy tokens
    n_on: Tensor
    n_off: Tensor
    n_tok: Tensor

    @classmethod
    def prepare(
        cls,
        log_prob: Tensor,
        old_log_prob: Tensor,
        advantages: Tensor,
        mask: Tensor,
        off_policy_mask: Tensor,
        weights: LossWeights,
        multiplicity: Tensor | None,
    ) -> _Tokens:
        off = off_policy_mask & mask
        on = ~off_policy_mask & mask
        zero = torch.zeros((), dtype=torch.float32, device=log_prob.device)
        count = mask.float() if multiplicity is None else torch.where(mask, multiplicity.float(), zero).detach()
        return cls(
            mask=mask,
            on=on,
            off=off,
            zero=zero,
            lp=torch.where(mask, log_prob.float(), zero),
            old=torch.where(mask, old_log_prob.float(), zero).detach(),
            adv=torch.where(mask, advantages.float(), zero).detach(),
            count=count,
            w_pg=torch.where(mask, weights.policy.float(), zero).detach() * count,
            w_mean=torch.where(mask, weights.mean.float(), zero).detach() * count,
            w_off=torch.where(off, weights.off_policy_mean.float(), zero).detach() * count,
            n_on=(on * count).sum(),
            n_off=(off * count).sum(),
            n_tok=count.sum(),
        )


def _on_policy_term(
    t: _Tokens, reshape: Callable, c: AlgorithmConfig, rollout_is_weight: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-token policy-gradient loss of on-policy tokens (0 elsewhere), scaled by the rollout IS weight when given,
    and where the PPO clip was active."""
    ratio = reshape(torch.where(t.on, t.lp, t.zero), torch.where(t.on, t.old, t.zero), c)
    pg_on = -t.adv * ratio
    if c.clip_ratio:
        upper = max(c.clip_upper, 1.0 + c.clip_eps)
        pg_on2 = -t.adv * torch.clamp(ratio, 1.0 - c.clip_eps, upper)
        clipped = (pg_on2 > pg_on) & t.on
        pg_on = torch.maximum(pg_on, pg_on2)
    else:
        clipped = torch.zeros_like(t.on)
    if rollout_is_weight is not None:
        pg_on = pg_on * torch.where(t.on, rollout_is_weight.detach().float(), t.zero + 1.0)
    return torch.where(t.on, pg_on, t.zero), clipped


def _off_policy_term(t: _Tokens, reshape: Callable, c: AlgorithmConfig, metrics: MetricSums) -> tuple[Tensor, Tensor]:
    """Per-token policy-gradient loss of off-policy tokens (0 elsewhere) and the shaped, clamped f(p)."""
    f = reshape(torch.where(t.off, t.lp, t.zero), c)
    max_c, min_c = c.off_policy_max_clamp, c.off_policy_min_clamp
    if max_c is not None:
        f = torch.clamp(f, max=max_c)
        metrics.add_mean("actor/off_ratio_max_clip_frac", (((f == max_c) & t.off) * t.count).sum(), t.n_off)
    if min_c is not None:
        f = torch.clamp(f, min=min_c)
        metrics.add_mean("actor/off_ratio_min_clip_frac", (((f == min_c) & t.off) * t.count).sum(), t.n_off)
    return torch.where(t.off, -t.adv * f, t.zero), f


def _policy_gradient_loss(t: _Tokens, pg_on: Tensor, pg_off: Tensor, c: AlgorithmConfig, metrics: MetricSums) -> Tensor:
    """The weighted policy-gradient sum; with ``sft_loss`` trace tokens get the NLL term instead of a gradient."""
    if c.sft_loss:
        per_token = pg_on
        nll = torch.where(t.off, -t.lp, t.zero)
        sft_loss = c.sft_loss_coeff * (nll * t.w_off).sum()
        metrics.add_mean("actor/sft_nll", (nll * t.count).sum(), t.n_off)
        metrics.add_total("actor/sft_loss", sft_loss)
    else:
        per_token = pg_on + pg_off
        sft_loss = t.zero
    pg_loss = (per_token * t.w_pg).sum()
    metrics.add_total("actor/pg_loss", pg_loss)
    return pg_loss + sft_loss


def _add_regularisers(
    loss: Tensor,
    t: _Tokens,
    entropy: Tensor | None,
    ref_log_prob: Tensor | None,
    kl_penalty: Callable[[Tensor, Tensor], Tensor],
    c: AlgorithmConfig,
    metrics: MetricSums,
) -> Tensor:
    """``loss`` minus the entropy bonus plus the KL penalty (each term only when its coefficient is on; the metric
    whenever its input is given)."""
    if entropy is not None:
        ent = torch.where(t.mask, entropy.float(), t.zero)
        metrics.add_mean("actor/entropy", (ent * t.count).sum(), t.n_tok)
        if c.entropy_coeff > 0:
            ent_loss = -c.entropy_coeff * (ent * t.w_mean).sum()
            loss = loss + ent_loss
            metrics.add_total("actor/entropy_loss", ent_loss)
    if ref_log_prob is not None:
        ref = torch.where(t.mask, ref_log_prob.float(), t.zero).detach()
        kld = torch.where(t.mask, kl_penalty(t.lp, ref), t.zero)
        metrics.add_mean("actor/kl_ref", (kld * t.count).sum(), t.n_tok)
        if c.kl_coeff > 0:
            kl_loss = c.kl_coeff * (kld * t.w_mean).sum()
            loss = loss + kl_loss
            metrics.add_total("actor/kl_loss", kl_loss)
    return loss


@torch.no_grad()
def _token_metrics(t: _Tokens, pg_on: Tensor, pg_off: Tensor, clipped: Tensor, f: Tensor, metrics: MetricSums) -> None:
    """Token means of the policy-gradient terms, the clip fraction, the probabilities and the shaped ratio."""
    count = t.count
    metrics.add_mean("actor/on_pg_loss", (pg_on * count).sum(), t.n_on)
    metrics.add_mean("actor/off_pg_loss", (pg_off * count).sum(), t.n_off)
    metrics.add_mean("actor/pg_clipfrac", (clipped * count).sum(), t.n_on)
    metrics.add_mean("actor/ppo_kl", (torch.where(t.mask, t.old - t.lp, t.zero) * count).sum(), t.n_tok)
    old_on = torch.where(t.on, t.old, t.zero)
    metrics.add_mean("actor/on_policy_prob", (torch.where(t.on, torch.exp(old_on), t.zero) * count).sum(), t.n_on)
    lp_off = torch.where(t.off, t.lp, t.zero)
    metrics.add_mean("actor/off_policy_prob", (torch.where(t.off, torch.exp(lp_off), t.zero) * count).sum(), t.n_off)
    metrics.add_mean("actor/off_ratio_mean", (torch.where(t.off, f, t.zero) * count).sum(), t.n_off)
    metrics.add_total("actor/response_tokens", t.n_tok)


def _option(table: dict, name: str, config: AlgorithmConfig) -> Callable:
    """``table[config.<name>]``, or a ValueError naming the key (a dict lookup: no validation pass per call)."""
    value = getattr(config, name)
    if value not in table:
        raise ValueError(f"config.{name}: {value!r} is not one of {[m.value for m in table]}")
    return table[value]


def _check_inputs(
    tensors: dict[str, Tensor | None], response_mask: Tensor, off_policy_mask: Tensor, c: AlgorithmConfig
) -> list[tuple[str, Tensor]]:
    """Types and shapes (no host sync); returns the given (name, tensor) pairs. ``entropy``, ``ref_log_prob`` and
    ``multiplicity`` may be None unless a coefficient needs them."""
    ref_shape = tuple(tensors["log_prob"].shape) if isinstance(tensors["log_prob"], Tensor) else None
    optional = ("entropy", "ref_log_prob", "multiplicity", "rollout_is_weight")
    named = [(n, t) for n, t in tensors.items() if t is not None or n not in optional]
    for name, t in named:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {_describe(t)}")
        if tuple(t.shape) != ref_shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match log_prob {ref_shape}")
    for name, m in (("response_mask", response_mask), ("off_policy_mask", off_policy_mask)):
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError(f"{name}: expected a torch.bool tensor, got {_describe(m)}")
        if tuple(m.shape) != ref_shape:
            raise ValueError(f"{name}: shape {tuple(m.shape)} does not match log_prob {ref_shape}")
    if c.entropy_coeff > 0 and tensors["entropy"] is None:
        raise ValueError("entropy: required when config.entropy_coeff > 0")
    if c.kl_coeff > 0 and tensors["ref_log_prob"] is None:
        raise ValueError("ref_log_prob: required when config.kl_coeff > 0")
    return named  # type: ignore[return-value]


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
