"""``luffy-train`` under the real torchrun, with the real SGLang server and sglang-router it launches itself (the
``sglang`` tier): every weight-sync mode reaches the server, which then serves the trainer's own log-probs.

What this covers that no stand-in can: torchrun's agent store (the weight-update store must still be hosted by trainer
rank 0), torchrun's environment (launched servers and router must not inherit it), the router's request schema, and
SGLang's own weight loaders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_models import write_train_assets
from tests.sglang_real import cpu_server_overrides, free_port_block, sglang_python

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
#: fp32 on both sides; the kernels differ (SGLang's torch-native attention vs Megatron's), so not bit-exact: the
#: largest gap seen is 1e-6.
GAP_TOL = 5e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_train_assets(tmp_path_factory.mktemp("sglang_train"))


def train_with_sglang(assets: Path, out: Path, weight_sync: str, *extra: str) -> list[dict]:
    """``STEPS`` LUFFY steps at TP=2 under torchrun (two optimiser steps each), rollouts from a launched CPU server
    behind a launched router."""
    from luffy_megatron.metrics.logger import read_jsonl
    from tests.dist_utils import free_port

    python = sglang_python()
    overrides = [
        f"model.hf_path={assets / 'model'}",
        "model.dtype=float32",
        f"data.train_files=[{assets / 'task' / 'train.parquet'}]",
        "data.val_files=[]",
        "trainer.val_interval=0",
        "data.train_batch_size=8",
        "data.mini_batch_size=4",
        "data.max_response_length=28",
        "data.max_prompt_length=32",
        "rollout.n=4",
        "reward.num_workers=1",
        "optimizer.lr=1e-3",
        f"trainer.total_steps={STEPS}",
        f"logging.out_dir={out}",
        "logging.progress_bar=false",
        "parallel.tp=2",
        "parallel.pack_sequences=true",
        "rollout.backend=sglang",
        "rollout.sglang.launch=true",
        "rollout.sglang.use_router=true",
        f"rollout.sglang.weight_sync={weight_sync}",
        f"rollout.sglang.weight_sync_dir={out / 'weights'}",
        *cpu_server_overrides(python, free_port_block()),
        *extra,
    ]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [
        torchrun,
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "luffy_megatron.train.cli",
        str(ROOT / "configs" / "tiny_cpu_luffy.yaml"),
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return read_jsonl(out / "metrics.jsonl")


@pytest.mark.parametrize("weight_sync", ["distributed", "disk", "tensor"])
def test_torchrun_trainer_syncs_every_step_into_the_real_server(assets, tmp_path, weight_sync):
    """After every sync the server's log-probs of the tokens it sampled equal the trainer's own (fp32): a sync that
    silently did nothing would leave the server one or more updates behind, far outside the tolerance."""
    rows = train_with_sglang(assets, tmp_path / "out", weight_sync, "rollout.sglang.weight_sync_backend=gloo")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The run learns: traces are rewarded, advantages and the policy-gradient loss are not zero.
    assert all(r["reward/off_policy"] > 0 for r in rows), [r["reward/off_policy"] for r in rows]
    assert all(abs(r["actor/pg_loss"]) > 0 and r["actor/grad_norm"] > 0 for r in rows)
    gaps = [r["actor/train_rollout_logprob_gap_max"] for r in rows]
    assert max(gaps) < GAP_TOL, gaps
    # One optimiser update moves some sampled token's log-prob by far more than the tolerance (the largest change
    # between a step's rollout and its second mini-batch), so a server left one update behind could not pass the check
    # above. (The mean change, ``actor/ppo_kl``, can cancel to below the tolerance.)
    moved = [r["actor/policy_shift_max"] for r in rows]
    assert min(moved) > 20 * GAP_TOL, moved
