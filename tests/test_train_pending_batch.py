"""The asynchronous run's batch in flight, as a checkpoint holds it: global rank 0 writes it as flat binary arrays
and a resumed run reads back the same samples, bit for bit."""

from __future__ import annotations

import json
import math
from dataclasses import astuple

from luffy_megatron.train.producer import PENDING_FILE, RolloutPrefetcher
from luffy_megatron.train.samples import Sample


def scored_batch() -> tuple[list[Sample], dict[str, float]]:
    """Two groups sharing their prompt lists, with values fp32 cannot hold, a NaN, an int64 id and no log-probs."""
    p0, p1 = [1, 2, 3], [2**40, 5]
    samples = [
        Sample(7, 0, p0, [4, 5], False, "stop", [-0.5, -1.25], 1.0, 0.5, None, 2),
        Sample(7, 0, p0, [6], True, "stop", None, 1.0, 0.5),
        Sample(9, 1, p1, [8, 9, 10], False, "length", [-0.1, math.nan, -1e-30], 0.0, -1 / 3, [-0.2, -0.3, -0.4]),
    ]
    return samples, {"reward/on_policy": 0.5, "groups/solved_none": 1 / 3}


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
    for a, b in zip(want, got.samples, strict=True):
        assert repr(astuple(a)) == repr(astuple(b))  # repr: NaN equals NaN, -0.0 differs from 0.0
    assert got.samples[0].prompt_ids is got.samples[1].prompt_ids  # shared prompt lists stay shared


def test_no_batch_in_flight_writes_nothing(tmp_path):
    prefetcher = RolloutPrefetcher()
    assert prefetcher.save(tmp_path) is None
    assert not (tmp_path / PENDING_FILE).exists()
    prefetcher.load(tmp_path, None)
    assert prefetcher.take(1) is None
    prefetcher.close()
