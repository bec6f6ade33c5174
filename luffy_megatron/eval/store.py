"""The output folder of an evaluation: its settings (``run.json``) and the per-sample records (``samples.jsonl``).

Records are appended one generation chunk at a time and flushed to disk, so a killed run loses at most the chunk in
flight; a torn last line is dropped on the next start. A rerun into the same folder must use the same settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from luffy_megatron.data import DataError

SETTINGS = "run.json"
SAMPLES = "samples.jsonl"


class EvalError(ValueError):
    """Bad command-line input or output folder; the message names the option, file or key."""


class SampleStore:
    """Records keyed by ``(row_id, sample)``; the first record of a key wins."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        path = out / SETTINGS
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}: unreadable ({e}); use a new --out") from e
            changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            if changed:
                k = changed[0]
                raise EvalError(
                    f"{out} holds a run with other settings ({k}: {old.get(k)!r} there, {settings.get(k)!r} now); "
                    "use a new --out or the same settings"
                )
        else:
            path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self.path = out / SAMPLES
        self.records: dict[tuple[str, int], dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn write of a killed run
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}: corrupt record at byte {good}: {e}") from e
            self.records.setdefault((rec["row_id"], rec["sample"]), rec)
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def has(self, row_id: str, sample: int) -> bool:
        return (row_id, sample) in self.records

    def append(self, records: list[dict]) -> None:
        """Write ``records`` and flush them to disk before returning."""
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for rec in records:
            self.records.setdefault((rec["row_id"], rec["sample"]), rec)
