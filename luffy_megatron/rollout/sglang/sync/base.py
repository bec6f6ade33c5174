"""What every weight-sync mode of :class:`~luffy_megatron.rollout.sglang.engine.SGLangEngine` offers the engine."""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from luffy_megatron.rollout.sglang.engine import SGLangEngine

T = TypeVar("T")


class SyncMode:
    """One way to bring a weight stream to every server. The engine frames each :meth:`push` (pause, flush, session,
    memory, continue, version); the mode reads the engine's settings (``client``, ``bucket_bytes``, ``tp_size``, ...)
    at each push, so they may change between updates."""

    #: Whether the loads run inside a weight-update session (``/begin_weight_update`` ... ``/end_weight_update``).
    session = False

    def __init__(self, engine: SGLangEngine) -> None:
        self.engine = engine
        #: Seconds of this mode's own phases in its last push, added to the engine's ``last_sync``.
        self.phases: dict[str, float] = {}

    @property
    def folder(self) -> Path | None:
        """The folder holding the last pushed weights, which a revived server can load (None: only the trainer)."""
        return None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a client coroutine on the engine's loop and wait for it."""
        return self.engine.loop.run(coro)

    def prepare(self, joining: set[str]) -> None:
        """Before an update, the URLs of the servers that join with it (revived ones); nothing to do by default."""

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Load the stream on every server as weight version ``version``; returns the bytes sent."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the mode holds (the engine is closing); nothing by default."""
