"""``make gpu-check`` on a machine without a GPU: the CPU-runnable stages pass, the GPU stages are skipped with a
reason, the JSON report says so, and the exit code is 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour; on a GPU run make gpu-check")
def test_cpu_stages_pass_and_gpu_stages_skip_with_reasons(tmp_path, capsys) -> None:
    assert gpu_check.main(["--out", str(tmp_path), "--budget-s", "300"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["name"]: s for s in report["stages"]}
    assert list(status) == list(gpu_check.STAGES)
    for name in ("roundtrip", "logits_vs_hf", "fused_logprob"):
        assert status[name]["status"] == "pass", status[name]
    assert status["roundtrip"]["details"]["bit_identical"] is True
    assert status["logits_vs_hf"]["details"]["max_abs_diff"] <= 1e-4
    assert status["fused_logprob"]["details"]["max_err_logp"] <= 1e-4
    for name in ("te_spec_build", "luffy_train", "sglang_sync", "sglang_export"):
        assert status[name]["status"] == "skip" and status[name]["reason"], status[name]
    assert report["ok"] is True
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
