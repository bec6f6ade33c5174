"""``make gpu-check`` on a machine without a GPU: the CPU-runnable stages pass, the GPU stages are skipped with a
reason, the JSON report says so (written after every stage), and the exit code is 0; the training stage's command
line (packed sequences, torchrun, a server the trainer launches) and the default time budget's margin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import gpu_check  # noqa: E402

from luffy_megatron.config import load_config  # noqa: E402
from luffy_megatron.config_checks import validate  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour; on a GPU run make gpu-check")
def test_cpu_stages_pass_and_gpu_stages_skip_with_reasons(tmp_path, capsys) -> None:
    assert gpu_check.main(["--out", str(tmp_path), "--budget-s", "300"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["name"]: s for s in report["stages"]}
    assert list(status) == list(gpu_check.STAGES)
    for name in ("roundtrip", "logits_vs_hf", "fused_logprob", "mfu"):
        assert status[name]["status"] == "pass", status[name]
    mfu = status["mfu"]["details"]  # the GPU stage's path at a tiny shape: a real update, no MFU without a peak
    assert mfu["tokens_per_s"] > 0 and mfu["tokens_per_step"] > 1000 and mfu["mfu"] is None
    assert mfu["computed_over_real"] == 1.0
    assert status["roundtrip"]["details"]["bit_identical"] is True
    assert status["logits_vs_hf"]["details"]["max_abs_diff"] <= 1e-4
    assert status["fused_logprob"]["details"]["max_err_logp"] <= 1e-4
    for name in ("te_spec_build", "luffy_train", "sglang_sync", "sglang_export"):
        assert status[name]["status"] == "skip" and status[name]["reason"], status[name]
    assert report["ok"] is True and report["pending"] == []
    out = capsys.readouterr().out
    assert "no CUDA device found" in out and "te_spec_build  skip" in out


def test_a_failing_stage_fails_the_run_and_the_time_budget_skips(tmp_path, monkeypatch) -> None:
    def broken(ctx):
        raise AssertionError("numbers differ")

    monkeypatch.setitem(gpu_check.STAGES, "fused_logprob", broken)
    assert gpu_check.main(["--out", str(tmp_path), "--stages", "fused_logprob", "roundtrip", "--budget-s", "1"]) == 1
    stages = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]}
    assert stages["fused_logprob"]["status"] == "fail" and "numbers differ" in stages["fused_logprob"]["reason"]
    assert stages["roundtrip"]["status"] == "skip" and "time budget" in stages["roundtrip"]["reason"]


class Killed(BaseException):
    """Stands for the machine's hard limit ending the run inside a stage."""


def test_the_report_is_written_after_every_stage(tmp_path, monkeypatch) -> None:
    seen: list[dict] = []

    def killed_inside(ctx):
        seen.append(json.loads((tmp_path / "gpu_check.json").read_text()))
        raise Killed

    monkeypatch.setitem(gpu_check.STAGES, "te_spec_build", lambda ctx: {"answer": 42})
    monkeypatch.setitem(gpu_check.STAGES, "roundtrip", killed_inside)
    with pytest.raises(Killed):
        gpu_check.main(["--out", str(tmp_path), "--stages", "te_spec_build", "roundtrip", "fused_logprob"])
    left = json.loads((tmp_path / "gpu_check.json").read_text())
    assert seen == [left]
    assert [(s["name"], s["status"], s["details"]) for s in left["stages"]] == [
        ("te_spec_build", "pass", {"answer": 42})
    ]
    assert left["pending"] == ["roundtrip", "fused_logprob"] and left["ok"] is False
    assert sorted(p.name for p in tmp_path.glob("gpu_check.json*")) == ["gpu_check.json"]  # no temporary file left


def test_the_default_budget_leaves_a_margin_under_ten_minutes(tmp_path) -> None:
    assert gpu_check.DEFAULT_BUDGET_S <= 600 - 90
    assert set(gpu_check.NEED_S) == set(gpu_check.STAGES)
    assert sum(gpu_check.NEED_S.values()) <= gpu_check.DEFAULT_BUDGET_S
    assert sum(gpu_check.NEED_S.values()) <= gpu_check.DEFAULT_BUDGET_S
    gpu_check.main(["--out", str(tmp_path), "--stages", "te_spec_build"])  # no GPU: skipped at once
    assert json.loads((tmp_path / "gpu_check.json").read_text())["budget_s"] == gpu_check.DEFAULT_BUDGET_S


@pytest.mark.parametrize("sglang", [True, False], ids=["sglang", "no-sglang"])
def test_the_training_stage_packs_sequences_and_runs_torchrun_with_a_launched_server(
    tmp_path, monkeypatch, sglang: bool
) -> None:
    calls: list[tuple[list[str], float, dict]] = []

    def run_logged(cmd, log, timeout_s, env=None):
        calls.append((cmd, timeout_s, env))
        raise AssertionError("not run here")

    monkeypatch.setattr(gpu_check, "has", lambda module: module != "sglang" or sglang)
    monkeypatch.setattr(gpu_check, "_qwen05b", gpu_check._small_model)
    monkeypatch.setattr(gpu_check, "_run_logged", run_logged)
    ctx = gpu_check.Ctx(tmp_path, time.monotonic() + gpu_check.DEFAULT_BUDGET_S, 20, cuda=True, gpus=2)
    with pytest.raises(AssertionError, match="not run here"):
        gpu_check.stage_luffy_train(ctx)
    [(cmd, timeout_s, env)] = calls
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc-per-node=2" in cmd
    assert timeout_s < gpu_check.DEFAULT_BUDGET_S and env["PYTHONPATH"] == str(gpu_check.REPO)
    i = cmd.index("luffy_megatron.train.cli")
    config, overrides = cmd[i + 1], cmd[i + 2 :]
    assert "parallel.pack_sequences=true" in overrides
    launched = {"rollout.backend=sglang", "rollout.sglang.launch=true", "rollout.sglang.device=cuda"}
    assert launched <= set(overrides) if sglang else "rollout.backend=hf" in overrides
    assert not any(o.startswith("rollout.sglang.urls") for o in overrides)  # never a server the tool started
    cfg = load_config(config, overrides)
    validate(cfg, world_size=2)
    assert cfg.parallel.pack_sequences is True and cfg.rollout.backend == ("sglang" if sglang else "hf")
    if sglang:
        s = cfg.rollout.sglang
        assert s.launch and s.colocate and (s.device, s.weight_sync_backend, s.python) == ("cuda", "auto", None)
        assert list(s.env) == [gpu_check.MARK_ENV] and s.startup_timeout_s < timeout_s


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the processes through /proc")
def test_servers_left_by_the_trainer_are_found_by_their_mark_and_killed() -> None:
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    marked = subprocess.Popen(sleep, env={**os.environ, gpu_check.MARK_ENV: "run-a"})
    other = subprocess.Popen(sleep, env={**os.environ, gpu_check.MARK_ENV: "run-b"})
    try:
        assert gpu_check._stop_marked("run-a", grace_s=0) == [marked.pid]
        assert marked.wait(timeout=10) == -9 and other.poll() is None
        assert gpu_check._stop_marked("run-c", grace_s=5) == []
    finally:
        for proc in (marked, other):
            proc.kill()
            proc.wait()
