"""Evaluation rows: LUFFY-schema parquet files read and rendered by the training data loader (system prompt removed
as in the paper's evaluation by default, or kept or replaced as ``data.system_prompt`` does), grouped into problems,
optionally filtered by data source or collapsed to one row per problem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from luffy_megatron.config import DataConfig, SystemPrompt
from luffy_megatron.data import DataError, PromptDataset
from luffy_megatron.eval.metrics import problem_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Columns the evaluation needs (the training loader's defaults; no trace column).
REQUIRED = ("prompt", "reward_model.ground_truth", "data_source")


@dataclass(frozen=True)
class EvalRow:
    """One prompt to sample ``n`` times; ``row_id`` is stable across runs (file name and row number)."""

    row_id: str
    problem_id: str
    data_source: str
    prompt_ids: list[int]
    ground_truth: str
    prompt_ends_with_think: bool


def _check_file(path: str) -> None:
    """Existence, readability, non-emptiness and the required columns of one parquet file, each as one error."""

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    try:
        meta = pq.read_metadata(p)
    except Exception as e:  # pyarrow raises several types for non-parquet or truncated files
        raise DataError(f"{path}: cannot read parquet file: {e}") from e
    if meta.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
    names = set(meta.schema.to_arrow_schema().names)
    missing = [c for c in REQUIRED if c.split(".")[0] not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {sorted(names)}")


def load_rows(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    sources: list[str] | None = None,
    unique: bool = False,
    system_prompt: str = SystemPrompt.REMOVE.value,
    system_prompt_text: str | None = None,
    limit_per_source: int | None = None,
) -> list[EvalRow]:
    """Rows of ``files`` in file order. ``sources``: keep only these data sources (an unknown name is an error);
    ``unique``: one row per problem (for ``--n`` samples per unique problem); ``system_prompt``,
    ``system_prompt_text``: as ``data.system_prompt`` and ``data.system_prompt_text`` of the training config;
    ``limit_per_source``: the first that many problems of each source (all their rows)."""
    for path in files:
        _check_file(path)
    cfg = DataConfig(
        max_prompt_length=2**31 - 1,  # never drop a benchmark prompt
        max_response_length=2**31 - 1,  # traces are not used: never cut them (nor warn that they were)
        system_prompt=system_prompt,
        system_prompt_text=system_prompt_text,
    )
    dataset = PromptDataset(cfg, files, tokenizer, progress=False)
    items = list(dataset.items)
    present = list(dict.fromkeys(it.data_source for it in items))
    if sources:
        unknown = [s for s in sources if s not in present]
        if unknown:
            raise DataError(f"unknown data source(s) {unknown}; the files have {present}")
        items = [it for it in items if it.data_source in sources]
    rows: list[EvalRow] = []
    kept: set[str] = set()
    excluded: set[str] = set()
    per_source: dict[str, int] = {}
    for it in items:
        pid = problem_id(it.data_source, it.prompt_ids, it.ground_truth)
        if pid in excluded or (unique and pid in kept):
            continue
        if pid not in kept:
            if limit_per_source is not None and per_source.get(it.data_source, 0) >= limit_per_source:
                excluded.add(pid)
                continue
            per_source[it.data_source] = per_source.get(it.data_source, 0) + 1
            kept.add(pid)
        row_id = f"{Path(it.source).name}:{it.row}"
        rows.append(EvalRow(row_id, pid, it.data_source, it.prompt_ids, it.ground_truth, it.prompt_ends_with_think))
    return rows
