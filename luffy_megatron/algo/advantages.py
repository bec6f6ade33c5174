"""Group-relative (GRPO) outcome advantages over mixed on/off-policy groups.

``A_j = r_j - mean_g(r)`` over every sample of the group ``g`` of ``j``, the off-policy traces included (the released
LUFFY run uses verl's ``grpo`` estimator with ``algorithm.grpo_use_std=False``); with ``use_std`` it is divided by the
unbiased group standard deviation plus ``eps``. A group of a single sample gets mean 0 and std 1 (as verl does).
``stat_mask`` restricts the samples that enter mean and std (the "RL with SFT loss" ablation uses verl's
``grpo_split``: statistics over the on-policy samples only), while every sample still receives an advantage.
``baseline_mask`` centres its samples on the mean of the ``baseline_mask`` samples of their group instead, keeping the
scale (``algorithm.on_policy_baseline=on_policy_mean`` passes the on-policy samples: each trace keeps LUFFY's advantage,
each on-policy sample loses the share of the trace's reward in its baseline; docs/algorithm.md says why).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_advantages"]


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    use_std: bool = False,
    eps: float = 1e-6,
    stat_mask: Tensor | None = None,
    baseline_mask: Tensor | None = None,
) -> Tensor:
    """Per-sample advantages.

    Args:
        rewards: [S] float scalar reward of each sample.
        group_ids: [S] integer id of each sample's group (prompt); any values, groups of any sizes.
        use_std: divide by (unbiased std of the group + eps).
        eps: added to the std.
        stat_mask: [S] bool, samples that enter the group statistics (default: all).
        baseline_mask: [S] bool, samples centred on the mean of the ``baseline_mask`` samples of their group (a
            group of one such sample: mean 0) instead of the ``stat_mask`` mean; the std stays the ``stat_mask`` one.

    Returns:
        [S] advantages, dtype of ``rewards``. Statistics are accumulated in float64 (no Python loop over samples);
        a group whose rewards are all equal gets exactly 0.

    Raises:
        ValueError naming the argument for shape/dtype mismatches, non-finite rewards, or a group with no sample in
        ``stat_mask``.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a 1-D float tensor, got {_describe(rewards)}")
    if not isinstance(group_ids, Tensor) or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids: expected an integer tensor, got {_describe(group_ids)}")
    if tuple(group_ids.shape) != tuple(rewards.shape):
        raise ValueError(f"group_ids: shape {tuple(group_ids.shape)} does not match rewards {tuple(rewards.shape)}")
    for name, mask in (("stat_mask", stat_mask), ("baseline_mask", baseline_mask)):
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool):
            raise ValueError(f"{name}: expected a bool tensor, got {_describe(mask)}")
        if mask is not None and tuple(mask.shape) != tuple(rewards.shape):
            raise ValueError(f"{name}: shape {tuple(mask.shape)} does not match rewards {tuple(rewards.shape)}")
    if stat_mask is None:
        stat_mask = torch.ones_like(rewards, dtype=torch.bool)
    if rewards.numel() == 0:
        return rewards.clone()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards: {int((~torch.isfinite(rewards)).sum())} non-finite value(s) (NaN/inf)")

    _, inv = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inv.max()) + 1
    r = rewards.double()
    count, mean, equal = _group_stats(r, inv, stat_mask, num_groups)
    if bool((count == 0).any()):
        bad = group_ids[(count == 0)[inv]][0].item()
        raise ValueError(f"stat_mask: group {bad} has no sample that enters the group statistics")
    dev = r - mean[inv]
    if baseline_mask is not None:
        _, baseline, _ = _group_stats(r, inv, baseline_mask, num_groups)
        dev = torch.where(baseline_mask, r - baseline[inv], dev)
    if not use_std:
        return dev.to(rewards.dtype)
    sq = torch.zeros_like(count).index_add_(0, inv, (r - mean[inv]).square() * stat_mask.double())
    std = torch.sqrt(sq / (count - 1).clamp_min(1))
    std = torch.where(equal, torch.zeros_like(std), std)
    std = torch.where(count == 1, torch.ones_like(std), std)
    return (dev / (std[inv] + eps)).to(rewards.dtype)


def _group_stats(r: Tensor, inv: Tensor, mask: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per group, over its ``mask`` samples: their count, their mean (exact when their rewards are all equal, so
    that those get exactly zero advantage; 0 for a group of one, as verl does) and whether their rewards are equal."""
    w = mask.double()
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, w)
    total = torch.zeros_like(count).index_add_(0, inv, r * w)
    big = torch.finfo(torch.float64).max
    lo = torch.full_like(count, big).scatter_reduce_(0, inv, torch.where(mask, r, big), "amin")
    hi = torch.full_like(count, -big).scatter_reduce_(0, inv, torch.where(mask, r, -big), "amax")
    equal = lo == hi
    mean = torch.where(equal, lo, total / count.clamp_min(1))
    return count, torch.where(count == 1, torch.zeros_like(mean), mean), equal


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
