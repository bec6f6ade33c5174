"""Comparing two training runs step by step, and what each must show first: that it learns. Two runs that train on
nothing (every reward 0, every advantage 0, loss 0) agree whatever a resume or a parallel layout got wrong."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

#: The metrics two runs of the same steps (one resumed, one not) must agree on, to fp32 round-off.
COMPARED = (
    "actor/loss",
    "actor/pg_loss",
    "actor/grad_norm",
    "actor/entropy",
    "reward/on_policy",
    "response/length_mean",
)

#: The share of steps that must train on signal; a step whose groups all agree (rare with expert traces) may not.
MOST = 0.75


def step_learns(row: dict) -> bool:
    """Some group's rewards differ (non-zero advantages): its on-policy samples disagree, or its rewarded expert trace
    sits beside an unsolved sample; and the policy-gradient loss and the gradient are non-zero."""
    mixed_on_policy = row["groups/solved_all"] + row["groups/solved_none"] < 1.0
    trace_beats_rollout = row["reward/off_policy"] > 0 and row["groups/solved_all"] < 1.0
    signal = mixed_on_policy or trace_beats_rollout
    return signal and row["actor/pg_loss"] != 0 and row["actor/grad_norm"] > 0


def assert_learns(rows: Iterable[dict], most: float = MOST) -> None:
    """At least ``most`` of the logged steps learn (:func:`step_learns`); the message lists the steps that do not."""
    rows = list(rows)
    assert rows, "no step was logged"
    idle = [r["step"] for r in rows if not step_learns(r)]
    assert len(idle) <= (1 - most) * len(rows), f"steps {idle} of {len(rows)} trained on no signal"


def assert_same_step(a: dict, b: dict) -> None:
    """Step ``b`` equals step ``a`` in every :data:`COMPARED` metric (relative 1e-5)."""
    for key in COMPARED:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
