"""Stopping for a requeue: Slurm's warning signal before a time limit or preemption, SIGTERM, or a stop file.

Each rank catches ``fault_tolerance.stop_signals`` (the handler only records the signal); global rank 0 also watches
``fault_tolerance.stop_file``, which the sbatch examples create when the batch shell gets ``--signal=B:USR1@N``
(torchrun would die of a SIGUSR1 sent to its process, so the signal never goes to the trainer's step). After every
step all ranks agree whether any of them was asked to stop (:meth:`StopRequest.requested`); the loop then checkpoints
(atomically, see :mod:`luffy_megatron.train.checkpoint`) and :meth:`StopRequest.leave_marker` writes the requeue
marker that tells the batch script to ``scontrol requeue`` the job. The resumed job starts from that checkpoint.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

import torch.distributed as dist

from luffy_megatron.config import FaultToleranceConfig


class StopRequest:
    """Signal handlers and the stop file of one run; :meth:`close` restores the previous handlers."""

    def __init__(self, ft: FaultToleranceConfig, save_dir: str | None) -> None:
        self.reason: str | None = None
        self.stop_file = Path(ft.stop_file) if ft.stop_file else None
        marker = ft.requeue_marker or (str(Path(save_dir) / "REQUEUE") if save_dir else None)
        self.marker = Path(marker) if marker else None
        self._previous = {}
        for name in ft.stop_signals:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reason = self.reason or signal.Signals(signum).name

    def requested(self) -> str | None:
        """Collective (every rank calls it): why the run must stop now (a signal on some rank, or the stop file seen
        by rank 0), or None to go on."""
        local = self.reason
        is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if local is None and is_rank0 and self.stop_file is not None and self.stop_file.exists():
            local = f"stop file {self.stop_file}"
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return local
        reasons: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, local)
        found = [f"{r} on rank {rank}" for rank, r in enumerate(reasons) if r is not None]
        return found[0] if found else None

    def leave_marker(self, step: int, reason: str, checkpoint: Path | None) -> None:
        """On rank 0: write the requeue marker (atomically) naming the step, the cause and the checkpoint."""
        if self.marker is None or (dist.is_initialized() and dist.get_rank() != 0):
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(f"stopped after step {step} ({reason}); resume from {checkpoint}\n")
        os.replace(tmp, self.marker)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
