"""A step's metrics over its mini-batches: maxima stay maxima, counts add up, the rest are means."""

from __future__ import annotations

from pathlib import Path

from luffy_megatron.metrics.reduce import MINI_BATCH_REDUCTION, reduce_mini_batches

PACKAGE = Path(__file__).resolve().parents[1] / "luffy_megatron"


def test_two_mini_batches_give_the_steps_maximum_and_totals():
    step = reduce_mini_batches(
        {
            "rollout_is/ratio_max": [3.0, 7.5],
            "train_rollout_logprob_gap_max": [2e-6, 1e-6],
            "trained_samples": [4.0, 5.0],
            "update_skipped": [0.0, 1.0],
            "actor/loss": [1.0, 3.0],
        }
    )
    assert step == {
        "rollout_is/ratio_max": 7.5,
        "train_rollout_logprob_gap_max": 2e-6,
        "trained_samples": 9.0,
        "update_skipped": 1.0,
        "actor/loss": 2.0,
    }


def test_every_listed_metric_is_one_the_trainer_emits():
    source = "\n".join(p.read_text() for p in (PACKAGE / "train").glob("*.py")) + (PACKAGE / "algo/loss.py").read_text()
    missing = [name for name in MINI_BATCH_REDUCTION if f'"{name}"' not in source]
    assert missing == [], f"not emitted by the trainer: {missing}"
