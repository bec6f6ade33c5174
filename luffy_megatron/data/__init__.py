"""Prompt data: LUFFY-schema sources (parquet / HF datasets), tokenisation of prompts and traces, a resumable sampler,
and the synthetic addition task for the CPU demo."""

from luffy_megatron.data.dataset import PromptDataset, PromptItem, apply_system_prompt, strip_think_prefix
from luffy_megatron.data.sampler import PromptSampler, SampledBatch
from luffy_megatron.data.sources import DataError

__all__ = [
    "DataError",
    "PromptDataset",
    "PromptItem",
    "PromptSampler",
    "SampledBatch",
    "apply_system_prompt",
    "strip_think_prefix",
]
