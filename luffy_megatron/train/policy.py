"""The policy on Megatron: model chunks, optimizer, LR schedule, log-prob forward and the policy update.

Runs at any (TP, PP, VPP, DP) layout through megatron-core's pipeline schedules. Every rank holds the step's
:class:`~luffy_megatron.train.step_batch.StepBatch` (broadcast by the loop); :func:`pack_micro_batches` gives each
data-parallel rank its share, cut out of the batch by index. With
``parallel.pack_sequences`` a micro-batch is one packed row (THD, :mod:`luffy_megatron.train.batch`) whose length
varies from micro-batch to micro-batch; under pipeline parallelism megatron's ``variable_seq_lengths`` exchanges each
activation's shape. The loss of a micro-batch carries its global aggregation weights, so the summed gradient is that
of the whole mini-batch however it is split.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from luffy_megatron.algo import GlobalCounts, MetricSums, micro_batch_loss, vocab_parallel_logprob_entropy
from luffy_megatron.config import RunConfig
from luffy_megatron.models.builder import ModelSpec, build_gpt_model, build_transformer_config
from luffy_megatron.platform import device
from luffy_megatron.platform.packed_attention import packed_seq_params
from luffy_megatron.train.batch import (
    FlatMicroBatch,
    flatten_padded,
    make_micro_batch,
    micro_batch_tokens,
    pack_micro_batch,
    pad_micro_batch,
)
from luffy_megatron.train.router_metrics import RouterLoad
from luffy_megatron.train.samples import pack_micro_batches, round_up
from luffy_megatron.train.step_batch import StepBatch, compact_batch


class MegatronPolicy:
    """Model chunks of this rank plus optimizer and scheduler; built from a validated :class:`RunConfig`."""

    def __init__(self, cfg: RunConfig, spec: ModelSpec, pad_id: int) -> None:
        self.cfg, self.spec, self.pad_id = cfg, spec, pad_id
        p = cfg.parallel
        self.tconfig = build_transformer_config(
            spec,
            tp=p.tp,
            pp=p.pp,
            vpp=p.vpp,
            dtype=cfg.model.dtype,
            recompute=cfg.model.recompute_activations,
            sequence_parallel=p.sequence_parallel_on(),
            ep=p.ep,
            moe_token_dispatcher=p.moe_token_dispatcher,
            variable_seq_lengths=p.pack_sequences and p.pp > 1,
        )
        use_dist_opt = p.use_distributed_optimizer and torch.cuda.is_available()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_dist_opt
        )
        self.chunks = build_gpt_model(
            spec, self.tconfig, use_transformer_engine=cfg.model.use_transformer_engine, ddp_config=ddp_config
        )
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = [c.no_sync for c in self.chunks]
        if len(self.chunks) == 1:
            self.tconfig.no_sync_func = self.tconfig.no_sync_func[0]
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=cfg.model.dtype == "bfloat16",
                fp16=cfg.model.dtype == "float16",
                params_dtype=self.tconfig.params_dtype,
                use_distributed_optimizer=use_dist_opt,
            ),
            self.chunks,
        )
        steps_per_rollout = cfg.data.train_batch_size // cfg.data.mini_batch_size
        total = max(1, cfg.trainer.total_steps * steps_per_rollout)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.lr_warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_steps,
            lr_decay_steps=total,
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=total,
            wd_incr_style="constant",
        )
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group() if p.tp > 1 else None
        self.vocab_start = ps.get_tensor_model_parallel_rank() * (spec.padded_vocab_size // p.tp)
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        # Every micro-batch's sequence (a packed row, or the padded rows' length) splits evenly over the TP ranks when
        # sequence parallelism shards it.
        self.alignment = p.tp if self.tconfig.sequence_parallel else 1
        self._token_stats = {"real": 0, "computed": 0, "max_micro_batch": 0}
        # An MoE model's router metrics (train.router_metrics): counted in the update's forward passes
        self.router_load = RouterLoad(self.chunks, self.tconfig) if spec.family.moe_config is not None else None

    # ---------------------------------------------------------------------------------------------------------
    @property
    def modules(self) -> list[torch.nn.Module]:
        """The bare GPTModel chunks (without the DDP wrapper)."""
        return [getattr(c, "module", c) for c in self.chunks]

    def _micro_batches(self, batch: StepBatch, count_tokens: bool = False) -> list[FlatMicroBatch]:
        """This rank's micro-batches of ``batch``: packed rows, or right-padded rows with ``pack_sequences`` off.

        With ``count_tokens`` the tokens of the whole step (every rank's micro-batches) go into the token stats.
        """
        p = self.cfg.parallel
        lengths = batch.lengths.tolist()
        plan = pack_micro_batches(
            lengths,
            p.max_tokens_per_micro_batch,
            self.dp_size,
            packed=p.pack_sequences,
            alignment=self.alignment,
            count_multiple=p.pp if p.vpp else 1,
        )
        if count_tokens:
            sizes = micro_batch_tokens(
                plan, lengths, packed=p.pack_sequences, alignment=self.alignment, common_shape=p.pp > 1
            )
            stats = self._token_stats
            stats["real"] += sum(lengths)
            stats["computed"] += sum(sizes)
            stats["max_micro_batch"] = max(stats["max_micro_batch"], *sizes)
        if p.pack_sequences:
            return [pack_micro_batch(batch, ids, self.pad_id, self.alignment) for ids in plan[self.dp_rank]]
        mbs = [make_micro_batch(batch, ids, self.pad_id) for ids in plan[self.dp_rank]]
        shapes = [(mb.tokens.shape[0], round_up(mb.tokens.shape[1], self.alignment)) for mb in mbs]
        if p.pp > 1:  # padded rows keep one shape per step under PP: every micro-batch is padded to the largest
            shapes = [(max(r for r, _ in shapes), max(n for _, n in shapes))] * len(mbs)
        mbs = [mb if tuple(mb.tokens.shape) == s else pad_micro_batch(mb, s, self.pad_id) for mb, s in zip(mbs, shapes)]
        return [flatten_padded(mb) for mb in mbs]

    def take_token_stats(self) -> dict[str, float]:
        """``perf/padding_ratio`` (tokens computed, padding included / real tokens), ``perf/max_micro_batch_tokens``
        and both token counts of the updates since the last call (all data-parallel ranks); resets the counters."""
        stats, self._token_stats = self._token_stats, {"real": 0, "computed": 0, "max_micro_batch": 0}
        if not stats["real"]:
            return {}
        return {
            "perf/padding_ratio": stats["computed"] / stats["real"],
            "perf/max_micro_batch_tokens": float(stats["max_micro_batch"]),
            "perf/update_real_tokens": float(stats["real"]),
            "perf/update_computed_tokens": float(stats["computed"]),
        }

    def _token_logprobs(self, mb: FlatMicroBatch, logits: torch.Tensor, with_entropy: bool, checks: bool):
        """Log-probs (and entropies) of ``mb``'s targets; ``checks``: the host-syncing target and finite checks."""
        return vocab_parallel_logprob_entropy(
            logits.reshape(-1, logits.shape[-1]),
            mb.targets.to(logits.device),
            tp_group=self.tp_group,
            vocab_start=self.vocab_start,
            temperature=self.cfg.rollout.temperature,
            true_vocab_size=self.spec.vocab_size,
            chunk_tokens=self.cfg.algorithm.logprob_chunk_tokens,
            compute_entropy=with_entropy,
            check_targets=checks,
            check_finite=checks,
        )

    def _run(self, mbs: list[FlatMicroBatch], loss_fn, forward_only: bool) -> list[Any]:
        def forward_step(data_iterator: Iterator[FlatMicroBatch], model: torch.nn.Module):
            mb = next(data_iterator)
            if self.router_load is not None:
                self.router_load.before_forward(model, mb)
            dev = next(model.parameters()).device
            packed = None if mb.cu_seqlens is None else packed_seq_params(mb.cu_seqlens, dev)
            out = model(mb.tokens.to(dev), mb.position_ids.to(dev), attention_mask=None, packed_seq_params=packed)
            return out, partial(loss_fn, mb)

        iters: Any = [iter(mbs) for _ in self.chunks] if len(self.chunks) > 1 else iter(mbs)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters,
            model=self.chunks,
            num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[1] for mb in mbs),
            micro_batch_size=max(mb.tokens.shape[0] for mb in mbs),
            forward_only=forward_only,
        )

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, batch: StepBatch) -> torch.Tensor:
        """[T] fp32 log-probs of ``batch``'s response tokens under the current weights (forward only), at each token's
        own index as :attr:`StepBatch.old_logprobs` holds them (0 on prompt tokens), on every rank.

        The values travel as one flat tensor of the batch's response tokens: each is written by the one rank that
        computed it (last pipeline stage, first TP rank, its data-parallel rank) and summed over all ranks.
        """
        for c in self.chunks:
            c.eval()
        mbs = self._micro_batches(batch)
        resp_lengths = batch.response_lengths
        starts = torch.cat([torch.zeros(1, dtype=torch.long), resp_lengths.cumsum(0)])
        # On the collective's device (NCCL reduces GPU tensors only).
        flat = torch.zeros(int(starts[-1]), dtype=torch.float32, device=device())
        owner = self.is_last_stage and (self.tp_group is None or dist.get_rank(self.tp_group) == 0)

        def loss_fn(mb: FlatMicroBatch, logits: torch.Tensor):
            # Not the update's hot path, and the values are copied to the host anyway: always checked.
            logp, _ = self._token_logprobs(mb, logits, with_entropy=False, checks=True)
            if owner:  # response tokens of a sample are contiguous and in order in both layouts
                resp = mb.response_mask
                ids = torch.tensor(mb.sample_ids, dtype=torch.long)[mb.seq_index[resp]]
                where = (starts[ids] + _ranks_within(ids)).to(flat.device)
                flat[where] = logp.float()[resp.to(logp.device)].to(flat.device)
            return torch.zeros(()), {}

        self._run(mbs, loss_fn, forward_only=True)
        dist.all_reduce(flat)
        out = torch.zeros(batch.num_tokens, dtype=torch.float32)
        out[batch.response_token_mask()] = flat.cpu()
        return out

    def train_mini_batch(self, batch: StepBatch, use_old_logprobs: bool) -> dict[str, float]:
        """One optimiser step on ``batch`` (a mini-batch). Returns reduced metrics (identical on every rank).

        Without ``use_old_logprobs`` the old policy is the current one (one optimiser step per rollout batch), so the
        ratio is ``exp(logp - logp.detach())``: value 1, gradient of logp. Identical samples are trained once with their
        count as weight, and zero-advantage ones not at all where that is exact (:func:`compact_batch`).
        """
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        alg = self.cfg.algorithm
        lengths = batch.response_lengths
        counts = GlobalCounts(
            num_tokens=int(lengths.sum()),
            num_seqs=int((lengths > 0).sum()),
            num_off_policy_tokens=int(lengths[batch.off_policy].sum()),
        )
        # A zero advantage zeroes every term of a sample's loss unless an entropy, KL or SFT term is on.
        zero_adv_is_inert = alg.entropy_coeff == 0 and alg.kl_coeff == 0 and not alg.sft_loss
        trained = compact_batch(batch, drop_zero_advantage=alg.skip_zero_advantage and zero_adv_is_inert)
        # No sample left: the gradient is exactly 0; step the optimizer (its moments decay) without a forward.
        if not trained.num_samples:
            return {**self._finish_step([], num_trained=0), "actor/loss": 0.0, "actor/pg_loss": 0.0}
        mbs = self._micro_batches(trained, count_tokens=True)
        if self.router_load is not None:
            self.router_load.start(trained.lengths)
        # The schedule divides each micro-batch loss by their number and DDP averages over data-parallel ranks; the
        # aggregation weights already normalise over the whole mini-batch, so undo both.
        scale = len(mbs) * self.dp_size

        def loss_fn(mb: FlatMicroBatch, logits: torch.Tensor):
            logp, ent = self._token_logprobs(mb, logits, with_entropy=True, checks=alg.debug_checks)
            loss, sums = micro_batch_loss(
                mb,
                logp,
                ent,
                alg,
                counts,
                max_response_length=self.cfg.data.max_response_length,
                use_old_logprobs=use_old_logprobs,
            )
            # Counted on the device, read once per step in _finish_step (the host syncs only there).
            sums.add_total(_NONFINITE, (~torch.isfinite(loss.detach())).sum())
            return loss * scale, sums

        stores = self._run(mbs, loss_fn, forward_only=False)
        routing = self.router_load.finish() if self.router_load is not None else {}
        return {**self._finish_step(stores, num_trained=trained.num_samples), **routing}

    def _finish_step(self, stores: list[MetricSums], num_trained: int) -> dict[str, float]:
        """The step's metrics, reduced over ranks, then the optimizer and scheduler step; a non-finite micro-batch
        loss stops every rank before the weights change."""
        local = MetricSums()
        if self.is_last_stage and (self.tp_group is None or dist.get_rank(self.tp_group) == 0):
            for sums in stores:
                local.add(sums)
        metrics = _reduce_metric_sums(local)
        bad = int(metrics.pop(_NONFINITE, 0.0))
        if bad:
            raise FloatingPointError(
                f"{bad} micro-batch loss(es) of this step are NaN/inf; the update is not applied "
                "(algorithm.debug_checks=true names the first bad input)"
            )
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_skipped"] = float(not ok)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["trained_samples"] = float(num_trained)
        return metrics


