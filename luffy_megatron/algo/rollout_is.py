"""Rollout importance sampling: correct on-policy tokens for the rollout engine being the behaviour policy.

The engine samples from ``mu`` (its own weights and kernels: another precision, or, with one-step-off asynchronous
rollout, the previous step's weights); the loss's ratio is taken against ``pi_old`` (the trainer's log-probs before
the update). The on-policy loss term of every token is multiplied by a detached weight built from
``delta_t = old_logp_t - rollout_logp_t`` (``log pi_old / mu`` of the sampled token), with ``C = rollout_is_cap``:

- ``token_tis``: ``w_t = min(exp(delta_t), C)`` (truncated per-token IS: slime ``--use-tis``, NeMo-RL ``tis``).
- ``seq_tis``:   ``w_t = min(exp(sum_s delta_s), C)`` over the token's sequence (verl's sequence-level truncated IS).
- ``seq_mask``:  ``w_t = 1`` if the sequence's geometric-mean ratio ``exp(mean_s delta_s)`` lies in ``[1/C, C]``,
  else ``0`` (the whole sequence is left out; NeMo-RL's ``seq-mask``, verl's geometric rejection sampling).

Tokens without engine log-probs (trace tokens, padding) get weight 1. When rollout and old log-probs agree every
weight is exactly 1. Metrics (token means over on-policy tokens, weighted by sample multiplicity):
``rollout_is/weight_mean`` (the weight applied), ``rollout_is/ratio_max`` (the largest untruncated ratio of the step),
``rollout_is/clipped_frac`` (``*_tis``: tokens whose ratio exceeded the cap) or ``rollout_is/masked_frac``
(``seq_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from luffy_megatron.config import RolloutIS, choices

__all__ = ["RolloutISWeights", "rollout_is_weights"]

# exp() of a sequence's summed log-ratio overflows fp32 past ~88; ratios beyond exp(60) are all "above the cap".
_MAX_LOG_RATIO = 60.0


@dataclass
class RolloutISWeights:
    """Per-token weights (detached, 1 off the corrected tokens), untruncated ratios and the clipped/masked tokens."""

    weight: Tensor
    ratio: Tensor
    limited: Tensor  # bool: the token's weight was truncated (``*_tis``) or zeroed (``seq_mask``)

    def metrics(self, mode: str, corrected: Tensor, count: Tensor) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
        """``({key: (sum, count)}, max ratio)`` over the ``corrected`` tokens, each counted ``count`` times."""
        n = (corrected * count).sum()
        limited_key = "rollout_is/masked_frac" if mode == RolloutIS.SEQ_MASK else "rollout_is/clipped_frac"
        sums = {
            "rollout_is/weight_mean": ((self.weight * corrected * count).sum(), n),
            limited_key: ((self.limited & corrected).float().mul(count).sum(), n),
        }
        ratio_max = torch.where(corrected, self.ratio, torch.zeros_like(self.ratio)).max()
        return sums, ratio_max


@torch.no_grad()
def rollout_is_weights(
    old_logp: Tensor, rollout_logp: Tensor, corrected: Tensor, seq_ids: Tensor, mode: str, cap: float
) -> RolloutISWeights:
    """Weights of ``mode`` (see the module docstring) for [B, T] or packed [N] tensors.

    Args:
        old_logp: log-prob of each token under the policy before the update.
        rollout_logp: the engine's log-prob of the token (any value where not ``corrected``).
        corrected: bool, on-policy response tokens that have engine log-probs.
        seq_ids: int64, the index of each token's sequence (e.g. the row index of a [B, T] batch), from 0 and
            below the token count (true of any numbering of the batch's sequences from 0).
        mode: a :class:`~luffy_megatron.config.RolloutIS` value.
        cap: ``C`` > 1.
    """
    if mode not in choices(RolloutIS):
        raise ValueError(f"rollout_is: {mode!r} is not one of {list(choices(RolloutIS))}")
    zero = torch.zeros((), dtype=torch.float32, device=old_logp.device)
    delta = torch.where(corrected, old_logp.float() - rollout_logp.float(), zero)
    if mode == RolloutIS.TOKEN_TIS:
        ratio = torch.exp(delta.clamp(max=_MAX_LOG_RATIO))
        limited = corrected & (ratio > cap)
        weight = torch.where(corrected, ratio.clamp(max=cap), zero + 1.0)
        return RolloutISWeights(weight, ratio, limited)
    flat_ids, flat_delta = seq_ids.reshape(-1), delta.reshape(-1)
    size = max(flat_ids.numel(), 1)  # a bound on the sequence count that needs no host sync
    seq_sum = torch.zeros(size, dtype=torch.float32, device=delta.device).index_add_(0, flat_ids, flat_delta)
    seq_len = torch.zeros(size, dtype=torch.float32, device=delta.device)
    seq_len.index_add_(0, flat_ids, corrected.reshape(-1).float())
    if mode == RolloutIS.SEQ_TIS:
        seq_ratio = torch.exp(seq_sum.clamp(max=_MAX_LOG_RATIO))
        seq_weight, seq_limited = seq_ratio.clamp(max=cap), seq_ratio > cap
    else:  # seq_mask: geometric mean of the sequence's token ratios
        seq_ratio = torch.exp(seq_sum / seq_len.clamp(min=1.0))
        seq_limited = (seq_ratio > cap) | (seq_ratio < 1.0 / cap)
        seq_weight = (~seq_limited).float()
    ratio = seq_ratio[seq_ids]
    weight = torch.where(corrected, seq_weight[seq_ids], zero + 1.0)
    return RolloutISWeights(weight, ratio, corrected & seq_limited[seq_ids])
