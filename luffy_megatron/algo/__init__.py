"""The LUFFY algorithm as plain tensor functions: advantages, split-invariant aggregation weights, the mixed-policy
loss, a micro-batch's loss as the trainer computes it, and the fused vocab-parallel log-prob/entropy. See
docs/algorithm.md."""

from .advantages import compute_advantages
from .aggregation import AGG_MODES, GlobalCounts, LossWeights, aggregation_weights, sequence_lengths
from .logprob import vocab_parallel_logprob_entropy
from .loss import MetricSums, mixed_policy_loss
from .micro_batch_loss import LossInputs, micro_batch_loss
from .options import RESHAPES

__all__ = [
    "AGG_MODES",
    "RESHAPES",
    "GlobalCounts",
    "LossInputs",
    "LossWeights",
    "MetricSums",
    "aggregation_weights",
    "compute_advantages",
    "micro_batch_loss",
    "mixed_policy_loss",
    "sequence_lengths",
    "vocab_parallel_logprob_entropy",
]
