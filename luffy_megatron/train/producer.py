"""The producer of a step's batch (global rank 0): rollout -> reward -> advantages, and the engine's weights.

One scored round: the next prompts, ``n - n_off`` rollouts per prompt with a trace and ``n`` per prompt without,
assembled into mixed groups with ``n_off`` trace copies, verifier rewards (memoised), group-normalised advantages.
With ``algorithm.dynamic_sampling`` rounds repeat until the batch is full of groups with signal
(:mod:`luffy_megatron.train.dynamic_sampling`). :func:`sync_weights` streams the policy's weights into the engine.

One-step-off asynchronous rollout (``trainer.async_rollout``): while the policy trains on step k's batch, a background
thread of global rank 0 (:class:`RolloutPrefetcher`) generates and scores step k + 1's batch with the engine's
weights, those of step k - 1. At the next step boundary the loop waits for that batch, pushes the weights of step k
into the engine and starts step k + 2's rollout, so a batch is at most one update behind the policy that trains on it
(``rollout/weight_staleness``; the first step's batch is generated before any update and is not stale). The on-policy
tokens are then off by one update: ``algorithm.rollout_is`` corrects for it with the engine's log-probs as behaviour
policy.

Where generation runs: SGLang servers are separate processes already (they must not be colocated); the in-process HF
engine moves into a child process with its own torch threads (:class:`~luffy_megatron.rollout.process_engine.
ProcessEngine`). A rollout or reward failure in the background reaches the loop at the next boundary and stops the run
there, as in the synchronous loop. A checkpoint waits for the batch in flight and global rank 0 writes it (samples,
rewards, advantages, metrics) into the checkpoint as flat binary arrays (:data:`PENDING_FILE`); a resumed run trains
on that batch and continues exactly.

The scored samples become the step's :class:`~luffy_megatron.train.step_batch.StepBatch` here, on rank 0 (in the
background thread when the rollout is asynchronous): nothing after the producer handles samples one by one.

Timeline: every step logs ``timeline/generate_start``, ``timeline/generate_end`` (its batch's rollout + reward),
``timeline/update_start`` and ``timeline/update_end`` (epoch seconds); ``tools/plot_metrics.py --timeline`` draws them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from luffy_megatron.algo import compute_advantages
from luffy_megatron.config import AlgorithmConfig, OnPolicyBaseline, RunConfig
from luffy_megatron.convert.export import iter_hf_weights
from luffy_megatron.eval.score import response_texts
from luffy_megatron.metrics.logger import Timers
from luffy_megatron.platform import rank0_call
from luffy_megatron.rollout.base import SamplingParams
from luffy_megatron.train.checkpoint import should_save
from luffy_megatron.train.dynamic_sampling import collect_groups, round_seed
from luffy_megatron.train.samples import Sample, assemble_groups, group_metrics
from luffy_megatron.train.step_batch import StepBatch
from luffy_megatron.train.transport import load_batch, save_batch

if TYPE_CHECKING:
    from luffy_megatron.train.run_state import RunState

Produce = Callable[[], tuple[StepBatch, dict[str, float]]]
#: The asynchronous run's batch in flight, in a checkpoint folder (written by global rank 0 alone).
PENDING_FILE = "pending_rollout.npz"


@dataclass
class ScoredBatch:
    """A scored rollout batch for RL step ``step``, generated with the weights after ``weights_step`` updates."""

    step: int
    weights_step: int
    batch: StepBatch
    metrics: dict[str, float]


def produce_batch(step: int, weights_step: int, produce: Produce) -> ScoredBatch:
    """Run ``produce`` and stamp the batch with its generation window."""
    start = time.time()
    batch, metrics = produce()
    window = {"timeline/generate_start": start, "timeline/generate_end": time.time()}
    return ScoredBatch(step, weights_step, batch, {**metrics, **window})


class RolloutPrefetcher:
    """At most one :class:`ScoredBatch` in flight in a background thread (global rank 0)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="luffy-rollout")
        self._future: Future | None = None
        self._ready: ScoredBatch | None = None

    def start(self, step: int, weights_step: int, produce: Produce) -> None:
        """Begin producing step ``step``'s batch; the previous one must have been taken."""
        if self._future is not None or self._ready is not None:
            raise RuntimeError(f"a rollout batch is already in flight; cannot start step {step}'s")
        self._future = self._executor.submit(produce_batch, step, weights_step, produce)

    def wait(self) -> None:
        """Block until the batch in flight is ready; re-raises its failure."""
        if self._future is not None:
            future, self._future = self._future, None
            self._ready = future.result()

    def take(self, step: int) -> ScoredBatch | None:
        """Step ``step``'s batch (waiting for it), or None when none was started or recorded for that step."""
        self.wait()
        if self._ready is None or self._ready.step != step:
            return None
        batch, self._ready = self._ready, None
        return batch

    def save(self, folder: Path) -> dict[str, Any] | None:
        """Write the batch in flight (waiting for it) to ``folder/PENDING_FILE`` as the flat arrays of
        :func:`~luffy_megatron.train.transport.save_batch` (binary, floats bit-exact); return its small record for
        the trainer state, None when there is no batch."""
        self.wait()
        if self._ready is None:
            return None
        save_batch(self._ready.batch, folder / PENDING_FILE)
        batch = self._ready
        return {"step": batch.step, "weights_step": batch.weights_step, "metrics": batch.metrics, "file": PENDING_FILE}

    def load(self, folder: Path, record: dict[str, Any] | None) -> None:
        """Restore a batch written by :meth:`save` into ``folder`` (its record from the trainer state)."""
        if record is None:
            return
        batch = load_batch(folder / record["file"])
        self._ready = ScoredBatch(int(record["step"]), int(record["weights_step"]), batch, dict(record["metrics"]))

    def close(self) -> None:
        """Wait for the background thread to finish (close the engine first so that it cannot block) and drop it."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._future = None


# ----------------------------------------------------------------------------------------------------------------
# The batch of a step, and the engine's weights
# ----------------------------------------------------------------------------------------------------------------
def take_rollout(cfg: RunConfig, run: RunState, timers: Timers) -> tuple[StepBatch, dict[str, float]]:
    """Global rank 0: this step's scored batch, the one produced in the background (async) or one produced now."""
    batch = None
    if run.prefetch is not None:
        with timers("rollout_wait"):
            batch = run.prefetch.take(run.step)
    if batch is None:
        batch = produce_batch(run.step, run.engine_step, partial(rollout_and_score, cfg, run, timers, run.step))
    return batch.batch, {**batch.metrics, "rollout/weight_staleness": float(run.step - 1 - batch.weights_step)}


