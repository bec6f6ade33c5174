"""A training run's state besides the policy, and its life: setup (or resume), checkpoints, HF export, teardown.

Global rank 0 owns the data, the rollout engine, the reward pool and the metrics logger; every rank holds the policy
and takes part in checkpoints, exports and weight syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers.utils import logging as hf_logging

from luffy_megatron.config import RunConfig, read_hf_config, to_dict
from luffy_megatron.convert import write_hf_folder
from luffy_megatron.data import PromptDataset, PromptSampler
from luffy_megatron.metrics.logger import MetricsLogger
from luffy_megatron.models.builder import model_spec
from luffy_megatron.models.tokenizer import load_tokenizer, pad_token_id
from luffy_megatron.platform import init_distributed, init_model_parallel, rank0_call
from luffy_megatron.reward import RewardMemo, RewardPool
from luffy_megatron.rollout.factory import build_run_engine
from luffy_megatron.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, should_save
from luffy_megatron.train.policy import MegatronPolicy
from luffy_megatron.train.preemption import StopRequest
from luffy_megatron.train.producer import RolloutPrefetcher, sync_weights
from luffy_megatron.train.sft import is_sft, needs_engine
from luffy_megatron.train.start_weights import load_start_weights, model_identity


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


def setup(cfg: RunConfig) -> tuple[RunState, Any]:
    """Distributed groups, policy (weights from checkpoint / Megatron checkpoint / HF), data, engine, rewards."""
    init_distributed(cfg.parallel.backend, timeout_minutes=cfg.fault_tolerance.collective_timeout_min)
    if not cfg.logging.progress_bar:
        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    p = cfg.parallel
    init_model_parallel(p.tp, p.pp, p.vpp, seed=cfg.trainer.seed, ep=p.ep)
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
    else:
        load_start_weights(cfg, policy)

    rank0_call(lambda: _setup_rank0(cfg, run, tokenizer, trainer_state, resume_from), "setup")
    # The engine starts from the HF folder; after a resume or a Megatron checkpoint it must get the policy's weights.
    if (resume_from is not None or cfg.model.megatron_checkpoint) and needs_engine(cfg):
        sync_weights(run, policy)
    return run, policy


def _setup_rank0(
    cfg: RunConfig, run: RunState, tokenizer: Any, trainer_state: dict[str, Any], resume_from: Path | None
) -> None:
    """What only global rank 0 holds: datasets and sampler, rollout engine, reward pool, metrics logger. On a failure
    (an unreadable data file, an unreachable rollout server) what was started is closed again."""
    try:
        _open_rank0_resources(cfg, run, tokenizer, trainer_state, resume_from)
    except BaseException:
        teardown(run)
        raise
    print(f"data: {run.dataset.summary()}", flush=True)


def _open_rank0_resources(
    cfg: RunConfig, run: RunState, tokenizer: Any, trainer_state: dict[str, Any], resume_from: Path | None
) -> None:
    run.dataset = PromptDataset(cfg.data, cfg.data.train_files, tokenizer, require_traces=is_sft(cfg))
    run.sampler = PromptSampler(len(run.dataset), cfg.data.train_batch_size, cfg.data.seed, cfg.data.shuffle)
    if "sampler" in trainer_state:
        run.sampler.load_state_dict(trainer_state["sampler"])
    if cfg.data.val_files and cfg.trainer.val_interval:
        run.val_dataset = PromptDataset(cfg.data, cfg.data.val_files, tokenizer)
    run.engine = build_run_engine(cfg) if needs_engine(cfg) else None  # SFT: only to validate
    if cfg.trainer.async_rollout:
        run.prefetch = RolloutPrefetcher()
        if resume_from is not None:
            run.prefetch.load(resume_from, trainer_state.get("pending_rollout"))
    run.rewards = RewardPool(cfg.reward, hard_margin_s=cfg.reward.hard_margin_s) if needs_engine(cfg) else None
    run.logger = MetricsLogger(cfg.logging, to_dict(cfg))


def save(cfg: RunConfig, run: RunState, policy) -> Path:
    """A training checkpoint of every rank's shards plus rank 0's trainer state (weight version, sampler)."""

    def trainer_state() -> dict[str, Any]:
        if run.prefetch is not None:
            run.prefetch.wait()  # the batch in flight first: producing it advances the sampler
        model = model_identity(policy.spec)  # what an RL run started from this checkpoint compares with its model
        return {"weight_version": run.weight_version, "sampler": run.sampler.state_dict(), "model": model}

    def pending_batch(folder: Path) -> dict[str, Any]:  # rank 0 alone: the batch never travels to other ranks
        return {"pending_rollout": run.prefetch.save(folder) if run.prefetch is not None else None}

    state = rank0_call(trainer_state, "collecting the trainer state")
    c = cfg.checkpoint
    path = save_checkpoint(c.save_dir, run.step, policy, state, c.keep_last, rank0_files=pending_batch)
    if dist.get_rank() == 0:
        print(f"saved checkpoint {path}", flush=True)
    return path


def stop_early(cfg: RunConfig, run: RunState, policy, stop: StopRequest, reason: str) -> None:
    """Checkpoint the finished step (unless it was just saved) and leave the requeue marker for the batch script."""
    path = None
    if cfg.checkpoint.save_dir:
        path = latest_checkpoint(cfg.checkpoint.save_dir) if should_save(cfg, run.step) else save(cfg, run, policy)
        stop.leave_marker(run.step, reason, path)
    if dist.get_rank() == 0:
        what = f"checkpoint {path}, requeue marker {stop.marker}" if path else "no checkpoint (no checkpoint.save_dir)"
        print(f"stopping after step {run.step} on {reason}: {what}", flush=True)


def export_hf(cfg: RunConfig, policy) -> None:
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
