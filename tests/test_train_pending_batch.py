"""The asynchronous run's batch in flight, as a checkpoint holds it: global rank 0 writes it as flat binary arrays
and a resumed run reads back the same batch, bit for bit."""

from __future__ import annotations

import json
import math

from luffy_megatron.train.producer import PENDING_FILE, RolloutPrefetcher
from luffy_megatron.train.samples import Sample
from luffy_megatron.train.step_batch import StepBatch
from tests.test_train_transport import differences


def scored_batch() -> tuple[StepBatch, dict[str, float]]:
    """Two groups, with a NaN and a tiny log-prob, an fp64 advantage, an int64 id and a sample without log-probs."""
    p0, p1 = [1, 2, 3], [2**40, 5]
    samples = [
        Sample(7, 0, p0, [4, 5], False, "stop", [-0.5, -1.25], 1.0, 0.5, None, 2),
        Sample(7, 0, p0, [6], True, "stop", None, 1.0, 0.5),
        Sample(9, 1, p1, [8, 9, 10], False, "length", [-0.1, math.nan, -1e-30], 0.0, -1 / 3, [-0.2, -0.3, -0.4]),
    ]
    return StepBatch.from_samples(samples), {"reward/on_policy": 0.5, "groups/solved_none": 1 / 3}


def test_the_batch_in_flight_round_trips_bit_exactly(tmp_path):
    writer = RolloutPrefetcher()
    writer.start(3, 1, scored_batch)
    record = writer.save(tmp_path)
    writer.close()
    assert record["file"] == PENDING_FILE and (tmp_path / PENDING_FILE).is_file()
    json.dumps(record)  # the trainer state keeps only this small record
    assert "samples" not in record

    reader = RolloutPrefetcher()
    reader.load(tmp_path, record)
    got = reader.take(3)
    reader.close()
    want, metrics = scored_batch()
    assert (got.step, got.weights_step) == (3, 1)
    assert {k: got.metrics[k] for k in metrics} == metrics
    assert differences(want, got.batch) == []  # bit for bit: NaN equals NaN, -0.0 differs from 0.0


def test_no_batch_in_flight_writes_nothing(tmp_path):
    prefetcher = RolloutPrefetcher()
    assert prefetcher.save(tmp_path) is None
    assert not (tmp_path / PENDING_FILE).exists()
    prefetcher.load(tmp_path, None)
    assert prefetcher.take(1) is None
    prefetcher.close()