_NONFINITE = "nonfinite_micro_batch_losses"


def _reduce_metric_sums(local: MetricSums) -> dict[str, float]:
    """Every rank's micro-batch metrics (ranks off the last pipeline stage hold none) combined key by key, as
    :class:`MetricSums` declares: token means as sums over counts, totals as sums, maxima as maxima."""
    payload = tuple(
        {k: float(v) for k, v in part.items()} for part in (local.sums, local.counts, local.totals, local.maxes)
    )
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    total = MetricSums()
    for sums, counts, totals, maxes in gathered:
        for k, v in sums.items():
            total.add_mean(k, torch.tensor(v), torch.tensor(counts[k]))
        for k, v in totals.items():
            total.add_total(k, torch.tensor(v))
        for k, v in maxes.items():
            total.add_max(k, torch.tensor(v))
    return total.compute()


def _ranks_within(ids: torch.Tensor) -> torch.Tensor:
    """For a sequence of sample ids whose equal entries are contiguous: 0, 1, 2, ... within each run."""
    if ids.numel() == 0:
        return ids
    new_run = torch.ones_like(ids, dtype=torch.bool)
    new_run[1:] = ids[1:] != ids[:-1]
    run_start = torch.cummax(torch.where(new_run, torch.arange(ids.numel()), 0), dim=0).values
    return torch.arange(ids.numel()) - run_start
