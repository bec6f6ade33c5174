"""Checkpoint conversion HF <-> Megatron at any TP/PP, and the streamed Megatron -> HF weight export.

- :func:`load_hf_weights`: HF folder -> live sharded model (the trainer starts from an HF folder with it).
- :func:`save_megatron_checkpoint` / :func:`load_megatron_checkpoint`: layout-free ``dist_checkpointing`` files.
- :func:`iter_hf_weights`: live sharded model -> buckets of (HF name, full tensor); conversion and rollout weight
  sync both use it.
- :func:`convert_hf_to_megatron` / :func:`convert_megatron_to_hf`: what the tools in ``tools/`` run.
"""

from luffy_megatron.convert.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf, write_hf_folder
from luffy_megatron.convert.export import iter_hf_weights, save_hf_checkpoint
from luffy_megatron.convert.load import (
    load_hf_weights,
    load_megatron_checkpoint,
    read_checkpoint_metadata,
    save_megatron_checkpoint,
)
from luffy_megatron.convert.mapping import ConversionError

__all__ = [
    "ConversionError",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "iter_hf_weights",
    "load_hf_weights",
    "load_megatron_checkpoint",
    "read_checkpoint_metadata",
    "save_hf_checkpoint",
    "save_megatron_checkpoint",
    "write_hf_folder",
]
