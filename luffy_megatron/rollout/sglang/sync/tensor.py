"""``tensor`` weight sync, for colocated servers: each bucket is pickled with torch's ``ForkingPickler`` (CUDA-IPC
handles for GPU tensors, after SGLang's ``monkey_patch_torch_reductions``), base64-encoded and posted to
``/update_weights_from_tensor``, serialized once per server and TP rank (each consumes its own CUDA-IPC references)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from luffy_megatron.rollout.sglang.sync.base import SyncMode
from luffy_megatron.rollout.sglang.weights import iter_buckets, serialize_named_tensors


class TensorSync(SyncMode):
    """Buckets in the request bodies, inside a weight-update session."""

    session = True

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """One request per bucket and server; the last bucket's requests carry the version and flush the cache."""
        eng = self.engine
        nbytes = 0
        for bucket, last in iter_buckets(named_tensors, eng.bucket_bytes):
            named = [(n, t.detach().contiguous()) for n, t in bucket]
            bodies: dict[str, dict | None] = {}
            for url in eng.client.server_urls:  # each server and TP rank consumes its own CUDA-IPC references
                payloads = [serialize_named_tensors(named) for _ in range(eng.tp_size)]
                bodies[url] = {"serialized_named_tensors": payloads, "flush_cache": last, "abort_all_requests": False}
                if last:
                    bodies[url]["weight_version"] = str(version)  # type: ignore[index]
            self.run(eng.client.post_each("/update_weights_from_tensor", bodies))
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        return nbytes
