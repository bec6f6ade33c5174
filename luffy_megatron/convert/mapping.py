"""The generic interpreter of a family's declarative name mapping.

A family (``luffy_megatron/models/*.py``) declares Megatron <-> HF names with ``*`` standing for the layer index and
``#`` for the expert index of an MoE layer. :func:`conversion_plan` expands them for one model into :class:`Rule`
objects keyed by the *global* Megatron parameter name (local layer spec naming, global layer and expert indices). A
rule knows how to cut this TP rank's shard of the Megatron parameter out of the HF tensors (:meth:`Rule.shard_from_hf`)
and how to rebuild the HF tensors from all TP ranks' shards (:meth:`Rule.hf_from_shards`).

Layouts (per TP rank ``r`` of ``t``):

- direct: the same tensor; TP-parallel ones are split along the parameter's ``partition_dim`` (megatron sets it on
  every parallel parameter). Embedding and output layer are vocab-padded with zero rows to ``padded_vocab_size``.
- fused QKV: for each query group ``g``: ``[q_g (heads_per_group * head_dim rows); k_g (head_dim); v_g (head_dim)]``;
  rank ``r`` holds groups ``[r * G/t, (r+1) * G/t)``. The same for the bias.
- fused gated MLP: rank ``r`` holds ``[gate_r; up_r]`` (each the ``r``-th of ``t`` row blocks).
- experts (``Rule.expert``): laid out as above over the *expert* tensor-parallel ranks; with expert parallelism each
  EP rank holds whole experts, ``E / ep`` consecutive ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from luffy_megatron.models.builder import ModelSpec
from luffy_megatron.models.family import EXPERT, LAYER, TE_FUSED_NORM_NAMES, VOCAB_PARAMS

# reads an HF tensor, optionally only rows/columns [start, stop) of dimension ``dim``
HFReader = Callable[..., torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint does not match the model it is converted for; the message names the tensors."""


@dataclass(frozen=True)
class Geometry:
    """Sizes of one model needed to lay out fused tensors and vocabulary padding."""

    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int

    @classmethod
    def of(cls, spec: ModelSpec, padded_vocab: int | None = None) -> Geometry:
        hf = spec.hf_config
        heads = int(hf["num_attention_heads"])
        return cls(
            heads=heads,
            groups=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            ffn=int(hf["intermediate_size"]),
            vocab=spec.vocab_size,
            padded_vocab=padded_vocab or spec.padded_vocab_size,
        )


