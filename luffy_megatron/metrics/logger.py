"""Per-step metrics: one line on stdout, a JSONL file always, TensorBoard and W&B when configured."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from luffy_megatron.config import LoggingConfig

# Shown on the per-step line (everything goes to JSONL / TensorBoard / W&B).
_HEADLINE = (
    ("reward/on_policy", "r_on"),
    ("reward/off_policy", "r_off"),
    ("actor/loss", "loss"),
    ("actor/entropy", "ent"),
    ("actor/off_policy_prob", "p_off"),
    ("actor/grad_norm", "gnorm"),
    ("response/length_mean", "len"),
    ("perf/step_s", "s"),
    ("perf/tokens_per_s", "tok/s"),
)


class Timers:
    """Wall-clock seconds of named phases of one step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class MetricsLogger:
    """Writes ``metrics.jsonl`` in ``cfg.out_dir`` (append: a resumed run continues the same file)."""

    def __init__(self, cfg: LoggingConfig, run_config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(cfg.out_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            (self.path.parent / "config.json").write_text(json.dumps(run_config, indent=1))
        # tensorboard and wandb are optional dependencies (extras), imported only when configured.
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(cfg.out_dir) / "tensorboard"))
        if cfg.wandb_project:
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=run_config)

    def log(self, step: int, metrics: dict[str, float], write: Callable[[str], None] = print) -> None:
        """Append one record and print one line with ``write`` (e.g. a progress bar's ``write``)."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        parts = [f"step {step}"]
        parts += [f"{short} {metrics[key]:.4g}" for key, short in _HEADLINE if key in metrics]
        write(" | ".join(parts))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _clean(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics file; a torn last line (a run killed mid-write) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
