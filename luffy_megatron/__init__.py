"""LUFFY: mixed-policy GRPO on Megatron-core."""

from luffy_megatron.megatron_import import prepare_megatron_import

prepare_megatron_import()  # before any module of the package imports megatron-core

__version__ = "0.1.0"
