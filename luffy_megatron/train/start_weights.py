"""The weights a run starts from when it does not resume: ``model.hf_path``, or ``model.megatron_checkpoint``, which
is a converted Megatron checkpoint (``tools/convert_hf_to_megatron.py``) or another run's training checkpoint (a
``step_N`` folder, or a ``checkpoint.save_dir``: its newest complete one).

From a training checkpoint only the model's weights are taken: optimizer, scheduler, sampler and step start afresh,
so an RL run starts from an SFT run's checkpoint directly (SFT then RL is two commands, docs/training.md). Before
anything is loaded the checkpoint is compared with the model ``model.hf_path`` describes; another architecture or
another vocabulary stops the run with a :class:`~luffy_megatron.config.ConfigError` that says which. After loading,
the optimizer's fp32 main copies of the parameters (bf16 and fp16 runs) take the loaded values: they were copied from
the freshly built model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from luffy_megatron.config import ConfigError, RunConfig
from luffy_megatron.convert import load_hf_weights, load_megatron_checkpoint, read_checkpoint_metadata
from luffy_megatron.convert.load import METADATA_NAME
from luffy_megatron.models.builder import ModelSpec
from luffy_megatron.models.family import VOCAB_PARAMS
from luffy_megatron.train.checkpoint import latest_checkpoint

KEY = "model.megatron_checkpoint"
#: The HF config entries that decide the weights' shapes or their meaning; two configs that differ in one of them
#: describe another architecture. ``vocab_size`` is compared on its own (another vocabulary).
ARCHITECTURE_KEYS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
)


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """What a checkpoint records of its model (the fields of a converted checkpoint's ``luffy_checkpoint.json``)."""
    return {"family": spec.family.name, "vocab_size": spec.vocab_size, "hf_config": spec.hf_config}


def load_start_weights(cfg: RunConfig, policy) -> None:
    """Load the starting weights into ``policy`` (every rank) and give them to the optimizer's main copies."""
    path = cfg.model.megatron_checkpoint
    if path is None:
        load_hf_weights(policy.modules, policy.spec, cfg.model.hf_path)
    elif (step_dir := training_checkpoint(Path(path))) is not None:
        state = json.loads((step_dir / "trainer_state.json").read_text())
        check_same_model(cfg, policy, step_dir / "model_optim", state.get("model"), str(step_dir))
        sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(policy.modules)}
        loaded = dist_checkpointing.load(sharded, str(step_dir / "model_optim"))
        for i, chunk in enumerate(policy.modules):
            chunk.load_state_dict(loaded[f"model{i}"])
    elif (Path(path) / METADATA_NAME).is_file():
        check_same_model(cfg, policy, Path(path), read_checkpoint_metadata(path), path)
        load_megatron_checkpoint(policy.modules, path)
    else:
        raise ConfigError(
            f"{KEY}: {path} is neither a converted Megatron checkpoint (no {METADATA_NAME}) nor a training checkpoint "
            "(no trainer_state.json, no complete step_N folder)"
        )
    policy.optimizer.reload_model_params()


def training_checkpoint(path: Path) -> Path | None:
    """The complete training checkpoint ``path`` names (itself, or a save_dir's newest); None for any other folder."""
    if (path / "trainer_state.json").is_file():
        return path
    return latest_checkpoint(path)


def check_same_model(cfg: RunConfig, policy, tensors_dir: Path, identity: dict | None, where: str) -> None:
    """Raise :class:`ConfigError` when the checkpoint's recorded model (``identity``; None for checkpoints written
    before it was recorded) differs from this model's, or else its tensors' shapes do (this layout's vocabulary
    padding included)."""
    problems = describe_config_difference(identity, policy.spec) if identity else None
    if problems is None:
        problems = describe_shape_difference(dist_checkpointing.load_tensors_metadata(str(tensors_dir)), policy)
    if problems is not None:
        kind, details = problems
        raise ConfigError(f"{KEY}: {where} is of another {kind} than model.hf_path {cfg.model.hf_path}: {details}")


def describe_config_difference(identity: dict, spec: ModelSpec) -> tuple[str, str] | None:
    """("architecture" | "vocabulary", the differing entries) of a recorded model against ``spec``; None if equal."""
    saved, here = identity.get("hf_config", {}), spec.hf_config
    arch = [
        f"{k} {saved.get(k)!r} (model.hf_path: {here.get(k)!r})"
        for k in ARCHITECTURE_KEYS
        if saved.get(k) != here.get(k)
    ]
    if identity.get("family", spec.family.name) != spec.family.name:
        arch.insert(0, f"family {identity['family']!r} (model.hf_path: {spec.family.name!r})")
    if arch:
        return "architecture", "the checkpoint's " + ", ".join(arch)
    if identity.get("vocab_size") != spec.vocab_size:
        saved_vocab = identity.get("vocab_size")
        return "vocabulary", f"the checkpoint's model has {saved_vocab} tokens, model.hf_path's {spec.vocab_size}"
    return None


def describe_shape_difference(saved: dict[str, Any], policy) -> tuple[str, str] | None:
    """("architecture" | "vocabulary", the first differences) of the checkpoint's tensors (``load_tensors_metadata``)
    against the model's; None when every tensor of the model is there with its shape."""
    expected: dict[str, tuple[int, ...]] = {}
    for chunk in policy.modules:
        for value in chunk.sharded_state_dict().values():
            if isinstance(value, ShardedTensor):
                expected[value.key] = tuple(value.global_shape)
    found = {k: tuple(v.global_shape) for k, v in saved.items() if hasattr(v, "global_shape")}
    differ = {k: (found.get(k), shape) for k, shape in expected.items() if found.get(k) != shape}
    if not differ:
        return None
    if set(differ) <= set(VOCAB_PARAMS) and all(s and s[1:] == e[1:] for s, e in differ.values()):
        key = next(iter(differ))
        rows, here = differ[key][0][0], differ[key][1][0]
        spec = policy.spec
        return "vocabulary", (
            f"{key} has {rows} rows in the checkpoint, {here} here (vocab_size {spec.vocab_size} padded for "
            f"parallel.tp={policy.cfg.parallel.tp})"
        )
    shown = [f"{k}: {'absent' if s is None else s} in the checkpoint, {e} here" for k, (s, e) in sorted(differ.items())]
    return "architecture", "; ".join(shown[:3]) + (f"; and {len(shown) - 3} more" if len(shown) > 3 else "")
