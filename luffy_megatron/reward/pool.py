"""A process pool that scores responses with :func:`score_detailed`, surviving hung and crashing workers.

math-verify relies on ``signal`` timers, which only work in a process's main thread, so scoring runs in worker
processes. The pool sends chunks of items (not one item per round trip), likely-slow items (long ground truths)
first, and shrinks the chunks as the batch drains so that the last ones do not leave a worker idle while another
finishes; each worker reports every finished item at once, so the parent always knows which item a worker is on and
since when. Per item the worker enforces the soft budget ``timeout_s`` itself (score 0, ``stats.timeouts``); the
parent enforces a hard deadline of ``timeout_s + hard_margin_s``: a worker past it, or one that died, is killed and
replaced, its current item scores 0 (``stats.hung`` / ``stats.crashes``) and the rest of its chunk goes back to the
queue. A step therefore never stalls.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from luffy_megatron.config import RewardConfig
from luffy_megatron.reward.math_reward import (
    CORRECT,
    CRASH,
    ERROR,
    FORMAT_ERROR,
    HUNG,
    TIMEOUT,
    RewardResult,
    score_detailed,
)

logger = logging.getLogger(__name__)

Item = tuple[int, str, str, bool]  # (position in the batch, response, ground truth, prompt_ends_with_think)


@dataclass
class RewardStats:
    """Cumulative counters over the pool's lifetime."""

    items: int = 0
    correct: int = 0
    format_errors: int = 0
    timeouts: int = 0  # soft budget ran out inside a worker
    hung: int = 0  # worker ignored the budget and was killed
    crashes: int = 0  # worker process died
    errors: int = 0  # unexpected exceptions inside math-verify
    workers_started: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _worker_main(conn: Connection, timeout_s: float, require_think: bool, choices: bool) -> None:
    """Worker loop: receive ``(batch_id, items)``, send ``(batch_id, position, score, status)`` after each item;
    None stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    score_detailed("<think></think>\\boxed{1}", "1", False, None)  # warm-up: imports sympy / math-verify
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        batch_id, items = chunk
        for pos, response, truth, think in items:
            res = score_detailed(response, truth, think, timeout_s, require_think, choices)
            conn.send((batch_id, pos, res.score, res.status))


class _Worker:
    def __init__(self, ctx: Any, args: tuple) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.chunk: deque[Item] = deque()
        self.item_started = time.monotonic()  # when the current item (or the start-up) began

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardPool:
    """Score responses in ``config.num_workers`` processes; results come back in input order.

    Example::

        with RewardPool(RewardConfig(num_workers=2, timeout_s=5)) as pool:
            rewards = pool.score(responses, ground_truths, prompt_ends_with_think)
    """

    def __init__(
        self,
        config: RewardConfig,
        hard_margin_s: float = 0.5,
        chunk_size: int | None = None,
        start_method: str | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        """``hard_margin_s``: grace after ``timeout_s`` before a worker is killed. ``chunk_size``: most items per
        message (None = a batch split into about 16 chunks per worker); near the end of a batch chunks shrink to
        ``ceil(unassigned / (2 * num_workers))`` items, for balance. ``start_method``: multiprocessing start
        method (None = ``forkserver`` on Linux: safe from threaded/CUDA parents, fast respawns with math-verify
        preloaded).
        """
        if config.num_workers < 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {config.num_workers}")
        self.config = config
        self.hard_margin_s = hard_margin_s
        self.chunk_size = chunk_size
        self.startup_timeout_s = startup_timeout_s
        method = start_method or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            self._ctx.set_forkserver_preload(["luffy_megatron.reward.math_reward", "math_verify"])
        self._args = (float(config.timeout_s), config.require_think_format, config.allow_choice_letters)
        self.stats = RewardStats()
        self._start_failures = 0
        self._batch_id = 0  # results of an interrupted earlier call are recognised and dropped
        self._workers: list[_Worker] = [self._spawn() for _ in range(config.num_workers)]
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        self.stats.workers_started += 1
        return _Worker(self._ctx, self._args)

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for w in self._workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(None)
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every worker has imported math-verify and said so (default budget: ``startup_timeout_s``).

        Scoring does not need this (it starts on whichever workers are ready); it lets a caller overlap the pool's
        start-up with other work and then make sure it is done.
        """
        budget = self.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        for w in self._workers:
            while not w.ready:
                if not w.proc.is_alive():
                    raise RuntimeError(f"reward worker pid {w.proc.pid} exited during start-up")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"reward workers not ready after {budget:.0f} s")
                if w.conn.poll(min(left, 0.5)):
                    self._drain(w, [], time.monotonic())

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    # -- scoring ---------------------------------------------------------------------------------------------------

    def score(self, responses: list[str], ground_truths: list[str], prompt_ends_with_think: list[bool]) -> list[float]:
        """Rewards (1.0 / 0.0) in the order of ``responses``."""
        return [r.score for r in self.score_detailed(responses, ground_truths, prompt_ends_with_think)]

    def score_detailed(
        self, responses: list[str], ground_truths: list[str], prompt_ends_with_think: list[bool]
    ) -> list[RewardResult]:
        """Like :meth:`score` with the status of every item (correct, incorrect, format_error, timeout, hung, ...)."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        n = len(responses)
        if len(ground_truths) != n or len(prompt_ends_with_think) != n:
            raise ValueError(
                f"lengths differ: {n} responses, {len(ground_truths)} ground truths, "
                f"{len(prompt_ends_with_think)} prompt_ends_with_think flags"
            )
        for i, (r, g) in enumerate(zip(responses, ground_truths)):
            if not isinstance(r, str) or not isinstance(g, str):
                raise TypeError(f"item {i}: response and ground truth must be str, got {type(r)} and {type(g)}")
        results: list[RewardResult | None] = [None] * n
        if n:
            # Longest-processing-time-first: symbolic comparison cost grows with the ground truth's size (a timeout
            # is nearly always a long LaTeX expression), so long ground truths go out first and the cheap items fill
            # the tail. Equal ground truths stay adjacent (the stable sort keeps a group together), as in a serial pass.
            order = sorted(range(n), key=lambda i: (-len(ground_truths[i]), ground_truths[i]))
            items = [(i, responses[i], ground_truths[i], bool(prompt_ends_with_think[i])) for i in order]
            max_chunk = self.chunk_size or max(1, -(-n // (16 * len(self._workers))))
            self._batch_id += 1
            try:
                self._run(deque(items), results, max_chunk)
            except BaseException:  # e.g. KeyboardInterrupt: busy workers would keep scoring a stale batch
                for idx, w in enumerate(self._workers):
                    if w.chunk:
                        w.kill()
                        self._workers[idx] = self._spawn()
                raise
        out = [r if r is not None else RewardResult(0.0, ERROR) for r in results]
        self._count(out)
        return out

    def _count(self, results: list[RewardResult]) -> None:
        s = self.stats
        s.items += len(results)
        for r in results:
            s.correct += r.status == CORRECT
            s.format_errors += r.status == FORMAT_ERROR
            s.timeouts += r.status == TIMEOUT
            s.hung += r.status == HUNG
            s.crashes += r.status == CRASH
            s.errors += r.status == ERROR

    def _run(self, queue: deque[Item], results: list[RewardResult | None], max_chunk: int) -> None:
        hard = self.config.timeout_s + self.hard_margin_s
        remaining = len(queue)
        while remaining:
            now = time.monotonic()
            for w in self._workers:  # hand out work to idle ready workers
                if w.ready and not w.chunk and queue:
                    size = min(max_chunk, -(-len(queue) // (2 * len(self._workers))))
                    chunk = [queue.popleft() for _ in range(size)]
                    try:
                        w.conn.send((self._batch_id, chunk))
                    except (OSError, ValueError):
                        queue.extendleft(reversed(chunk))
                        continue
                    w.chunk.extend(chunk)
                    w.item_started = now
            waits: list[float] = []
            for w in self._workers:
                if w.chunk:
                    waits.append(w.item_started + hard - now)
                elif not w.ready:
                    waits.append(w.item_started + self.startup_timeout_s - now)
            timeout = max(0.0, min(waits)) if waits else None
            handles: list[Any] = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
            ready = set(wait(handles, timeout=timeout))
            now = time.monotonic()
            for idx, w in enumerate(list(self._workers)):
                if w.conn in ready:
                    remaining -= self._drain(w, results, now)
                died = w.proc.sentinel in ready or not w.proc.is_alive()
                overdue = bool(w.chunk) and now - w.item_started > hard
                stuck_start = not w.ready and now - w.item_started > self.startup_timeout_s
                if (died or overdue or stuck_start) and w.conn.poll():  # results that arrived just now count
                    remaining -= self._drain(w, results, now)
                    overdue = bool(w.chunk) and now - w.item_started > hard
                    stuck_start = not w.ready and now - w.item_started > self.startup_timeout_s
                if died or overdue or stuck_start:
                    remaining -= self._replace(idx, w, queue, results, HUNG if overdue and not died else CRASH)

    def _drain(self, w: _Worker, results: list[RewardResult | None], now: float) -> int:
        """Read every message waiting on ``w``'s pipe; returns how many items finished."""
        done = 0
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self._start_failures = 0
                    continue
                batch_id, pos, score, status = msg
                if batch_id == self._batch_id and w.chunk and w.chunk[0][0] == pos:
                    w.chunk.popleft()
                    results[pos] = RewardResult(score, status)
                    done += 1
                    w.item_started = now
        except (EOFError, OSError):
            pass
        return done

    def _replace(
        self, idx: int, w: _Worker, queue: deque[Item], results: list[RewardResult | None], status: str
    ) -> int:
        """Kill ``w``, score its current item 0 with ``status``, requeue the rest of its chunk, start a new worker."""
        finished = 0
        if w.chunk:
            pos = w.chunk.popleft()[0]
            results[pos] = RewardResult(0.0, status)
            finished = 1
            logger.warning("reward worker pid %s %s on item %d; replacing it", w.proc.pid, status, pos)
            queue.extendleft(reversed(w.chunk))
        elif not w.ready:
            self._start_failures += 1
            logger.warning("reward worker pid %s failed to start; replacing it", w.proc.pid)
            if self._start_failures > 3 * self.config.num_workers:
                raise RuntimeError(f"reward workers keep failing to start ({self._start_failures} times); see log")
        w.kill()
        self._workers[idx] = self._spawn()
        return finished
