"""HF weights -> a live TP/PP-sharded Megatron model, and Megatron distributed checkpoints (save / load).

Every rank reads only its own shards: :func:`load_hf_weights` reads, for each of its parameters, the HF rows (or
columns) that this TP rank holds (of an MoE model's experts: this EP rank's experts, split over the expert TP ranks);
:func:`load_megatron_checkpoint` lets megatron's ``dist_checkpointing`` reshard a checkpoint written at any TP/PP/EP
to the model's layout. Load weights before building the optimizer (a distributed
optimizer keeps its own fp32 copy of the parameters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from luffy_megatron.convert.hf_io import HFCheckpointReader, copy_aux_files
from luffy_megatron.convert.mapping import (
    VOCAB_PARAMS,
    ConversionError,
    Geometry,
    conversion_plan,
    global_param_names,
    hf_names,
    unwrap,
)
from luffy_megatron.models.builder import ModelSpec

METADATA_NAME = "luffy_checkpoint.json"
HF_FILES_DIR = "hf"  # inside a Megatron checkpoint: config.json, generation config, tokenizer files
FORMAT_VERSION = 1


def expected_hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for the model ``spec.hf_config`` describes (built by transformers on the meta device).

    Names and shapes are those of checkpoint files: an MoE family's ``hf_file_shapes`` turns transformers' fused
    expert parameters into the per-expert tensors. Also checks that the family's mapping names exactly these tensors
    (a mapping bug otherwise).
    """
    hf = dict(spec.hf_config)
    model_type = hf.pop("model_type")
    config = AutoConfig.for_model(model_type, **hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if spec.family.hf_file_shapes is not None:
        shapes = spec.family.hf_file_shapes(shapes)
    planned = set(hf_names(conversion_plan(spec)))
    if planned != set(shapes):
        raise ConversionError(
            f"family {spec.family.name} mapping does not match transformers' {type(model).__name__}: "
            f"unmapped {sorted(set(shapes) - planned)[:8]}, unknown {sorted(planned - set(shapes))[:8]}"
        )
    return shapes


def check_hf_tensors(reader: HFCheckpointReader, spec: ModelSpec) -> None:
    """Raise :class:`ConversionError` listing missing / unexpected tensors and shape mismatches."""
    expected = expected_hf_shapes(spec)
    present = set(reader.names())
    ignored = set(spec.family.extra_hf_keys_to_ignore)
    if spec.tied_embeddings:
        ignored.add(spec.family.output_layer[1])  # some tied checkpoints still store lm_head.weight
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected) - ignored)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors ({len(extra)}): {', '.join(extra)}")
    for name in sorted(set(expected) & present):
        if tuple(reader.shape(name)) != expected[name]:
            problems.append(f"shape mismatch for {name}: expected {expected[name]}, found {tuple(reader.shape(name))}")
    if problems:
        raise ConversionError(f"{reader.dir} does not match its config.json:\n  " + "\n  ".join(problems))


def _tp(expert: bool = False) -> tuple[int, int]:
    """(rank, size) in the tensor-parallel group of a dense parameter, or of an expert's (``expert``)."""
    if expert:
        ps = parallel_state
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def check_parallel_layout(spec: ModelSpec, tp: int, ep: int = 1) -> None:
    """Raise if ``tp`` does not divide the attention heads, query groups or MLP width (of the experts too), or
    ``ep`` the experts."""
    geo = Geometry.of(spec)
    sizes = [("attention heads", geo.heads), ("query groups (kv heads)", geo.groups), ("ffn", geo.ffn)]
    experts = spec.family.num_experts(spec.hf_config)
    if experts:
        sizes.append(("expert ffn (moe_intermediate_size)", int(spec.hf_config["moe_intermediate_size"])))
    for what, n in sizes:
        if n % tp:
            raise ConversionError(f"tensor parallel size {tp} does not divide the {n} {what}")
    if ep > 1 and (not experts or experts % ep):
        raise ConversionError(f"expert parallel size {ep} does not divide the {experts} experts of {spec.family.name}")


@torch.no_grad()
def load_hf_weights(model_chunks: list[torch.nn.Module], spec: ModelSpec, hf_dir: str | Path, progress: bool = False):
    """Copy an HF checkpoint into this rank's model chunks (any TP/PP/VPP), converting on the fly.

    Checks names and shapes first (:class:`ConversionError` names the offending tensors). Each rank reads only the
    rows/columns of its shards; memory beyond the model is one HF tensor slice at a time.
    """
    check_parallel_layout(spec, _tp()[1], parallel_state.get_expert_model_parallel_world_size())
    plan = conversion_plan(spec)
    with HFCheckpointReader(hf_dir) as reader:
        check_hf_tensors(reader, spec)
        params = [p for chunk in model_chunks for p in global_param_names(chunk)]
        for gname, local, param in _progress(params, progress, "load HF weights"):
            rule = plan.get(gname)
            if rule is None:
                raise ConversionError(
                    f"model parameter {local} ({gname}) has no HF mapping in family {spec.family.name}"
                )
            tp_rank, tp_size = _tp(rule.expert)
            padded = param.shape[0] * tp_size if gname in VOCAB_PARAMS else None
            geo = Geometry.of(spec, padded_vocab=padded)
            dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
            shard = rule.shard_from_hf(reader.read, geo, tp_rank, tp_size, dim, param.shape)
            if shard.shape != param.shape:
                raise ConversionError(f"{gname}: shard shape {tuple(shard.shape)} != parameter {tuple(param.shape)}")
            param.data.copy_(shard)


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    return tqdm(items, desc=desc, unit="tensor")


