"""Run a test body in N local processes joined by a gloo process group (how TP/PP/DP are tested on CPU).

Spawning a world costs seconds of imports (torch, megatron-core) before any test code runs, and the suite runs many
bodies at the same world size. So a world is spawned once per size and kept: its ranks run one body after another.
Between bodies each rank restores what a body may leave behind (megatron-core's parallel state, environment
variables, torch's default dtype and seed); a body that fails or times out takes its world down with it, and the
next call spawns a fresh one. ``fresh=True`` runs a body in a world of its own (for a body that must start from a
new process).
"""

from __future__ import annotations

import atexit
import gc
import os
import queue as queue_mod
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from luffy_megatron.platform.ports import free_port

__all__ = ["free_port", "run_distributed", "shutdown_worlds"]

#: How often an idle rank checks that the test process that spawned it is still there.
_IDLE_POLL_S = 5.0


def _reset_between_bodies(environ: dict[str, str]) -> None:
    """Undo what one body may leave in a rank for the next: process groups, microbatch calculator, env, dtype."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from luffy_megatron.platform import destroy_model_parallel

    destroy_model_parallel()
    # megatron-core forgets its groups without destroying them; each gloo group keeps threads until destroyed
    for group in list(distributed_c10d._world.pg_map):
        if group is not distributed_c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)
    gc.collect()
    try:
        from megatron.core import num_microbatches_calculator

        num_microbatches_calculator.destroy_num_microbatches_calculator()
    except ImportError:
        pass
    os.environ.clear()
    os.environ.update(environ)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)


def _serve(rank: int, world_size: int, port: int, tasks: Any, results: Any, parent: int) -> None:
    """One rank of a kept world: join the gloo group once, then run bodies from ``tasks`` until told to stop."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    environ = dict(os.environ)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        while True:
            try:
                task = tasks.get(timeout=_IDLE_POLL_S)
            except queue_mod.Empty:
                if os.getppid() != parent:  # the test process is gone: nobody will send more
                    return
                continue
            if task is None:
                return
            number, fn, args = task
            try:
                result = fn(rank, world_size, *args)
            except BaseException:  # report every failure, with its traceback, to the parent
                results.put((number, rank, "error", traceback.format_exc()))
                return  # the parent takes this world down
            if not dist.is_initialized():  # the body shut the group down (as a finished run does): retire
                results.put((number, rank, "retired", result))
                return
            results.put((number, rank, "ok", result))
            _reset_between_bodies(environ)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _World:
    """``size`` spawned ranks that run bodies one at a time."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.size = size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, size, port, self.tasks[r], self.results, os.getpid()))
            for r in range(size)
        ]
        for p in self.procs:
            p.start()
        self.number = 0
        self.retired = False  # a body destroyed the default group: its ranks have exited

    def alive(self) -> bool:
        return not self.retired and all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> list[Any]:
        """``fn(rank, size, *args)`` on every rank; the results by rank. Raises (the world is then unusable) with the
        first failing rank's traceback."""
        self.number += 1
        for q in self.tasks:
            q.put((self.number, fn, args))
        got: dict[int, Any] = {}
        while len(got) < self.size:
            try:
                number, rank, status, payload = self.results.get(timeout=timeout_s)
            except queue_mod.Empty:
                raise AssertionError(
                    f"{fn.__name__}: no result within {timeout_s:.0f}s from ranks "
                    f"{sorted(set(range(self.size)) - set(got))}"
                ) from None
            if number != self.number:
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            self.retired |= status == "retired"
            got[rank] = payload
        return [got[r] for r in range(self.size)]

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
        for p in self.procs:
            p.join(timeout=1 if kill else 30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_WORLDS: dict[int, _World] = {}


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0, fresh: bool = False
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on every rank of a gloo world of ``world_size`` processes; return the
    results by rank.

    ``fn`` must be importable (a module-level function) and its result picklable. Any rank's exception fails the
    caller with that rank's traceback. The world is kept for the next call of the same size unless ``fresh``.
    """
    world = None if fresh else _WORLDS.pop(world_size, None)
    if world is None or not world.alive():
        if world is not None:
            world.close(kill=True)
        world = _World(world_size)
    try:
        results = world.run(fn, args, timeout_s)
    except BaseException:
        world.close(kill=True)
        raise
    if fresh or world.retired:
        world.close(kill=world.retired)
    else:
        _WORLDS[world_size] = world
    return results


@atexit.register
def shutdown_worlds() -> None:
    """Stop every kept world (at the end of the test session)."""
    while _WORLDS:
        _WORLDS.popitem()[1].close()
