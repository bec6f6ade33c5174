"""Distributed initialisation for torchrun and Slurm, and megatron-core's model-parallel groups."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from luffy_megatron.platform.cpu_compat import apply_cpu_patches
from luffy_megatron.platform.ports import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def read_dist_env() -> DistEnv:
    """Rank layout from torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK) or, under ``srun``, from Slurm's.

    Without either, a single process on this host. MASTER_ADDR/MASTER_PORT default to localhost / 29500; under Slurm
    set MASTER_ADDR to the first host of ``$SLURM_JOB_NODELIST`` (examples/*.sh do).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    return DistEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")))


def setup_platform() -> torch.device:
    """Choose the device and, without CUDA, make megatron-core run on the CPU. Idempotent."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    apply_cpu_patches()
    return torch.device("cpu")


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_minutes: float = 30) -> DistEnv:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) unless already done; set the CUDA device."""
    setup_platform()
    env = read_dist_env()
    if dist.is_initialized():
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        # A lone process rendezvouses with itself on a free port, passed directly: writing it to os.environ would
        # hand a port this process keeps listening on to every child process started later.
        init_method = f"tcp://127.0.0.1:{free_port()}"
    else:
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        init_method = "env://"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return env


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1, ep: int = 1) -> None:
    """Create megatron-core's TP/PP/DP groups (and the expert groups: ``ep`` expert-parallel ranks out of the
    data-parallel ones, expert TP = ``tp``) and seed the model-parallel RNG tracker."""
    # megatron-core is imported here, not at the top: this module is also used by light tools (free_port,
    # read_dist_env) that should not pay its ~3 s of imports.
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def shutdown_distributed() -> None:
    """The end of a finished run: wait for every rank, then destroy the model-parallel and default process groups.

    A group left to the interpreter's exit is torn down while a peer may already be gone: a gloo rank can then abort
    ("terminate called without an active exception") and turn a finished job into a failed one; torch also warns
    about NCCL groups that were not destroyed.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    destroy_model_parallel()
    dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
