"""Model shapes for the planner: an HF ``config.json`` (or a recipe YAML naming one) -> the parameters each rank holds.

Parameters are listed per model chunk in the order megatron-core's ``GPTModel`` registers them (embedding, then per
layer input norm, attention output and QKV projections, QK norms, MLP norm, MLP, then final norm and output layer),
with their numel under tensor parallelism and whether they are norms (which the local layer spec keeps in fp32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.models.family import padded_vocab_size

# config.json values of the recipes' models (huggingface.co/Qwen/<name>/blob/main/config.json), used when the
# recipe's model.hf_path is not on this machine.
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

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "model") -> ModelShape:
        model_type = hf.get("model_type", "")
        heads = int(hf["num_attention_heads"])
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
            qk_norm=model_type == "qwen3",
        )

    def num_params(self) -> int:
        """Parameters of the HF model (unpadded vocabulary)."""
        per_layer = sum(n for _, n, _ in layer_params(self, 1))
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


Param = tuple[str, int, bool]  # (name, numel on this rank, is a norm weight)


def layer_params(m: ModelShape, tp: int) -> list[Param]:
    """One transformer layer's parameters on a TP rank, in registration order."""
    q, kv = m.heads * m.head_dim // tp, m.kv_heads * m.head_dim // tp
    out: list[Param] = [
        ("input_layernorm.weight", m.hidden, True),
        ("self_attention.linear_proj.weight", m.hidden * q, False),
        ("self_attention.linear_qkv.weight", (q + 2 * kv) * m.hidden, False),
    ]
    if m.qkv_bias:
        out.append(("self_attention.linear_qkv.bias", q + 2 * kv, False))
    if m.qk_norm:
        out += [
            ("self_attention.q_layernorm.weight", m.head_dim, True),
            ("self_attention.k_layernorm.weight", m.head_dim, True),
        ]
    out += [
        ("pre_mlp_layernorm.weight", m.hidden, True),
        ("mlp.linear_fc1.weight", 2 * m.ffn // tp * m.hidden, False),
        ("mlp.linear_fc2.weight", m.hidden * (m.ffn // tp), False),
    ]
    return out


def chunk_params(m: ModelShape, tp: int, pp: int, vpp: int | None, pp_rank: int, chunk: int) -> list[Param]:
    """Parameters of model chunk ``chunk`` (virtual stage) of pipeline rank ``pp_rank``, in registration order."""
    stages = pp * (vpp or 1)
    per_stage = m.layers // stages
    stage = chunk * pp + pp_rank
    vocab_rows = padded_vocab_size(m.vocab, tp) // tp
    out: list[Param] = []
    if stage == 0:
        out.append(("embedding.word_embeddings.weight", vocab_rows * m.hidden, False))
    for layer in range(stage * per_stage, (stage + 1) * per_stage):
        out += [(f"decoder.layers.{layer}.{n}", k, norm) for n, k, norm in layer_params(m, tp)]
    if stage == stages - 1:
        out.append(("decoder.final_layernorm.weight", m.hidden, True))
        if not m.tied or stages > 1:
            out.append(("output_layer.weight", vocab_rows * m.hidden, False))
    return out
