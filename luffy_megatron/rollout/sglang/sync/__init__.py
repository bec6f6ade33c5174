"""Weight-sync modes of the SGLang engine, one module each, and the table ``rollout.sglang.weight_sync`` picks from."""

from __future__ import annotations

from luffy_megatron.config import WeightSync
from luffy_megatron.rollout.sglang.sync.base import SyncMode
from luffy_megatron.rollout.sglang.sync.disk import DiskSync
from luffy_megatron.rollout.sglang.sync.distributed import DistributedSync
from luffy_megatron.rollout.sglang.sync.tensor import TensorSync

__all__ = ["SYNC_MODES", "DiskSync", "DistributedSync", "SyncMode", "TensorSync"]

#: ``rollout.sglang.weight_sync`` -> the mode's class (made with the engine it serves).
SYNC_MODES: dict[WeightSync, type[SyncMode]] = {
    WeightSync.DISK: DiskSync,
    WeightSync.DISTRIBUTED: DistributedSync,
    WeightSync.TENSOR: TensorSync,
}
