"""Stopping for a requeue (luffy_megatron.train.preemption): signals and the stop file in one process, the
``fault_tolerance`` section's validation, and a real trainer that gets SIGTERM mid-run (checkpoint, marker, exit 0).
The Slurm side (warning signal, requeue, exact resume) is tests/test_slurm_faults.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from luffy_megatron.config import ConfigError, FaultToleranceConfig, load_config
from luffy_megatron.config_checks import validate
from luffy_megatron.train.checkpoint import latest_checkpoint
from luffy_megatron.train.preemption import StopRequest
from tests.fixtures_models import tiny_checkpoint, write_train_assets
from tests.test_train_e2e import metrics, overrides, train_cmd


def test_a_signal_or_the_stop_file_asks_to_stop_and_the_marker_names_the_step(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    stop_file = tmp_path / "stop"
    stop = StopRequest(FaultToleranceConfig(stop_file=str(stop_file)), save_dir=str(tmp_path / "ckpt"))
    try:
        assert stop.requested() is None
        stop_file.touch()
        assert stop.requested() == f"stop file {stop_file}"
        stop_file.unlink()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() == "SIGUSR1"
        stop.leave_marker(7, "SIGUSR1", tmp_path / "ckpt" / "step_000007")
        marker = tmp_path / "ckpt" / "REQUEUE"
        assert marker.read_text() == f"stopped after step 7 (SIGUSR1); resume from {tmp_path}/ckpt/step_000007\n"
        assert not list(marker.parent.glob("*.tmp"))
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("fault_tolerance.stop_signals=[SIGUSR3]", "fault_tolerance.stop_signals"),
        ("fault_tolerance.stop_signals=[SIGKILL]", "fault_tolerance.stop_signals"),
        ("fault_tolerance.collective_timeout_min=0", "fault_tolerance.collective_timeout_min"),
        ("fault_tolerance.servers_grace_s=-1", "fault_tolerance.servers_grace_s"),
    ],
)
def test_bad_fault_tolerance_values_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    data = tmp_path / "train.parquet"
    data.write_bytes(b"")
    base = [f"model.hf_path={tiny_checkpoint('qwen2')}", f"data.train_files=[{data}]", "data.max_response_length=512"]
    cfg = load_config(None, [*base, override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, world_size=1)


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_the_step_leaves_the_marker_and_exits_0(tmp_path: Path) -> None:
    assets = write_train_assets(tmp_path / "assets")
    out, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"
    args = overrides(assets, out, 500, f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=100")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(train_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "no step within 5 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    steps = sorted(metrics(out))
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 500, steps
    assert f"stopping after step {last} on SIGTERM" in output, output[-2000:]
    assert latest_checkpoint(ckpt) == ckpt / f"step_{last:06d}"
    assert json.loads((ckpt / f"step_{last:06d}" / "trainer_state.json").read_text())["step"] == last
    assert (ckpt / "REQUEUE").read_text().startswith(f"stopped after step {last} (SIGTERM); resume from {ckpt}")
    assert not list(ckpt.glob("*.incomplete"))
