"""LUFFY: mixed-policy GRPO on Megatron-core."""

__version__ = "0.1.0"
