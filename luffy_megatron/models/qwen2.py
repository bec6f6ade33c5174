"""Qwen2 and Qwen2.5 (dense): GQA with a bias on q/k/v projections, RMSNorm, SwiGLU, RoPE."""

from luffy_megatron.models.family import GATED_MLP, QKV_BIAS, QKV_WEIGHT, ModelFamily, layer_direct_map

FAMILY = ModelFamily(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    qkv_bias=True,
    qk_layernorm=False,
    direct=layer_direct_map(qk_norm=False),
    fused_qkv=(QKV_WEIGHT, QKV_BIAS),
    fused_mlp=(GATED_MLP,),
)
