"""How the metrics of one RL step's optimiser steps (its mini-batches) combine into the step's value.

Within an optimiser step, micro-batches and ranks are already combined where the metric is computed (token means as
sums over counts, totals as sums, maxima as maxima: ``train.policy``). Across mini-batches a metric is a mean unless
:data:`MINI_BATCH_REDUCTION` says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


#: Metrics (as the policy names them) that are not means over mini-batches.
MINI_BATCH_REDUCTION: dict[str, Callable[[list[float]], float]] = {
    "rollout_is/ratio_max": max,
    "train_rollout_logprob_gap_max": max,
    "policy_shift_max": max,
    "update_skipped": max,  # 1 when any optimiser step of the RL step was skipped
    "trained_samples": sum,
    "actor/response_tokens": sum,
}


def reduce_mini_batches(per_mini_batch: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's values over the mini-batches as the step's value (:data:`MINI_BATCH_REDUCTION`, else the mean)."""
    return {name: MINI_BATCH_REDUCTION.get(name, _mean)(values) for name, values in per_mini_batch.items()}
