"""A lone process initialises torch.distributed without touching the environment its children inherit."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import os
import torch.distributed as dist
from luffy_megatron.platform import init_distributed
init_distributed()
assert dist.get_world_size() == 1
print(sorted(k for k in ("MASTER_ADDR", "MASTER_PORT") if k in os.environ))
"""


def test_single_process_init_leaves_no_rendezvous_port_for_children():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _finish_run(rank: int, world_size: int) -> tuple[bool, bool]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from luffy_megatron.platform import init_model_parallel, setup_platform, shutdown_distributed

    setup_platform()
    init_model_parallel(tp=world_size)
    shutdown_distributed()
    return dist.is_initialized(), parallel_state.model_parallel_is_initialized()


def test_a_finished_run_destroys_its_process_groups():
    """What the trainer and the converters do before exit: no group outlives the run (world size 2, gloo)."""
    from tests.dist_utils import run_distributed

    assert run_distributed(_finish_run, 2) == [(False, False), (False, False)]
