"""The LUFFY training loop. One RL step, in the order data flows:

    batch    = next prompts (+ expert traces)
    rollouts = engine.generate(prompts, counts): n - n_off per prompt with a trace, n per prompt without
    samples  = mixed groups: rollouts + n_off trace copies
    rewards  = verifier(samples)
    adv      = r - mean(group)                        (optionally / std)
    (dynamic sampling: groups without reward signal left out, more prompts drawn until the batch is full)
    old_logp = policy.compute_logprobs(samples)      (skipped with one optimiser step per rollout batch)
    metrics  = policy.train_mini_batch(...) for each mini-batch
    engine.update_weights(policy's HF-named weights)
    log, validate, checkpoint

With ``trainer.async_rollout`` (luffy_megatron.train.async_rollout) the rollout..advantages part of step k + 1 runs in
the background during step k's update, and the weight sync moves to the start of the next step.

Global rank 0 owns the data, the rollout engine and the reward pool; the samples travel to every rank as a few flat
tensors (luffy_megatron.train.transport: one broadcast per dtype, no pickling), the step's rollout metrics as one
small object, and all ranks run the Megatron parts together.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from luffy_megatron.algo import compute_advantages
from luffy_megatron.config import AlgorithmConfig, OnPolicyBaseline, RunConfig, read_hf_config, to_dict
from luffy_megatron.convert import load_hf_weights, load_megatron_checkpoint, write_hf_folder
from luffy_megatron.convert.export import iter_hf_weights
from luffy_megatron.data import PromptDataset, PromptSampler
from luffy_megatron.metrics.logger import MetricsLogger, Timers
from luffy_megatron.metrics.perf import mfu, model_flops, peak_flops
from luffy_megatron.metrics.reduce import reduce_mini_batches
from luffy_megatron.models.builder import model_spec
from luffy_megatron.models.tokenizer import load_tokenizer, pad_token_id
from luffy_megatron.platform import init_distributed, init_model_parallel, rank0_call
from luffy_megatron.reward import RewardMemo, RewardPool
from luffy_megatron.rollout.base import SamplingParams
from luffy_megatron.train.async_rollout import RolloutPrefetcher, build_engine, produce_batch
from luffy_megatron.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from luffy_megatron.train.dynamic_sampling import collect_groups, round_seed
from luffy_megatron.train.policy import MegatronPolicy
from luffy_megatron.train.preemption import StopRequest
from luffy_megatron.train.samples import Sample, assemble_groups, group_metrics, mean_or_zero, split_mini_batches
from luffy_megatron.train.transport import rank0_batch


@dataclass
class RunState:
    """What the loop owns besides the policy (global rank 0 only, except ``step``)."""

    step: int
    tokenizer: Any = None
    dataset: Any = None
    sampler: Any = None
    val_dataset: Any = None
    engine: Any = None
    rewards: Any = None
    logger: Any = None
    weight_version: int = 0
    reward_memo: RewardMemo = field(default_factory=RewardMemo)
    engine_step: int = 0  # policy updates contained in the engine's weights (every rank)
    prefetch: Any = None  # RolloutPrefetcher with trainer.async_rollout (rank 0)


def train(cfg: RunConfig) -> dict[str, float]:
    """Run ``cfg.trainer.total_steps`` RL steps (resuming from the newest checkpoint when configured).

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
    bar = tqdm(total=cfg.trainer.total_steps, initial=run.step, desc="RL steps", unit="step", disable=not show)
    try:
        while run.step < cfg.trainer.total_steps:
            run.step += 1
            metrics = rl_step(cfg, run, policy)
            if cfg.trainer.val_interval and run.step % cfg.trainer.val_interval == 0:
                settle_engine(cfg, run, policy)  # async: the engine is idle and holds this step's weights
                metrics.update(validate_policy(cfg, run))
            if run.logger is not None:
                run.logger.log(run.step, metrics, write=bar.write if show else print)
            if _should_save(cfg, run.step):
                save(cfg, run, policy)
            bar.update(1)
            if run.step < cfg.trainer.total_steps and (reason := stop.requested()) is not None:
                stop_early(cfg, run, policy, stop, reason)
                break
        if cfg.checkpoint.export_hf_at_end and run.step == cfg.trainer.total_steps:
            export_hf(cfg, run, policy)
    finally:
        bar.close()
        stop.close()
        teardown(run)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# One RL step
