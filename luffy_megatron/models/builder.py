"""Build megatron-core ``GPTModel`` chunks for a family, on the current rank's pipeline stage(s)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from luffy_megatron.models import get_family
from luffy_megatron.models.family import ModelFamily, padded_vocab_size, torch_dtype, transformer_config_kwargs


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build (and convert) one model: family, HF config, and the derived Megatron shapes."""

    family: ModelFamily
    hf_config: dict[str, Any]
    vocab_size: int  # true vocabulary of the HF checkpoint
    padded_vocab_size: int
    tied_embeddings: bool
    max_position_embeddings: int


def model_spec(hf_config: dict[str, Any], tp: int = 1) -> ModelSpec:
    family = get_family(hf_config)
    vocab = int(hf_config["vocab_size"])
    return ModelSpec(
        family=family,
        hf_config=hf_config,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, tp),
        tied_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 32768)),
    )


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def layer_spec_kwargs(spec: ModelSpec, use_transformer_engine: bool) -> dict[str, Any]:
    """Keyword arguments of megatron-core's layer-spec function.

    The local spec takes ``normalization`` (its norm class depends on it); the TE spec has no such parameter in
    megatron-core 0.16-0.19 (TE's fused norms read ``config.normalization``, which the family sets to RMSNorm).
    An MoE family's layers hold its routed experts as ``SequentialMLP`` (one MLP per expert, on either spec).
    """
    kwargs: dict[str, Any] = {"qk_layernorm": spec.family.qk_layernorm}
    if spec.family.moe_config is not None:
        kwargs.update(num_experts=spec.family.num_experts(spec.hf_config), moe_grouped_gemm=False)
    if not use_transformer_engine:
        kwargs["normalization"] = "RMSNorm"
    return kwargs


def build_transformer_config(
    spec: ModelSpec,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: str = "float32",
    recompute: bool = False,
    sequence_parallel: bool = False,
    ep: int = 1,
    moe_token_dispatcher: str = "alltoall",
    **overrides: Any,
):
    """HF config -> ``TransformerConfig`` with the parallel layout and precision of this run.

    ``sequence_parallel`` (TP > 1 only) shards the sequence of the norms, residuals and dropout over the TP ranks:
    every micro-batch's sequence length must then be a multiple of ``tp``. ``ep`` splits an MoE model's experts over
    that many ranks (their tensor-parallel size stays ``tp``); ``moe_token_dispatcher`` is megatron's
    ``moe_token_dispatcher_type`` of an MoE model (a dense model dispatches nothing).
    """
    params_dtype = torch_dtype(dtype)
    kwargs = transformer_config_kwargs(spec.family, spec.hf_config)
    kwargs.update(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        # Mixed precision: the attention softmax runs in fp32 (as HF attention does); the residual stream stays in
        # params_dtype (megatron's fp32_residual_connection is off).
        attention_softmax_in_fp32=True,
        # RoPE in TE's fused kernels where TE runs (packed rows without a host sync); elsewhere the builder installs
        # a sync-free packed path (platform.packed_attention)
        apply_rope_fusion=transformer_engine_available(),
    )
    if not torch.cuda.is_available():
        # gloo matches point-to-point messages between two ranks in posting order. With interleaved stages at PP=2
        # the same pair of ranks exchanges activations and gradients in one direction, and batched ops would swap
        # them silently; megatron's unbatched ops put the two streams on different process groups.
        kwargs["batch_p2p_comm"] = False
    if spec.family.moe_config is not None:
        kwargs["moe_token_dispatcher_type"] = moe_token_dispatcher
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    if kwargs.get("variable_seq_lengths"):
        # megatron-core rejects variable shapes with its default MoE dispatcher ("allgather") even in a dense model,
        # which dispatches nothing.
        kwargs.setdefault("moe_token_dispatcher_type", "alltoall")
    return TransformerConfig(**kwargs)


def build_gpt_model(
    spec: ModelSpec,
    config,
    *,
    use_transformer_engine: bool | None = None,
    ddp_config=None,
) -> list[torch.nn.Module]:
    """Model chunks of this pipeline rank (one per virtual stage), on this rank's device.

    Uses transformer-engine's layer spec when TE is importable on a GPU (or when forced), else megatron-core's local
    spec with :class:`~luffy_megatron.platform.packed_attention.PackedDotProductAttention` (packed rows) and, under
    sequence parallelism, :class:`~luffy_megatron.platform.local_norm.LocalNorm` for every norm.
    Parameters are named as the local spec names them; with TE the layer norms live in the fused linears.
    With ``ddp_config`` (a megatron ``DistributedDataParallelConfig``) the chunks are wrapped in megatron's DDP.
    """
    use_te = transformer_engine_available() if use_transformer_engine is None else use_transformer_engine
    specs = gpt_layer_specs
    layer_spec_fn = specs.get_gpt_layer_with_transformer_engine_spec if use_te else specs.get_gpt_layer_local_spec
    layer_spec = layer_spec_fn(**layer_spec_kwargs(spec, use_te))
    if not use_te:  # the local attention refuses packed rows; this one runs them segment by segment
        from luffy_megatron.platform.packed_attention import PackedDotProductAttention

        layer_spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    if not config.apply_rope_fusion:
        from luffy_megatron.platform.packed_attention import use_sync_free_packed_rope

        use_sync_free_packed_rope()
    local_sp = not use_te and config.sequence_parallel
    if local_sp:
        _use_local_norms(layer_spec)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks: list[torch.nn.Module] = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        block_spec: Any = layer_spec
        if local_sp:  # the final norm too: megatron builds it from the block's submodules
            from luffy_megatron.platform.local_norm import LocalNorm

            layers = [layer_spec] * get_num_layers_to_build(config, vp_stage=stage)
            block_spec = TransformerBlockSubmodules(layer_specs=layers, layer_norm=LocalNorm)
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
            vocab_size=spec.padded_vocab_size,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tied_embeddings,
            position_embedding_type="rope",
            vp_stage=stage,
            **spec.family.rope_kwargs(spec.hf_config),
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if ddp_config is not None:
        chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=(i > 0))
            for i, m in enumerate(chunks)
        ]
    return chunks


def _use_local_norms(layer_spec) -> None:
    """Every norm of a local layer spec built by :class:`~luffy_megatron.platform.local_norm.LocalNorm`, whose weights
    megatron sums over the TP ranks under sequence parallelism (the local spec's torch norms refuse it)."""
    from luffy_megatron.platform.local_norm import LocalNorm

    subs = layer_spec.submodules
    subs.input_layernorm = subs.pre_mlp_layernorm = LocalNorm
    attn = subs.self_attention.submodules
    if attn.q_layernorm not in (None, IdentityOp):  # qk_layernorm: the torch norm refuses SP here too
        attn.q_layernorm = attn.k_layernorm = LocalNorm
