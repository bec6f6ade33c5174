"""A model family: how an HF ``config.json`` becomes a Megatron ``TransformerConfig``, and how parameters are named.

Each family file (qwen2.py, llama.py, qwen3.py, qwen3_moe.py) declares one :class:`ModelFamily`. Parameter names are
declared, not coded: ``direct`` maps Megatron names (local layer spec, ``*`` = layer index, ``#`` = global expert index
in MoE layers) one-to-one to HF names, and three fused mappings cover the tensors Megatron stores concatenated. The
conversion code in ``luffy_megatron.convert`` interprets these declarations for every family alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from luffy_megatron.config import DTYPES, ConfigError

# In a parameter name pattern: the layer index, and the global expert index of an MoE layer's expert.
LAYER = "*"
EXPERT = "#"


@dataclass(frozen=True)
class FusedQKV:
    """Megatron ``linear_qkv`` holds, per query group, [q heads of the group; k; v] rows (weight or bias)."""

    megatron: str
    q: str
    k: str
    v: str


@dataclass(frozen=True)
class FusedGatedMLP:
    """Megatron ``linear_fc1`` of a SwiGLU MLP holds [gate; up] rows."""

    megatron: str
    gate: str
    up: str


@dataclass(frozen=True)
class ModelFamily:
    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    qkv_bias: bool
    qk_layernorm: bool
    direct: dict[str, str]
    fused_qkv: tuple[FusedQKV, ...]
    fused_mlp: tuple[FusedGatedMLP, ...]
    # Megatron name -> HF name of the output layer; absent from checkpoints with tied embeddings.
    output_layer: tuple[str, str] = ("output_layer.weight", "lm_head.weight")
    extra_hf_keys_to_ignore: tuple[str, ...] = field(default_factory=tuple)
    # MoE families: the TransformerConfig fields of the router and experts, from the HF config (None: a dense family).
    moe_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # MoE families: transformers' in-memory parameter shapes -> the shapes its checkpoints store (per-expert tensors).
    hf_file_shapes: Callable[[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]] | None = None

    def num_experts(self, hf: dict[str, Any]) -> int:
        """Routed experts per MoE layer (0 for a dense family)."""
        return 0 if self.moe_config is None else int(self.moe_config(hf)["num_moe_experts"])

    def rope_kwargs(self, hf: dict[str, Any]) -> dict[str, Any]:
        """GPTModel rotary arguments (llama 3.x frequency scaling where the config asks for it).

        Reads both config styles: transformers < 5 (``rope_theta`` and ``rope_scaling`` at top level) and
        transformers >= 5 (``rope_parameters`` holding ``rope_theta``, ``rope_type`` and the scaling fields).
        """
        rope = hf.get("rope_parameters") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000))
        kwargs: dict[str, Any] = {"rotary_base": int(theta)}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
                for key, value in expected.items():
                    if float(scaling.get(key, value)) != value:
                        raise ConfigError(f"rope_scaling.{key}={scaling[key]} is not supported (megatron uses {value})")
                kwargs.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
            elif kind not in (None, "default"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported for family {self.name}")
        return kwargs


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocabulary padded to a multiple of ``multiple * tp`` (Megatron's convention), so every TP shard is equal."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


# The dtype names of configs and command lines and their torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name ("float32", "bfloat16", "float16")."""
    if name not in TORCH_DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {list(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def transformer_config_kwargs(family: ModelFamily, hf: dict[str, Any]) -> dict[str, Any]:
    """The family-independent part of HF config -> TransformerConfig."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_layernorm,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        hidden_dropout=0.0,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        **(family.moe_config(hf) if family.moe_config else {}),
    )


def layer_direct_map(qk_norm: bool, dense_mlp: bool = True) -> dict[str, str]:
    """One-to-one names shared by the families (local layer spec on the Megatron side); ``dense_mlp=False`` leaves
    out the dense MLP's ``linear_fc2`` (an MoE family maps its experts instead)."""
    names = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
        "decoder.layers.*.input_layernorm.weight": "model.layers.*.input_layernorm.weight",
        "decoder.layers.*.pre_mlp_layernorm.weight": "model.layers.*.post_attention_layernorm.weight",
        "decoder.layers.*.self_attention.linear_proj.weight": "model.layers.*.self_attn.o_proj.weight",
    }
    if dense_mlp:
        names["decoder.layers.*.mlp.linear_fc2.weight"] = "model.layers.*.mlp.down_proj.weight"
    if qk_norm:
        names["decoder.layers.*.self_attention.q_layernorm.weight"] = "model.layers.*.self_attn.q_norm.weight"
        names["decoder.layers.*.self_attention.k_layernorm.weight"] = "model.layers.*.self_attn.k_norm.weight"
    return names


QKV_WEIGHT = FusedQKV(
    "decoder.layers.*.self_attention.linear_qkv.weight",
    "model.layers.*.self_attn.q_proj.weight",
    "model.layers.*.self_attn.k_proj.weight",
    "model.layers.*.self_attn.v_proj.weight",
)
QKV_BIAS = FusedQKV(
    "decoder.layers.*.self_attention.linear_qkv.bias",
    "model.layers.*.self_attn.q_proj.bias",
    "model.layers.*.self_attn.k_proj.bias",
    "model.layers.*.self_attn.v_proj.bias",
)
GATED_MLP = FusedGatedMLP(
    "decoder.layers.*.mlp.linear_fc1.weight",
    "model.layers.*.mlp.gate_proj.weight",
    "model.layers.*.mlp.up_proj.weight",
)

# Layer-relative names of the norms that transformer-engine's layer spec fuses into the following linear
# (local spec name -> TE spec name); the converter translates TE names back before applying the mappings above.
# Megatron parameters whose first dimension is the (padded, TP-split) vocabulary.
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")

TE_FUSED_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