# ----------------------------------------------------------------------------------------------------------------
def rl_step(cfg: RunConfig, run: RunState, policy) -> dict[str, float]:
    timers = Timers()
    start = time.perf_counter()
    samples, extra = rank0_batch(
        lambda: take_rollout(cfg, run, timers), f"step {run.step}: rollout or reward", "nothing was trained"
    )
    if cfg.trainer.async_rollout:
        with timers("weight_sync"):
            start_next_rollout(cfg, run, policy)
    update_start = time.time()
    mini_batches = split_mini_batches(samples, cfg.data.train_batch_size // cfg.data.mini_batch_size)
    needs_old = len(mini_batches) > 1
    if needs_old:
        with timers("old_logprob"):
            for s, lp in zip(samples, policy.compute_logprobs(samples)):
                s.old_logprobs = lp
    train_metrics: dict[str, list[float]] = defaultdict(list)
    with timers("train"):
        for mb in mini_batches:
            for k, v in policy.train_mini_batch(mb, use_old_logprobs=needs_old).items():
                train_metrics[k].append(v)
    update_end = time.time()
    if not cfg.trainer.async_rollout:
        with timers("weight_sync"):
            sync_weights(run, policy)

    metrics = {(k if "/" in k else f"actor/{k}"): v for k, v in reduce_mini_batches(train_metrics).items()}
    metrics.update(extra)
    metrics.update({"timeline/update_start": update_start, "timeline/update_end": update_end})
    step_s = time.perf_counter() - start
    tokens = sum(s.num_tokens for s in samples)
    metrics.update({f"time/{k}_s": v for k, v in timers.seconds.items()})
    metrics.update({"perf/step_s": step_s, "perf/tokens_per_s": tokens / step_s, "perf/tokens": float(tokens)})
    metrics.update(policy.take_token_stats())  # perf/padding_ratio, perf/max_micro_batch_tokens of the update
    if torch.cuda.is_available():
        tf32 = torch.backends.cuda.matmul.allow_tf32
        peak = peak_flops(torch.cuda.get_device_name(), cfg.model.dtype, tf32=tf32)
        if peak is not None:  # None: a GPU without an entry in metrics.perf.PEAK_FLOPS
            flops = model_flops(policy.spec, samples)
            metrics["perf/mfu"] = mfu(flops, timers.seconds["train"], dist.get_world_size(), peak)
    return metrics


def take_rollout(cfg: RunConfig, run: RunState, timers: Timers) -> tuple[list[Sample], dict[str, float]]:
    """Global rank 0: this step's scored batch, the one produced in the background (async) or one produced now."""
    batch = None
    if run.prefetch is not None:
        with timers("rollout_wait"):
            batch = run.prefetch.take(run.step)
    if batch is None:
        batch = produce_batch(run.step, run.engine_step, partial(rollout_and_score, cfg, run, timers, run.step))
    return batch.samples, {**batch.metrics, "rollout/weight_staleness": float(run.step - 1 - batch.weights_step)}


def start_next_rollout(cfg: RunConfig, run: RunState, policy) -> None:
    """Async rollout, at the start of a step: the engine gets the weights after ``step - 1`` updates (every rank),
    then rank 0 starts producing the next step's batch in the background."""
    if run.engine_step < run.step - 1:
        sync_weights(run, policy, updates=run.step - 1)
    # After the last step only when a checkpoint follows: it records the batch so that a longer resumed run is exact.
    if run.prefetch is None or (run.step >= cfg.trainer.total_steps and not _should_save(cfg, run.step)):
        return
    step = run.step + 1

    def produce() -> tuple[list[Sample], dict[str, float]]:
        timers = Timers()
        samples, metrics = rollout_and_score(cfg, run, timers, step)
        return samples, {**metrics, **{f"time/{k}_s": v for k, v in timers.seconds.items()}}

    run.prefetch.start(step, run.engine_step, produce)


def rollout_and_score(cfg: RunConfig, run: RunState, timers: Timers, step: int) -> tuple[list[Sample], dict]:
    """Global rank 0's part of a step: one scored round (or, with dynamic sampling, rounds until the batch is full of
    groups with signal) and the group metrics."""
    a = cfg.algorithm

    def draw(round_index: int) -> tuple[list[Sample], dict[str, float]]:
        return score_round(cfg, run, timers, step, round_index)

    if a.dynamic_sampling:
        target, rounds, signal = cfg.data.train_batch_size, a.dynamic_sampling_max_rounds, a.dynamic_sampling_signal
        samples, extra = collect_groups(draw, target, rounds, signal)
    else:
        samples, extra = draw(0)
    return samples, {**group_metrics(samples), **extra, **run.engine.step_metrics()}


def score_round(
    cfg: RunConfig, run: RunState, timers: Timers, step: int, round_index: int
) -> tuple[list[Sample], dict[str, float]]:
    """Next batch of prompts: rollouts, rewards, advantages; plus the ``rollout/samples_*`` counts."""
    batch = run.dataset.get_batch(next(run.sampler).indices)
    with timers("rollout"):
        samples, counts = generate_groups(cfg, run, batch, step, round_index)
    with timers("reward"):
        rewards = score_samples(cfg, run, samples, batch)
    assign_advantages(cfg.algorithm, samples, rewards)
    return samples, counts


def assign_advantages(a: AlgorithmConfig, samples: list[Sample], rewards: list[float]) -> None:
    """Set each sample's reward and its group-normalised advantage (the statistics ``a`` asks for)."""
    off = torch.tensor([s.off_policy for s in samples])
    adv = compute_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor([s.group_id for s in samples]),
        use_std=a.adv_use_std,
        eps=a.adv_eps,
        # The "RL with SFT loss" ablation baselines on-policy samples only (the paper's grpo_split).
        stat_mask=~off if a.sft_loss else None,
        baseline_mask=~off if a.on_policy_baseline == OnPolicyBaseline.ON_POLICY_MEAN else None,
    )
    for s, r, value in zip(samples, rewards, adv.tolist()):
        s.reward, s.advantage = r, value


