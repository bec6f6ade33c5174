"""Rollout engines behind one interface: in-process transformers (``hf``) and SGLang servers (``sglang``)."""

from luffy_megatron.rollout.base import (
    RolloutEngine,
    RolloutError,
    RolloutOutput,
    SamplingParams,
    WeightSyncError,
    build_rollout_engine,
    sample_seed,
)

__all__ = [
    "RolloutEngine",
    "RolloutError",
    "RolloutOutput",
    "SamplingParams",
    "WeightSyncError",
    "build_rollout_engine",
    "sample_seed",
]
