"""The LUFFY training loop. One RL step, in the order data flows, under the module that does each part:

    train.producer: global rank 0 (with trainer.async_rollout in a background thread, one step ahead)
        batch    = next prompts (+ expert traces)
        rollouts = engine.generate(prompts, counts): n - n_off per prompt with a trace, n per prompt without
        samples  = mixed groups: rollouts + n_off trace copies
        rewards  = verifier(samples)
        adv      = r - mean(group)                        (optionally / std)
        (dynamic sampling: groups without reward signal left out, more prompts drawn until the batch is full)
        batch    = the samples as one StepBatch            (train.step_batch: flat tensors, built once)
    update_policy (below): every rank
        batch.old_logprobs = policy.compute_logprobs(batch)  (skipped with one optimiser step per rollout batch)
        metrics  = policy.train_mini_batch(batch.select(ids)) for each mini-batch
                   (train.policy; the loss: algo.micro_batch_loss; how metrics combine: metrics.reduce)
    train.producer.sync_weights: every rank
        engine.update_weights(policy's HF-named weights)  (with trainer.async_rollout: at the next step's start)
    train (below)
        log, validate (train.validation), checkpoint (train.run_state)

The batch travels from rank 0 to every rank as its tensors (train.transport: one broadcast per dtype, no pickling),
the step's rollout metrics as one small object; mini-batches, compaction and micro-batches are index selections into
it. Setup, resume, checkpoints, export and teardown:
train.run_state.

An SFT step (``trainer.mode=sft``, train.sft) is the same without the rollout: rank 0's batch is the next prompts'
traces, update_policy trains them with the SFT loss, and the engine (when validation needs one) gets the weights
just before it validates.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from luffy_megatron.config import RunConfig
from luffy_megatron.metrics.logger import Timers
from luffy_megatron.metrics.perf import mfu, model_flops, peak_flops
from luffy_megatron.metrics.reduce import reduce_mini_batches
from luffy_megatron.train.checkpoint import should_save
from luffy_megatron.train.preemption import StopRequest
from luffy_megatron.train.producer import settle_engine, start_next_rollout, sync_weights, take_rollout
from luffy_megatron.train.run_state import RunState, export_hf, save, setup, stop_early, teardown
from luffy_megatron.train.sft import is_sft, sync_for_validation, trace_batch
from luffy_megatron.train.step_batch import StepBatch
from luffy_megatron.train.transport import rank0_batch
from luffy_megatron.train.validation import validate_policy


def train(cfg: RunConfig) -> dict[str, float]:
    """Run ``cfg.trainer.total_steps`` RL or SFT steps (resuming from the newest checkpoint when configured).

    The config must already be validated (:func:`luffy_megatron.config_checks.validate`). Returns the last step's
    metrics.
    """
    stop = StopRequest(cfg.fault_tolerance, cfg.checkpoint.save_dir)  # before setup: a signal waits for step 1
    try:
        run, policy = setup(cfg)
    except BaseException:
        stop.close()
        raise
    metrics: dict[str, float] = {}
    show = run.logger is not None and cfg.logging.progress_bar
    sft = is_sft(cfg)
    desc = f"{cfg.trainer.mode.upper()} steps"
    bar = tqdm(total=cfg.trainer.total_steps, initial=run.step, desc=desc, unit="step", disable=not show)
    try:
        while run.step < cfg.trainer.total_steps:
            run.step += 1
            metrics = (sft_step if sft else rl_step)(cfg, run, policy)
            if cfg.trainer.val_interval and run.step % cfg.trainer.val_interval == 0:
                # async: the engine is idle and holds this step's weights; SFT: it gets them now
                (sync_for_validation if sft else settle_engine)(cfg, run, policy)
                metrics.update(validate_policy(cfg, run))
            if run.logger is not None:
                run.logger.log(run.step, metrics, write=bar.write if show else print)
            if should_save(cfg, run.step):
                save(cfg, run, policy)
            bar.update(1)
            if run.step < cfg.trainer.total_steps and (reason := stop.requested()) is not None:
                stop_early(cfg, run, policy, stop, reason)
                break
        if cfg.checkpoint.export_hf_at_end and run.step == cfg.trainer.total_steps:
            export_hf(cfg, policy)
    finally:
        bar.close()
        stop.close()
        teardown(run)
    return metrics


def rl_step(cfg: RunConfig, run: RunState, policy) -> dict[str, float]:
    """One RL step on every rank: rank 0's scored batch, the policy update, the weight sync; the step's metrics."""
    timers = Timers()
    start = time.perf_counter()
    batch, extra = rank0_batch(
        lambda: take_rollout(cfg, run, timers), f"step {run.step}: rollout or reward", "nothing was trained"
    )
    if cfg.trainer.async_rollout:
        with timers("weight_sync"):
            start_next_rollout(cfg, run, policy)
    update_start = time.time()
    metrics = update_policy(cfg, policy, batch, timers)
    update_end = time.time()
    if not cfg.trainer.async_rollout:
        with timers("weight_sync"):
            sync_weights(run, policy)
    metrics.update(extra)
    metrics.update({"timeline/update_start": update_start, "timeline/update_end": update_end})
    metrics.update(perf_metrics(cfg, policy, batch, timers, time.perf_counter() - start))
    return metrics


def sft_step(cfg: RunConfig, run: RunState, policy) -> dict[str, float]:
    """One SFT step on every rank: rank 0's batch of traces and the policy update; the step's metrics."""
    timers = Timers()
    start = time.perf_counter()
    batch, extra = rank0_batch(lambda: trace_batch(run, timers), f"step {run.step}: trace batch", "nothing was trained")
    update_start = time.time()
    metrics = update_policy(cfg, policy, batch, timers)
    metrics.update({**extra, "timeline/update_start": update_start, "timeline/update_end": time.time()})
    metrics.update(perf_metrics(cfg, policy, batch, timers, time.perf_counter() - start))
    return metrics


def update_policy(cfg: RunConfig, policy, batch: StepBatch, timers: Timers) -> dict[str, float]:
    """One optimiser step per mini-batch (RL: old log-probs, written into ``batch``, first when there are several; the
    SFT loss reads none); the update's metrics combined over the mini-batches
    (:func:`~luffy_megatron.metrics.reduce.reduce_mini_batches`), ``actor/`` added to names without a ``/``."""
    mini_batches = batch.mini_batch_ids(cfg.data.train_batch_size // cfg.data.mini_batch_size)
    needs_old = len(mini_batches) > 1 and not is_sft(cfg)
    if needs_old:
        with timers("old_logprob"):
            batch.old_logprobs = policy.compute_logprobs(batch)
    train_metrics: dict[str, list[float]] = defaultdict(list)
    with timers("train"):
        for ids in mini_batches:
            for k, v in policy.train_mini_batch(batch.select(ids), use_old_logprobs=needs_old).items():
                train_metrics[k].append(v)
    return {(k if "/" in k else f"actor/{k}"): v for k, v in reduce_mini_batches(train_metrics).items()}


def perf_metrics(cfg: RunConfig, policy, batch: StepBatch, timers: Timers, step_s: float) -> dict[str, float]:
    """Stage times, step time, token throughput, the update's padding and (on a GPU with a known peak) MFU."""
    tokens = batch.num_tokens
    out = {f"time/{k}_s": v for k, v in timers.seconds.items()}
    out.update({"perf/step_s": step_s, "perf/tokens_per_s": tokens / step_s, "perf/tokens": float(tokens)})
    out.update(policy.take_token_stats())  # perf/padding_ratio, perf/max_micro_batch_tokens of the update
    if torch.cuda.is_available():
        tf32 = torch.backends.cuda.matmul.allow_tf32
        peak = peak_flops(torch.cuda.get_device_name(), cfg.model.dtype, tf32=tf32)
        if peak is not None:  # None: a GPU without an entry in metrics.perf.PEAK_FLOPS
            flops = model_flops(policy.spec, batch.lengths.tolist())
            out["perf/mfu"] = mfu(flops, timers.seconds["train"], dist.get_world_size(), peak)
    return out