def _sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    chunks = [unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_megatron_checkpoint(
    model_chunks: list[torch.nn.Module],
    spec: ModelSpec,
    ckpt_dir: str | Path,
    *,
    dtype: str,
    hf_files_from: str | Path | None = None,
    release_model: bool = False,
) -> Path:
    """Write the model as a megatron ``dist_checkpointing`` (torch_dist) checkpoint that loads at any TP/PP.

    Next to it: ``luffy_checkpoint.json`` (family, HF config, true vocabulary, dtype) and ``hf/`` with the HF config,
    generation config and tokenizer files copied from ``hf_files_from``, so the checkpoint is self-contained.
    Collective: every rank of the job calls it with the same ``ckpt_dir``.

    ``release_model`` (for one-shot conversion): megatron's writer clones every tensor that is a view (the SwiGLU
    ``[gate; up]`` halves of each ``linear_fc1``) all at once, which costs ~40% of the model on top of it. Instead the
    views are cloned one parameter at a time and the parameter's storage is freed right after, so peak memory stays
    at about one model; the chunks are unusable afterwards.
    """
    ckpt = Path(ckpt_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        ckpt.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    sharded = _sharded_state_dict(model_chunks)
    if release_model:
        _move_views_out_of_params(sharded)
    dist_checkpointing.save(sharded, str(ckpt))
    if rank0:
        meta = {
            "format_version": FORMAT_VERSION,
            "family": spec.family.name,
            "vocab_size": spec.vocab_size,
            "dtype": dtype,
            "tied_embeddings": spec.tied_embeddings,
            "hf_config": spec.hf_config,
        }
        (ckpt / METADATA_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (ckpt / HF_FILES_DIR).mkdir(exist_ok=True)
        if hf_files_from is not None:
            copy_aux_files(hf_files_from, ckpt / HF_FILES_DIR)
        (ckpt / HF_FILES_DIR / "config.json").write_text(json.dumps(spec.hf_config, indent=2, sort_keys=True) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return ckpt


def _move_views_out_of_params(sharded: dict[str, Any]) -> None:
    """Give every sharded tensor that views part of a parameter its own copy, freeing each parameter once copied."""
    apply_factories(sharded)
    by_storage: dict[int, list[ShardedTensor]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, ShardedTensor) and node.data is not None:
            storage = node.data.untyped_storage()
            if storage.nbytes() != node.data.numel() * node.data.element_size():
                by_storage.setdefault(storage.data_ptr(), []).append(node)

    walk(sharded)
    for views in by_storage.values():
        storage = views[0].data.untyped_storage()
        covered = sum(v.data.numel() * v.data.element_size() for v in views) == storage.nbytes()
        for sh_ten in views:
            sh_ten.data = sh_ten.data.clone()
        if covered:  # nothing else in the state dict reads this parameter
            storage.resize_(0)


def read_checkpoint_metadata(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``luffy_checkpoint.json`` of a checkpoint written by :func:`save_megatron_checkpoint`."""
    path = Path(ckpt_dir) / METADATA_NAME
    if not path.exists():
        raise ConversionError(f"{ckpt_dir} is not a luffy-megatron checkpoint (no {METADATA_NAME})")
    return json.loads(path.read_text())


@torch.no_grad()
def load_megatron_checkpoint(model_chunks: list[torch.nn.Module], ckpt_dir: str | Path) -> dict[str, Any]:
    """Load a checkpoint written at any TP/PP into this rank's chunks; return its metadata. Collective.

    Loads in place: sharded-tensor factories (the SwiGLU ``[gate; up]`` split of ``linear_fc1``) are applied before
    loading, so their halves are views of the parameters and megatron's merge step (which would concatenate a second
    copy of every ``linear_fc1``) is skipped. Anything the loader returns in a new buffer is copied into the parameter.
    """
    meta = read_checkpoint_metadata(ckpt_dir)
    sharded = _sharded_state_dict(model_chunks)
    apply_factories(sharded)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    _copy_into_params(sharded, loaded)
    return meta


def _copy_into_params(sharded: Any, loaded: Any) -> None:
    """Copy loaded tensors that are not already the parameters' own storage (walks the nested state dict)."""
    if isinstance(sharded, dict):
        for key, value in sharded.items():
            _copy_into_params(value, loaded[key])
    elif isinstance(sharded, list):
        for value, got in zip(sharded, loaded):
            _copy_into_params(value, got)
    elif isinstance(sharded, ShardedTensor) and isinstance(loaded, torch.Tensor):
        target = sharded.data
        if loaded.untyped_storage().data_ptr() != target.untyped_storage().data_ptr():
            target.copy_(loaded)  # not loaded in place
