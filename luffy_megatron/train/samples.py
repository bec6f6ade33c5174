"""Mixed groups of samples as global rank 0 assembles and scores them, and the plan of micro-batches.

A *sample* is one prompt + one response: on-policy (sampled by the rollout engine) or off-policy (the expert trace).
Each prompt's samples form a *group* of ``n``: ``n - n_off`` on-policy samples and ``n_off`` copies of its trace
(a prompt without a trace gets ``n`` on-policy samples instead). The engine is asked for exactly these counts. Once
scored, a step's samples become one :class:`~luffy_megatron.train.step_batch.StepBatch`, which is what every rank
trains on; :func:`pack_micro_batches` plans its micro-batches from the samples' lengths.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


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
    multiplicity: int = 1  # identical samples this one stands for (see step_batch.compact_batch)

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
