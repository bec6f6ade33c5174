"""One evaluation run: resolve the model, load the rows, generate what the output folder lacks, score, summarise.

Rows are generated in fixed chunks of ``chunk_size`` rows; chunk ``c`` samples with seed
``sample_seed(seed, c, 0)``, so sample ``j`` of a row is the same whether the chunk runs in the first attempt or in
a rerun after a kill. A rerun generates only the chunks whose samples are not all on disk.

The model-side imports (the engines, transformers, the Megatron checkpoint converter) are inside the functions that
use them, so that ``luffy-eval --help`` and errors in the arguments, data or output folder answer without torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm
from yaml import YAMLError

from luffy_megatron.config import ConfigError, RolloutConfig, RunConfig, SGLangConfig, SystemPrompt
from luffy_megatron.config_checks import check_rollout
from luffy_megatron.eval.data import EvalRow, load_rows
from luffy_megatron.eval.metrics import render_tables, summarise
from luffy_megatron.eval.score import SCORING_VERSION, ScoreRule, score_outputs
from luffy_megatron.eval.store import EvalError, SampleStore
from luffy_megatron.rollout.base import RolloutEngine, SamplingParams, sample_seed

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
HF_FROM_MEGATRON = "hf_model"


@dataclass
class EvalOptions:
    """Everything ``luffy-eval`` takes; the defaults are the paper's evaluation settings (docs/eval.md)."""

    model: str
    data: list[str]
    out: str
    name: str | None = None
    sources: list[str] = field(default_factory=list)
    n: int = 1
    unique: bool = False
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 8192
    seed: int = 0
    system_prompt: str = SystemPrompt.REMOVE.value
    system_prompt_text: str | None = None
    think_format: str = "paper"
    choice_letters: bool = True
    limit_per_source: int | None = None
    chunk_size: int = 64
    reward_timeout_s: float = 5.0
    backend: str = "hf"
    batch_size: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    sglang_urls: list[str] = field(default_factory=list)
    sglang_launch: bool = False
    sglang_servers: int = 1
    sglang_tp: int = 1
    sglang_router: bool = False
    sglang_set: list[str] = field(default_factory=list)

    def rule(self) -> ScoreRule:
        """How the samples are graded."""
        return ScoreRule(self.think_format, self.choice_letters, self.reward_timeout_s)

    def settings(self) -> dict:
        """What fixes the samples and their scores: a rerun into the same folder must match these."""
        keys = (
            "data",
            "sources",
            "n",
            "unique",
            "temperature",
            "top_p",
            "top_k",
            "max_new_tokens",
            "seed",
            "system_prompt",
            "system_prompt_text",
            "think_format",
            "choice_letters",
            "reward_timeout_s",
            "limit_per_source",
            "chunk_size",
        )
        d = asdict(self)
        return {"model": str(Path(self.model).resolve()), "scoring": SCORING_VERSION, **{k: d[k] for k in keys}}


def validation_options(cfg: RunConfig, model: str, out: str, name: str | None = None) -> EvalOptions:
    """The options under which ``luffy-eval`` scores ``model`` as the run's validation does (``val/*``): its held-out
    files, prompts (``data.system_prompt``), sampling (``trainer.val_*``, ``data.max_response_length``) and the
    training reward's rule. ``val_max_prompts`` becomes ``limit_per_source``: the same prompts for one source of
    distinct problems (the demo's held-out set)."""
    t, d, r = cfg.trainer, cfg.data, ScoreRule.of_reward(cfg.reward)
    return EvalOptions(
        model,
        list(d.val_files),
        out,
        name=name,
        n=t.val_n,
        temperature=t.val_temperature,
        max_new_tokens=d.max_response_length,
        seed=t.seed,
        system_prompt=d.system_prompt,
        system_prompt_text=d.system_prompt_text if d.system_prompt == SystemPrompt.REPLACE else None,
        think_format=r.think_format,
        choice_letters=r.choice_letters,
        limit_per_source=t.val_max_prompts,
        reward_timeout_s=float(cfg.reward.timeout_s),
    )


def resolve_model(model: str, out: Path) -> Path:
    """An HF folder as is; a luffy-megatron (Megatron) checkpoint converted to ``OUT/hf_model`` once."""
    from luffy_megatron.convert.load import METADATA_NAME

    path = Path(model)
    if not path.is_dir():
        raise EvalError(f"--model {model}: no such folder")
    if (path / METADATA_NAME).is_file():
        hf = out / HF_FROM_MEGATRON
        if not (hf / "config.json").is_file():
            from luffy_megatron.convert import convert_megatron_to_hf

            convert_megatron_to_hf(path, hf, overwrite=True)
        return hf
    if not (path / "config.json").is_file():
        raise EvalError(f"--model {model}: neither an HF model folder (no config.json) nor a Megatron checkpoint")
    return path


