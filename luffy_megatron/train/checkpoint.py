"""Training checkpoints: model + optimizer (megatron dist_checkpointing), scheduler, sampler, RNG states, step.

Layout of ``save_dir``::

    step_000010/              a complete checkpoint (only names of this form are ever loaded)
        model_optim/          dist_checkpointing (torch_dist) of model chunks and optimizer: reshardable
        trainer_state.json    step, scheduler, sampler, metadata; written last
        pending_rollout.npz   an asynchronous run's batch in flight (global rank 0 writes it, never broadcast)
        rng/rank_00000.pt     python / numpy / torch / megatron RNG states of every rank
    step_000020.incomplete/   a save in progress or interrupted: ignored, removed by the next save

A save writes into ``step_N.incomplete`` and renames it to ``step_N`` once every rank has finished, so a crash (or a
full disk) at any point never leaves a directory that looks complete; older checkpoints are pruned only after that.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from luffy_megatron.config import RunConfig
from luffy_megatron.platform.rank0 import describe, every_rank_call, rank0_call

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def should_save(cfg: RunConfig, step: int) -> bool:
    """Whether RL step ``step`` ends with a checkpoint (every ``checkpoint.save_interval`` steps and the last)."""
    c = cfg.checkpoint
    if not c.save_dir:
        return False
    return step == cfg.trainer.total_steps or (c.save_interval > 0 and step % c.save_interval == 0)


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``save_dir`` (None when there is none)."""
    root = Path(save_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    found = [(s, p) for s, p in found if (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _sharded_state(policy, is_loading: bool) -> dict:
    model_sd: dict[str, Any] = {}
    for i, chunk in enumerate(policy.modules):
        model_sd[f"model{i}"] = chunk.sharded_state_dict()
    state = dict(model_sd)
    state["optimizer"] = policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    save_dir: str,
    step: int,
    policy,
    trainer_state: dict,
    keep_last: int,
    rank0_files: Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Save collectively (every rank calls it); returns the final directory. Raises :class:`CheckpointError`.

    ``rank0_files(folder)`` runs on global rank 0 alone before the state file is written: it writes files of its own
    into the checkpoint folder and returns what to record about them in the trainer state."""
    root = Path(save_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.incomplete"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.incomplete"):
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "model_optim").mkdir(parents=True)
        (tmp / "rng").mkdir()

    try:
        rank0_call(prepare, "creating the checkpoint directory")
    except Exception as e:  # every rank raises (see rank0_call)
        raise CheckpointError(f"cannot create checkpoint directory {tmp}: {describe(e)}") from e

    def write_shards() -> None:
        dist_checkpointing.save(_sharded_state(policy, is_loading=False), str(tmp / "model_optim"))
        torch.save(_rng_state(), tmp / "rng" / f"rank_{dist.get_rank():05d}.pt")

    try:
        every_rank_call(write_shards, "writing checkpoint shards")
    except Exception as e:
        raise CheckpointError(
            f"saving checkpoint {final} failed (previous checkpoints are intact): {describe(e)}"
        ) from e

    def finish() -> Path:
        files = rank0_files(tmp) if rank0_files is not None else {}
        state = dict(trainer_state, **files, step=step, scheduler=policy.scheduler.state_dict())
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
        for _, old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    try:
        return rank0_call(finish, "finishing the checkpoint")
    except Exception as e:
        raise CheckpointError(
            f"finishing checkpoint {final} failed (previous checkpoints are intact): {describe(e)}"
        ) from e


def load_checkpoint(path: str | os.PathLike, policy) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG state; returns the trainer state (step, sampler, ...).

    Model and optimizer reshard to the current TP/PP layout.
    """
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    loaded = dist_checkpointing.load(_sharded_state(policy, is_loading=True), str(path / "model_optim"))
    for i, chunk in enumerate(policy.modules):
        chunk.load_state_dict(loaded[f"model{i}"])
    policy.optimizer.load_state_dict(loaded["optimizer"])
    trainer_state = json.loads(state_file.read_text())
    policy.scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng_file.is_file():  # absent when resuming at a different world size: RNG streams then start afresh
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