def generate_groups(
    cfg: RunConfig, run: RunState, batch: list, step: int, round_index: int = 0
) -> tuple[list[Sample], dict[str, float]]:
    """Exactly the samples the groups use (``n - n_off`` per prompt with a trace, ``n`` otherwise), assembled with
    the trace copies; plus the ``rollout/samples_*`` counts. Each dynamic-sampling round has its own seed."""
    r = cfg.rollout
    seed = round_seed(r.seed * 1_000_003 + step, round_index)
    params = SamplingParams.from_config(r, cfg.data.max_response_length, seed=seed)
    traces = [item.trace_ids if r.n_off > 0 else None for item in batch]
    counts = [r.n if t is None else r.n - r.n_off for t in traces]
    if round_index > 0:  # an earlier round of this step released colocated servers
        run.engine.resume_memory()
    outputs = run.engine.generate([item.prompt_ids for item in batch], params, counts)
    run.engine.release_memory()  # colocated servers give the GPUs to Megatron until the weight sync
    rollouts = [[(o.output_ids, o.logprobs, o.finish_reason) for o in outs] for outs in outputs]
    samples = assemble_groups([item.index for item in batch], [item.prompt_ids for item in batch], traces, rollouts,
                              r.n_off)  # fmt: skip
    generated = float(sum(len(outs) for outs in outputs))
    used = float(sum(1 for s in samples if not s.off_policy))
    return samples, {"rollout/samples_generated": generated, "rollout/samples_discarded": generated - used}


def score_samples(cfg: RunConfig, run: RunState, samples: list[Sample], batch: list) -> list[float]:
    """Verifier rewards, memoised on (response text, ground truth): repeated answers are scored once."""
    by_group = {i: item for i, item in enumerate(batch)}
    texts = run.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=False)
    keys = [
        (t, by_group[s.group_id].ground_truth, by_group[s.group_id].prompt_ends_with_think)
        for t, s in zip(texts, samples)
    ]
    return run.reward_memo.rewards(
        keys, lambda todo: run.rewards.score([k[0] for k in todo], [k[1] for k in todo], [k[2] for k in todo])
    )


