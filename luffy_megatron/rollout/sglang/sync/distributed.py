"""``distributed`` weight sync: once, ``/init_weights_update_group`` puts the trainer (rank 0) and every server GPU
(rank ``1 + i * tp_size + tp_rank``) into one NCCL (or gloo) group around a store the trainer hosts; per bucket,
``/update_weights_from_distributed`` carries names, dtypes and shapes while the trainer broadcasts the tensors."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from luffy_megatron.platform.ports import free_port
from luffy_megatron.rollout.base import RolloutError
from luffy_megatron.rollout.sglang.sync.base import SyncMode
from luffy_megatron.rollout.sglang.weights import GROUP_NAME, init_weights_update_group, iter_buckets

if TYPE_CHECKING:
    from luffy_megatron.rollout.sglang.engine import SGLangEngine

logger = logging.getLogger(__name__)


class DistributedSync(SyncMode):
    """Broadcasts over a weight-update group made at the first push and made again when the servers change."""

    session = True

    def __init__(self, engine: SGLangEngine) -> None:
        super().__init__(engine)
        #: The trainer's side of the group (None until the first push) and the servers in it.
        self.group: Any = None
        self.group_urls: list[str] = []
        self._group_name = GROUP_NAME  # a fresh name per group: one that was not destroyed never blocks the next

    def prepare(self, joining: set[str]) -> None:
        """Leave the group when its members changed (the next push makes a new one)."""
        urls = self.engine.client.server_urls
        if self.group is not None and urls != self.group_urls:
            self.drop([u for u in self.group_urls if u in urls and u not in joining])

    def drop(self, alive: list[str]) -> None:
        """Leave the group; the servers in ``alive`` destroy their side (best effort)."""
        try:
            body = {"group_name": self._group_name}
            self.run(self.engine.client.post_all("/destroy_weights_update_group", body, urls=alive))
        except RolloutError as e:
            logger.warning("destroying the old weight-update group: %s", e)
        dist.destroy_process_group(self.group)
        self.group = None

    def init(self) -> None:
        """Join the servers' group (once): rank 0 here, server ``i`` TP rank ``r`` at ``1 + i * tp + r``."""
        if self.group is not None:
            return
        eng = self.engine
        urls = eng.client.server_urls
        world = 1 + len(urls) * eng.tp_size
        port = eng.master_port or free_port()
        self._group_name = f"{GROUP_NAME}_{uuid.uuid4().hex[:8]}"
        futures: list[Future] = []
        for i, url in enumerate(urls):
            body = {
                "master_address": eng.master_address,
                "master_port": port,
                "rank_offset": 1 + i * eng.tp_size,
                "world_size": world,
                "group_name": self._group_name,
                "backend": eng.group_backend,
            }
            futures.append(self._submit(eng.client.post_all("/init_weights_update_group", body, urls=[url])))
        try:
            self.group = init_weights_update_group(
                eng.master_address, port, 0, world, self._group_name, eng.group_backend
            )
        except BaseException:
            for f in futures:  # the servers' side waits for a store that is not there: do not wait for it
                f.cancel()
            raise
        for f in futures:
            f.result()
        self.group_urls = list(urls)

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        """Start a client coroutine on the engine's loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.engine.loop.loop)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Per bucket, the servers' request and the trainer's broadcasts run together; the last carries the version."""
        self.init()
        eng = self.engine
        device = torch.device("cuda", torch.cuda.current_device()) if eng.group_backend == "nccl" else "cpu"
        nbytes = 0
        for bucket, last in iter_buckets(named_tensors, eng.bucket_bytes):
            body: dict[str, Any] = {
                "names": [n for n, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": self._group_name,
                "flush_cache": last,
            }
            if last:
                body["weight_version"] = str(version)
            fut = self._submit(eng.client.post_all("/update_weights_from_distributed", body))
            try:
                for _, t in bucket:
                    dist.broadcast(t.detach().to(device).contiguous(), src=0, group=self.group)
                    nbytes += t.numel() * t.element_size()
            finally:
                fut.result()
        return nbytes

    def close(self) -> None:
        """Destroy the trainer's side of the group."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
