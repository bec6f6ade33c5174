"""What must happen before the first ``import megatron.core``; run by ``luffy_megatron/__init__.py``.

Because the package's ``__init__`` runs before any of its modules, every module may import megatron-core at its top.
Part of the platform layer, kept outside ``luffy_megatron.platform`` so that importing the package stays free of torch
(``luffy-train --help`` and configuration errors answer at once).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from typing import Any

_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"


def _stub_paged_stash_ops() -> None:
    """Fixes ``import megatron.core`` failing without triton.

    ``megatron/core/transformer/moe/ops/paged_stash.py`` imports triton unguarded (MoE paged stashing kernels, CUDA
    only) and is reached from ``gpt_model`` and the pipeline schedules. Without triton we register a module with the
    same names whose kernels raise if ever launched.
    """
    if _PAGED_STASH in sys.modules or importlib.util.find_spec("triton") is not None:
        return

    def _unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MoE paged stash kernels need triton and CUDA")

    stub = types.ModuleType(_PAGED_STASH)
    stub.GLOBAL_BLOCK_SIZE = 1024  # type: ignore[attr-defined]
    stub.paged_stash_copy_kernel = _unavailable  # type: ignore[attr-defined]
    stub.paged_stash_pop_kernel = _unavailable  # type: ignore[attr-defined]
    sys.modules[_PAGED_STASH] = stub


def prepare_megatron_import() -> None:
    """Make ``import megatron.core`` work without triton and, when transformer-engine is absent, silence megatron's
    "Transformer Engine and Apex are not installed" / "Apex is not installed" UserWarnings (five per process on a
    CPU machine; the torch fallbacks they announce are the intended path there). Idempotent."""
    _stub_paged_stash_ops()
    if importlib.util.find_spec("transformer_engine") is None:
        for message in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
