"""Validation: ``luffy-eval``'s avg@k per data source on the held-out set, sampled by the rollout engine on global
rank 0 and scored by luffy-eval's definition (:func:`luffy_megatron.eval.score.score_outputs`) under the training
reward's rule. ``luffy-eval`` with :func:`luffy_megatron.eval.runner.validation_options` scores a model the same way.
"""

from __future__ import annotations

import torch.distributed as dist

from luffy_megatron.config import RunConfig
from luffy_megatron.eval.metrics import source_average, summarise
from luffy_megatron.eval.score import ScoreRule, score_outputs
from luffy_megatron.rollout.base import SamplingParams
from luffy_megatron.train.run_state import RunState


def validate_policy(cfg: RunConfig, run: RunState) -> dict[str, float]:
    """The ``val/*`` metrics of the engine's current weights on rank 0 (empty elsewhere and without a held-out set)."""
    if dist.get_rank() != 0 or run.val_dataset is None:
        return {}
    return evaluate(cfg, run.engine, run.rewards, run.tokenizer, run.val_dataset)


def evaluate(cfg: RunConfig, engine, rewards, tokenizer, dataset) -> dict[str, float]:
    """avg@k per data source of ``dataset`` (plus ``all``), ``val_n`` samples per prompt."""
    return val_metrics(validation_records(cfg, engine, rewards, tokenizer, dataset), cfg.trainer.val_n)


def validation_records(cfg: RunConfig, engine, rewards, tokenizer, dataset) -> list[dict]:
    """luffy-eval's record of each sample: ``val_n`` per prompt of the first ``val_max_prompts`` prompts, graded in
    the reward pool ``rewards`` (``ScoreRule.of_reward(cfg.reward)``: the training reward's check)."""
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
    return score_outputs(items, outputs, tokenizer, ScoreRule.of_reward(cfg.reward), pool=rewards)


def val_metrics(records: list[dict], n: int) -> dict[str, float]:
    """``val/<source>/avg@<n>``: luffy-eval's avg@k of the source (mean over its problems of the problem's mean score;
    k counts a problem's samples over all its rows); ``val/all/avg@<n>``: the mean over sources."""
    per_source = summarise(records)
    out = {f"val/{source}/avg@{n}": res["avg@k"] for source, res in per_source.items()}
    out[f"val/all/avg@{n}"] = source_average(per_source)
    return out
