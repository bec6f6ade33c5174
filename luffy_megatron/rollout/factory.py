"""The rollout engine a config names, and the one a training run uses.

Apart from :mod:`luffy_megatron.rollout.base`, the interface, so that the engines import the interface and never the
reverse. Importing it loads both engines' dependencies (transformers, aiohttp).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from luffy_megatron.config import FaultToleranceConfig, RolloutBackend, RolloutConfig, RunConfig, choices
from luffy_megatron.rollout.base import RolloutEngine
from luffy_megatron.rollout.hf_engine import HFEngine
from luffy_megatron.rollout.process_engine import ProcessEngine
from luffy_megatron.rollout.sglang.engine import SGLangEngine

__all__ = ["ENGINES", "build_rollout_engine", "build_run_engine"]


def _hf(
    cfg: RolloutConfig, hf_path: str, dtype: str, eos_token_ids: list[int] | None, device: str, ft: Any, log_dir: Any
) -> RolloutEngine:
    return HFEngine.from_pretrained(
        hf_path, dtype=dtype, device=device, batch_size=cfg.hf_batch_size, eos_token_ids=eos_token_ids
    )


def _sglang(
    cfg: RolloutConfig, hf_path: str, dtype: str, eos_token_ids: list[int] | None, device: str, ft: Any, log_dir: Any
) -> RolloutEngine:
    return SGLangEngine.from_config(
        cfg.sglang, hf_path, eos_token_ids=eos_token_ids, fault_tolerance=ft, log_dir=log_dir
    )


#: ``rollout.backend`` -> builder(cfg, hf_path, dtype, eos_token_ids, device, fault_tolerance, log_dir).
ENGINES: dict[RolloutBackend, Callable[..., RolloutEngine]] = {RolloutBackend.HF: _hf, RolloutBackend.SGLANG: _sglang}


def build_rollout_engine(
    cfg: RolloutConfig,
    hf_path: str,
    *,
    dtype: str = "float32",
    eos_token_ids: list[int] | None = None,
    device: str = "cpu",
    fault_tolerance: FaultToleranceConfig | None = None,
    log_dir: str | None = None,
) -> RolloutEngine:
    """The engine named by ``cfg.backend``: ``hf`` (in-process transformers) or ``sglang`` (HTTP servers).

    ``dtype``/``device`` apply to the HF engine (fp32 on CPU by default); SGLang takes its dtype from
    ``cfg.sglang.dtype``. ``eos_token_ids`` default to the model's ``generation_config`` / ``config``. SGLang servers
    are supervised as ``fault_tolerance`` says; the servers and router it launches log to ``log_dir``.
    """
    if cfg.backend not in ENGINES:
        raise ValueError(f"rollout.backend: {cfg.backend!r} is not one of {list(choices(RolloutBackend))}")
    return ENGINES[cfg.backend](cfg, hf_path, dtype, eos_token_ids, device, fault_tolerance, log_dir)


def build_run_engine(cfg: RunConfig) -> RolloutEngine:
    """The rollout engine of a training run: with ``trainer.async_rollout`` the HF engine runs in its own process
    (:class:`~luffy_megatron.rollout.process_engine.ProcessEngine`); launched SGLang servers and their router log to
    ``logging.out_dir/rollout_servers``."""
    if cfg.trainer.async_rollout and cfg.rollout.backend == RolloutBackend.HF:
        return ProcessEngine(
            cfg.model.hf_path, num_threads=cfg.trainer.async_rollout_threads, batch_size=cfg.rollout.hf_batch_size
        )
    log_dir = str(Path(cfg.logging.out_dir) / "rollout_servers")
    return build_rollout_engine(cfg.rollout, cfg.model.hf_path, fault_tolerance=cfg.fault_tolerance, log_dir=log_dir)
