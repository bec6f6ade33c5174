"""The loss of one micro-batch as the trainer computes it, from the model's log-probs and entropies.

Puts the pieces of this package together for one micro-batch of the update: split-invariant aggregation weights, the
old log-probs (those of the mini-batch's samples, or the current ones detached when a rollout batch is one optimiser
step), rollout importance-sampling weights (``algorithm.rollout_is``), the mixed-policy loss, and the trainer's
diagnostics of the engine's log-probs. Nothing here waits for the device unless ``algorithm.debug_checks`` is on
(``tests/test_hot_path_syncs.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from .aggregation import GlobalCounts, aggregation_weights
from .loss import MetricSums, mixed_policy_loss
from .rollout_is import rollout_is_weights

if TYPE_CHECKING:
    from luffy_megatron.config import AlgorithmConfig

__all__ = ["LossInputs", "micro_batch_loss"]


class LossInputs(Protocol):
    """A micro-batch's loss inputs as flat ``[N]`` tensors (``luffy_megatron.train.batch.FlatMicroBatch`` is one)."""

    response_mask: Tensor  # bool
    off_policy_mask: Tensor  # bool
    seq_index: Tensor  # int64: each token's sequence within the micro-batch
    advantages: Tensor
    old_logprobs: Tensor
    rollout_logprobs: Tensor  # the engine's, where ``has_rollout_logprobs``
    has_rollout_logprobs: Tensor  # bool
    multiplicity: Tensor


def micro_batch_loss(
    mb: LossInputs,
    logp: Tensor,
    entropy: Tensor,
    config: AlgorithmConfig,
    counts: GlobalCounts,
    *,
    max_response_length: int,
    use_old_logprobs: bool,
) -> tuple[Tensor, MetricSums]:
    """LUFFY's loss of micro-batch ``mb`` and its metrics.

    Args:
        mb: the loss inputs (on any device: they are moved to ``logp``'s).
        logp: [N] log-prob of each token's target under the current weights (differentiable).
        entropy: [N] entropy of each token's distribution (differentiable).
        config: the algorithm switches; ``config.debug_checks`` turns on the checks that wait for the device.
        counts: the mini-batch's global counts (every micro-batch, every data-parallel rank).
        max_response_length: ``L_max`` of the ``luffy`` aggregation mode.
        use_old_logprobs: take the old policy's log-probs from ``mb``; else the current ones are the old policy's.

    Returns:
        (the micro-batch's share of the mini-batch loss, :class:`MetricSums` of the loss's metrics plus
        ``train_rollout_logprob_gap`` (token mean of ``|old - rollout|``), ``train_rollout_logprob_gap_max``,
        ``policy_shift_max`` (largest ``|old - logp|`` of an on-policy token) and, with ``config.rollout_is``, the
        ``rollout_is/*`` metrics).
    """
    dev = logp.device
    resp, off = mb.response_mask.to(dev), mb.off_policy_mask.to(dev)
    weights = aggregation_weights(
        config.loss_agg_mode,
        resp,
        counts,
        max_response_length=max_response_length,
        seq_index=mb.seq_index.to(dev),
        off_policy_mask=off,
        luffy_micro_batch_seqs=config.luffy_micro_batch_seqs,
        check_counts=config.debug_checks,
    )
    old = mb.old_logprobs.to(dev) if use_old_logprobs else logp.detach()
    mult = mb.multiplicity.to(dev)
    corrected = mb.has_rollout_logprobs.to(dev) & ~off
    rollout_logp = mb.rollout_logprobs.to(dev)
    is_w = None
    if config.rollout_is is not None:
        seq = mb.seq_index.to(dev)
        is_w = rollout_is_weights(old, rollout_logp, corrected, seq, config.rollout_is, config.rollout_is_cap)
    loss, sums = mixed_policy_loss(
        logp,
        old,
        mb.advantages.to(dev),
        resp,
        off,
        config,
        token_weights=weights,
        entropy=entropy,
        multiplicity=mult,
        rollout_is_weight=None if is_w is None else is_w.weight,
        check_finite=config.debug_checks,
    )
    gap_mask = corrected * mult
    gap = (old.detach().float() - rollout_logp).abs()
    sums.add_mean("train_rollout_logprob_gap", (gap * gap_mask).sum(), gap_mask.sum())
    # The largest gap shows a weight sync that did not reach the engine (its tokens come from older weights).
    sums.add_max("train_rollout_logprob_gap_max", (gap * gap_mask).max())
    # The largest change of a sampled token's log-prob since the rollout (0 in a step's first mini-batch): what a
    # sync that never reached the engine would leave as its gap.
    shift = (old.detach().float() - logp.detach().float()).abs() * (resp & ~off)
    sums.add_max("policy_shift_max", shift.max())
    if is_w is not None:
        is_sums, ratio_max = is_w.metrics(config.rollout_is, corrected, mult)
        for key, (total, count) in is_sums.items():
            sums.add_mean(key, total, count)
        sums.add_max("rollout_is/ratio_max", ratio_max)
    return loss, sums
