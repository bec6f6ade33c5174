"""Mixed groups of samples and their packing into micro-batches.

A *sample* is one prompt + one response: on-policy (sampled by the rollout engine) or off-policy (the expert trace).
Each prompt's samples form a *group* of ``n``: ``n - n_off`` on-policy samples and ``n_off`` copies of its trace
(a prompt without a trace gets ``n`` on-policy samples instead). The engine is asked for exactly these counts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

import torch


@dataclass
class Sample:
    """One prompt + response. Log-prob lists are aligned with ``response_ids``."""

    prompt_index: int  # row of the dataset
    group_id: int  # position of the prompt in this step's batch
    prompt_ids: list[int]
    response_ids: list[int]
    off_policy: bool
    finish_reason: str = "stop"
    rollout_logprobs: list[float] | None = None  # from the engine; None for traces
    reward: float = 0.0
    advantage: float = 0.0
    old_logprobs: list[float] | None = None  # from the policy before this update
    multiplicity: int = 1  # identical samples this one stands for (see compact_samples)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def assemble_groups(
    prompt_indices: list[int],
    prompt_ids: list[list[int]],
    traces: list[list[int] | None],
    rollouts: list[list[tuple[list[int], list[float], str]]],
    n_off: int,
) -> list[Sample]:
    """Mixed groups: per prompt its on-policy rollouts then ``n_off`` copies of its trace (when it has one).

    ``rollouts[i]`` holds (output ids, engine log-probs, finish reason) of prompt i: ``n`` of them for a prompt
    without a trace, ``n - n_off`` for one with a trace (the loop asks the engine for exactly these counts).
    """
    samples: list[Sample] = []
    for gid, (pidx, pids, trace, outs) in enumerate(zip(prompt_indices, prompt_ids, traces, rollouts)):
        for ids, logprobs, reason in outs:
            samples.append(Sample(pidx, gid, pids, list(ids), False, reason, list(logprobs)))
        if trace is not None:
            for _ in range(n_off):
                samples.append(Sample(pidx, gid, pids, list(trace), True, "stop"))
    return samples


@dataclass
class MicroBatch:
    """Right-padded tensors of a few samples; position t predicts token t + 1.

    All [b, L] with L the longest sample of this micro-batch (never the max response length): ``tokens``,
    ``position_ids``, ``targets`` (token t + 1), ``response_mask`` (target is a response token), ``off_policy_mask``,
    ``advantages``, ``old_logprobs`` (0 where unknown), ``rollout_logprobs`` (0 where unknown),
    ``has_rollout_logprobs`` and ``multiplicity`` (the row's sample multiplicity, 0 on padding rows).
    """

    sample_ids: list[int]
    tokens: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor
    off_policy_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    rollout_logprobs: torch.Tensor
    has_rollout_logprobs: torch.Tensor
    multiplicity: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def compact_samples(samples: list[Sample], drop_zero_advantage: bool) -> list[Sample]:
    """The samples the update needs, each once: identical ones merged into one with their count as ``multiplicity``.

    Identical means the same prompt, response, kind (trace or not), advantage and old log-probs, so every loss term
    and metric of the merged sample, weighted by its multiplicity, equals the sum over the copies (the train-vs-rollout
    log-prob gap uses the first copy's engine log-probs). With ``drop_zero_advantage`` samples whose advantage is
    exactly 0 are left out; the caller passes it only when their loss and gradient are provably 0.
    """
    merged: dict[tuple, Sample] = {}
    for s in samples:
        if drop_zero_advantage and s.advantage == 0.0:
            continue
        key = (
            tuple(s.prompt_ids),
            tuple(s.response_ids),
            s.off_policy,
            s.advantage,
            None if s.old_logprobs is None else tuple(s.old_logprobs),
        )
        if key in merged:
            merged[key].multiplicity += s.multiplicity
        else:
            merged[key] = replace(s)
    return list(merged.values())


def make_micro_batch(samples: list[Sample], sample_ids: list[int], pad_id: int) -> MicroBatch:
    """Right-padded tensors of ``samples[i] for i in sample_ids``."""
    rows = [samples[i] for i in sample_ids]
    # An empty micro-batch (a rank with fewer samples than micro-batches) is one fully masked row of padding.
    length = max((s.num_tokens for s in rows), default=2)
    b = max(len(rows), 1)

    def padded(values: list, start: int, fill: float | int) -> list:
        return [fill] * start + values + [fill] * (length - start - len(values))

    tokens = torch.tensor([padded(s.prompt_ids + s.response_ids, 0, pad_id) for s in rows] or [[pad_id] * length])
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    # Position t predicts token t + 1: the response's targets sit at positions [p - 1, p - 1 + r).
    starts = torch.tensor([len(s.prompt_ids) - 1 for s in rows] or [0]).unsqueeze(1)
    ends = starts + torch.tensor([len(s.response_ids) for s in rows] or [0]).unsqueeze(1)
    positions = torch.arange(length).unsqueeze(0).expand(b, length).contiguous()
    resp = (positions >= starts) & (positions < ends)

    def per_row(values: list) -> torch.Tensor:
        return torch.tensor(values or [0], dtype=torch.float32).unsqueeze(1)

    def spans(attr: str) -> torch.Tensor:
        vals = [padded(getattr(s, attr) or [], len(s.prompt_ids) - 1, 0.0) for s in rows]
        return torch.tensor(vals or [[0.0] * length], dtype=torch.float32)

    off = resp & per_row([float(s.off_policy) for s in rows]).bool()
    adv = resp * per_row([s.advantage for s in rows])
    has_roll = resp & per_row([float(s.rollout_logprobs is not None) for s in rows]).bool()
    old, roll = spans("old_logprobs"), spans("rollout_logprobs")
    mult = per_row([float(s.multiplicity) for s in rows]).expand(b, length).contiguous()
    return MicroBatch(sample_ids, tokens, positions, targets, resp, off, adv, old, roll, has_roll, mult)


def pad_micro_batch(mb: MicroBatch, shape: tuple[int, int], pad_id: int) -> MicroBatch:
    """``mb`` right-padded to ``shape`` = (rows, length) with fully masked padding."""
    rows, length = shape
    b, n = mb.tokens.shape

    def pad(t: torch.Tensor, value: float | int | bool) -> torch.Tensor:
        out = torch.full((rows, length), value, dtype=t.dtype)
        out[:b, :n] = t
        return out

    positions = torch.arange(length).unsqueeze(0).expand(rows, length).contiguous()
    return MicroBatch(
        mb.sample_ids,
        pad(mb.tokens, pad_id),
        positions,
        pad(mb.targets, pad_id),
        pad(mb.response_mask, False),
        pad(mb.off_policy_mask, False),
        pad(mb.advantages, 0.0),
        pad(mb.old_logprobs, 0.0),
        pad(mb.rollout_logprobs, 0.0),
        pad(mb.has_rollout_logprobs, False),
        pad(mb.multiplicity, 0.0),
    )


def pack_micro_batches(
    lengths: list[int],
    max_tokens: int,
    num_ranks: int,
    *,
    packed: bool = False,
    alignment: int = 1,
    count_multiple: int = 1,
) -> list[list[list[int]]]:
    """Split samples over data-parallel ranks and micro-batches by a token budget.

    Returns ``plan[rank][micro_batch] -> sample ids``. Every rank gets the same number of micro-batches (the pipeline
    schedules need it), a multiple of ``count_multiple`` (the interleaved schedule needs a multiple of PP). Samples
    are dealt to ranks longest-first onto the rank with the fewest tokens (balances work across ranks). A
    micro-batch stays within ``max_tokens`` unless a single sample is longer; it costs ``len(samples) * longest
    sample`` tokens (right padding; consecutive samples sorted by length, so padding is small) or, with ``packed``,
    the sum of its samples (one packed row; samples placed first-fit, longest first); either length rounded up to
    ``alignment``.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rank_samples: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0] * num_ranks
    for i in order:
        r = min(range(num_ranks), key=lambda k: (load[k], len(rank_samples[k])))
        rank_samples[r].append(i)
        load[r] += lengths[i]

    def split(ids: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        for i in ids:  # longest first, so the first sample of a batch sets its padded length
            if current and (len(current) + 1) * round_up(lengths[current[0]], alignment) > max_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def first_fit(ids: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        loads: list[int] = []
        for i in ids:
            fits = (k for k, used in enumerate(loads) if round_up(used + lengths[i], alignment) <= max_tokens)
            k = next(fits, len(batches))
            if k == len(batches):
                batches.append([])
                loads.append(0)
            batches[k].append(i)
            loads[k] += lengths[i]
        return batches

    plan = [(first_fit if packed else split)(ids) for ids in rank_samples]
    target = round_up(max(1, max(len(p) for p in plan)), count_multiple)
    for p in plan:  # equalise the count: split the largest micro-batches until every rank has `target`
        while len(p) < target:
            big = max(range(len(p)), key=lambda k: len(p[k])) if p else None
            if big is None or len(p[big]) < 2:
                p.append([])
                continue
            half = len(p[big]) // 2
            p.insert(big + 1, p[big][half:])
            p[big] = p[big][:half]
    return plan


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def by_group(samples: list[Sample]) -> list[list[Sample]]:
    """The samples of each group (prompt), in order of group id; each group keeps its samples' order."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group_id].append(s)
    return [groups[g] for g in sorted(groups)]


def split_mini_batches(samples: list[Sample], num: int) -> list[list[Sample]]:
    """Consecutive groups of prompts (a group is never split across optimiser steps)."""
    groups = by_group(samples)
    per = math.ceil(len(groups) / num)
    return [[s for g in groups[i : i + per] for s in g] for i in range(0, len(groups), per)]


def group_metrics(samples: list[Sample]) -> dict[str, float]:
    """Rewards of on-policy samples and traces, solved-all / solved-none groups, response lengths."""
    on = [s for s in samples if not s.off_policy]
    off = [s for s in samples if s.off_policy]
    groups: dict[int, list[float]] = defaultdict(list)
    for s in on:
        groups[s.group_id].append(s.reward)
    lengths = [len(s.response_ids) for s in on]
    out = {
        "reward/on_policy": mean_or_zero([s.reward for s in on]),
        "reward/off_policy": mean_or_zero([s.reward for s in off]),
        "reward/all": mean_or_zero([s.reward for s in samples]),
        "groups/solved_all": mean_or_zero([float(min(g) == 1.0) for g in groups.values()]),
        "groups/solved_none": mean_or_zero([float(max(g) == 0.0) for g in groups.values()]),
        "response/length_mean": mean_or_zero(lengths),
        "response/length_max": float(max(lengths, default=0)),
        "response/truncated": mean_or_zero([float(s.finish_reason == "length") for s in on]),
        "response/off_policy_length_mean": mean_or_zero([len(s.response_ids) for s in off]),
    }
    return out


def mean_or_zero(values: list[float]) -> float:
    """The mean, 0.0 for no values (a metric of an empty set)."""
    return sum(values) / len(values) if values else 0.0
