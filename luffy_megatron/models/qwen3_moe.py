"""Qwen3-MoE: Qwen3's attention (GQA, QK-norm, no biases) with a routed mixture of SwiGLU experts in every layer.

HF's router (``Qwen3MoeTopKRouter``) takes the softmax over all experts, keeps the top ``num_experts_per_tok`` and,
with ``norm_topk_prob``, divides them by their sum. Megatron's softmax router computes the same probabilities: with
``moe_router_pre_softmax=False`` it takes the top-k logits and a softmax over those alone (equal to the renormalised
top-k probabilities), with ``moe_router_pre_softmax=True`` the softmax over all experts and then the top-k (HF without
``norm_topk_prob``). The expert outputs are weighted by these probabilities and summed, as in HF.

The auxiliary load-balancing loss: ``router_aux_loss_coef`` becomes ``moe_aux_loss_coeff`` of Megatron's per-layer
``aux_loss`` (Switch-style), which Megatron adds to the gradients in training mode only. HF adds its own (over all
layers at once) only with ``output_router_logits``; the coefficient is kept either way, and a run that wants none sets
it to 0.

Checkpoints store one tensor per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``), which transformers >= 5
fuses on load into ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj`` ``[E, H, I]``; the
conversion reads and writes the per-expert form. Megatron's experts (``SequentialMLP``) are
``mlp.experts.local_experts.{e}.linear_fc1`` (``[gate; up]``) and ``linear_fc2``, named here by the global expert
index; with expert parallelism each EP rank holds ``E / ep`` consecutive experts.
"""

from __future__ import annotations

import re
from typing import Any

from luffy_megatron.config import ConfigError
from luffy_megatron.config_checks import expert_count
from luffy_megatron.models.family import QKV_WEIGHT, FusedGatedMLP, ModelFamily, layer_direct_map


def experts_in(hf: dict[str, Any]) -> int:
    """The routed experts per layer (:func:`~luffy_megatron.config_checks.expert_count`), checked."""
    key, value = expert_count(hf)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer for family qwen3_moe")
    return value


def moe_config(hf: dict[str, Any]) -> dict[str, Any]:
    """TransformerConfig fields of the router and experts; refuses what megatron's layers here cannot represent."""
    experts = experts_in(hf)
    topk = hf.get("num_experts_per_tok")
    if not isinstance(topk, int) or not 1 <= topk <= experts:
        raise ConfigError(f"num_experts_per_tok={topk!r} must be an integer in [1, num_experts={experts}]")
    if hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(
            f"decoder_sparse_step={hf['decoder_sparse_step']!r} is not supported: every layer must be an MoE layer (1)"
        )
    if hf.get("mlp_only_layers"):
        raise ConfigError(f"mlp_only_layers={hf['mlp_only_layers']!r} is not supported: every layer must be MoE ([])")
    if hf.get("shared_expert_intermediate_size"):
        raise ConfigError(
            f"shared_expert_intermediate_size={hf['shared_expert_intermediate_size']!r} is not supported "
            "(Qwen3-MoE has no shared expert)"
        )
    return dict(
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not bool(hf.get("norm_topk_prob", False)),
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)),
        moe_grouped_gemm=False,
    )


_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def hf_file_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """transformers' fused expert parameters -> the per-expert tensors of a checkpoint (other names unchanged)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        m = _FUSED_EXPERTS.match(name)
        if m is None:
            out[name] = shape
            continue
        prefix, kind = m.groups()
        experts, rows, cols = shape
        for e in range(experts):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = (rows, cols)
            else:
                out[f"{prefix}.{e}.gate_proj.weight"] = (rows // 2, cols)
                out[f"{prefix}.{e}.up_proj.weight"] = (rows // 2, cols)
    return out


ROUTER_AND_EXPERT_FC2 = {
    "decoder.layers.*.mlp.router.weight": "model.layers.*.mlp.gate.weight",
    "decoder.layers.*.mlp.experts.local_experts.#.linear_fc2.weight": "model.layers.*.mlp.experts.#.down_proj.weight",
}
EXPERT_FC1 = FusedGatedMLP(
    "decoder.layers.*.mlp.experts.local_experts.#.linear_fc1.weight",
    "model.layers.*.mlp.experts.#.gate_proj.weight",
    "model.layers.*.mlp.experts.#.up_proj.weight",
)

FAMILY = ModelFamily(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_types=("qwen3_moe",),
    qkv_bias=False,
    qk_layernorm=True,
    direct={**layer_direct_map(qk_norm=True, dense_mlp=False), **ROUTER_AND_EXPERT_FC2},
    fused_qkv=(QKV_WEIGHT,),
    fused_mlp=(EXPERT_FC1,),
    moe_config=moe_config,
    hf_file_shapes=hf_file_shapes,
)
