"""Weights streamed from a (TP-sharded) Megatron policy into the in-process engine: the engine's log-probs of the
tokens it samples equal Megatron's log-probs of the same tokens (the train-vs-rollout gap is ~0 in fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.fixtures_models import tiny_checkpoint

pytestmark = pytest.mark.slow


def sync_and_compare(rank: int, world: int, hf_dir: str, tp: int) -> dict:
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.export import iter_hf_weights
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.rollout.base import SamplingParams
    from luffy_megatron.rollout.hf_engine import HFEngine
    from luffy_megatron.train.samples import Sample
    from luffy_megatron.train.step_batch import StepBatch

    setup_platform()
    init_model_parallel(tp, 1, None, seed=1)
    cfg = load_config(None, [f"model.hf_path={hf_dir}", "model.dtype=float32", f"parallel.tp={tp}"])
    spec = model_spec(read_hf_config(hf_dir), tp)
    from luffy_megatron.train.policy import MegatronPolicy

    policy = MegatronPolicy(cfg, spec, pad_id=0)
    load_hf_weights(policy.modules, spec, hf_dir)
    # Move the policy away from the HF folder's weights, so that only the sync can make the engine agree.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in (p for m in policy.modules for p in m.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    engine = HFEngine.from_pretrained(hf_dir, batch_size=16) if rank == 0 else None
    stream = (pair for bucket in iter_hf_weights(policy.modules, spec) for pair in bucket)
    if engine is not None:
        engine.update_weights(stream, version=1)
    else:
        for _ in stream:
            pass
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
    samples: list = [None]
    if rank == 0:
        outs = engine.generate(prompts, SamplingParams(n=3, temperature=0.8, max_new_tokens=10, seed=3))
        samples[0] = [
            Sample(i, i, prompts[i], o.output_ids, False, rollout_logprobs=o.logprobs)
            for i, group in enumerate(outs)
            for o in group
        ]
    torch.distributed.broadcast_object_list(samples, src=0)
    samples = samples[0]
    policy.cfg.rollout.temperature = 0.8  # the fused log-prob divides logits by the sampling temperature
    batch = StepBatch.from_samples(samples)
    gaps = (policy.compute_logprobs(batch) - batch.rollout_logprobs)[batch.response_token_mask()].abs()
    return {"max_gap": float(gaps.max()), "tokens": gaps.numel()}


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_logprobs_equal_megatron_after_sync(tp):
    hf_dir = str(tiny_checkpoint("qwen2"))  # tied embeddings, q/k/v biases, GQA 4
    result = run_distributed(sync_and_compare, tp, hf_dir, tp)[0]
    assert result["tokens"] >= 20
    assert result["max_gap"] < 1e-4, result
