"""Qwen3 (dense): GQA without biases, RMSNorm on queries and keys per head (QK-norm), SwiGLU, RoPE."""

from luffy_megatron.models.family import GATED_MLP, QKV_WEIGHT, ModelFamily, layer_direct_map

FAMILY = ModelFamily(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_types=("qwen3",),
    qkv_bias=False,
    qk_layernorm=True,
    direct=layer_direct_map(qk_norm=True),
    fused_qkv=(QKV_WEIGHT,),
    fused_mlp=(GATED_MLP,),
)
