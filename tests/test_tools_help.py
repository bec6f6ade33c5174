"""Every user-facing command answers ``--help`` with a usage line and an example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in (ROOT / "tools").glob("*.py"))


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help(tool):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
    assert "example" in proc.stdout.lower(), f"{tool} --help shows no example"


def test_luffy_train_help():
    proc = subprocess.run(
        [sys.executable, "-m", "luffy_megatron.train.cli", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and "key=value" in proc.stdout and "examples:" in proc.stdout
