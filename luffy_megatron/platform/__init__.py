"""Platform layer: device choice, distributed init (torchrun / Slurm), megatron-core on CPU.

Call :func:`setup_platform` first in every entry point that builds Megatron models; it is the one place where the
CPU compatibility layer is applied.
"""

from luffy_megatron.platform.distributed import (
    DistEnv,
    destroy_model_parallel,
    device,
    free_port,
    init_distributed,
    init_model_parallel,
    is_rank0,
    read_dist_env,
    setup_platform,
)

__all__ = [
    "DistEnv",
    "destroy_model_parallel",
    "device",
    "free_port",
    "init_distributed",
    "init_model_parallel",
    "is_rank0",
    "read_dist_env",
    "setup_platform",
]
