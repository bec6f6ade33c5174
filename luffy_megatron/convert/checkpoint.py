"""Whole-checkpoint conversions HF <-> Megatron, as the command-line tools run them (single process or torchrun).

A Megatron checkpoint written here is layout-free (``dist_checkpointing`` reshards on load), so a single process is
enough unless the model does not fit one process's memory; under ``torchrun`` with ``tp * pp`` dividing the world
size each rank reads and writes only its own shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from luffy_megatron.config import read_hf_config
from luffy_megatron.convert.export import save_hf_checkpoint
from luffy_megatron.convert.hf_io import check_output_dir, commit_output_dir, prepare_output_dir, temp_dir_for
from luffy_megatron.convert.load import (
    HF_FILES_DIR,
    check_parallel_layout,
    load_hf_weights,
    load_megatron_checkpoint,
    read_checkpoint_metadata,
    save_megatron_checkpoint,
)
from luffy_megatron.convert.mapping import ConversionError
from luffy_megatron.models.builder import ModelSpec, build_gpt_model, build_transformer_config, model_spec
from luffy_megatron.models.family import torch_dtype
from luffy_megatron.platform import init_distributed, init_model_parallel, rank0_call


def hf_dtype_name(hf_config: dict) -> str:
    """The checkpoint precision an HF config declares (``dtype`` or ``torch_dtype``), default float32."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return str(name).removeprefix("torch.")


def setup_parallel(tp: int, pp: int) -> None:
    """Initialise torch.distributed (torchrun env or a single process) and megatron's TP/PP groups."""
    init_distributed()
    world = dist.get_world_size()
    if world % (tp * pp):
        hint = f" (run under torchrun --nproc-per-node {tp * pp})" if world == 1 else ""
        raise ConversionError(f"tp * pp = {tp * pp} does not divide the world size {world}{hint}")
    init_model_parallel(tp, pp)


def build_model(spec: ModelSpec, tp: int, pp: int, dtype: str) -> list[torch.nn.Module]:
    """This rank's model chunks with uninitialised weights (every tensor is loaded afterwards)."""
    config = build_transformer_config(spec, tp=tp, pp=pp, dtype=dtype, perform_initialization=False)
    return build_gpt_model(spec, config)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _prepare(out: Path, overwrite: bool) -> Path:
    """Rank 0 checks ``out`` and creates its temp folder; a failure there raises on every rank."""
    rank0_call(lambda: prepare_output_dir(out, overwrite), f"preparing {out}")
    return temp_dir_for(out)


def _finish(tmp: Path, out: Path) -> None:
    if dist.is_initialized():
        dist.barrier()
    if _rank0():
        commit_output_dir(tmp, out)
    if dist.is_initialized():
        dist.barrier()


def _abort(tmp: Path) -> None:
    if _rank0() and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """HF folder -> Megatron distributed checkpoint in ``out`` (written to a temp folder, renamed at the end)."""
    out = Path(out)
    hf_config = read_hf_config(hf_dir, key="hf_dir")
    spec = model_spec(hf_config, tp=tp)
    check_parallel_layout(spec, tp)
    dtype = dtype or hf_dtype_name(hf_config)
    check_output_dir(out, overwrite)
    setup_parallel(tp, pp)
    tmp = _prepare(out, overwrite)
    try:
        chunks = build_model(spec, tp, pp, dtype)
        load_hf_weights(chunks, spec, hf_dir, progress=progress and _rank0())
        save_megatron_checkpoint(chunks, spec, tmp, dtype=dtype, hf_files_from=hf_dir, release_model=True)
        del chunks
        _finish(tmp, out)
    except BaseException:
        _abort(tmp)
        raise
    return out


def convert_megatron_to_hf(
    megatron_dir: str | Path,
    out: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 4 * 1024**3,
    progress: bool = False,
) -> Path:
    """Megatron checkpoint (from :func:`convert_hf_to_megatron` or training) -> complete HF folder in ``out``."""
    out = Path(out)
    meta = read_checkpoint_metadata(megatron_dir)
    spec = model_spec(meta["hf_config"], tp=tp)
    check_parallel_layout(spec, tp)
    out_dtype = dtype or meta["dtype"]
    check_output_dir(out, overwrite)
    setup_parallel(tp, pp)
    chunks = build_model(spec, tp, pp, meta["dtype"])
    load_megatron_checkpoint(chunks, megatron_dir)
    write_hf_folder(
        chunks,
        spec,
        out,
        dtype=out_dtype,
        hf_files_from=Path(megatron_dir) / HF_FILES_DIR,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
    )
    return out


def write_hf_folder(
    model_chunks: list[torch.nn.Module],
    spec: ModelSpec,
    out: str | Path,
    *,
    dtype: str,
    hf_files_from: str | Path,
    overwrite: bool = False,
    max_shard_bytes: int = 4 * 1024**3,
    progress: bool = False,
) -> Path:
    """A complete HF folder from a live (sharded) model, collectively; written beside ``out`` and renamed when
    complete, so an interrupted write never leaves a folder that looks finished."""
    out = Path(out)
    tmp = _prepare(out, overwrite)
    try:
        save_hf_checkpoint(
            model_chunks,
            spec,
            tmp,
            dtype=torch_dtype(dtype),
            hf_files_from=hf_files_from,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
        _finish(tmp, out)
    except BaseException:
        _abort(tmp)
        raise
    return out