def start_next_rollout(cfg: RunConfig, run: RunState, policy) -> None:
    """Async rollout, at the start of a step: the engine gets the weights after ``step - 1`` updates (every rank),
    then rank 0 starts producing the next step's batch in the background."""
    if run.engine_step < run.step - 1:
        sync_weights(run, policy, updates=run.step - 1)
    # After the last step only when a checkpoint follows: it records the batch so that a longer resumed run is exact.
    if run.prefetch is None or (run.step >= cfg.trainer.total_steps and not should_save(cfg, run.step)):
        return
    step = run.step + 1

    def produce() -> tuple[StepBatch, dict[str, float]]:
        timers = Timers()
        batch, metrics = rollout_and_score(cfg, run, timers, step)
        return batch, {**metrics, **{f"time/{k}_s": v for k, v in timers.seconds.items()}}

    run.prefetch.start(step, run.engine_step, produce)


def settle_engine(cfg: RunConfig, run: RunState, policy) -> None:
    """Async rollout: wait for the batch in flight, then give the engine this step's weights (every rank)."""
    if not cfg.trainer.async_rollout:
        return
    rank0_call(lambda: run.prefetch.wait(), f"step {run.step + 1}: rollout or reward")
    if run.engine_step < run.step:
        sync_weights(run, policy)


def sync_weights(run: RunState, policy, updates: int | None = None) -> None:
    """Stream the policy's weights (HF names, full tensors) into the rollout engine; every rank takes part.
    ``updates``: the RL steps these weights contain (default ``run.step``)."""
    run.weight_version += 1
    run.engine_step = run.step if updates is None else updates
    stream = (pair for bucket in iter_hf_weights(policy.modules, policy.spec) for pair in bucket)
    if run.engine is not None:  # colocated servers take back their memory inside the update, weights first
        run.engine.update_weights(stream, version=run.weight_version)
    else:
        for _ in stream:  # the collectives of the gather need every rank
            pass


