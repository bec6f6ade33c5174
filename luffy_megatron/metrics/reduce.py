"""How each metric of the policy update combines into an RL step's value.

An update metric is computed per micro-batch, on every rank that computes a loss, for every optimiser step (mini-batch)
of an RL step. :data:`METRIC_REDUCTIONS` declares for each one how it combines

- within an optimiser step, over its micro-batches and ranks (``train.policy``, through
  :class:`~luffy_megatron.algo.MetricSums`): ``mean`` is a token mean (sums over counts, ``add_mean``), ``sum`` a total
  (``add_total``), ``max`` a maximum (``add_max``); None marks a value the policy computes once per optimiser step,
  the same on every rank (gradient norm, learning rate);
- over the optimiser steps of the RL step (:func:`reduce_mini_batches`): ``mean``, ``sum``, ``max`` or ``min``.

Names are the policy's: the loop adds ``actor/`` to those without a ``/``. A name with ``{L}`` stands for one metric
per layer (``moe/layer0/...``, ``moe/layer1/...``). The rest of a step's metrics (rollout,
reward, timing) are computed once per RL step on one rank and do not combine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class Reduce(str, Enum):
    """How values combine."""

    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class Reduction:
    """``optimiser_step``: over the micro-batches and ranks of one optimiser step (None: one value per step);
    ``mini_batches``: over the optimiser steps of an RL step."""

    optimiser_step: Reduce | None
    mini_batches: Reduce


TOKEN_MEAN = Reduction(Reduce.MEAN, Reduce.MEAN)
LOSS_TERM = Reduction(Reduce.SUM, Reduce.MEAN)  # a weighted sum over the mini-batch; the step reports the mean loss
COUNT = Reduction(Reduce.SUM, Reduce.SUM)
MAXIMUM = Reduction(Reduce.MAX, Reduce.MAX)
PER_STEP_MEAN = Reduction(None, Reduce.MEAN)
PER_STEP_MAX = Reduction(None, Reduce.MAX)
PER_STEP_MIN = Reduction(None, Reduce.MIN)

#: Every metric the policy update reports, with its reduction.
METRIC_REDUCTIONS: dict[str, Reduction] = {
    # algo.loss: the mixed-policy loss
    "actor/loss": LOSS_TERM,
    "actor/pg_loss": LOSS_TERM,
    "actor/sft_loss": LOSS_TERM,
    "actor/entropy_loss": LOSS_TERM,
    "actor/kl_loss": LOSS_TERM,
    "actor/response_tokens": COUNT,
    "actor/on_pg_loss": TOKEN_MEAN,
    "actor/off_pg_loss": TOKEN_MEAN,
    "actor/pg_clipfrac": TOKEN_MEAN,
    "actor/ppo_kl": TOKEN_MEAN,
    "actor/on_policy_prob": TOKEN_MEAN,
    "actor/off_policy_prob": TOKEN_MEAN,
    "actor/off_ratio_mean": TOKEN_MEAN,
    "actor/off_ratio_max_clip_frac": TOKEN_MEAN,
    "actor/off_ratio_min_clip_frac": TOKEN_MEAN,
    "actor/sft_nll": TOKEN_MEAN,
    "actor/entropy": TOKEN_MEAN,
    "actor/kl_ref": TOKEN_MEAN,
    # algo.micro_batch_loss: rollout importance sampling and the engine's log-probs
    "rollout_is/weight_mean": TOKEN_MEAN,
    "rollout_is/clipped_frac": TOKEN_MEAN,
    "rollout_is/masked_frac": TOKEN_MEAN,
    "rollout_is/ratio_max": MAXIMUM,
    "train_rollout_logprob_gap": TOKEN_MEAN,
    "train_rollout_logprob_gap_max": MAXIMUM,
    "policy_shift_max": MAXIMUM,
    # train.policy: the optimiser step
    "grad_norm": PER_STEP_MEAN,
    "lr": PER_STEP_MEAN,
    "update_skipped": PER_STEP_MAX,  # 1 when any optimiser step of the RL step was skipped
    "trained_samples": Reduction(None, Reduce.SUM),
    # train.router_metrics (MoE models): expert load shares (the worst optimiser step's) and the auxiliary loss
    "moe/expert_load_max_share": PER_STEP_MAX,
    "moe/expert_load_min_share": PER_STEP_MIN,
    "moe/layer{L}/expert_load_max_share": PER_STEP_MAX,
    "moe/layer{L}/expert_load_min_share": PER_STEP_MIN,
    "moe/aux_loss": PER_STEP_MEAN,
}

_COMBINE: dict[Reduce, Callable[[list[float]], float]] = {
    Reduce.MEAN: lambda values: sum(values) / len(values),
    Reduce.SUM: sum,
    Reduce.MAX: max,
    Reduce.MIN: min,
}
_LAYER = re.compile(r"^moe/layer\d+/")


def declared_name(name: str) -> str:
    """The name under which ``name`` is declared in :data:`METRIC_REDUCTIONS` (a layer's metric: with ``{L}``)."""
    return _LAYER.sub("moe/layer{L}/", name)


def reduce_mini_batches(per_mini_batch: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's values over the mini-batches as the step's value; a metric missing from
    :data:`METRIC_REDUCTIONS` is an error (declare it there)."""
    undeclared = sorted(name for name in per_mini_batch if declared_name(name) not in METRIC_REDUCTIONS)
    if undeclared:
        raise KeyError(f"metrics without a reduction in luffy_megatron.metrics.reduce.METRIC_REDUCTIONS: {undeclared}")
    return {
        name: _COMBINE[METRIC_REDUCTIONS[declared_name(name)].mini_batches](values)
        for name, values in per_mini_batch.items()
    }