def sync_weights(run: RunState, policy, updates: int | None = None) -> None:
    """Stream the policy's weights (HF names, full tensors) into the rollout engine; every rank takes part.
    ``updates``: the RL steps these weights contain (default ``run.step``)."""
    run.weight_version += 1
    run.engine_step = run.step if updates is None else updates
    stream = (pair for bucket in iter_hf_weights(policy.modules, policy.spec) for pair in bucket)
    if run.engine is not None:  # colocated servers take back their memory inside the update, weights first
        run.engine.update_weights(stream, version=run.weight_version)
    else:
        for _ in stream:  # the collectives of the gather need every rank
            pass


def settle_engine(cfg: RunConfig, run: RunState, policy) -> None:
    """Async rollout: wait for the batch in flight, then give the engine this step's weights (every rank)."""
    if not cfg.trainer.async_rollout:
        return
    rank0_call(lambda: run.prefetch.wait(), f"step {run.step + 1}: rollout or reward")
    if run.engine_step < run.step:
        sync_weights(run, policy)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def validate_policy(cfg: RunConfig, run: RunState) -> dict[str, float]:
    """avg@k accuracy per data source on the held-out set, sampled by the rollout engine (rank 0)."""
    if dist.get_rank() != 0 or run.val_dataset is None:
        return {}
    return evaluate(cfg, run.engine, run.rewards, run.tokenizer, run.val_dataset)


def evaluate(cfg: RunConfig, engine, rewards, tokenizer, dataset) -> dict[str, float]:
    """avg@k accuracy per data source of ``dataset`` (plus ``all``), ``val_n`` samples per prompt."""
    t = cfg.trainer
    count = len(dataset) if t.val_max_prompts is None else min(len(dataset), t.val_max_prompts)
    items = dataset.get_batch(list(range(count)))
    params = SamplingParams(
        n=t.val_n,
        temperature=t.val_temperature,
        top_p=1.0,
        max_new_tokens=cfg.data.max_response_length,
        seed=cfg.trainer.seed,
    )
    outputs = engine.generate([it.prompt_ids for it in items], params)
    flat = [(it, o) for it, outs in zip(items, outputs) for o in outs]
    texts = tokenizer.batch_decode([o.output_ids for _, o in flat], skip_special_tokens=False)
    scores = rewards.score(texts, [it.ground_truth for it, _ in flat], [it.prompt_ends_with_think for it, _ in flat])
    per_source: dict[str, list[float]] = defaultdict(list)
    for (it, _), s in zip(flat, scores):
        per_source[it.data_source].append(s)
    out = {f"val/{src}/avg@{t.val_n}": mean_or_zero(v) for src, v in sorted(per_source.items())}
    out[f"val/all/avg@{t.val_n}"] = mean_or_zero(scores)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Setup, checkpoints, teardown
