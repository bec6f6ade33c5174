"""SFT mode (``trainer.mode=sft``): each step fits the traces of its prompts with token-mean cross entropy.

A step's batch is the sampler's next ``data.train_batch_size`` prompts, each with its trace as one off-policy sample
(advantage 0; nothing is generated or scored). The update is the RL one (:func:`luffy_megatron.train.loop.
update_policy`: ``data.mini_batch_size`` prompts per optimiser step, packing, every parallel layout), and the config
states the loss (:func:`luffy_megatron.config_checks.check_trainer_mode`): with ``algorithm.sft_loss`` every trace
token's loss is its NLL, weighted by 1 / (trace tokens of the mini-batch, over every micro-batch and data-parallel
rank), with no entropy bonus; on-policy tokens, the only others the loss has terms for, do not exist. So the
loss is the mini-batch's token-mean NLL, logged before the update as ``actor/sft_nll``. Data files, checkpoints,
resume, metrics and the Slurm scripts are the RL ones; every training row must have a trace
(:class:`~luffy_megatron.data.PromptDataset` ``require_traces``).

The rollout engine and the reward pool exist only for validation (:func:`needs_engine`); the policy's weights go to
the engine just before each validation (:func:`sync_for_validation`) instead of after every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from luffy_megatron.config import RunConfig, TrainerMode
from luffy_megatron.metrics.logger import Timers
from luffy_megatron.train.producer import sync_weights
from luffy_megatron.train.samples import Sample, mean_or_zero
from luffy_megatron.train.step_batch import StepBatch

if TYPE_CHECKING:
    from luffy_megatron.train.run_state import RunState


def is_sft(cfg: RunConfig) -> bool:
    return cfg.trainer.mode == TrainerMode.SFT


def needs_engine(cfg: RunConfig) -> bool:
    """Whether the run builds a rollout engine and a reward pool: RL always, SFT only to validate."""
    return not is_sft(cfg) or bool(cfg.trainer.val_interval and cfg.data.val_files)


def trace_batch(run: RunState, timers: Timers) -> tuple[StepBatch, dict[str, float]]:
    """Global rank 0: the next prompts' traces as one off-policy sample each, and their lengths."""
    with timers("batch"):
        items = run.dataset.get_batch(next(run.sampler).indices)
        samples = [Sample(it.index, gid, it.prompt_ids, list(it.trace_ids), True) for gid, it in enumerate(items)]
    lengths = [len(s.response_ids) for s in samples]
    return StepBatch.from_samples(samples), {
        "response/length_mean": mean_or_zero(lengths),
        "response/length_max": float(max(lengths, default=0)),
        "response/truncated": mean_or_zero([float(it.trace_truncated) for it in items]),
    }


def sync_for_validation(cfg: RunConfig, run: RunState, policy) -> None:
    """Every rank: give the engine the policy's weights unless it has them already (or there is no engine)."""
    if needs_engine(cfg) and run.engine_step < run.step:
        sync_weights(run, policy)