def load_tokenizer(path: Path):
    """The folder's tokenizer, or one clear error."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError, ValueError, JSON errors ... for broken folders
        raise EvalError(f"--model {path}: cannot load the tokenizer: {str(e).splitlines()[0]}") from e
    if tok.chat_template is None:
        raise EvalError(f"--model {path}: the tokenizer has no chat template")
    return tok


SGLANG_PREFIX = "rollout.sglang."
SGLANG_LOGS = "sglang_logs"


def sglang_config(opts: EvalOptions) -> SGLangConfig:
    """The servers' settings: the ``--sglang-*`` flags, then each ``--sglang-set KEY=VALUE`` (a ``rollout.sglang``
    setting of the training config, typed and checked as there); a bad one is an :class:`EvalError`."""
    items = []
    for item in opts.sglang_set:
        key, eq, _ = item.partition("=")
        if not eq or not key.removeprefix(SGLANG_PREFIX):
            raise EvalError(f"--sglang-set {item}: not of the form KEY=VALUE")
        items.append(item.removeprefix(SGLANG_PREFIX))
    flags = SGLangConfig(
        urls=list(opts.sglang_urls),
        launch=opts.sglang_launch,
        num_servers=opts.sglang_servers,
        tp_size=opts.sglang_tp,
        use_router=opts.sglang_router,
    )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(flags), OmegaConf.from_dotlist(items))
        sglang = OmegaConf.to_object(merged)
        check_rollout(RolloutConfig(backend=opts.backend, sglang=sglang))  # type: ignore[arg-type]
    except (OmegaConfBaseException, YAMLError, ConfigError) as e:
        raise EvalError(f"--sglang-set {' '.join(opts.sglang_set)}: {str(e).splitlines()[0]}") from e
    assert isinstance(sglang, SGLangConfig)
    return sglang


def build_engine(opts: EvalOptions, hf_path: Path) -> RolloutEngine:
    """The in-process HF engine or SGLang servers (launched here, logging to ``OUT/sglang_logs``, or given as URLs,
    optionally behind the router)."""
    cfg = RolloutConfig(backend=opts.backend, hf_batch_size=opts.batch_size, sglang=sglang_config(opts))
    # Lazy: the engines load torch, transformers and aiohttp, which luffy-eval --help and its argument and data errors
    # do without.
    from luffy_megatron.rollout.factory import build_rollout_engine

    try:
        return build_rollout_engine(
            cfg, str(hf_path), dtype=opts.dtype, device=opts.device, log_dir=str(Path(opts.out) / SGLANG_LOGS)
        )
    except (OSError, ValueError) as e:
        raise EvalError(f"--model {hf_path}: cannot load the model: {str(e).splitlines()[0]}") from e


def _records(rows: list[EvalRow], outputs, tokenizer, opts: EvalOptions) -> list[dict]:
    recs = score_outputs(rows, outputs, tokenizer, opts.rule(), extract=True)
    row_ids = [row.row_id for row, outs in zip(rows, outputs) for _ in outs]
    return [{"row_id": row_id, **rec} for row_id, rec in zip(row_ids, recs)]


def run_eval(opts: EvalOptions, progress: bool = True) -> dict:
    """Evaluate (resuming from ``opts.out``); writes ``results.json`` and ``results.md`` and returns the results."""
    out = Path(opts.out)
    hf_path = resolve_model(opts.model, out)
    tokenizer = load_tokenizer(hf_path)
    rows = load_rows(
        opts.data,
        tokenizer,
        sources=opts.sources or None,
        unique=opts.unique,
        system_prompt=opts.system_prompt,
        system_prompt_text=opts.system_prompt_text,
        limit_per_source=opts.limit_per_source,
    )
    store = SampleStore(out, opts.settings())
    chunks = [rows[i : i + opts.chunk_size] for i in range(0, len(rows), opts.chunk_size)]
    todo = [c for c, ch in enumerate(chunks) if not all(store.has(r.row_id, j) for r in ch for j in range(opts.n))]
    total = len(rows) * opts.n
    generated = 0
    if todo:
        engine = build_engine(opts, hf_path)
        done = sum(len(chunks[c]) for c in range(len(chunks)) if c not in set(todo)) * opts.n
        bar = tqdm(total=total, initial=done, desc="luffy-eval", unit="sample", disable=not progress)
        try:
            for c in todo:
                params = SamplingParams(
                    n=opts.n,
                    temperature=opts.temperature,
                    top_p=opts.top_p,
                    top_k=opts.top_k,
                    max_new_tokens=opts.max_new_tokens,
                    seed=sample_seed(opts.seed, c, 0),
                )
                outputs = engine.generate([r.prompt_ids for r in chunks[c]], params)
                store.append(_records(chunks[c], outputs, tokenizer, opts))
                generated += len(chunks[c]) * opts.n
                bar.update(len(chunks[c]) * opts.n)
        finally:
            bar.close()
            engine.close()
    samples = [store.records[(r.row_id, j)] for r in rows for j in range(opts.n)]
    results = {
        "name": opts.name or Path(opts.model).name,
        "settings": opts.settings(),
        "sources": summarise(samples),
        "samples": total,
        "generated_this_run": generated,
    }
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / RESULTS_MD).write_text(render_tables([(results["name"], results["sources"])]))
    return results


def compare(dirs: list[str]) -> str:
    """The tables of several output folders side by side (one row per run)."""
    runs = []
    for d in dirs:
        path = Path(d) / RESULTS_JSON
        if not path.is_file():
            raise EvalError(f"--compare {d}: no {RESULTS_JSON} (not a finished luffy-eval output folder)")
        res = json.loads(path.read_text())
        runs.append((res["name"], res["sources"]))
    names = [name for name, _ in runs]
    if len(set(names)) < len(names):  # runs of one model folder: tell them apart by their output folders
        runs = [(f"{name} ({Path(d).name})", res) for (name, res), d in zip(runs, dirs)]
    return render_tables(runs)
