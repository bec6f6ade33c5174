"""The norms of megatron-core's local spec (the CPU path), also under sequence parallelism.

With ``sequence_parallel`` each tensor-parallel rank normalises its own slice of the sequence, so a norm weight's
gradient on one rank covers only that slice; megatron's ``finalize_model_grads`` sums the gradients of parameters
marked ``sequence_parallel`` over the TP ranks. transformer-engine's and apex's norms mark their weights; the torch
norms of the local spec (``WrappedTorchNorm``) do not, and refuse the setting instead. :class:`LocalNorm` builds the
same torch norm and marks its parameters.

megatron-core is imported at module level: this module is imported only by the model builder, after
``luffy_megatron`` has prepared the megatron import.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["LocalNorm"]


class LocalNorm:
    """``WrappedTorchNorm`` (same arguments, same torch module) whose parameters carry ``sequence_parallel``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> torch.nn.Module:
        plain = copy.copy(config)  # a shallow copy: TransformerConfig's checks do not run again
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
