"""The ``sglang`` test tier: the real SGLang server and sglang-router, on SGLang's CPU engine.

``make test`` builds their environment once (``.venv-sglang``, see the Makefile); the two CUDA-only wheels SGLang
imports at start-up are replaced by the import-level stand-ins of ``tests/sglang_cpu`` (test scaffolding, on the
servers' ``PYTHONPATH`` only). Servers are launched by the project's own launcher with ``rollout.sglang.device=cpu``,
exactly as a user's config would launch them.
"""

from __future__ import annotations

from pathlib import Path

from luffy_megatron.config import SGLangConfig
from luffy_megatron.platform.ports import free_port_block
from tests.tiers import skip_tier

__all__ = ["cpu_server_config", "cpu_server_overrides", "free_port_block", "sglang_python"]

REPO = Path(__file__).resolve().parents[1]
SGLANG_VENV = REPO / ".venv-sglang"
STAND_INS = Path(__file__).resolve().parent / "sglang_cpu"
#: KV-cache tokens of a CPU test server: sized for the tests (the default takes a fraction of the machine's memory).
MAX_TOTAL_TOKENS = 16384


def sglang_python() -> str:
    """The tier's interpreter, or a tier skip (a failure under ``LUFFY_REQUIRE_ALL_TIERS=1``) saying why not."""
    if not (SGLANG_VENV / ".installed").is_file():
        log = SGLANG_VENV.parent / f"{SGLANG_VENV.name}.log"
        skip_tier("sglang", f"{SGLANG_VENV} is not built (`make sglang-venv`; its log: {log})")
    return str(SGLANG_VENV / "bin" / "python")


def cpu_server_overrides(python: str, base_port: int, *, dtype: str = "float32") -> list[str]:
    """``rollout.sglang`` overrides that launch real servers on SGLang's CPU engine (what a user on a CPU sets)."""
    return [
        "rollout.sglang.device=cpu",
        f"rollout.sglang.python={python}",
        f"rollout.sglang.env.PYTHONPATH={STAND_INS}",
        "rollout.sglang.env.OMP_NUM_THREADS=1",
        f"rollout.sglang.dtype={dtype}",
        f"rollout.sglang.base_port={base_port}",
        f"rollout.sglang.router_port={base_port + 30}",
        "rollout.sglang.startup_timeout_s=300",
        f"rollout.sglang.extra_args=[--max-total-tokens,{MAX_TOTAL_TOKENS}]",
    ]


def cpu_server_config(python: str, base_port: int, **fields) -> SGLangConfig:
    """An :class:`SGLangConfig` that launches real CPU servers (``fields`` override the rest)."""
    env = {"PYTHONPATH": str(STAND_INS), "OMP_NUM_THREADS": "1"}
    extra = ["--max-total-tokens", str(MAX_TOTAL_TOKENS)]
    cfg = SGLangConfig(
        launch=True,
        device="cpu",
        python=python,
        dtype="float32",
        base_port=base_port,
        router_port=base_port + 30,
        startup_timeout_s=300.0,
        extra_args=extra,
        env=env,
    )
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg
