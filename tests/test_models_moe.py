"""The qwen3_moe family without processes: HF config -> TransformerConfig (router top-k, probability normalisation,
expert width, auxiliary-loss coefficient), refusals naming the key, the layer spec, and the tiny-model tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from luffy_megatron.config import ConfigError
from luffy_megatron.models import get_family
from luffy_megatron.models.builder import build_transformer_config, layer_spec_kwargs, model_spec
from luffy_megatron.models.tiny import tiny_hf_config

#: The tiny model's dense dimensions, shared by every config here.
SHAPE = dict(vocab_size=397, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=160, tie_embeddings=False)


def _hf(**moe) -> dict:
    config = tiny_hf_config(
        "qwen3_moe",
        **SHAPE,
        moe=moe,
    )
    return config.to_dict()


def test_moe_fields_reach_the_transformer_config() -> None:
    spec = model_spec(_hf(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, router_aux_loss_coef=0.02))
    assert spec.family.name == "qwen3_moe"
    config = build_transformer_config(spec)
    assert config.num_moe_experts == 8 and config.moe_router_topk == 3 and config.moe_ffn_hidden_size == 48
    assert config.moe_router_load_balancing_type == "aux_loss" and config.moe_aux_loss_coeff == 0.02
    assert config.moe_router_score_function == "softmax" and config.qk_layernorm
    # norm_topk_prob: renormalised top-k = softmax over the top-k logits (no pre-softmax); without it the top-k of
    # the softmax over all experts (pre-softmax)
    assert config.moe_router_pre_softmax is False
    assert build_transformer_config(model_spec(_hf(norm_topk_prob=False))).moe_router_pre_softmax is True
    assert layer_spec_kwargs(spec, False) == dict(
        qk_layernorm=True, num_experts=8, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    # Qwen's own configs name the expert count num_experts, transformers >= 5 num_local_experts
    hf = _hf()
    hf["num_experts"] = hf.pop("num_local_experts")
    assert build_transformer_config(model_spec(hf)).num_moe_experts == 4


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("decoder_sparse_step", 2),
        ("mlp_only_layers", [0]),
        ("num_experts_per_tok", 5),
        ("num_local_experts", 0),
        ("shared_expert_intermediate_size", 64),
    ],
)
def test_unrepresentable_moe_configs_are_refused_by_key(key: str, value) -> None:
    hf = {**_hf(), key: value}
    with pytest.raises(ConfigError, match=f"{key}={value!r}".replace("[", r"\[").replace("]", r"\]")):
        build_transformer_config(model_spec(hf))


def test_layers_are_built_with_routed_experts() -> None:
    """The local spec's MoE layer: a router [E, hidden] and E SequentialMLP experts [gate; up] / down."""
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core.models.gpt import gpt_layer_specs

    spec = model_spec(_hf())
    mlp = gpt_layer_specs.get_gpt_layer_local_spec(**layer_spec_kwargs(spec, False)).submodules.mlp
    assert "MoELayer" in repr(mlp) and "SequentialMLP" in repr(mlp) and "TopKRouter" in repr(mlp)


def test_make_tiny_model_qwen3_moe(tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tools.make_tiny_model import main

    out = tmp_path / "moe"
    main(["--family", "qwen3_moe", "--out", str(out), "--num-experts", "6", "--experts-per-token", "2"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["norm_topk_prob"] is True
    assert get_family(config).name == "qwen3_moe" and get_family(config).num_experts(config) == 6
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    # the checkpoint stores one tensor per expert, as Qwen's checkpoints do
    assert {f"model.layers.1.mlp.experts.5.{p}_proj.weight" for p in ("gate", "up", "down")} <= names
    assert "model.layers.0.mlp.gate.weight" in names
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts_per_tok == 2
    with pytest.raises(ValueError, match="moe=.* is for family qwen3_moe only, not 'qwen3'"):
        tiny_hf_config("qwen3", **SHAPE, moe={"num_experts": 4})
