"""The LUFFY training loop. One RL step, in the order data flows:

    batch    = next prompts (+ expert traces)
    rollouts = engine.generate(prompts, n per prompt); the first n - n_off kept where the prompt has a trace
    samples  = mixed groups: rollouts + n_off trace copies
    rewards  = verifier(samples)
    adv      = r - mean(group)                        (optionally / std)
    old_logp = policy.compute_logprobs(samples)      (skipped with one optimiser step per rollout batch)
    metrics  = policy.train_mini_batch(...) for each mini-batch
    engine.update_weights(policy's HF-named weights)
    log, validate, checkpoint

Global rank 0 owns the data, the rollout engine and the reward pool; the samples are broadcast to every rank, and
all ranks run the Megatron parts together.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from luffy_megatron.algo import compute_advantages
from luffy_megatron.config import RunConfig, read_hf_config, to_dict
from luffy_megatron.convert import load_hf_weights, load_megatron_checkpoint, write_hf_folder
from luffy_megatron.convert.export import iter_hf_weights
from luffy_megatron.data import PromptDataset, PromptSampler
from luffy_megatron.metrics.logger import MetricsLogger, Timers
from luffy_megatron.metrics.perf import mfu, model_flops, peak_flops
from luffy_megatron.models.builder import model_spec
from luffy_megatron.models.tokenizer import load_tokenizer, pad_token_id
from luffy_megatron.platform import init_distributed, init_model_parallel, rank0_call
from luffy_megatron.reward import RewardPool
from luffy_megatron.rollout.base import SamplingParams, build_rollout_engine
from luffy_megatron.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from luffy_megatron.train.policy import MegatronPolicy
from luffy_megatron.train.samples import Sample, assemble_groups

_REWARD_CACHE_SIZE = 200_000


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
    reward_cache: dict | None = None


def train(cfg: RunConfig) -> dict[str, float]:
    """Run ``cfg.trainer.total_steps`` RL steps (resuming from the newest checkpoint when configured).

    The config must already be validated (:func:`luffy_megatron.config.validate`). Returns the last step's metrics.
    """
    run, policy = setup(cfg)
    metrics: dict[str, float] = {}
    show = run.logger is not None and cfg.logging.progress_bar
    bar = tqdm(total=cfg.trainer.total_steps, initial=run.step, desc="RL steps", unit="step", disable=not show)
    try:
        while run.step < cfg.trainer.total_steps:
            run.step += 1
            metrics = rl_step(cfg, run, policy)
            if cfg.trainer.val_interval and run.step % cfg.trainer.val_interval == 0:
                metrics.update(validate_policy(cfg, run))
            if run.logger is not None:
                run.logger.log(run.step, metrics, write=bar.write if show else print)
            if _should_save(cfg, run.step):
                save(cfg, run, policy)
            bar.update(1)
        if cfg.checkpoint.export_hf_at_end:
            export_hf(cfg, run, policy)
    finally:
        bar.close()
        teardown(run)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# One RL step
# ----------------------------------------------------------------------------------------------------------------
def rl_step(cfg: RunConfig, run: RunState, policy) -> dict[str, float]:
    timers = Timers()
    start = time.perf_counter()
    samples, extra = rank0_call(
        lambda: rollout_and_score(cfg, run, timers), f"step {run.step}: rollout or reward", "nothing was trained"
    )
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
    with timers("weight_sync"):
        sync_weights(run, policy)

    metrics = {(k if "/" in k else f"actor/{k}"): sum(v) / len(v) for k, v in train_metrics.items()}
    metrics.update(extra)
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


def rollout_and_score(cfg: RunConfig, run: RunState, timers: Timers) -> tuple[list[Sample], dict[str, float]]:
    """Global rank 0's part of a step: next batch, rollouts, rewards, advantages, group metrics."""
    batch = run.dataset.get_batch(next(run.sampler).indices)
    with timers("rollout"):
        samples = generate_groups(cfg, run, batch)
    with timers("reward"):
        rewards = score_samples(cfg, run, samples, batch)
    off = torch.tensor([s.off_policy for s in samples])
    adv = compute_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor([s.group_id for s in samples]),
        use_std=cfg.algorithm.adv_use_std,
        eps=cfg.algorithm.adv_eps,
        # The "RL with SFT loss" ablation baselines on-policy samples only (the paper's grpo_split).
        stat_mask=~off if cfg.algorithm.sft_loss else None,
    )
    for s, r, a in zip(samples, rewards, adv.tolist()):
        s.reward, s.advantage = r, a
    return samples, group_metrics(samples)


def generate_groups(cfg: RunConfig, run: RunState, batch: list) -> list[Sample]:
    """``n`` rollouts per prompt, of which the first ``n - n_off`` are kept where the prompt has a trace; assembled
    into groups with the trace copies."""
    r = cfg.rollout
    params = SamplingParams(
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=cfg.data.max_response_length,
        seed=r.seed * 1_000_003 + run.step,
    )
    outputs = run.engine.generate([item.prompt_ids for item in batch], params)
    run.engine.release_memory()  # colocated servers give the GPUs to Megatron until the weight sync
    n_off = r.n_off
    rollouts = []
    for item, outs in zip(batch, outputs):
        keep = r.n - n_off if item.trace_ids is not None and n_off > 0 else r.n
        rollouts.append([(o.output_ids, o.logprobs, o.finish_reason) for o in outs[:keep]])
    return assemble_groups(
        [item.index for item in batch],
        [item.prompt_ids for item in batch],
        [item.trace_ids if n_off > 0 else None for item in batch],
        rollouts,
        n_off,
    )


