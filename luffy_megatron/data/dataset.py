"""Prompt datasets in the LUFFY schema, tokenised once at load.

A row has ``prompt`` (chat messages, system + user), optionally ``target`` (the off-policy trace: a list of assistant
messages as in the paper's released data, a single message dict, or a plain string), ``reward_model.ground_truth``,
``data_source`` and ``extra_info``. Column names come from :class:`~luffy_megatron.config.DataConfig` (dotted keys
reach into struct columns).

Tokenisation follows the paper's ``RLHFDatasetWithTarget``:

* prompt: ``apply_chat_template(messages, add_generation_prompt=True)``, encoded without special tokens; prompts longer
  than ``max_prompt_length`` tokens are dropped and counted (``num_dropped_long_prompts``);
* trace: the content of the first target message; its leading ``<think>\\n`` is removed when the rendered prompt
  already ends with it; encoded without special tokens, cut to ``max_response_length - 1`` tokens
  (``num_truncated_traces``) and EOS appended, so a trace never exceeds ``max_response_length``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from luffy_megatron.config import DataConfig, SystemPrompt, choices
from luffy_megatron.data.sources import DataError, RawRow, expand_sources, read_table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

THINK_PREFIX = "<think>\n"
EXTRA_INFO_KEY = "extra_info"
_ROLES = ("system", "user", "assistant", "tool")
_ENCODE_CHUNK = 1024  # rows per batched tokenizer call


@dataclass
class PromptItem:
    """One tokenised prompt, ready for rollout; ``trace_ids`` is None for an all-on-policy group."""

    index: int  # position in the dataset (after dropped/skipped rows)
    prompt_ids: list[int]
    trace_ids: list[int] | None  # ends with EOS; at most max_response_length tokens
    ground_truth: str
    data_source: str
    prompt_ends_with_think: bool  # the generation prompt opens the think block (the reward credits it)
    source: str = ""  # file or dataset the row came from
    row: int = -1  # row number in that source
    extra_info: dict[str, Any] | None = None
    trace_truncated: bool = False


@dataclass
class DatasetCounts:
    """What happened to the rows of the sources."""

    rows_read: int = 0
    items: int = 0
    dropped_long_prompts: int = 0
    skipped_bad_rows: int = 0
    with_trace: int = 0
    truncated_traces: int = 0
    without_trace: dict[str, int] = field(default_factory=dict)  # source -> its parsed rows without a trace
    bad_row_errors: list[str] = field(default_factory=list)  # first few messages of skipped rows


def get_path(values: dict[str, Any], key: str) -> tuple[bool, Any]:
    """Look up a dotted ``key`` in a row; returns (found, value). A None struct on the way counts as not found."""
    cur: Any = values
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _where(raw: RawRow, column: str) -> str:
    return f"{raw.source}, row {raw.row}, column {column!r}"


def _messages(raw: RawRow, column: str, value: Any) -> list[dict[str, str]]:
    """Validate chat messages (a plain string is one user message)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(
            f"{_where(raw, column)}: expected a non-empty list of chat messages, got {type(value).__name__}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{_where(raw, column)}: message {i} is a {type(m).__name__}, not a dict")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise DataError(f"{_where(raw, column)}: message {i} has role {role!r} (expected one of {list(_ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{_where(raw, column)}: message {i} content is {type(content).__name__}, not str")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise DataError(f"{_where(raw, column)}: the prompt has no non-empty user message")
    return out


def _trace_text(raw: RawRow, column: str, value: Any) -> str | None:
    """The trace of a row: None when absent, else the content of the first target message."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return None
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise DataError(f"{_where(raw, column)}: the trace message has role {value.get('role')!r}, not assistant")
        value = value.get("content")
    if not isinstance(value, str):
        raise DataError(f"{_where(raw, column)}: the trace is {type(value).__name__}, expected str or messages")
    if not value.strip():
        raise DataError(f"{_where(raw, column)}: the trace is empty")
    return value


def _scalar_str(raw: RawRow, column: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{_where(raw, column)}: expected a string, got {type(value).__name__} ({value!r:.60})")
    text = str(value)
    if not text.strip():
        raise DataError(f"{_where(raw, column)}: the value is empty")
    return text


def apply_system_prompt(messages: list[dict[str, str]], mode: str, text: str | None) -> list[dict[str, str]]:
    """``keep`` the system message, ``replace`` it with ``text`` (inserting one if absent), or ``remove`` it."""
    if mode == SystemPrompt.KEEP:
        return messages
    rest = [m for m in messages if m["role"] != "system"]
    if mode == SystemPrompt.REMOVE:
        return rest
    if mode == SystemPrompt.REPLACE:
        if not text:
            raise ValueError("data.system_prompt=replace needs data.system_prompt_text")
        return [{"role": "system", "content": text}, *rest]
    raise ValueError(f"data.system_prompt: {mode!r} is not one of {list(choices(SystemPrompt))}")


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The chat-template text of ``messages`` with the generation prompt (as the paper renders it)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def strip_think_prefix(trace: str, prompt_text: str) -> str:
    """Drop the trace's leading ``<think>\\n`` when the rendered prompt already ends with it."""
    if prompt_text.endswith(THINK_PREFIX) and trace.startswith(THINK_PREFIX):
        return trace[len(THINK_PREFIX) :]
    return trace