# ----------------------------------------------------------------------------------------------------------------
def setup(cfg: RunConfig) -> tuple[RunState, Any]:
    """Distributed groups, policy (weights from checkpoint / Megatron checkpoint / HF), data, engine, rewards."""
    init_distributed(cfg.parallel.backend, timeout_minutes=cfg.fault_tolerance.collective_timeout_min)
    if not cfg.logging.progress_bar:
        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    p = cfg.parallel
    init_model_parallel(p.tp, p.pp, p.vpp, seed=cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model.hf_path)
    spec = model_spec(read_hf_config(cfg.model.hf_path), p.tp)
    policy = MegatronPolicy(cfg, spec, pad_token_id(tokenizer))
    run = RunState(step=0, tokenizer=tokenizer)

    resume_from = (
        latest_checkpoint(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir and cfg.checkpoint.resume else None
    )
    trainer_state: dict[str, Any] = {}
    if resume_from is not None:
        trainer_state = load_checkpoint(resume_from, policy)
        run.step = int(trainer_state["step"])
        run.weight_version = int(trainer_state.get("weight_version", run.step))
        run.engine_step = run.step  # the sync below
    elif cfg.model.megatron_checkpoint:
        load_megatron_checkpoint(policy.modules, cfg.model.megatron_checkpoint)
    else:
        load_hf_weights(policy.modules, spec, cfg.model.hf_path)

    rank0_call(lambda: _setup_rank0(cfg, run, tokenizer, trainer_state), "setup")
    # The engine starts from the HF folder; after a resume or a Megatron checkpoint it must get the policy's weights.
    if resume_from is not None or cfg.model.megatron_checkpoint:
        sync_weights(run, policy)
    return run, policy


def _setup_rank0(cfg: RunConfig, run: RunState, tokenizer: Any, trainer_state: dict[str, Any]) -> None:
    """What only global rank 0 holds: datasets and sampler, rollout engine, reward pool, metrics logger. On a failure
    (an unreadable data file, an unreachable rollout server) what was started is closed again."""
    try:
        _open_rank0_resources(cfg, run, tokenizer, trainer_state)
    except BaseException:
        teardown(run)
        raise
    print(f"data: {run.dataset.summary()}", flush=True)


def _open_rank0_resources(cfg: RunConfig, run: RunState, tokenizer: Any, trainer_state: dict[str, Any]) -> None:
    run.dataset = PromptDataset(cfg.data, cfg.data.train_files, tokenizer)
    run.sampler = PromptSampler(len(run.dataset), cfg.data.train_batch_size, cfg.data.seed, cfg.data.shuffle)
    if "sampler" in trainer_state:
        run.sampler.load_state_dict(trainer_state["sampler"])
    if cfg.data.val_files and cfg.trainer.val_interval:
        run.val_dataset = PromptDataset(cfg.data, cfg.data.val_files, tokenizer)
    run.engine = build_engine(cfg)
    if cfg.trainer.async_rollout:
        run.prefetch = RolloutPrefetcher()
        run.prefetch.load_state_dict(trainer_state.get("pending_rollout"))
    run.rewards = RewardPool(cfg.reward, hard_margin_s=cfg.reward.hard_margin_s)
    run.logger = MetricsLogger(cfg.logging, to_dict(cfg))


def _should_save(cfg: RunConfig, step: int) -> bool:
    c = cfg.checkpoint
    if not c.save_dir:
        return False
    return step == cfg.trainer.total_steps or (c.save_interval > 0 and step % c.save_interval == 0)


def save(cfg: RunConfig, run: RunState, policy) -> Path:
    """A training checkpoint of every rank's shards plus rank 0's trainer state (weight version, sampler)."""

    def trainer_state() -> dict[str, Any]:
        # The batch in flight first: producing it advances the sampler.
        pending = run.prefetch.state_dict() if run.prefetch is not None else None
        return {"weight_version": run.weight_version, "sampler": run.sampler.state_dict(), "pending_rollout": pending}

    state = rank0_call(trainer_state, "collecting the trainer state")
    path = save_checkpoint(cfg.checkpoint.save_dir, run.step, policy, state, cfg.checkpoint.keep_last)
    if dist.get_rank() == 0:
        print(f"saved checkpoint {path}", flush=True)
    return path


def stop_early(cfg: RunConfig, run: RunState, policy, stop: StopRequest, reason: str) -> None:
    """Checkpoint the finished step (unless it was just saved) and leave the requeue marker for the batch script."""
    path = None
    if cfg.checkpoint.save_dir:
        path = latest_checkpoint(cfg.checkpoint.save_dir) if _should_save(cfg, run.step) else save(cfg, run, policy)
        stop.leave_marker(run.step, reason, path)
    if dist.get_rank() == 0:
        what = f"checkpoint {path}, requeue marker {stop.marker}" if path else "no checkpoint (no checkpoint.save_dir)"
        print(f"stopping after step {run.step} on {reason}: {what}", flush=True)


def export_hf(cfg: RunConfig, run: RunState, policy) -> None:
    """Write the final policy as an HF folder next to the checkpoints (or in the output directory)."""
    out = Path(cfg.checkpoint.save_dir or cfg.logging.out_dir) / "hf_final"
    write_hf_folder(
        policy.modules, policy.spec, out, dtype=cfg.model.dtype, hf_files_from=cfg.model.hf_path, overwrite=True
    )
    if dist.get_rank() == 0:
        print(f"exported HF model to {out}", flush=True)


def teardown(run: RunState) -> None:
    """Close rank 0's resources; the engine before the rollout thread, so that a generation in flight ends."""
    for resource in (run.rewards, run.engine, run.prefetch, run.logger):
        if resource is not None:
            resource.close()
