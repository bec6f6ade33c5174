"""Router metrics of an MoE policy update: each layer's expert load and megatron's load-balancing loss.

Expert load: a forward hook on every router adds, per layer, the tokens its top-k sends to each expert, counting only
real tokens (padding excluded; a token the update routes counts once). It runs on the device without a host sync:
the micro-batch's real-token mask, put in the router's token order (sequence-first, this TP rank's slice of the
sequence under sequence parallelism), goes to the device before the forward. A layer counted again in the same
micro-batch (activation recomputation re-runs the forward in backward) is skipped. At the end of an optimiser step
one all-reduce sums the counts over every rank: TP ranks (under SP) and DP / EP ranks route different tokens, and each
pipeline stage holds its own layers. A layer's load share of an expert is its count over the layer's total (k per
real token); balanced routing gives 1 / experts.

Load-balancing loss: megatron's router records every micro-batch's auxiliary loss divided by its coefficient in its
metrics tracker (``get_moe_metrics_tracker``, name ``load_balancing_loss``), on the device; with SP each TP rank
records its partial sum. It covers every token the router sees, padding included, as the loss that is trained does.
Summed over all ranks and divided by the micro-batches of all DP ranks, it is the mean per micro-batch; megatron
computes none when ``moe_aux_loss_coeff`` is 0. Megatron's routers here drop no token (no capacity factor), so there
is no dropped-token count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.router import TopKRouter

from luffy_megatron.platform import device
from luffy_megatron.train.batch import FlatMicroBatch

#: Megatron's name of the auxiliary loss in its metrics tracker.
AUX_LOSS_NAME = "load_balancing_loss"
LAYER_MAX_SHARE = "moe/layer{L}/expert_load_max_share"
LAYER_MIN_SHARE = "moe/layer{L}/expert_load_min_share"


def real_tokens(mb: FlatMicroBatch, lengths: torch.Tensor) -> torch.Tensor:
    """[N] bool: which positions of ``mb`` (flat, row-major ``[rows, length]``) hold a token of a sample, not
    padding; ``lengths`` are the sample lengths of the batch ``mb`` was cut from."""
    n = len(mb.sample_ids)
    if n == 0:
        return torch.zeros(mb.tokens.numel(), dtype=torch.bool)
    own = lengths[torch.tensor(mb.sample_ids, dtype=torch.long)][mb.seq_index.clamp(max=n - 1)]
    return (mb.seq_index < n) & (mb.position_ids.reshape(-1) < own)


def router_order(mask: torch.Tensor, shape: tuple[int, int], tp: int, tp_rank: int) -> torch.Tensor:
    """A flat ``[rows, length]`` token mask in the order a router sees the tokens: sequence-first (``s * rows + b``),
    the ``tp_rank``-th of ``tp`` equal slices of the sequence (``tp`` 1 without sequence parallelism)."""
    seq_first = mask.reshape(shape).t()
    part = seq_first.shape[0] // tp
    return seq_first[tp_rank * part : (tp_rank + 1) * part].reshape(-1)


class RouterLoad:
    """Counts each layer's routed real tokens per expert over an optimiser step; :meth:`finish` gives the metrics."""

    def __init__(self, chunks: list[torch.nn.Module], config: Any) -> None:
        self.layers, self.experts = config.num_layers, config.num_moe_experts
        self.aux_loss_on = bool(config.moe_aux_loss_coeff)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.split = config.tensor_model_parallel_size if config.sequence_parallel else 1
        self.chunk_of = {id(c): i for i, c in enumerate(chunks)}
        self.masks: dict[int, torch.Tensor] = {}
        self.seen: dict[int, set[int]] = {}
        self.lengths: torch.Tensor | None = None
        # [layers, experts + 2]: tokens per expert, the summed auxiliary loss, micro-batches routed (TP rank 0)
        self.sums = torch.zeros(self.layers, self.experts + 2, dtype=torch.float64, device=device())
        for i, chunk in enumerate(chunks):
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._hook(i))

    def start(self, lengths: torch.Tensor) -> None:
        """Count from now on, for micro-batches cut from a batch with these sample lengths."""
        self.lengths = lengths
        self.sums.zero_()
        # megatron re-creates the entry, sized for this model, at the first micro-batch
        get_moe_metrics_tracker().metrics.pop(AUX_LOSS_NAME, None)

    def before_forward(self, chunk: torch.nn.Module, mb: FlatMicroBatch) -> None:
        """``mb`` is the next micro-batch through ``chunk`` (call before its forward)."""
        if self.lengths is None:
            return
        i = self.chunk_of[id(chunk)]
        mask = router_order(real_tokens(mb, self.lengths), tuple(mb.tokens.shape), self.split, self.tp_rank)
        self.masks[i] = mask.to(device=self.sums.device, dtype=torch.float32, non_blocking=True)
        self.seen[i] = set()

    def _hook(self, chunk: int):
        def count(router: TopKRouter, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            layer = router.layer_number - 1
            if self.lengths is None or layer in self.seen[chunk]:
                return
            self.seen[chunk].add(layer)
            routing_map = output[1]
            self.sums[layer, : self.experts] += (self.masks[chunk] @ routing_map.to(torch.float32)).double()
            if self.tp_rank == 0:
                self.sums[layer, -1] += 1

        return count

    def finish(self) -> dict[str, float]:
        """The step's metrics (the same on every rank: one all-reduce over all ranks); stops counting."""
        self.lengths = None
        entry = get_moe_metrics_tracker().metrics.get(AUX_LOSS_NAME)
        if entry is not None:
            self.sums[:, self.experts] = entry.values.double()
        dist.all_reduce(self.sums)
        return load_metrics(self.sums.cpu(), self.experts, self.aux_loss_on)


def load_metrics(sums: torch.Tensor, experts: int, aux_loss_on: bool) -> dict[str, float]:
    """Metrics from ``[layers, experts + 2]`` step sums (tokens per expert, auxiliary loss, micro-batches): each
    layer's largest and smallest expert share, the worst layer's of each, and the mean auxiliary loss."""
    counts = sums[:, :experts]
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    top, bottom = share.max(1).values, share.min(1).values
    out = {"moe/expert_load_max_share": float(top.max()), "moe/expert_load_min_share": float(bottom.min())}
    for layer in range(sums.shape[0]):
        out[LAYER_MAX_SHARE.format(L=layer)] = float(top[layer])
        out[LAYER_MIN_SHARE.format(L=layer)] = float(bottom[layer])
    if aux_loss_on:
        out["moe/aux_loss"] = float((sums[:, experts] / sums[:, -1].clamp(min=1)).mean())
    return out
