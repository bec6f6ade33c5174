"""Platform layer: device choice, distributed init (torchrun / Slurm), megatron-core on CPU, rank-0 calls.

Call :func:`setup_platform` first in every entry point that builds Megatron models; it is the one place where the
CPU compatibility layer is applied.
"""

from luffy_megatron.platform.distributed import (
    DistEnv,
    destroy_model_parallel,
    device,
    init_distributed,
    init_model_parallel,
    is_rank0,
    read_dist_env,
    setup_platform,
    shutdown_distributed,
)
from luffy_megatron.platform.ports import free_port, free_port_block
from luffy_megatron.platform.rank0 import (
    RankFailure,
    describe,
    every_rank_call,
    failed_elsewhere,
    rank0_call,
    report_error,
    settle,
)

__all__ = [
    "DistEnv",
    "RankFailure",
    "describe",
    "destroy_model_parallel",
    "device",
    "every_rank_call",
    "failed_elsewhere",
    "free_port",
    "free_port_block",
    "init_distributed",
    "init_model_parallel",
    "is_rank0",
    "rank0_call",
    "read_dist_env",
    "report_error",
    "settle",
    "setup_platform",
    "shutdown_distributed",
]
