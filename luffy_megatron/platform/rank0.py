"""Run a step on one rank (or on every rank) so that its result, or its failure, reaches every rank.

A failure that stays on the rank where it happened leaves the other ranks waiting forever in their next collective.
The rank where the failure happened re-raises the original exception (its type and traceback are the useful ones);
every other rank raises :class:`RankFailure`, whose one-line message names the step, the rank and the cause.
Without an initialised process group (or with one process) both functions are plain calls.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


class RankFailure(RuntimeError):
    """``what`` failed on rank ``origin`` (not this one); the message carries the original type and text."""

    def __init__(self, what: str, origin: int, cause: str, note: str = "") -> None:
        super().__init__(f"{what} failed on rank {origin} ({cause}){f'; {note}' if note else ''}")
        self.origin = origin


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def single_process() -> bool:
    """True without a process group or with a group of one: nothing to send."""
    return not dist.is_initialized() or dist.get_world_size() == 1


def rank0_call(fn: Callable[[], T], what: str, note: str = "") -> T:
    """Run ``fn()`` on global rank 0 and return its result on every rank (collective: every rank calls it).

    If ``fn`` raises, rank 0 re-raises it and every other rank raises :class:`RankFailure` ("``what`` failed on
    rank 0 (Type: message); ``note``"). The result must be picklable.
    """
    if single_process():
        return fn()
    box: list[Any] = [None]
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:  # re-raised below; the others learn of it through the broadcast
            failure = e
            box[0] = (False, describe(e))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if failure is not None:
        raise failure
    if not ok:
        raise RankFailure(what, 0, value, note)
    return value


def every_rank_call(fn: Callable[[], T], what: str, note: str = "") -> T:
    """Run ``fn()`` on every rank and return this rank's result once all of them have succeeded.

    If it raised anywhere, every rank raises: a rank where it failed re-raises its own exception, the others raise
    :class:`RankFailure` naming the lowest failing rank.
    """
    failure: Exception | None = None
    result: T | None = None
    try:
        result = fn()
    except Exception as e:  # gathered below so that no rank waits in a later collective
        failure = e
    if single_process():
        if failure is not None:
            raise failure
        return result  # type: ignore[return-value]
    causes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(causes, None if failure is None else describe(failure))
    if failure is not None:
        raise failure
    for rank, cause in enumerate(causes):
        if cause is not None:
            raise RankFailure(what, rank, cause, note)
    return result  # type: ignore[return-value]


def failed_elsewhere(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, a :class:`RankFailure`: the rank where it happened reports the cause."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, RankFailure):
            return True
        seen = seen.__cause__
    return False


def report_error(prog: str, exc: BaseException) -> None:
    """``prog: error: Type: message`` as one line on stderr, except on ranks where :func:`failed_elsewhere`."""
    if not failed_elsewhere(exc):
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr, flush=True)


def settle(timeout_s: float = 30.0) -> None:
    """Wait (at most ``timeout_s``) until every rank gets here, so that the rank that reports a failure is not killed
    by the launcher (torchrun stops all ranks when the first one exits) before it has printed."""
    if single_process():
        return
    waiter = threading.Thread(target=dist.barrier, daemon=True)
    waiter.start()
    waiter.join(timeout_s)