@dataclass(frozen=True)
class Rule:
    """How one global Megatron parameter relates to HF tensors."""

    megatron: str
    kind: Literal["direct", "qkv", "mlp"]
    hf: tuple[str, ...]
    vocab: bool = False
    tied_copy: bool = False  # output layer of a tied model on the last PP stage: a copy of the embedding
    expert: bool = False  # a routed expert's tensor: split over the expert TP ranks, held by one EP rank

    def shard_from_hf(
        self,
        read: HFReader,
        geo: Geometry,
        tp_rank: int,
        tp_size: int,
        partition_dim: int | None,
        local_shape: torch.Size,
    ) -> torch.Tensor:
        """This TP rank's shard of the Megatron parameter, read from HF tensors (only the rows it needs)."""
        if self.kind == "qkv":
            return self._qkv_shard(read, geo, tp_rank, tp_size)
        if self.kind == "mlp":
            per = local_shape[0] // 2
            gate = read(self.hf[0], dim=0, start=tp_rank * per, stop=(tp_rank + 1) * per)
            up = read(self.hf[1], dim=0, start=tp_rank * per, stop=(tp_rank + 1) * per)
            return torch.cat([gate, up], dim=0)
        if self.vocab:
            rows = local_shape[0]
            start, stop = tp_rank * rows, min((tp_rank + 1) * rows, geo.vocab)
            out = torch.zeros(local_shape, dtype=torch.float32)
            if stop > start:
                part = read(self.hf[0], dim=0, start=start, stop=stop)
                out = out.to(part.dtype)
                out[: stop - start] = part
            return out
        if partition_dim is None or tp_size == 1:
            return read(self.hf[0])
        size = local_shape[partition_dim]
        return read(self.hf[0], dim=partition_dim, start=tp_rank * size, stop=(tp_rank + 1) * size)

    def _qkv_shard(self, read: HFReader, geo: Geometry, tp_rank: int, tp_size: int) -> torch.Tensor:
        per_group = geo.heads // geo.groups
        groups = geo.groups // tp_size
        g0 = tp_rank * groups
        qrows, krows = per_group * geo.head_dim, geo.head_dim
        q = read(self.hf[0], dim=0, start=g0 * qrows, stop=(g0 + groups) * qrows)
        k = read(self.hf[1], dim=0, start=g0 * krows, stop=(g0 + groups) * krows)
        v = read(self.hf[2], dim=0, start=g0 * krows, stop=(g0 + groups) * krows)
        rest = q.shape[1:]
        fused = torch.cat(
            [q.reshape(groups, qrows, *rest), k.reshape(groups, krows, *rest), v.reshape(groups, krows, *rest)], dim=1
        )
        return fused.reshape(-1, *rest)

    def hf_from_shards(
        self, shards: list[torch.Tensor], geo: Geometry, partition_dim: int | None
    ) -> list[tuple[str, torch.Tensor]]:
        """The HF tensors rebuilt from every TP rank's shard (in TP rank order)."""
        if self.kind == "qkv":
            per_group = geo.heads // geo.groups
            qrows, krows = per_group * geo.head_dim, geo.head_dim
            qs, ks, vs = [], [], []
            for shard in shards:
                rest = shard.shape[1:]
                grouped = shard.reshape(-1, qrows + 2 * krows, *rest)
                q, k, v = grouped.split([qrows, krows, krows], dim=1)
                qs.append(q.reshape(-1, *rest))
                ks.append(k.reshape(-1, *rest))
                vs.append(v.reshape(-1, *rest))
            return [(self.hf[0], _cat(qs)), (self.hf[1], _cat(ks)), (self.hf[2], _cat(vs))]
        if self.kind == "mlp":
            halves = [s.chunk(2, dim=0) for s in shards]
            return [(self.hf[0], _cat([h[0] for h in halves])), (self.hf[1], _cat([h[1] for h in halves]))]
        full = shards[0] if partition_dim is None or len(shards) == 1 else _cat(shards, dim=partition_dim)
        if self.vocab:
            full = full[: geo.vocab]
        return [(self.hf[0], full.contiguous())]


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=dim)


def conversion_plan(spec: ModelSpec) -> dict[str, Rule]:
    """Every global Megatron parameter of the model -> its rule, in a fixed order (embedding, layers, norm, head).

    The tied output-layer copy (present only on a last PP stage without the embedding) is included as
    ``output_layer.weight`` with ``tied_copy=True``.
    """
    family = spec.family
    layers = int(spec.hf_config["num_hidden_layers"])
    plan: dict[str, Rule] = {}

    def add(rule: Rule) -> None:
        plan[rule.megatron] = rule

    for meg, hf in family.direct.items():
        if "*" not in meg and meg.startswith("embedding."):
            add(Rule(meg, "direct", (hf,), vocab=meg in VOCAB_PARAMS))
    experts = range(family.num_experts(spec.hf_config))
    for i in range(layers):
        layer_rules: list[Rule] = []
        for meg, hf in family.direct.items():
            for e in experts if EXPERT in meg else [None]:
                if LAYER in meg:
                    layer_rules.append(Rule(_at(meg, i, e), "direct", (_at(hf, i, e),), expert=e is not None))
        for qkv in family.fused_qkv:
            layer_rules.append(Rule(_at(qkv.megatron, i), "qkv", (_at(qkv.q, i), _at(qkv.k, i), _at(qkv.v, i))))
        for mlp in family.fused_mlp:
            for e in experts if EXPERT in mlp.megatron else [None]:
                pair = (_at(mlp.gate, i, e), _at(mlp.up, i, e))
                layer_rules.append(Rule(_at(mlp.megatron, i, e), "mlp", pair, expert=e is not None))
        for rule in sorted(layer_rules, key=lambda r: _layer_order(r.megatron)):
            add(rule)
    for meg, hf in family.direct.items():
        if "*" not in meg and not meg.startswith("embedding."):
            add(Rule(meg, "direct", (hf,), vocab=meg in VOCAB_PARAMS))
    out_meg, out_hf = family.output_layer
    if spec.tied_embeddings:
        embed_hf = plan["embedding.word_embeddings.weight"].hf
        add(Rule(out_meg, "direct", embed_hf, vocab=True, tied_copy=True))
    else:
        add(Rule(out_meg, "direct", (out_hf,), vocab=True))
    return plan


