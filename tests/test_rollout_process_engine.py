"""The HF engine in its own process (asynchronous rollout on CPU): the same samples as in-process, weight updates
through shared memory, errors from the child, a dead child, a background batch."""

from __future__ import annotations

import os

import pytest
import torch

from luffy_megatron.rollout import RolloutError, SamplingParams, WeightSyncError
from luffy_megatron.rollout.hf_engine import HFEngine
from luffy_megatron.rollout.process_engine import ProcessEngine
from luffy_megatron.train.producer import RolloutPrefetcher
from tests.fixtures_models import save_tiny_model, tiny_model

PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [7, 8], [11, 12, 13, 14]]
PARAMS = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("proc") / "m", seed=12)


def _ids(out):
    return [[o.output_ids for o in row] for row in out]


def test_same_samples_as_in_process_then_weight_update_and_errors(model_dir) -> None:
    ref = HFEngine.from_pretrained(model_dir)
    engine = ProcessEngine(str(model_dir), num_threads=1)
    try:
        assert engine.health()["ok"] and engine.health()["pid"] != os.getpid()
        counts = [2, 3, 0]
        got = engine.generate(PROMPTS, PARAMS, counts)
        want = ref.generate(PROMPTS, PARAMS, counts)
        assert _ids(got) == _ids(want) and [len(r) for r in got] == counts
        for row, rrow in zip(got, want):
            for o, r in zip(row, rrow):
                assert torch.allclose(torch.tensor(o.logprobs), torch.tensor(r.logprobs), atol=1e-6, rtol=0)
        # New weights arrive through shared memory and change the samples exactly as in process.
        new = tiny_model(seed=13, scale=4.0)
        engine.update_weights(new.state_dict().items(), version=1)
        assert engine.weight_version == 1
        assert _ids(engine.generate(PROMPTS, PARAMS)) == _ids(
            HFEngine(new, eos_token_ids=ref.eos_token_ids).generate(PROMPTS, PARAMS)
        )
        with pytest.raises(WeightSyncError, match="rollout process: WeightSyncError: update_weights: unknown"):
            engine.update_weights([("model.bogus.weight", torch.zeros(2))], version=2)
        with pytest.raises(RolloutError, match="rollout process: WeightSyncError"):
            engine.generate(PROMPTS, PARAMS)  # the child refuses partial weights, as the in-process engine does
        with pytest.raises(RolloutError, match="3 counts for 2 prompts"):
            engine.generate(PROMPTS[:2], PARAMS, [1, 1, 1])
    finally:
        engine.close()
    with pytest.raises(RolloutError, match="exited"):
        engine.generate(PROMPTS, PARAMS)


def test_a_killed_child_is_a_rollout_error_and_a_background_batch_matches(model_dir) -> None:
    engine = ProcessEngine(str(model_dir), num_threads=1)
    prefetcher = RolloutPrefetcher()
    try:
        prefetcher.start(2, 0, lambda: ([], {"n": float(len(engine.generate(PROMPTS, PARAMS)))}))
        assert prefetcher.take(3) is None  # nothing for another step; the batch for step 2 stays ready
        batch = prefetcher.take(2)
        assert batch is not None and batch.metrics["n"] == 3.0 and batch.weights_step == 0
        assert batch.metrics["timeline/generate_end"] >= batch.metrics["timeline/generate_start"]
        engine._proc.kill()
        engine._proc.join(10)
        prefetcher.start(3, 1, lambda: (engine.generate(PROMPTS, PARAMS), {}))
        with pytest.raises(RolloutError, match="exited"):
            prefetcher.take(3)
    finally:
        prefetcher.close()
        engine.close()
