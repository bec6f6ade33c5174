"""Test tiers: a tier that cannot run is a skip named in the run's summary, and a failure when CI requires all tiers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BODY = """
from tests.tiers import skip_tier

def test_needs_a_cluster():
    skip_tier("slurm", "sbatch is missing")

def test_plain():
    pass
"""


def _run(tmp_path: Path, require: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(BODY)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LUFFY_REQUIRE_ALL_TIERS="1" if require else "0")
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_a_tier_that_cannot_run_is_a_skip_named_in_the_summary(tmp_path):
    proc = _run(tmp_path, require=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    assert "test tiers not run here" in proc.stdout
    assert "slurm: 1 tests skipped: sbatch is missing" in proc.stdout


def test_required_tiers_turn_the_skip_into_a_failure(tmp_path):
    proc = _run(tmp_path, require=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[tier slurm] required (LUFFY_REQUIRE_ALL_TIERS=1) but cannot run: sbatch is missing" in proc.stdout
