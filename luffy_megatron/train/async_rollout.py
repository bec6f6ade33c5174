"""One-step-off asynchronous rollout (``trainer.async_rollout``).

While the policy trains on step k's batch, a background thread of global rank 0 generates and scores step k + 1's
batch with the engine's weights, those of step k - 1. At the next step boundary the loop waits for that batch, pushes
the weights of step k into the engine and starts step k + 2's rollout, so a batch is at most one update behind the
policy that trains on it (``rollout/weight_staleness``; the first step's batch is generated before any update and is
not stale). The on-policy tokens are then off by one update: ``algorithm.rollout_is`` corrects for it with the
engine's log-probs as behaviour policy.

Where generation runs: SGLang servers are separate processes already (they must not be colocated); the in-process HF
engine moves into a child process with its own torch threads (:class:`~luffy_megatron.rollout.process_engine.
ProcessEngine`). A rollout or reward failure in the background reaches the loop at the next boundary and stops the run
there, as in the synchronous loop. A checkpoint waits for the batch in flight and records it (samples, rewards,
advantages, metrics) in its trainer state; a resumed run trains on that batch and continues exactly.

Timeline: every step logs ``timeline/generate_start``, ``timeline/generate_end`` (its batch's rollout + reward),
``timeline/update_start`` and ``timeline/update_end`` (epoch seconds); ``tools/plot_metrics.py --timeline`` draws them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from luffy_megatron.config import RunConfig
from luffy_megatron.rollout.base import RolloutEngine
from luffy_megatron.rollout.factory import build_rollout_engine
from luffy_megatron.rollout.process_engine import ProcessEngine
from luffy_megatron.train.samples import Sample

Produce = Callable[[], tuple[list[Sample], dict[str, float]]]


@dataclass
class ScoredBatch:
    """A scored rollout batch for RL step ``step``, generated with the weights after ``weights_step`` updates."""

    step: int
    weights_step: int
    samples: list[Sample]
    metrics: dict[str, float]


def produce_batch(step: int, weights_step: int, produce: Produce) -> ScoredBatch:
    """Run ``produce`` and stamp the batch with its generation window."""
    start = time.time()
    samples, metrics = produce()
    window = {"timeline/generate_start": start, "timeline/generate_end": time.time()}
    return ScoredBatch(step, weights_step, samples, {**metrics, **window})


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

    def state_dict(self) -> dict[str, Any] | None:
        """The batch in flight, as plain JSON-able values (waits for it); None when there is none."""
        self.wait()
        return None if self._ready is None else asdict(self._ready)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a batch recorded by :meth:`state_dict`."""
        if state is None:
            return
        samples = [Sample(**s) for s in state["samples"]]
        self._ready = ScoredBatch(int(state["step"]), int(state["weights_step"]), samples, dict(state["metrics"]))

    def close(self) -> None:
        """Wait for the background thread to finish (close the engine first so that it cannot block) and drop it."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._future = None


def build_engine(cfg: RunConfig) -> RolloutEngine:
    """The rollout engine of a run: with ``trainer.async_rollout`` the HF engine runs in its own process."""
    if cfg.trainer.async_rollout and cfg.rollout.backend == "hf":
        return ProcessEngine(cfg.model.hf_path, num_threads=cfg.trainer.async_rollout_threads,
                             batch_size=cfg.rollout.hf_batch_size)  # fmt: skip
    log_dir = str(Path(cfg.logging.out_dir) / "rollout_servers")  # the logs of servers and router this run launches
    return build_rollout_engine(cfg.rollout, cfg.model.hf_path, fault_tolerance=cfg.fault_tolerance, log_dir=log_dir)
