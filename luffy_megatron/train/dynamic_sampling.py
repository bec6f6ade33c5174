"""Dynamic sampling (DAPO, Yu et al. 2025): leave out groups without a learning signal and refill the batch.

A group *has signal* unless its rewards are all equal. Which rewards count is ``algorithm.dynamic_sampling_signal``:

- ``on_policy`` (default): the group's on-policy samples decide, as in DAPO. A group of 7 failed rollouts and one
  correct trace is left out, although LUFFY would learn from it (the trace's advantage is 7/8, the failures' -1/8).
- ``group``: every member counts, the trace too: that group is kept. Use it to keep LUFFY's off-policy signal on the
  hardest prompts; with ``algorithm.sft_loss`` (on-policy advantages baselined on on-policy samples only) only
  ``on_policy`` leaves out exactly the groups whose policy gradient is zero.

Each round draws a fresh batch of ``data.train_batch_size`` prompts (the sampler advances, so a resumed run continues
with the same prompts) and generates with its own seed; kept groups accumulate until the batch is full or
``algorithm.dynamic_sampling_max_rounds`` rounds ran. The batch is then cut to ``train_batch_size`` groups; a batch
still short after the last round is topped up with filtered groups of the last round (no policy gradient, but the
mini-batch split and the number of optimiser steps stay as configured) and counts them in
``dynamic_sampling/groups_padded``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

from luffy_megatron.config import DynamicSamplingSignal, choices
from luffy_megatron.rollout.base import sample_seed
from luffy_megatron.train.samples import Sample, by_group

#: One generation round: ``round -> (scored samples of a fresh batch, their additive metrics)``.
RoundFn = Callable[[int], tuple[list[Sample], dict[str, float]]]


def has_signal(group: list[Sample], signal: str) -> bool:
    """Whether the rewards that ``signal`` counts (see the module docstring) are not all equal."""
    if signal not in choices(DynamicSamplingSignal):
        raise ValueError(f"dynamic_sampling_signal: {signal!r} is not one of {list(choices(DynamicSamplingSignal))}")
    rewards = {s.reward for s in group if signal == DynamicSamplingSignal.GROUP or not s.off_policy}
    return len(rewards) > 1


def round_seed(step_seed: int, round_index: int) -> int:
    """The rollout seed of generation round ``round_index`` of a step (round 0 keeps the step's own seed)."""
    return step_seed if round_index == 0 else sample_seed(step_seed, -1, round_index)


def collect_groups(draw: RoundFn, target: int, max_rounds: int, signal: str) -> tuple[list[Sample], dict[str, float]]:
    """Groups with signal from up to ``max_rounds`` calls of ``draw``, renumbered ``0 .. target - 1``.

    Returns the samples and the metrics: ``dynamic_sampling/{groups_filtered, rounds, prompts_consumed,
    groups_padded}`` plus the sum over rounds of what ``draw`` reported.
    """
    kept: list[list[Sample]] = []
    filtered: list[list[Sample]] = []
    totals: dict[str, float] = defaultdict(float)
    rounds = consumed = num_filtered = 0
    while len(kept) < target and rounds < max_rounds:
        samples, extra = draw(rounds)
        rounds += 1
        for k, v in extra.items():
            totals[k] += v
        groups = by_group(samples)
        consumed += len(groups)
        filtered = [g for g in groups if not has_signal(g, signal)]
        num_filtered += len(filtered)
        kept.extend(g for g in groups if has_signal(g, signal))
    padded = max(0, target - len(kept))
    chosen = kept[:target] + filtered[:padded]
    out = [replace(s, group_id=gid) for gid, group in enumerate(chosen) for s in group]
    metrics = {
        **totals,
        "dynamic_sampling/groups_filtered": float(num_filtered),
        "dynamic_sampling/rounds": float(rounds),
        "dynamic_sampling/prompts_consumed": float(consumed),
        "dynamic_sampling/groups_padded": float(min(padded, len(filtered))),
    }
    return out, metrics
