"""Packed sequences (THD): several samples concatenated in one row, attention confined to each sample.

A packed micro-batch is one row of ``T`` tokens holding samples back to back; ``cu_seqlens = [0, l_1, l_1 + l_2,
..., T]`` marks their boundaries (a padding tail, when there is one, is one more segment). megatron-core takes this as
:class:`PackedSeqParams` with ``qkv_format="thd"``: its attention then squeezes the batch dimension, applies RoPE
per segment (positions restart at 0 in every sample) and hands ``[T, heads, head_dim]`` tensors to the core
attention. On a GPU transformer-engine's ``TEDotProductAttention`` runs the variable-length kernel on ``cu_seqlens``.
megatron-core's local ``DotProductAttention`` (the CPU path) refuses packed input; :class:`PackedDotProductAttention`
runs it once per segment with its causal mask, so a packed row computes exactly what the same samples compute on
their own rows.

RoPE on a packed row: megatron-core's unfused THD path splits the row with ``cu_seqlens.tolist()`` and ``.item()``
for q and k in every layer (a host sync each on a GPU). Where TE's fused kernel is not used,
:func:`use_sync_free_packed_rope` routes packed rows to :func:`apply_rotary_pos_emb_sync_free`, which reads each
token's position inside its sample from ``cu_seqlens`` on the device and rotates the whole row at once.

megatron-core is imported at module level: this module is imported only by the model builder, after
``luffy_megatron`` has prepared the megatron import.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import attention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

__all__ = [
    "PackedDotProductAttention",
    "apply_rotary_pos_emb_sync_free",
    "packed_seq_params",
    "positions_in_segments",
    "use_sync_free_packed_rope",
]


def packed_seq_params(cu_seqlens: Tensor, device: torch.device | None = None) -> PackedSeqParams:
    """``PackedSeqParams`` of one packed row: ``cu_seqlens`` [segments + 1] (int32, starting at 0, ending at T).

    Pass the host tensor and the model's ``device``: the checks and the longest segment are read on the host, so a
    forward step does not wait for the GPU.
    """
    cu = cu_seqlens.to(torch.int32)
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected strictly increasing offsets from 0, got {cu.tolist()}")
    max_len = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(device) if device is not None else cu
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )


class PackedDotProductAttention(DotProductAttention):
    """megatron-core's local attention, also for packed rows: causal within each segment of ``cu_seqlens``.

    Unpacked input (``packed_seq_params`` None) is passed through unchanged. Packed input comes as ``[T, heads,
    head_dim]`` (megatron's ``thd``); each segment runs the parent's forward as a batch of one with the default
    causal mask, and the outputs are concatenated back to ``[T, heads * head_dim]``.
    """

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd" or attention_mask is not None:
            raise ValueError("packed attention: expected qkv_format='thd' and no attention mask")
        if self.attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"packed attention: only causal self-attention, got {self.attn_mask_type}")
        cu = packed_seq_params.cu_seqlens_q.tolist()
        if cu != packed_seq_params.cu_seqlens_kv.tolist() or cu[-1] != query.shape[0]:
            raise ValueError(f"packed attention: cu_seqlens {cu} do not cover the {query.shape[0]} packed tokens")
        outs = [
            super(PackedDotProductAttention, self).forward(
                query[s:e].unsqueeze(1), key[s:e].unsqueeze(1), value[s:e].unsqueeze(1), None, attn_mask_type
            )
            for s, e in zip(cu[:-1], cu[1:])
        ]
        return torch.cat(outs, dim=0).squeeze(1)


def positions_in_segments(cu_seqlens: Tensor, total: int) -> Tensor:
    """[total] int64: each token's position inside its segment of ``cu_seqlens``, computed on ``cu_seqlens``'s device
    without reading it on the host."""
    index = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.long()
    segment = torch.searchsorted(cu[1:], index, right=True)
    return index - cu[segment]


def apply_rotary_pos_emb_sync_free(
    t: Tensor,
    freqs: Tensor,
    config,
    cu_seqlens: Tensor | None = None,
    mscale: float = 1.0,
    cp_group: torch.distributed.ProcessGroup | None = None,
    mla_rotary_interleaved: bool = False,
) -> Tensor:
    """megatron-core's ``apply_rotary_pos_emb`` (same arguments), with packed rows rotated without host syncs.

    A packed row (``cu_seqlens`` given, ``t`` [T, heads, dim], ``freqs`` [max_len, 1, 1, dim]) takes ``freqs`` at
    each token's position inside its sample: what megatron's per-sample loop computes. Everything else (fused
    kernels, right-padded rows, context parallelism) goes to megatron's own function.
    """
    cp_size = (cp_group or parallel_state.get_context_parallel_group()).size()
    if cu_seqlens is None or config.apply_rope_fusion or cp_size > 1:
        return rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens, mscale, cp_group, mla_rotary_interleaved)
    positions = positions_in_segments(cu_seqlens, t.shape[0])
    return rope_utils._apply_rotary_pos_emb_bshd(
        t.unsqueeze(1),
        freqs[positions],
        rotary_interleaved=config.rotary_interleaved,
        mla_rotary_interleaved=mla_rotary_interleaved,
        mscale=mscale,
    ).squeeze(1)


def use_sync_free_packed_rope() -> None:
    """Route megatron-core's attention RoPE calls through :func:`apply_rotary_pos_emb_sync_free` (idempotent)."""
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb_sync_free
