"""Enumerate TP / PP / VPP / DP layouts (with sequence parallelism on and off at TP > 1, and for an MoE model every EP
size that divides DP and the experts) for a cluster, price each one's worst rank, and rank the feasible ones."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from luffy_megatron.models.family import padded_vocab_size
from luffy_megatron.plan.memory import (
    DTYPE_BYTES,
    Layout,
    MicroBatch,
    activation_bytes,
    logprob_chunk_bytes,
    sp_share,
    static_bytes,
)
from luffy_megatron.plan.shapes import ModelShape

GB = 1024**3


@dataclass
class PlanInputs:
    """What the planner is asked; the defaults are the 7B recipe's."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    rollout_gpus: int = 0  # GPUs serving rollouts (the rest train)
    dtype: str = "bfloat16"
    prompt_len: int = 1024
    response_len: int = 8192
    micro_batch_tokens: int = 32768
    samples_per_optimizer_step: int = 512  # mini-batch prompts x n
    dist_opt: bool = True
    recompute: bool = True
    flash_attention: bool = True  # transformer-engine on GPU; False = megatron's local spec (CPU)
    fp32_norms: bool = False  # the local spec keeps norm weights in fp32
    logprob_chunk_tokens: int = 1024
    reserve_gb: float = 3.0  # CUDA context, NCCL workspaces, allocator fragmentation
    vpp: list[int | None] = field(default_factory=lambda: [None])
    sequence_parallel: str = "both"  # at TP > 1: "on", "off", or "both" (each layout priced with and without)
    rollout_tp: list[int] = field(default_factory=list)
    rollout_mem_fraction: float = 0.8
    moe_dispatcher: str = "alltoall"  # an MoE model's token dispatcher (parallel.moe_token_dispatcher)

    @property
    def train_gpus(self) -> int:
        return self.nodes * self.gpus_per_node - self.rollout_gpus

    def micro_batch(self, alignment: int = 1) -> MicroBatch:
        """The worst micro-batch: padded to the whole token budget (or one longest sequence, rounded up to a multiple
        of ``alignment`` as SP pads it, when that is longer)."""
        length = self.prompt_len + self.response_len
        return MicroBatch(max(self.micro_batch_tokens, -(-length // alignment) * alignment), length)

    def sp_choices(self, tp: int, moe: bool = False) -> list[bool]:
        """Sequence parallelism on / off to price at ``tp`` (on first: the trainer's default at TP > 1); an MoE model
        trains under TP only with it."""
        if tp == 1 or self.sequence_parallel == "off":
            return [False]
        return [True] if self.sequence_parallel == "on" or moe else [True, False]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def expert_sizes(m: ModelShape, dp: int, inp: PlanInputs) -> list[int]:
    """The EP sizes to try: those dividing both DP and the experts (1 for a dense model, and with the allgather
    dispatcher, which the trainer runs at EP 1 only)."""
    if not m.experts or inp.moe_dispatcher == "allgather":
        return [1]
    return [e for e in _divisors(dp) if m.experts % e == 0]


def layout_problems(m: ModelShape, lay: Layout, inp: PlanInputs) -> list[str]:
    """Why a layout cannot run (empty when it can, memory aside)."""
    out = []
    if m.experts and lay.tp > 1 and inp.sequence_parallel == "off":
        out.append(f"TP {lay.tp}: megatron trains MoE layers under TP only with SP")
    if m.heads % lay.tp or m.kv_heads % lay.tp:
        out.append(f"TP {lay.tp} does not divide {m.heads} heads / {m.kv_heads} query groups")
    if lay.tp > inp.gpus_per_node:
        out.append(f"TP {lay.tp} spans nodes ({inp.gpus_per_node} GPUs per node)")
    stages = lay.pp * (lay.vpp or 1)
    if m.layers % stages:
        out.append(f"PP x VPP = {stages} does not divide {m.layers} layers")
    if lay.vpp and lay.pp < 2:
        out.append("VPP needs PP >= 2")
    return out


def price(m: ModelShape, lay: Layout, inp: PlanInputs) -> dict:
    """Per-GPU bytes of the worst rank (max over pipeline and data-parallel ranks) with the breakdown."""
    mb = inp.micro_batch(lay.tp if lay.sp else 1)
    act_bytes = DTYPE_BYTES[inp.dtype]
    per_rank_samples = math.ceil(inp.samples_per_optimizer_step / lay.dp)
    num_mb = max(1, math.ceil(per_rank_samples * mb.length / max(mb.tokens, 1)))
    worst: dict | None = None
    for pp_rank in range(lay.pp):
        statics = [static_bytes(m, lay, pp_rank, r, inp.dtype, inp.fp32_norms) for r in _dp_ranks(lay)]
        static = max(statics, key=lambda s: sum(s.values()))
        last = pp_rank == lay.pp - 1
        parts = {
            **static,
            "activations": activation_bytes(m, lay, pp_rank, mb, num_mb, act_bytes, inp.recompute, inp.flash_attention),
            # fp32 chunk blocks of the fused log-prob plus the logits' gradient, on the last stage
            "logprob_chunk": (
                logprob_chunk_bytes(m, lay.tp, inp.logprob_chunk_tokens)
                + mb.tokens * (padded_vocab_size(m.vocab, lay.tp) // lay.tp) * act_bytes
            )
            if last
            else 0,
            "comm_buffers": comm_buffer_bytes(m, lay, mb, act_bytes) + dispatcher_bytes(m, lay, mb, act_bytes, inp),
            "reserve": int(inp.reserve_gb * GB),
        }
        parts["total"] = sum(parts.values())
        parts["pp_rank"] = pp_rank
        if worst is None or parts["total"] > worst["total"]:
            worst = parts
    assert worst is not None
    worst["micro_batches_per_rank"] = num_mb
    worst["micro_batch"] = asdict(mb)
    return worst


def comm_buffer_bytes(m: ModelShape, lay: Layout, mb: MicroBatch, act_bytes: int) -> int:
    """PP > 1: the activation and its gradient sent and received between stages (1/TP of the sequence with SP);
    SP: the all-gathered input of a column-parallel linear (the whole sequence)."""
    p2p = 2 * math.ceil(sp_share(mb.tokens, lay) * m.hidden * act_bytes) if lay.pp > 1 else 0
    return p2p + (mb.tokens * m.hidden * act_bytes if lay.sp else 0)


def dispatcher_bytes(m: ModelShape, lay: Layout, mb: MicroBatch, act_bytes: int, inp: PlanInputs) -> int:
    """An MoE layer's token dispatcher: the token copies it holds at once beyond what autograd keeps, with balanced
    routing (megatron-core 0.19 ``transformer/moe/token_dispatcher.py``). 0 for a dense model.

    alltoall: ``dispatch_postprocess`` holds the tokens routed to this rank, ``tokens x top-k`` (the all-to-all
    output, all-gathered over TP), while ``sort_chunks_by_idxs`` writes them sorted by local expert (the experts'
    input, counted in the activations); ``combine_preprocess`` does the same in reverse: one more ``[tokens x top-k,
    hidden]`` copy. A router that sends every token to one EP rank's experts makes that rank receive EP times more.
    allgather: ``token_dispatch`` gathers every token of the TP x EP ranks, ``tokens x EP`` rows of hidden (activation
    dtype), expert probabilities (fp32) and routing map (bool) (nothing at TP = EP = 1), then ``permute`` copies this
    rank's ``tokens x top-k`` routed tokens out of them.
    """
    if not m.experts:
        return 0
    routed = mb.tokens * m.topk * m.hidden * act_bytes
    if inp.moe_dispatcher == "allgather":
        gathered = mb.tokens * lay.ep * (m.hidden * act_bytes + m.experts * 5) if lay.tp * lay.ep > 1 else 0
        return gathered + routed
    return routed


def _dp_ranks(lay: Layout) -> range:
    """Every DP rank when the optimizer is sharded (alignment gaps and bucket padding make shards differ)."""
    return range(lay.dp if lay.dist_opt else 1)


def step_time_factor(lay: Layout, num_mb: int, recompute: bool) -> float:
    """Relative time of a step on the same GPUs (lower is faster): the 1F1B bubble (PP - 1) / (m x VPP), ~10% per
    doubling of TP for its all-reduces (SP moves the same bytes as an all-gather and a reduce-scatter), 4/3 for
    recomputation. A rough order, not a prediction."""
    bubble = (lay.pp - 1) / (num_mb * (lay.vpp or 1))
    return (1 + bubble) * (1 + 0.1 * math.log2(lay.tp)) * (4 / 3 if recompute else 1.0)


def plan(m: ModelShape, inp: PlanInputs) -> dict:
    """Every layout of the training GPUs: feasible ones ranked by :func:`step_time_factor` (then memory), the rest
    with reasons (a layout that cannot run is listed once, without SP or EP)."""
    feasible, infeasible = [], []
    for tp in [d for d in _divisors(inp.train_gpus) if d <= max(inp.gpus_per_node, 1) * 2]:
        for pp in _divisors(inp.train_gpus // tp):
            dp = inp.train_gpus // (tp * pp)
            for vpp in inp.vpp:
                problems = layout_problems(m, Layout(tp, pp, dp, vpp, inp.dist_opt), inp)
                if problems:
                    where = {"tp": tp, "pp": pp, "vpp": vpp, "dp": dp, "ep": None, "sp": None}
                    infeasible.append({**where, "reasons": problems})
                    continue
                for ep, sp in [(e, p) for e in expert_sizes(m, dp, inp) for p in inp.sp_choices(tp, bool(m.experts))]:
                    where = {"tp": tp, "pp": pp, "vpp": vpp, "dp": dp, "ep": ep}
                    lay = Layout(tp, pp, dp, vpp, inp.dist_opt, sp, ep)
                    mem = price(m, lay, inp)
                    row = {**where, "sp": sp, "memory": mem}
                    row["step_time_factor"] = step_time_factor(lay, mem["micro_batches_per_rank"], inp.recompute)
                    if mem["total"] > inp.gpu_mem_gb * GB:
                        gib = mem["total"] / GB
                        infeasible.append({**row, "reasons": [f"needs {gib:.1f} GiB > {inp.gpu_mem_gb:g} GiB"]})
                    else:
                        feasible.append(row)
    feasible.sort(key=lambda r: (r["step_time_factor"], r["memory"]["total"]))
    for i, row in enumerate(feasible, 1):
        row["rank"] = i
    return {
        "model": asdict(m),
        "inputs": asdict(inp),
        "params": m.num_params(),
        "feasible": feasible,
        "infeasible": infeasible,
        "rollout": rollout_plan(m, inp),
    }


def rollout_plan(m: ModelShape, inp: PlanInputs) -> list[dict]:
    """Per rollout server TP: bf16 weights per GPU, KV-cache bytes per token, and tokens the KV budget holds."""
    out = []
    for tp in inp.rollout_tp:
        weights = m.num_params() * 2 / tp
        kv_heads = max(1, m.kv_heads // tp)  # heads are replicated when TP exceeds them
        kv_per_token = 2 * m.layers * kv_heads * m.head_dim * 2
        budget = inp.gpu_mem_gb * GB * inp.rollout_mem_fraction - weights
        row = {
            "tp": tp,
            "weights_per_gpu": int(weights),
            "kv_bytes_per_token": kv_per_token,
            "kv_tokens": int(budget // kv_per_token) if budget > 0 else 0,
            "servers": inp.rollout_gpus // tp if inp.rollout_gpus else None,
        }
        if m.heads % tp:
            row["reason"] = f"TP {tp} does not divide {m.heads} heads"
        elif budget <= 0:
            row["reason"] = "weights exceed the static memory fraction"
        out.append(row)
    return out
