"""Weight-sync building blocks shared with SGLang's side: buckets, tensor payloads, the update group, the address.

Each follows the pinned SGLang source (``tests/test_upstream_contract.py`` checks them against it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory / CUDA-IPC reducers for ForkingPickler
from safetensors.torch import save_file
from torch.distributed import distributed_c10d as c10d

from luffy_megatron.config import GroupBackend
from luffy_megatron.models.tokenizer import HF_CONFIG_FILES
from luffy_megatron.rollout.base import RolloutError, WeightSyncError

#: SGLang's default ``group_name`` of the weight-update requests.
GROUP_NAME = "weight_update_group"


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """Group a stream into buckets of at most ``bucket_bytes`` (a larger tensor is a bucket alone); yields (bucket,
    is_last)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    pending: list[tuple[str, torch.Tensor]] | None = None
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            if pending is not None:
                yield pending, False
            pending, bucket, size = bucket, [], 0
        bucket.append((name, t))
        size += nbytes
    if pending is not None:
        yield pending, not bucket
    if bucket:
        yield bucket, True


def write_hf_folder(
    named_tensors: Iterable[tuple[str, torch.Tensor]], final: Path, bucket_bytes: int, hf_path: str | None
) -> tuple[Path, int]:
    """The stream as HF safetensors shards of ``bucket_bytes`` plus their index and ``hf_path``'s config files, in
    ``final`` (written beside it, then renamed: a folder at ``final`` is always whole). Returns (folder, bytes)."""
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    nbytes = 0
    index: dict[str, str] = {}
    for k, (bucket, _) in enumerate(iter_buckets(named_tensors, bucket_bytes)):
        fname = f"model-{k:05d}.safetensors"
        tensors = {name: t.detach().contiguous().cpu() for name, t in bucket}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            index[name] = fname
            nbytes += t.numel() * t.element_size()
    index_json = {"metadata": {"total_size": nbytes}, "weight_map": index}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    for cfg_name in HF_CONFIG_FILES if hf_path else ():
        if (Path(hf_path) / cfg_name).is_file():
            shutil.copy(Path(hf_path) / cfg_name, tmp / cfg_name)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final, nbytes


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``MultiprocessingSerializer`` format: ForkingPickler bytes (shared memory / CUDA IPC), base64.

    CUDA tensors need SGLang's reducers (device UUIDs instead of indices, so a server with another
    ``CUDA_VISIBLE_DEVICES`` finds the device), installed by ``monkey_patch_torch_reductions``. CPU tensors are shared
    as named shared-memory files (torch's ``file_system`` strategy, for this call only): the default strategy passes
    file descriptors through a connection that only this process's children may open, and the server dies on it.
    """
    if any(t.is_cuda for _, t in named):
        try:  # lazy: sglang is an optional dependency of the trainer, needed only for CUDA tensors here
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError as e:
            raise WeightSyncError("weight_sync=tensor with CUDA tensors needs sglang importable by the trainer") from e
        monkey_patch_torch_reductions()
    buf = io.BytesIO()
    strategy = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        ForkingPickler(buf).dump(named)
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def init_weights_update_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "nccl",
    timeout_s: float = 600.0,
) -> Any:
    """A process group outside the default one (trainer rank 0 + server GPUs), joined the way SGLang's servers join
    theirs (``sglang.srt.utils.common.init_custom_process_group``): a TCP store wrapped in ``PrefixStore(group_name)``,
    or the two sides would wait on different keys.

    The store is built here, hosted by rank 0, rather than through ``torch.distributed.rendezvous``: under torchrun
    (``TORCHELASTIC_USE_AGENT_STORE=True``) a ``tcp://`` rendezvous makes every rank a client, so the trainer would
    never host the store the servers connect to.
    """
    timeout = timedelta(seconds=timeout_s)
    host = rank == 0
    store = torch.distributed.TCPStore(master_address, master_port, world_size, host, timeout, wait_for_workers=False)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store, group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def resolve_group_backend(setting: str) -> str:
    """``rollout.sglang.weight_sync_backend`` as a torch.distributed backend: ``auto`` follows the trainer's platform
    (NCCL where CUDA is available, else gloo)."""
    if setting == GroupBackend.AUTO:
        return GroupBackend.NCCL.value if torch.cuda.is_available() else GroupBackend.GLOO.value
    return GroupBackend(setting).value


def trainer_address(server_urls: Iterable[str]) -> str:
    """The address servers use to reach this process's weight-update store.

    ``LUFFY_WEIGHT_SYNC_ADDR`` when set; loopback when every server is local; else the source address of this host's
    route to the first remote server (asked of the kernel with an unconnected UDP socket; nothing is sent). The
    host name's address is not used: Debian-style hosts map it to 127.0.1.1, which remote servers cannot reach.
    """
    if os.environ.get("LUFFY_WEIGHT_SYNC_ADDR"):
        return os.environ["LUFFY_WEIGHT_SYNC_ADDR"]
    parsed = [urlparse(u) for u in server_urls]
    remote = [p for p in parsed if p.hostname not in ("127.0.0.1", "localhost", "::1")]
    if not remote:
        return "127.0.0.1"
    host, port = remote[0].hostname, remote[0].port or 80
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except OSError as e:
        raise RolloutError(
            f"no route from this host to the SGLang server {host}; set LUFFY_WEIGHT_SYNC_ADDR to an address of this "
            f"host that the servers can reach ({e})"
        ) from e
