"""A rollout or reward failure on rank 0 fails the step loudly on every rank (none waits forever, nothing trains)."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow


class _Sampler:
    def __next__(self):
        return type("Batch", (), {"indices": [0]})()


class _Dataset:
    def get_batch(self, indices):
        return [type("Item", (), {"prompt_ids": [1, 2], "trace_ids": [3], "index": 0})()]


class _DeadEngine:
    def generate(self, prompts, params, counts=None):
        raise ConnectionError("rollout server http://127.0.0.1:9 refused the connection")


class _NoPolicy:
    def __getattr__(self, name):
        raise AssertionError(f"the policy was used ({name}) after a failed rollout")


def failing_step(rank: int, world: int) -> str:
    from luffy_megatron.config import RunConfig
    from luffy_megatron.train.loop import rl_step
    from luffy_megatron.train.run_state import RunState

    run = RunState(step=1, dataset=_Dataset(), sampler=_Sampler(), engine=_DeadEngine())
    try:
        rl_step(RunConfig(), run, _NoPolicy())
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_rollout_failure_on_rank0_fails_every_rank():
    rank0, rank1 = run_distributed(failing_step, 2, timeout_s=120)
    assert rank0.startswith("ConnectionError") and "127.0.0.1:9" in rank0
    assert rank1.startswith("RankFailure: step 1: rollout or reward failed on rank 0"), rank1
    assert "ConnectionError" in rank1 and "nothing was trained" in rank1


def failing_async_step(rank: int, world: int) -> str:
    """Step 2 of an asynchronous run whose background rollout (started during step 1) failed."""
    from luffy_megatron.config import RunConfig
    from luffy_megatron.train.loop import rl_step
    from luffy_megatron.train.producer import RolloutPrefetcher
    from luffy_megatron.train.run_state import RunState

    cfg = RunConfig()
    cfg.trainer.async_rollout = True
    run = RunState(step=2, engine_step=1)
    if rank == 0:
        run.prefetch = RolloutPrefetcher()
        run.prefetch.start(2, 0, lambda: _DeadEngine().generate([[1, 2]], None))
    try:
        rl_step(cfg, run, _NoPolicy())
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if run.prefetch is not None:
            run.prefetch.close()
    return "no error"


def test_background_rollout_failure_stops_the_next_step_on_every_rank():
    rank0, rank1 = run_distributed(failing_async_step, 2, timeout_s=120)
    assert rank0.startswith("ConnectionError") and "127.0.0.1:9" in rank0
    assert rank1.startswith("RankFailure: step 2: rollout or reward failed on rank 0"), rank1
    assert "nothing was trained" in rank1


def setup_with_unreadable_data(rank: int, world: int, assets: str) -> str:
    from pathlib import Path

    from luffy_megatron.config import load_config
    from luffy_megatron.train.run_state import setup

    root = Path(assets)
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu_luffy.yaml",
        [
            f"model.hf_path={root / 'model'}",
            f"data.train_files=[{root / 'broken.parquet'}]",
            "data.val_files=[]",
            f"logging.out_dir={root / 'out'}",
            "parallel.tp=2",
        ],
    )
    try:
        setup(cfg)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_setup_failure_on_rank0_fails_every_rank(tmp_path):
    from tests.fixtures_models import write_train_assets

    root = write_train_assets(tmp_path)
    (root / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    rank0, rank1 = run_distributed(setup_with_unreadable_data, 2, str(root), timeout_s=300)
    assert "broken.parquet" in rank0, rank0
    assert rank1.startswith("RankFailure: setup failed on rank 0") and "broken.parquet" in rank1, rank1


def test_bad_parquet_under_torchrun_is_one_error_line_without_rank_tracebacks(tmp_path):
    """What a user sees: one line naming the file, no traceback from any rank, no TE/Apex warnings."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.dist_utils import free_port
    from tests.fixtures_models import write_train_assets

    root = write_train_assets(tmp_path)
    (root / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu_luffy.yaml"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "luffy_megatron.train.cli",
        str(config),
        f"model.hf_path={root / 'model'}",
        f"data.train_files=[{root / 'broken.parquet'}]",
        "data.val_files=[]",
        f"logging.out_dir={root / 'out'}",
        "parallel.tp=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "luffy-train: error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("luffy-train: error: DataError: ") and "broken.parquet" in errors[0]
    assert "luffy_megatron/" not in proc.stderr, "a traceback from a rank"
    assert "Apex" not in proc.stderr
