"""The ``fault_tolerance`` section of the run configuration: stopping for a requeue, collective timeouts, rollout
servers that die (see docs/training.md, "Long jobs on Slurm")."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class FaultToleranceConfig:
    """How a run survives time limits, preemption and dead rollout servers, and how fast it fails otherwise."""

    # Signals that ask the trainer to finish its current step, checkpoint and leave the requeue marker.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    # A file whose appearance asks the same (the sbatch examples create it on Slurm's warning signal); null = none.
    stop_file: str | None = None
    # Written (step and cause) when the trainer stopped early with a checkpoint; the batch script then requeues.
    # null = <checkpoint.save_dir>/REQUEUE.
    requeue_marker: str | None = None
    # A collective that waits longer fails the rank (a peer hangs); it must cover the longest rollout phase, which
    # the other ranks spend waiting for rank 0.
    collective_timeout_min: float = 30.0
    # Rollout servers (SGLang): health-check timeout, and how long the run may have no healthy server before it fails.
    health_timeout_s: float = 10.0
    servers_grace_s: float = 600.0
    # Restart a launched server that died (servers given as URLs are waited for instead).
    restart_servers: bool = True


def validate_fault_tolerance(ft: FaultToleranceConfig, fail: Callable[[str, str], None]) -> None:
    """Check the section; ``fail(key, message)`` raises the configuration error."""
    for name in ft.stop_signals:
        if not isinstance(getattr(signal, name, None), signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            fail("fault_tolerance.stop_signals", f"{name!r} is not a signal that can be caught (e.g. SIGUSR1)")
    for name in ("collective_timeout_min", "health_timeout_s", "servers_grace_s"):
        if getattr(ft, name) <= 0:
            fail(f"fault_tolerance.{name}", f"must be positive, got {getattr(ft, name)}")
