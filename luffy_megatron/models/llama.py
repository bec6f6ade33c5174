"""Llama 3.x: GQA without biases, RMSNorm, SwiGLU, RoPE with llama3 frequency scaling."""

from luffy_megatron.models.family import GATED_MLP, QKV_WEIGHT, ModelFamily, layer_direct_map

FAMILY = ModelFamily(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_types=("llama",),
    qkv_bias=False,
    qk_layernorm=False,
    direct=layer_direct_map(qk_norm=False),
    fused_qkv=(QKV_WEIGHT,),
    fused_mlp=(GATED_MLP,),
)