# ----------------------------------------------------------------------------------------------------------------
# Rollout -> reward -> advantages
# ----------------------------------------------------------------------------------------------------------------
def rollout_and_score(cfg: RunConfig, run: RunState, timers: Timers, step: int) -> tuple[StepBatch, dict]:
    """Global rank 0's part of a step: one scored round (or, with dynamic sampling, rounds until the batch is full of
    groups with signal) as the step's batch, and the group metrics."""
    a = cfg.algorithm

    def draw(round_index: int) -> tuple[list[Sample], dict[str, float]]:
        return score_round(cfg, run, timers, step, round_index)

    if a.dynamic_sampling:
        target, rounds, signal = cfg.data.train_batch_size, a.dynamic_sampling_max_rounds, a.dynamic_sampling_signal
        samples, extra = collect_groups(draw, target, rounds, signal)
    else:
        samples, extra = draw(0)
    return StepBatch.from_samples(samples), {**group_metrics(samples), **extra, **run.engine.step_metrics()}


def score_round(
    cfg: RunConfig, run: RunState, timers: Timers, step: int, round_index: int
) -> tuple[list[Sample], dict[str, float]]:
    """Next batch of prompts: rollouts, rewards, advantages; plus the ``rollout/samples_*`` counts."""
    batch = run.dataset.get_batch(next(run.sampler).indices)
    with timers("rollout"):
        samples, counts = generate_groups(cfg, run, batch, step, round_index)
    with timers("reward"):
        rewards = score_samples(run, samples, batch)
    assign_advantages(cfg.algorithm, samples, rewards)
    return samples, counts


def generate_groups(
    cfg: RunConfig, run: RunState, batch: list, step: int, round_index: int = 0
) -> tuple[list[Sample], dict[str, float]]:
    """Exactly the samples the groups use (``n - n_off`` per prompt with a trace, ``n`` otherwise), assembled with
    the trace copies; plus the ``rollout/samples_*`` counts. Each dynamic-sampling round has its own seed."""
    r = cfg.rollout
    seed = round_seed(r.seed * 1_000_003 + step, round_index)
    params = SamplingParams.from_config(r, cfg.data.max_response_length, seed=seed)
    traces = [item.trace_ids if r.n_off > 0 else None for item in batch]
    counts = [r.n if t is None else r.n - r.n_off for t in traces]
    if round_index > 0:  # an earlier round of this step released colocated servers
        run.engine.resume_memory()
    outputs = run.engine.generate([item.prompt_ids for item in batch], params, counts)
    run.engine.release_memory()  # colocated servers give the GPUs to Megatron until the weight sync
    rollouts = [[(o.output_ids, o.logprobs, o.finish_reason) for o in outs] for outs in outputs]
    indices, prompts = [item.index for item in batch], [item.prompt_ids for item in batch]
    samples = assemble_groups(indices, prompts, traces, rollouts, r.n_off)
    generated = float(sum(len(outs) for outs in outputs))
    used = float(sum(1 for s in samples if not s.off_policy))
    return samples, {"rollout/samples_generated": generated, "rollout/samples_discarded": generated - used}


def score_samples(run: RunState, samples: list[Sample], batch: list) -> list[float]:
    """Verifier rewards, memoised on (response text, ground truth): repeated answers are scored once."""
    by_group = {i: item for i, item in enumerate(batch)}
    texts = response_texts(run.tokenizer, [s.response_ids for s in samples], [s.finish_reason for s in samples])
    keys = [
        (t, by_group[s.group_id].ground_truth, by_group[s.group_id].prompt_ends_with_think)
        for t, s in zip(texts, samples)
    ]
    return run.reward_memo.rewards(
        keys, lambda todo: run.rewards.score([k[0] for k in todo], [k[1] for k in todo], [k[2] for k in todo])
    )


def assign_advantages(a: AlgorithmConfig, samples: list[Sample], rewards: list[float]) -> None:
    """Set each sample's reward and its group-normalised advantage (the statistics ``a`` asks for)."""
    off = torch.tensor([s.off_policy for s in samples])
    adv = compute_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor([s.group_id for s in samples]),
        use_std=a.adv_use_std,
        eps=a.adv_eps,
        # The "RL with SFT loss" ablation baselines on-policy samples only (the paper's grpo_split).
        stat_mask=~off if a.sft_loss else None,
        baseline_mask=~off if a.on_policy_baseline == OnPolicyBaseline.ON_POLICY_MEAN else None,
    )
    for s, r, value in zip(samples, rewards, adv.tolist()):
        s.reward, s.advantage = r, value
