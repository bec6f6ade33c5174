"""``tools/plot_metrics.py --timeline``: per-step generation and update windows of a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import plot_metrics  # noqa: E402


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_timeline_png_from_overlapping_windows_and_a_clear_error_without_them(tmp_path: Path) -> None:
    t0 = 1.7e9
    records = []
    for step in range(1, 9):  # generation of step k + 1 runs during the update of step k
        gen = (t0 + step - 1.0, t0 + step - 0.2)
        upd = (t0 + step - 0.1, t0 + step + 0.7)
        records.append(
            {
                "step": step,
                "timeline/generate_start": gen[0],
                "timeline/generate_end": gen[1],
                "timeline/update_start": upd[0],
                "timeline/update_end": upd[1],
            }
        )
    f = _write(tmp_path / "metrics.jsonl", records)
    out = tmp_path / "timeline.png"
    assert plot_metrics.main([f, "--timeline", "--steps", "6", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    old = _write(tmp_path / "old.jsonl", [{"step": 1, "reward/on_policy": 0.0}])
    with pytest.raises(SystemExit, match="no timeline"):
        plot_metrics.main([old, "--timeline", "--out", str(tmp_path / "x.png")])


def test_curves_png_from_the_command_line(tmp_path: Path) -> None:
    """As users run it (a script, not an import): the curve plot of a two-step run."""
    records = [{"step": s, "reward/on_policy": 0.1 * s, "actor/entropy": 2.0 - 0.1 * s} for s in (1, 2)]
    f = _write(tmp_path / "metrics.jsonl", records)
    out = tmp_path / "curves.png"
    script = Path(plot_metrics.__file__)
    cmd = [sys.executable, str(script), f, "--keys", "reward/on_policy", "actor/entropy", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 5_000
