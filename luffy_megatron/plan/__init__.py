"""``luffy-plan``: per-GPU memory of training layouts (exact static bytes, modelled activations) and which fit."""

from luffy_megatron.plan.memory import Layout, MicroBatch, activation_bytes, static_bytes
from luffy_megatron.plan.search import PlanInputs, plan
from luffy_megatron.plan.shapes import ModelShape, load_shape

__all__ = ["Layout", "MicroBatch", "ModelShape", "PlanInputs", "activation_bytes", "load_shape", "plan", "static_bytes"]