# Order of a layer's tensors in exported streams and written files (follows the forward pass).
_LAYER_ORDER = {
    name: i
    for i, name in enumerate(
        [
            "input_layernorm.weight",
            "self_attention.linear_qkv.weight",
            "self_attention.linear_qkv.bias",
            "self_attention.q_layernorm.weight",
            "self_attention.k_layernorm.weight",
            "self_attention.linear_proj.weight",
            "pre_mlp_layernorm.weight",
            "mlp.linear_fc1.weight",
            "mlp.linear_fc2.weight",
            "mlp.router.weight",
            "mlp.experts.local_experts",
            "linear_fc1.weight",
            "linear_fc2.weight",
        ]
    )
}
_EXPERT_RE = re.compile(r"^(mlp\.experts\.local_experts)\.(\d+)\.(.*)$")


def _layer_order(megatron: str) -> tuple[int, ...]:
    """Sort key of a layer's parameter: the forward pass order, expert by expert (fc1 then fc2 of each)."""
    rest = megatron.split(".", 3)[3]
    m = _EXPERT_RE.match(rest)
    if m is None:
        return (_LAYER_ORDER.get(rest, 99),)
    return (_LAYER_ORDER[m.group(1)], int(m.group(2)), _LAYER_ORDER.get(m.group(3), 99))


def _at(pattern: str, layer: int, expert: int | None = None) -> str:
    name = pattern.replace(LAYER, str(layer))
    return name if expert is None else name.replace(EXPERT, str(expert))


def hf_names(plan: dict[str, Rule]) -> list[str]:
    """The HF tensor names the plan produces, in export order (the tied copy adds none)."""
    return [name for rule in plan.values() if not rule.tied_copy for name in rule.hf]


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_TE_TO_LOCAL = {te: local for local, te in TE_FUSED_NORM_NAMES.items()}


def global_param_names(chunk: torch.nn.Module) -> list[tuple[str, str, torch.nn.Parameter]]:
    """``(global Megatron name, local name, parameter)`` for one model chunk (DDP/Float16 wrappers removed).

    Local layer indices become global ones (via each layer's 1-based ``layer_number``), an MoE layer's local expert
    indices global ones (via its ``local_expert_indices``), and transformer-engine names of layer norms fused into
    linears become the local spec's names.
    """
    module = unwrap(chunk)
    layers = module.decoder.layers if hasattr(module, "decoder") else []
    out = []
    for local, param in module.named_parameters():
        name = local
        m = _LAYER_RE.match(local)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            rest = _TE_TO_LOCAL.get(rest, rest)
            expert = _EXPERT_RE.match(rest)
            if expert:
                owned = layers[idx].mlp.local_expert_indices
                rest = f"{expert.group(1)}.{owned[int(expert.group(2))]}.{expert.group(3)}"
            name = f"decoder.layers.{layers[idx].layer_number - 1}.{rest}"
        out.append((name, local, param))
    return out


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk
