"""Streaming safetensors I/O for HF folders: read row ranges without mmap, write shards tensor by tensor.

Both sides avoid holding a checkpoint in memory. The reader parses safetensors headers itself and reads only the
bytes of the requested rows with ``pread`` (no memory map, so the process RSS does not grow with the file). The writer
knows every tensor's name, shape and dtype up front, so it writes each shard's header first and then appends tensor
bytes as they arrive.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from luffy_megatron.convert.mapping import ConversionError

SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
# Everything but weights that makes an HF folder usable: configs, tokenizer files, chat template.
HF_AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class HFCheckpointReader:
    """Tensors of an HF folder (``model.safetensors`` or an index with shards), read lazily row range by row range."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise ConversionError(f"{self.dir}: no model.safetensors or {INDEX_NAME} (only safetensors are supported)")
        self._entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...], int]] = {}
        for file in files:
            path = self.dir / file
            header, data_start = _read_header(path)
            for name, meta in header.items():
                if meta["dtype"] not in SAFETENSORS_DTYPES:
                    raise ConversionError(f"{name}: unsupported dtype {meta['dtype']}")
                begin, _ = meta["data_offsets"]
                dtype = SAFETENSORS_DTYPES[meta["dtype"]]
                self._entries[name] = (path, data_start + begin, dtype, tuple(meta["shape"]), 0)
        self._fds: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][3]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][2]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(
        self, name: str, dim: int | None = None, start: int | None = None, stop: int | None = None
    ) -> torch.Tensor:
        """The tensor, or its slice ``[start, stop)`` along ``dim`` (dim 0 reads only those rows' bytes)."""
        path, offset, dtype, shape, _ = self._entries[name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        row = math.prod(shape[1:]) * itemsize if shape else itemsize
        if dim == 0:
            rows = (start or 0, shape[0] if stop is None else stop)
            offset += rows[0] * row
            shape = (rows[1] - rows[0], *shape[1:])
        nbytes = math.prod(shape) * itemsize
        buf = bytearray(nbytes)
        view = memoryview(buf)
        fd, done = self._fd(path), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ConversionError(f"{path}: truncated while reading {name}")
            done += n
        tensor = torch.frombuffer(buf, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
        if dim not in (None, 0):
            tensor = tensor.narrow(dim, start or 0, (stop or shape[dim]) - (start or 0)).contiguous()
        return tensor

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamingSafetensorsWriter:
    """Writes planned tensors into ``model-0000i-of-0000N.safetensors`` shards plus the index, in plan order.

    ``plan`` lists ``(name, shape, dtype)`` in the order :meth:`write` will receive them; shards are cut at
    ``max_shard_bytes``. Only the tensor being written is held.
    """

    def __init__(
        self, out_dir: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
    ) -> None:
        self.dir = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[1]) * torch.empty((), dtype=entry[2]).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self._queue: list[tuple[str, tuple[int, ...], torch.dtype, str]] = []
        self._headers: list[tuple[str, bytes]] = []
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype in shard:
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                header[name] = {
                    "dtype": DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
                weight_map[name] = file
                self._queue.append((name, shape, dtype, file))
            total += offset
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self._headers.append((file, struct.pack("<Q", len(raw)) + raw))
        self._index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        self._pos = 0
        self._file: str | None = None
        self._handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise ConversionError(f"unexpected tensor {name}: all planned tensors are written")
        want, shape, dtype, file = self._queue[self._pos]
        if name != want or tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"expected {want} {tuple(shape)}, got {name} {tuple(tensor.shape)}")
        if file != self._file:
            self._open(file)
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        self._handle.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
        self._pos += 1

    def _open(self, file: str) -> None:
        if self._handle is not None:
            self._handle.close()
        header = dict(self._headers)[file]
        self._handle = open(self.dir / file, "wb")  # noqa: SIM115 (closed in _open / close)
        self._handle.write(header)
        self._file = file

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._file = None
        if self._pos != len(self._queue):
            missing = [q[0] for q in self._queue[self._pos :]]
            raise ConversionError(f"{len(missing)} planned tensors were not written: {missing[:8]}")
        (self.dir / INDEX_NAME).write_text(json.dumps(self._index, indent=2) + "\n")


def write_tensors(out_dir: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], plan, max_shard_bytes: int) -> None:
    writer = StreamingSafetensorsWriter(out_dir, plan, max_shard_bytes)
    for name, tensor in tensors:
        writer.write(name, tensor)
    writer.close()


def copy_aux_files(src: str | Path, dst: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``src``; return their names."""
    copied = []
    for name in HF_AUX_FILES:
        if name in skip:
            continue
        path = Path(src) / name
        if path.exists():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"output {out} exists and is not empty (pass --overwrite to replace it)")


def prepare_output_dir(out: str | Path, overwrite: bool) -> Path:
    """A fresh temporary folder next to ``out`` (``.<name>.tmp``); refuses a non-empty ``out`` unless overwrite.

    Write there and call :func:`commit_output_dir`: an interrupted conversion leaves no complete-looking ``out``.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def temp_dir_for(out: str | Path) -> Path:
    """Where a conversion to ``out`` writes before the final rename (the same on every rank)."""
    out = Path(out)
    return out.parent / f".{out.name}.tmp"


def commit_output_dir(tmp: str | Path, out: str | Path) -> Path:
    """Move the finished temporary folder to ``out`` (replacing it)."""
    out = Path(out)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        Path(tmp).rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        Path(tmp).rename(out)
    return out
