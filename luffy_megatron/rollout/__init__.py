"""Rollout engines behind one interface: in-process transformers (``hf``) and SGLang servers (``sglang``); the
engine a config names comes from :func:`luffy_megatron.rollout.factory.build_rollout_engine`."""

from luffy_megatron.rollout.base import (
    RolloutEngine,
    RolloutError,
    RolloutOutput,
    SamplingParams,
    WeightSyncError,
    sample_seed,
)

__all__ = [
    "RolloutEngine",
    "RolloutError",
    "RolloutOutput",
    "SamplingParams",
    "WeightSyncError",
    "sample_seed",
]
