"""The in-process HF engine run in a child process with its own torch threads, for asynchronous rollout on CPU.

Generation in a thread of the trainer's process would share the trainer's intra-op thread pool and its GIL; in its
own (spawned) process the engine's ``torch.set_num_threads`` is its own, so generation and the policy update overlap
on separate cores. Requests go over a pipe; weight updates send HF-named tensors through torch's shared-memory
pickling (no copy through the pipe). Errors in the child come back as :class:`RolloutError` /
:class:`WeightSyncError` with the child's message; a dead child is a :class:`RolloutError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from luffy_megatron.rollout.base import RolloutEngine, RolloutError, RolloutOutput, SamplingParams, WeightSyncError
from luffy_megatron.rollout.hf_engine import HFEngine

_START_TIMEOUT_S = 600.0


def default_threads() -> int:
    """Half the cores this process may use (at least 1): the other half stays with the trainer."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


class ProcessEngine(RolloutEngine):
    """An :class:`~luffy_megatron.rollout.hf_engine.HFEngine` in a spawned child process (thread-safe calls)."""

    def __init__(
        self,
        hf_path: str,
        *,
        num_threads: int | None = None,
        dtype: str = "float32",
        batch_size: int = 64,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.num_threads = num_threads or default_threads()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        spec = {
            "hf_path": str(hf_path),
            "dtype": dtype,
            "batch_size": batch_size,
            "eos_token_ids": eos_token_ids,
            "num_threads": self.num_threads,
        }
        self._proc = ctx.Process(target=_serve, args=(child, spec), daemon=True, name="luffy-rollout")
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self.weight_version: int | None = 0
        try:
            self._call(("ping",), RolloutError, timeout_s=_START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _call(self, request: tuple, error: type[Exception], timeout_s: float | None = None) -> Any:
        with self._lock:
            if not self._proc.is_alive():
                raise RolloutError(f"the rollout process exited (exit code {self._proc.exitcode})")
            try:
                self._conn.send(request)
                if timeout_s is not None and not self._conn.poll(timeout_s):
                    raise RolloutError(f"the rollout process did not answer {request[0]!r} within {timeout_s:.0f} s")
                status, value = self._conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as e:
                raise RolloutError(f"the rollout process exited during {request[0]!r}: {e}") from e
        if status == "error":
            raise error(f"rollout process: {value}")
        return value

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, counts: Sequence[int] | None = None
    ) -> list[list[RolloutOutput]]:
        """As :meth:`HFEngine.generate`, computed in the child process."""
        return self._call(("generate", prompts, params, None if counts is None else list(counts)), RolloutError)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Stream the tensors to the child (shared memory) and load them strictly there."""
        named = [(n, t.detach().contiguous().clone()) for n, t in named_tensors]
        self._call(("update", named, version), WeightSyncError)
        self.weight_version = version

    def health(self) -> dict:
        alive = self._proc.is_alive()
        return {"ok": alive, "weight_version": self.weight_version, "backend": "hf-process", "pid": self._proc.pid}

    def close(self) -> None:
        """Stop the child (politely, then by terminate)."""
        if self._proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(("close",))
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(10)
        self._conn.close()


def _serve(conn: Any, spec: dict) -> None:
    """Child main loop: build the engine, then answer requests until ``close`` or a closed pipe."""
    torch.set_num_threads(spec["num_threads"])
    engine = HFEngine.from_pretrained(
        spec["hf_path"], dtype=spec["dtype"], batch_size=spec["batch_size"], eos_token_ids=spec["eos_token_ids"]
    )
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        kind = request[0]
        if kind == "close":
            return
        try:
            if kind == "ping":
                value: Any = None
            elif kind == "generate":
                value = engine.generate(request[1], request[2], request[3])
            elif kind == "update":
                engine.update_weights(request[1], request[2])
                value = None
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send(("ok", value))
        except Exception as e:  # reported to the parent, which raises it there
            conn.send(("error", f"{type(e).__name__}: {e}"))
