"""Megatron-core's start-up notices about its own API stay off the console; real warnings still show.

A fresh process builds the trainer's policy (GPT model chunks, DDP, distributed optimizer) the way ``luffy-train``
does on CPU. The control run first removes our filters, so the test fails if megatron stops emitting these notices
(the filter would then be dead code) as well as when a notice leaks.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_models import tiny_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NOTICES = (
    "GPTModel IS DEPRECATED",
    "full scope is deprecated",
    "MimoModelConfig is experimental",
    "Transformer Engine and Apex are not installed",
)
SCRIPT = """
import logging, sys, warnings
from luffy_megatron.megatron_import import _LOG_NOTICES
if sys.argv[2] == "unfiltered":
    warnings.resetwarnings()
    for name in _LOG_NOTICES:
        logging.getLogger(name).filters.clear()
from luffy_megatron.config import load_config, read_hf_config
from luffy_megatron.models.builder import model_spec
from luffy_megatron.platform import init_distributed, init_model_parallel
from luffy_megatron.train.policy import MegatronPolicy

init_distributed("gloo")
init_model_parallel(1, 1, None, seed=1)
hf = sys.argv[1]
MegatronPolicy(load_config(None, [f"model.hf_path={hf}", "model.dtype=float32"]), model_spec(read_hf_config(hf), 1), 0)
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("a real GPTModel warning")
warnings.warn("a real megatron-core warning", UserWarning)
"""


def build_policy(mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", SCRIPT, str(tiny_checkpoint("qwen2")), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_startup_notices_are_filtered_and_real_warnings_are_not():
    quiet = build_policy("filtered")
    assert "a real GPTModel warning" in quiet and "a real megatron-core warning" in quiet, quiet
    assert [n for n in NOTICES if n in quiet] == [], quiet
    loud = build_policy("unfiltered")
    expected = NOTICES[:-1] if importlib.util.find_spec("transformer_engine") else NOTICES
    assert [n for n in expected if n not in loud] == [], loud
