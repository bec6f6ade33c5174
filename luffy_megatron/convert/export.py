"""Stream HF-named full tensors out of a live TP/PP-sharded Megatron model, in bounded buckets.

Used by Megatron -> HF conversion and by rollout weight sync every RL step. For each bucket of consecutive
parameters owned by one pipeline stage, the owning stage's TP ranks all-gather their shards and rebuild the HF
tensors (fused QKV / gate-up split, vocabulary padding removed); with PP > 1 the owning stage then broadcasts the
bucket as one flat buffer over the pipeline group. An MoE model's experts with expert parallelism: a bucket holds
experts of one EP rank, whose expert-TP ranks gather it; that EP rank broadcasts it over the expert-parallel group
before the pipeline broadcast.

Where tensors materialise: on **every rank of the model-parallel group** (all TP and PP ranks of a data-parallel
replica) each yielded bucket holds the full HF tensors; data-parallel replicas work independently (no cross-DP
traffic). All ranks of the model-parallel group must iterate the generator to the end together (it is collective).
Memory beyond the model is about one bucket (plus one parameter's gathered shards).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from luffy_megatron.convert.hf_io import StreamingSafetensorsWriter, copy_aux_files
from luffy_megatron.convert.load import expected_hf_shapes
from luffy_megatron.convert.mapping import VOCAB_PARAMS, Geometry, conversion_plan, global_param_names
from luffy_megatron.models.builder import ModelSpec

DEFAULT_BUCKET_BYTES = 256 * 1024**2

_SHAPES_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def _hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    key = json.dumps(spec.hf_config, sort_keys=True, default=str)
    if key not in _SHAPES_CACHE:
        _SHAPES_CACHE[key] = expected_hf_shapes(spec)
    return _SHAPES_CACHE[key]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _gather_tp(param: torch.Tensor, tp_group, tp_size: int) -> list[torch.Tensor]:
    """Every TP rank's shard of ``param`` (gloo and NCCL alike: moved as raw bytes, so any dtype works)."""
    if tp_size == 1:
        return [param.detach()]
    local = _as_bytes(param.detach())
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local, group=tp_group)
    return [p.view(param.dtype).reshape(param.shape) for p in parts]


def _gather_names(mine: dict, group, size: int) -> list[dict]:
    """Every rank's ``mine`` in ``group`` (just ours without one)."""
    if size == 1:
        return [mine]
    every: list[dict] = [None] * size  # type: ignore[list-item]
    dist.all_gather_object(every, mine, group=group)
    return every