def score_samples(cfg: RunConfig, run: RunState, samples: list[Sample], batch: list) -> list[float]:
    """Verifier rewards, memoised on (response text, ground truth): repeated answers are scored once."""
    by_group = {i: item for i, item in enumerate(batch)}
    texts = run.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=False)
    keys = [
        (t, by_group[s.group_id].ground_truth, by_group[s.group_id].prompt_ends_with_think)
        for t, s in zip(texts, samples)
    ]
    cache = run.reward_cache
    todo = sorted({k for k in keys if k not in cache})
    if todo:
        scores = run.rewards.score([k[0] for k in todo], [k[1] for k in todo], [k[2] for k in todo])
        if len(cache) + len(todo) > _REWARD_CACHE_SIZE:
            cache.clear()
        cache.update(zip(todo, scores))
    return [float(cache[k]) for k in keys]


def split_mini_batches(samples: list[Sample], num: int) -> list[list[Sample]]:
    """Consecutive groups of prompts (a group is never split across optimiser steps)."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group_id].append(s)
    ids = sorted(groups)
    per = math.ceil(len(ids) / num)
    return [[s for g in ids[i : i + per] for s in groups[g]] for i in range(0, len(ids), per)]


def group_metrics(samples: list[Sample]) -> dict[str, float]:
    """Rewards of on-policy samples and traces, solved-all / solved-none groups, response lengths."""
    on = [s for s in samples if not s.off_policy]
    off = [s for s in samples if s.off_policy]
    groups: dict[int, list[float]] = defaultdict(list)
    for s in on:
        groups[s.group_id].append(s.reward)
    lengths = [len(s.response_ids) for s in on]
    out = {
        "reward/on_policy": _mean([s.reward for s in on]),
        "reward/off_policy": _mean([s.reward for s in off]),
        "reward/all": _mean([s.reward for s in samples]),
        "groups/solved_all": _mean([float(min(g) == 1.0) for g in groups.values()]),
        "groups/solved_none": _mean([float(max(g) == 0.0) for g in groups.values()]),
        "response/length_mean": _mean(lengths),
        "response/length_max": float(max(lengths, default=0)),
        "response/truncated": _mean([float(s.finish_reason == "length") for s in on]),
        "response/off_policy_length_mean": _mean([len(s.response_ids) for s in off]),
    }
    return out


def sync_weights(run: RunState, policy) -> None:
    """Stream the policy's weights (HF names, full tensors) into the rollout engine; every rank takes part."""
    run.weight_version += 1
    stream = (pair for bucket in iter_hf_weights(policy.modules, policy.spec) for pair in bucket)
    if run.engine is not None:
        run.engine.resume_memory()
        run.engine.update_weights(stream, version=run.weight_version)
    else:
        for _ in stream:  # the collectives of the gather need every rank
            pass


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
    out = {f"val/{src}/avg@{t.val_n}": _mean(v) for src, v in sorted(per_source.items())}
    out[f"val/all/avg@{t.val_n}"] = _mean(scores)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Setup, checkpoints, teardown
# ----------------------------------------------------------------------------------------------------------------
def setup(cfg: RunConfig) -> tuple[RunState, Any]:
    """Distributed groups, policy (weights from checkpoint / Megatron checkpoint / HF), data, engine, rewards."""
    init_distributed(cfg.parallel.backend)
    p = cfg.parallel
    init_model_parallel(p.tp, p.pp, p.vpp, seed=cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model.hf_path)
    spec = model_spec(read_hf_config(cfg.model.hf_path), p.tp)
    policy = MegatronPolicy(cfg, spec, pad_token_id(tokenizer))
    run = RunState(step=0, tokenizer=tokenizer, reward_cache={})

    resume_from = (
        latest_checkpoint(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir and cfg.checkpoint.resume else None
    )
    trainer_state: dict[str, Any] = {}
    if resume_from is not None:
        trainer_state = load_checkpoint(resume_from, policy)
        run.step = int(trainer_state["step"])
        run.weight_version = int(trainer_state.get("weight_version", run.step))
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
    run.engine = build_rollout_engine(cfg.rollout, cfg.model.hf_path)
    run.rewards = RewardPool(cfg.reward, hard_margin_s=cfg.reward.hard_margin_s)
    run.logger = MetricsLogger(cfg.logging, to_dict(cfg))


def _should_save(cfg: RunConfig, step: int) -> bool:
    c = cfg.checkpoint
    if not c.save_dir:
        return False
    return step == cfg.trainer.total_steps or (c.save_interval > 0 and step % c.save_interval == 0)


def save(cfg: RunConfig, run: RunState, policy) -> None:
    """A training checkpoint of every rank's shards plus rank 0's trainer state (weight version, sampler)."""

    def trainer_state() -> dict[str, Any]:
        return {"weight_version": run.weight_version, "sampler": run.sampler.state_dict()}

    state = rank0_call(trainer_state, "collecting the trainer state")
    path = save_checkpoint(cfg.checkpoint.save_dir, run.step, policy, state, cfg.checkpoint.keep_last)
    if dist.get_rank() == 0:
        print(f"saved checkpoint {path}", flush=True)


def export_hf(cfg: RunConfig, run: RunState, policy) -> None:
    """Write the final policy as an HF folder next to the checkpoints (or in the output directory)."""
    out = Path(cfg.checkpoint.save_dir or cfg.logging.out_dir) / "hf_final"
    write_hf_folder(
        policy.modules, policy.spec, out, dtype=cfg.model.dtype, hf_files_from=cfg.model.hf_path, overwrite=True
    )
    if dist.get_rank() == 0:
        print(f"exported HF model to {out}", flush=True)


def teardown(run: RunState) -> None:
    for resource in (run.rewards, run.engine, run.logger):
        if resource is not None:
            resource.close()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
