"""Validation: avg@k accuracy per data source on the held-out set, sampled by the rollout engine (global rank 0)."""

from __future__ import annotations

from collections import defaultdict

import torch.distributed as dist

from luffy_megatron.config import RunConfig
from luffy_megatron.rollout.base import SamplingParams
from luffy_megatron.train.run_state import RunState
from luffy_megatron.train.samples import mean_or_zero


def validate_policy(cfg: RunConfig, run: RunState) -> dict[str, float]:
    """The ``val/*`` metrics of the engine's current weights on rank 0 (empty elsewhere and without a held-out set)."""
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
