"""``disk`` weight sync: the stream is written as HF safetensors shards (``bucket_bytes`` each, plus the model's
config files) into ``weight_sync_dir/v{version}`` and every server loads it with ``/update_weights_from_disk``.
Needs a filesystem shared by trainer and servers; the folder is what a revived server loads."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from luffy_megatron.rollout.sglang.sync.base import SyncMode
from luffy_megatron.rollout.sglang.weights import write_hf_folder

if TYPE_CHECKING:
    from luffy_megatron.rollout.sglang.engine import SGLangEngine


class DiskSync(SyncMode):
    """A safetensors folder per version; the previous one is deleted once every server loaded the new one."""

    def __init__(self, engine: SGLangEngine) -> None:
        super().__init__(engine)
        self._last_dir: Path | None = None

    @property
    def folder(self) -> Path | None:
        return self._last_dir

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Write, then load on every server; ``phases`` gets ``write_s`` and ``load_s``."""
        eng = self.engine
        assert eng.weight_sync_dir is not None
        t0 = time.perf_counter()
        folder = Path(eng.weight_sync_dir) / f"v{version}"
        final, nbytes = write_hf_folder(named_tensors, folder, eng.bucket_bytes, eng.hf_path)
        self.phases = {"write_s": time.perf_counter() - t0}
        body = {
            "model_path": str(final),
            "weight_version": str(version),
            "flush_cache": True,
            "abort_all_requests": False,
        }
        t1 = time.perf_counter()
        self.run(eng.client.post_all("/update_weights_from_disk", body))
        self.phases["load_s"] = time.perf_counter() - t1
        if self._last_dir is not None and self._last_dir != final:
            shutil.rmtree(self._last_dir, ignore_errors=True)
        self._last_dir = final
        return nbytes
