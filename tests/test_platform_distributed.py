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
