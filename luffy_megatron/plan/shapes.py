"""Model shapes for the planner: an HF ``config.json`` (or a recipe YAML naming one) -> the parameters each rank holds.

Parameters are listed per model chunk in the order megatron-core's ``GPTModel`` registers them (embedding, then per
layer input norm, attention output and QKV projections, QK norms, MLP norm, MLP, then final norm and output layer),
with their numel under tensor parallelism and whether they are norms (which the local layer spec keeps in fp32). An
MoE layer's MLP is its router (``[experts, hidden]``, not split) and the ``experts / EP`` experts of this EP rank,
each a SwiGLU MLP split over TP as a dense one is (megatron's expert TP is the TP size here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.config_checks import expert_count
from luffy_megatron.models.family import padded_vocab_size

# config.json values of the recipes' models and of Qwen3-30B-A3B (huggingface.co/Qwen/<name>/blob/main/config.json),
# used when a recipe's model.hf_path is not on this machine.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen2.5-Math-7B": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
    ),
    "Qwen2.5-32B": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
    ),
    "Qwen3-30B-A3B": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        norm_topk_prob=True,
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: sizes of the transformer and its vocabulary."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    experts: int = 0  # routed experts per layer (0: a dense model); every layer is an MoE layer
    topk: int = 0  # experts per token
    moe_ffn: int = 0  # an expert's intermediate size

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "model") -> ModelShape:
        model_type = hf.get("model_type", "")
        heads = int(hf["num_attention_heads"])
        experts = int(expert_count(hf)[1] or 0)
        return cls(
            name=name,
            layers=int(hf["num_hidden_layers"]),
            hidden=int(hf["hidden_size"]),
            ffn=int(hf["intermediate_size"]),
            heads=heads,
            kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            vocab=int(hf["vocab_size"]),
            tied=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type.startswith("qwen3"),
            experts=experts,
            topk=int(hf["num_experts_per_tok"]) if experts else 0,
            moe_ffn=int(hf["moe_intermediate_size"]) if experts else 0,
        )

    def num_params(self) -> int:
        """Parameters of the HF model (unpadded vocabulary)."""
        per_layer = sum(p.numel for p in layer_params(self, 1))
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embed + self.hidden


def load_shape(path: str) -> tuple[ModelShape, Any]:
    """A model shape from an HF folder / ``config.json``, or a recipe YAML (returns its RunConfig too, else None)."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        cfg = load_config(str(p), [])
        hf_dir = Path(cfg.model.hf_path)
        if (hf_dir / "config.json").is_file():
            return ModelShape.from_hf(_read_json(hf_dir / "config.json"), hf_dir.name), cfg
        if hf_dir.name in KNOWN_MODELS:
            return ModelShape.from_hf(KNOWN_MODELS[hf_dir.name], hf_dir.name), cfg
        raise ConfigError(f"{path}: model.hf_path {hf_dir} has no config.json and is not one of {list(KNOWN_MODELS)}")
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{path}: no such config.json, model folder or recipe YAML")
    return ModelShape.from_hf(_read_json(p), p.parent.name), None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e


class Param(NamedTuple):
    """One parameter of a rank."""

    name: str
    numel: int  # on this rank
    norm: bool  # a norm weight (fp32 in the local layer spec)
    expert: bool = False  # an expert's weight: reduced over the expert-DP group, in its own buffers when EP > 1


def layer_params(m: ModelShape, tp: int, ep: int = 1) -> list[Param]:
    """One transformer layer's parameters on a TP (and EP) rank, in registration order."""
    q, kv = m.heads * m.head_dim // tp, m.kv_heads * m.head_dim // tp
    out = [
        Param("input_layernorm.weight", m.hidden, True),
        Param("self_attention.linear_proj.weight", m.hidden * q, False),
        Param("self_attention.linear_qkv.weight", (q + 2 * kv) * m.hidden, False),
    ]
    if m.qkv_bias:
        out.append(Param("self_attention.linear_qkv.bias", q + 2 * kv, False))
    if m.qk_norm:
        out += [
            Param("self_attention.q_layernorm.weight", m.head_dim, True),
            Param("self_attention.k_layernorm.weight", m.head_dim, True),
        ]
    out.append(Param("pre_mlp_layernorm.weight", m.hidden, True))
    if not m.experts:
        return out + [
            Param("mlp.linear_fc1.weight", 2 * m.ffn // tp * m.hidden, False),
            Param("mlp.linear_fc2.weight", m.hidden * (m.ffn // tp), False),
        ]
    out.append(Param("mlp.router.weight", m.experts * m.hidden, False))
    for e in range(m.experts // ep):
        expert = f"mlp.experts.local_experts.{e}"
        out.append(Param(f"{expert}.linear_fc1.weight", 2 * m.moe_ffn // tp * m.hidden, False, True))
        out.append(Param(f"{expert}.linear_fc2.weight", m.hidden * (m.moe_ffn // tp), False, True))
    return out


def chunk_params(
    m: ModelShape, tp: int, pp: int, vpp: int | None, pp_rank: int, chunk: int, ep: int = 1
) -> list[Param]:
    """Parameters of model chunk ``chunk`` (virtual stage) of pipeline rank ``pp_rank``, in registration order."""
    stages = pp * (vpp or 1)
    per_stage = m.layers // stages
    stage = chunk * pp + pp_rank
    vocab_rows = padded_vocab_size(m.vocab, tp) // tp
    out: list[Param] = []
    if stage == 0:
        out.append(Param("embedding.word_embeddings.weight", vocab_rows * m.hidden, False))
    for layer in range(stage * per_stage, (stage + 1) * per_stage):
        out += [p._replace(name=f"decoder.layers.{layer}.{p.name}") for p in layer_params(m, tp, ep)]
    if stage == stages - 1:
        out.append(Param("decoder.final_layernorm.weight", m.hidden, True))
        if not m.tied or stages > 1:
            out.append(Param("output_layer.weight", vocab_rows * m.hidden, False))
    return out