def _owners(local: dict, plan: dict) -> tuple[dict[str, tuple[int, int]], dict[str, torch.dtype]]:
    """Global name -> (pipeline stage, expert-parallel rank) that holds it, and the parameters' dtypes.

    The EP rank is that of the one rank holding an expert's tensor, and -1 for dense parameters (every EP rank
    holds them).
    """
    ep_size = ps.get_expert_model_parallel_world_size()
    at_stage = _gather_names({g: p.dtype for g, p in local.items()}, ps.get_expert_model_parallel_group(), ep_size)
    stage_names: dict[str, tuple[int, torch.dtype]] = {}
    for ep_rank, names in enumerate(at_stage):
        for g, dt in names.items():
            stage_names.setdefault(g, (ep_rank, dt))
    stages = _gather_names(
        stage_names, ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()
    )
    owner: dict[str, tuple[int, int]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for stage, names in enumerate(stages):
        for g, (ep_rank, dt) in names.items():
            if g not in owner:
                expert = g in plan and plan[g].expert
                owner[g], dtypes[g] = (stage, ep_rank if expert else -1), dt
    return owner, dtypes


def iter_hf_weights(
    model_chunks: list[torch.nn.Module],
    spec: ModelSpec,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of ``(HF name, full tensor)`` covering the whole model once, in a fixed order.

    A bucket holds consecutive tensors of one pipeline stage (and, for an MoE model's experts, one expert-parallel
    rank) up to ``bucket_bytes`` (a single larger tensor forms its own bucket). ``dtype`` casts the output (default:
    the parameters' dtype). Collective over the model-parallel group (with expert parallelism, the expert-parallel
    group too); see the module docstring for where tensors materialise. Exact: no arithmetic touches the values.
    Yielded tensors may be views of the parameters (TP=1 without a dtype cast): copy them if they must outlive the
    next optimizer step, and never modify them in place.
    """
    plan = conversion_plan(spec)
    local = {g: p for chunk in model_chunks for g, _, p in global_param_names(chunk)}
    owner, dtypes = _owners(local, plan)
    shapes = _hf_shapes(spec)
    order = [g for g, rule in plan.items() if not rule.tied_copy]
    missing = [g for g in order if g not in owner]
    if missing:
        raise RuntimeError(f"no pipeline stage holds {missing[:8]}")

    def out_dtype(g: str) -> torch.dtype:
        return dtype or dtypes[g]

    def nbytes(g: str) -> int:
        return sum(math.prod(shapes[h]) for h in plan[g].hf) * torch.empty((), dtype=out_dtype(g)).element_size()

    buckets: list[list[str]] = []
    size = 0
    for g in order:
        if buckets and owner[g] == owner[buckets[-1][-1]] and size + nbytes(g) <= bucket_bytes:
            buckets[-1].append(g)
            size += nbytes(g)
        else:
            buckets.append([g])
            size = nbytes(g)

    my_stage, my_ep = ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    pp_group, ep_group = ps.get_pipeline_model_parallel_group(), ps.get_expert_model_parallel_group()
    with torch.no_grad():
        for bucket in buckets:
            stage, ep_rank = owner[bucket[0]]
            mine = stage == my_stage and ep_rank in (-1, my_ep)
            tensors = _bucket_tensors(bucket, local, plan, spec, out_dtype) if mine else []
            if ep_rank >= 0 and stage == my_stage and ps.get_expert_model_parallel_world_size() > 1:
                # experts: the EP rank holding them sends them to the stage's other EP ranks
                src = dist.get_process_group_ranks(ep_group)[ep_rank]
                tensors = _broadcast_bucket(tensors, bucket, plan, shapes, out_dtype, ep_group, src)
            if ps.get_pipeline_model_parallel_world_size() > 1:
                src = dist.get_process_group_ranks(pp_group)[stage]
                tensors = _broadcast_bucket(tensors, bucket, plan, shapes, out_dtype, pp_group, src)
            yield tensors


def _bucket_tensors(bucket: list[str], local: dict, plan: dict, spec: ModelSpec, out_dtype) -> list:
    """The HF tensors of this rank's bucket: each parameter's TP shards gathered (over the expert TP group for an
    expert) and rebuilt."""
    tensors: list[tuple[str, torch.Tensor]] = []
    for g in bucket:
        param, rule = local[g], plan[g]
        if rule.expert:
            tp_group, tp_size = ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size()
        else:
            tp_group, tp_size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
        dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
        geo = Geometry.of(spec, padded_vocab=param.shape[0] * tp_size if g in VOCAB_PARAMS else None)
        shards = _gather_tp(param, tp_group, tp_size) if dim is not None else [param.detach()]
        for name, t in rule.hf_from_shards(shards, geo, dim):
            tensors.append((name, t.to(out_dtype(g)).contiguous()))
    return tensors


def _broadcast_bucket(tensors, bucket, plan, shapes, out_dtype, group, src: int):
    """Send the owning rank's bucket to every rank of ``group`` as one flat byte buffer."""
    names = [(h, out_dtype(g)) for g in bucket for h in plan[g].hf]
    sizes = [math.prod(shapes[h]) * torch.empty((), dtype=dt).element_size() for h, dt in names]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if tensors:
        flat = torch.cat([_as_bytes(t) for _, t in tensors]).to(device)
    else:
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(flat, src=src, group=group)
    if tensors:
        return tensors
    out = []
    for (h, dt), part in zip(names, flat.split(sizes)):
        out.append((h, part.view(dt).reshape(shapes[h])))
    return out


def save_hf_checkpoint(
    model_chunks: list[torch.nn.Module],
    spec: ModelSpec,
    out_dir: str | Path,
    *,
    dtype: torch.dtype,
    hf_files_from: str | Path | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    progress: bool = False,
) -> None:
    """Write a complete HF folder from the live model (global rank 0 writes; every rank must call it).

    Sharded safetensors with an index, ``config.json`` (true vocabulary, ``dtype``), and the generation config and
    tokenizer files copied from ``hf_files_from``.
    """
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    plan = conversion_plan(spec)
    shapes = _hf_shapes(spec)
    order = [h for rule in plan.values() if not rule.tied_copy for h in rule.hf]
    writer = (
        StreamingSafetensorsWriter(out_dir, [(h, shapes[h], dtype) for h in order], max_shard_bytes) if rank0 else None
    )
    bar = None
    if progress and rank0:
        total = sum(math.prod(shapes[h]) for h in order) * torch.empty((), dtype=dtype).element_size()
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="export HF weights")
    for bucket in iter_hf_weights(model_chunks, spec, bucket_bytes=bucket_bytes, dtype=dtype):
        if writer is not None:
            for name, tensor in bucket:
                writer.write(name, tensor)
                if bar is not None:
                    bar.update(tensor.numel() * tensor.element_size())
        del bucket
    if bar is not None:
        bar.close()
    if writer is None:
        return
    writer.close()
    out = Path(out_dir)
    if hf_files_from is not None:
        copy_aux_files(hf_files_from, out, skip=("config.json",))
    config = dict(spec.hf_config)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config["vocab_size"] = spec.vocab_size
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
