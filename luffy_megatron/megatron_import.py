"""What must happen before the first ``import megatron.core``; run by ``luffy_megatron/__init__.py``.

Because the package's ``__init__`` runs before any of its modules, every module may import megatron-core at its top.
Part of the platform layer, kept outside ``luffy_megatron.platform`` so that importing the package stays free of torch
(``luffy-train --help`` and configuration errors answer at once).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
import warnings
from typing import Any

_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"

# Megatron's notices about its own API, printed at every start whatever the user does; matched by the start of the
# message (any other warning or log record still shows):
# - "full scope is deprecated": TransformerConfig's own default ``cuda_graph_modules="full"`` (megatron-core 0.19),
#   without effect here (no CUDA graphs);
# - "MimoModelConfig is experimental": raised when megatron's optimizer module imports the MIMO model, unused here;
# - "GPTModel IS DEPRECATED": a log record of every GPTModel built (the model class of megatron-core's GPT path).
_WARNING_NOTICES = ("full scope is deprecated", "MimoModelConfig is experimental")
_LOG_NOTICES = {"megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",)}
# Announcements of the torch fallbacks, which are the intended path without transformer-engine (five per process).
_FALLBACK_NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed")


class _DropNotices(logging.Filter):
    """Drops the log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


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
    """Make ``import megatron.core`` work without triton and keep megatron's start-up notices about its own API (and,
    without transformer-engine, about its torch fallbacks) off the console. Idempotent."""
    _stub_paged_stash_ops()
    notices = _WARNING_NOTICES
    if importlib.util.find_spec("transformer_engine") is None:
        notices += _FALLBACK_NOTICES
    for message in notices:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for name, prefixes in _LOG_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(prefixes))