def _encode_many(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Encode without special tokens; repeated texts (avg@k copies of a problem) are encoded once."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    encoded = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"]))
    return [list(encoded[t]) for t in texts]


def cut_and_close(ids: list[int], max_len: int, eos_id: int) -> tuple[list[int], bool]:
    """Cut trace tokens so that with EOS appended they fit ``max_len``; returns (ids + [eos], whether cut)."""
    cut = len(ids) + 1 > max_len
    return [*ids[: max_len - 1], eos_id] if cut else [*ids, eos_id], cut


def encode_trace(tokenizer: PreTrainedTokenizerBase, trace: str, max_len: int, eos_id: int) -> tuple[list[int], bool]:
    """Trace tokens (no special tokens) cut so that with EOS appended they fit ``max_len``; returns (ids, cut)."""
    return cut_and_close(tokenizer.encode(trace, add_special_tokens=False), max_len, eos_id)


class PromptDataset:
    """Tokenised prompts (and traces) of one or more sources; indexable, with counts of what was dropped."""

    def __init__(
        self,
        config: DataConfig,
        files: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        progress: bool | None = None,
        require_traces: bool = False,
    ) -> None:
        """``files``: parquet paths or globs, HF dataset folders or names (``name@split``). ``progress``: show a
        progress bar (None = only for 5,000 rows or more). ``require_traces`` (SFT): a source with rows without a
        trace stops the load with a :class:`DataError` naming each such source and its count."""
        if not files:
            raise DataError("no data files given")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; the trace needs one appended")
        if config.max_response_length < 2:
            raise ValueError(f"data.max_response_length must be >= 2, got {config.max_response_length}")
        self.config = config
        self.tokenizer = tokenizer
        self.counts = DatasetCounts()
        self.items: list[PromptItem] = []
        self._system_mode = config.system_prompt
        apply_system_prompt([], config.system_prompt, config.system_prompt_text or "x")  # validate the mode early
        keys = {
            "prompt": config.prompt_key,
            "target": config.target_key,
            "ground_truth": config.ground_truth_key,
            "data_source": config.data_source_key,
        }
        top = sorted({k.split(".")[0] for k in keys.values()} | {EXTRA_INFO_KEY})
        for spec in expand_sources(list(files)):
            table = read_table(spec, top)
            for role, key in keys.items():
                if role != "target" and key.split(".")[0] not in table.columns:
                    raise DataError(f"{spec}: missing column {key!r} ({role}); columns are {table.columns}")
            if config.target_key.split(".")[0] not in table.columns:
                logger.info("%s has no column %r: every row gets an all-on-policy group", spec, config.target_key)
            self._add_table(table, keys, progress)
        c = self.counts
        if require_traces and c.without_trace:
            each = "; ".join(f"{src}: {n} rows" for src, n in c.without_trace.items())
            raise DataError(f"SFT trains on traces, but rows have none (column {config.target_key!r}): {each}")
        if c.skipped_bad_rows:
            logger.warning(
                "skipped %d bad rows (data.skip_bad_rows=true); first: %s", c.skipped_bad_rows, c.bad_row_errors[0]
            )
        if c.dropped_long_prompts:
            logger.warning(
                "dropped %d prompts longer than data.max_prompt_length=%d tokens",
                c.dropped_long_prompts,
                config.max_prompt_length,
            )
        if c.truncated_traces:
            logger.warning(
                "cut %d traces to data.max_response_length=%d tokens", c.truncated_traces, config.max_response_length
            )
        if not self.items:
            raise DataError(f"no usable rows in {list(files)} ({c.rows_read} read)")

    # -- loading ---------------------------------------------------------------------------------------------------

    def _parse_row(self, raw: RawRow, keys: dict[str, str]) -> tuple[list[dict[str, str]], str | None, str, str, Any]:
        values = raw.values
        found, prompt = get_path(values, keys["prompt"])
        if not found or prompt is None:
            raise DataError(f"{_where(raw, keys['prompt'])}: the prompt is missing")
        messages = apply_system_prompt(
            _messages(raw, keys["prompt"], prompt), self._system_mode, self.config.system_prompt_text
        )
        _, target = get_path(values, keys["target"])
        trace = _trace_text(raw, keys["target"], target)
        found, truth = get_path(values, keys["ground_truth"])
        if not found or truth is None:
            raise DataError(f"{_where(raw, keys['ground_truth'])}: the ground truth is missing")
        truth = _scalar_str(raw, keys["ground_truth"], truth)
        found, source = get_path(values, keys["data_source"])
        if not found or source is None:
            raise DataError(f"{_where(raw, keys['data_source'])}: the data source is missing")
        source = _scalar_str(raw, keys["data_source"], source)
        extra = values.get(EXTRA_INFO_KEY)
        return messages, trace, truth, source, extra if isinstance(extra, dict) else None

    def _add_table(self, table: Any, keys: dict[str, str], progress: bool | None) -> None:
        cfg, tok, c = self.config, self.tokenizer, self.counts
        rows = list(table)
        c.rows_read += len(rows)
        show = progress if progress is not None else len(rows) >= 5000
        parsed = []
        for raw in rows:
            try:
                messages, trace, truth, source, extra = self._parse_row(raw, keys)
                try:
                    text = render_prompt(tok, messages)
                except Exception as e:  # jinja template errors (e.g. a role order the template refuses)
                    raise DataError(f"{_where(raw, keys['prompt'])}: the chat template failed: {e}") from e
            except DataError as e:
                if not cfg.skip_bad_rows:
                    raise
                c.skipped_bad_rows += 1
                if len(c.bad_row_errors) < 10:
                    c.bad_row_errors.append(str(e))
                continue
            parsed.append((raw, text, trace, truth, source, extra))
            if trace is None:
                c.without_trace[raw.source] = c.without_trace.get(raw.source, 0) + 1
        bar = tqdm(total=len(parsed), desc=f"tokenising {table.source}", disable=not show, unit="row")
        for start in range(0, len(parsed), _ENCODE_CHUNK):
            chunk = parsed[start : start + _ENCODE_CHUNK]
            prompt_ids = _encode_many(tok, [p[1] for p in chunk])
            traces = [strip_think_prefix(p[2], p[1]) for p in chunk if p[2] is not None]
            trace_ids = iter(_encode_many(tok, traces))
            for (raw, text, trace, truth, source, extra), ids in zip(chunk, prompt_ids):
                t_ids = next(trace_ids) if trace is not None else None
                if len(ids) > cfg.max_prompt_length:
                    c.dropped_long_prompts += 1
                    continue
                cut = False
                if t_ids is not None:
                    t_ids, cut = cut_and_close(t_ids, cfg.max_response_length, tok.eos_token_id)
                    c.with_trace += 1
                    c.truncated_traces += cut
                self.items.append(
                    PromptItem(
                        index=len(self.items),
                        prompt_ids=ids,
                        trace_ids=t_ids,
                        ground_truth=truth,
                        data_source=source,
                        prompt_ends_with_think=text.endswith(THINK_PREFIX) or text.endswith("<think>"),
                        source=raw.source,
                        row=raw.row,
                        extra_info=extra,
                        trace_truncated=cut,
                    )
                )
            bar.update(len(chunk))
        bar.close()
        c.items = len(self.items)

    # -- access ----------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    def get_batch(self, indices: Sequence[int]) -> list[PromptItem]:
        """The items at ``indices`` (a sampler's batch)."""
        return [self.items[i] for i in indices]

    @property
    def num_dropped_long_prompts(self) -> int:
        return self.counts.dropped_long_prompts

    @property
    def num_skipped_bad_rows(self) -> int:
        return self.counts.skipped_bad_rows

    @property
    def num_truncated_traces(self) -> int:
        return self.counts.truncated_traces

    def summary(self) -> dict[str, int]:
        """Counts for logs: rows read, items kept, dropped, skipped, with a trace, traces cut."""
        c = self.counts
        return {
            "rows_read": c.rows_read,
            "items": c.items,
            "dropped_long_prompts": c.dropped_long_prompts,
            "skipped_bad_rows": c.skipped_bad_rows,
            "with_trace": c.with_trace,
            "truncated_traces": c.truncated_traces,
        }
