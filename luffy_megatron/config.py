"""One typed configuration tree for a whole run.

A run is described by a YAML file in ``configs/`` plus ``key=value`` overrides (omegaconf dotlist syntax, e.g.
``parallel.tp=2 algorithm.off_policy_reshape=no_reshape``). Unknown keys and wrong types are rejected by omegaconf's
structured merge; everything else is checked by :func:`validate`, which runs before any model is built and names the
offending key in its message.

The defaults are the LUFFY paper's recipe for Qwen2.5-Math-7B (Yan et al. 2025, the released ``train.sh``): n=8 with
one off-policy trace, policy shaping p/(p+0.1), no clipping, no std normalisation, the "luffy" aggregation, entropy
bonus 0.001, no KL, AdamW lr 1e-6, 128 prompts per step, mini-batches of 64, prompts up to 1024 and responses up to
8192 tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


ON_OFF_RESHAPES = ("no_reshape", "p_div_p", "logp", "p_logp", "square_root", "pow")
LOSS_AGG_MODES = ("luffy", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The policy: an HF folder (architecture, tokenizer, and initial weights unless a Megatron checkpoint is given)."""

    hf_path: str = MISSING
    # A Megatron checkpoint from tools/convert_hf_to_megatron.py; null = convert the HF weights on the fly.
    megatron_checkpoint: str | None = None
    # Parameter and compute dtype of the policy update.
    dtype: str = "bfloat16"
    # transformer-engine layer spec: null = use it when importable and on GPU.
    use_transformer_engine: bool | None = None
    # Recompute activations of every transformer layer in backward (saves memory on long responses).
    recompute_activations: bool = False


@dataclass
class ParallelConfig:
    """Megatron parallel layout. Data parallelism is derived: world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per pipeline rank (interleaved 1F1B); null = not interleaved.
    vpp: int | None = None
    # Token budget of one packed micro-batch (sequences are packed, never padded to the max response length).
    max_tokens_per_micro_batch: int = 16384
    # Samples of a micro-batch packed in one row (THD, attention per sample); false: right-padded rows.
    pack_sequences: bool = True
    # Distributed optimizer (ZeRO-1 over data-parallel ranks).
    use_distributed_optimizer: bool = True
    # Distributed backend: null = nccl when CUDA is available, gloo otherwise.
    backend: str | None = None


@dataclass
class SGLangConfig:
    """SGLang rollout servers: either started here (``launch``) or attached to (``urls``)."""

    urls: list[str] = field(default_factory=list)
    launch: bool = False
    num_servers: int = 1
    tp_size: int = 1
    mem_fraction_static: float = 0.7
    host: str = "127.0.0.1"
    base_port: int = 30000
    # Read from this environment variable, never stored in the config or logs.
    api_key_env: str | None = None
    dtype: str = "bfloat16"
    context_length: int | None = None
    use_router: bool = False
    router_port: int = 29000
    max_concurrency: int = 256
    request_timeout_s: float = 3600.0
    startup_timeout_s: float = 900.0
    max_retries: int = 3
    retry_backoff_s: float = 0.5
    # Samples of one prompt sent per HTTP request (each is its own request id).
    samples_per_request: int = 16
    # How trained weights reach the servers: disk | distributed | tensor.
    weight_sync: str = "distributed"
    weight_sync_dir: str | None = None
    weight_bucket_mb: int = 512
    # Colocated servers release their memory during training.
    colocate: bool = False
    extra_args: list[str] = field(default_factory=list)


@dataclass
class RolloutConfig:
    """How samples are generated. ``n`` is the group size including ``n_off`` off-policy traces."""

    backend: str = "hf"  # hf (in-process transformers) | sglang
    n: int = 8
    n_off: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 1
    # Requests per forward of the in-process engine.
    hf_batch_size: int = 64
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class AlgorithmConfig:
    """The mixed-policy GRPO objective (see luffy_megatron.algo.loss for the formulas)."""

    # Advantages: A = r - mean(group); divided by (std + eps) when use_std.
    adv_use_std: bool = False
    adv_eps: float = 1e-6
    # Policy shaping of off-policy tokens: f(p) with p = exp(logp); p_div_p is p / (p + gamma).
    off_policy_reshape: str = "p_div_p"
    off_policy_reshape_gamma: float = 0.1
    off_policy_reshape_pow_exp: float = 0.5
    # The same family for on-policy tokens, applied to the ratio rho = exp(logp - old_logp).
    on_policy_reshape: str = "no_reshape"
    on_policy_reshape_gamma: float = 0.1
    on_policy_reshape_pow_exp: float = 0.5
    # PPO clipping of the on-policy ratio (off in LUFFY, on in the GRPO baseline).
    clip_ratio: bool = False
    clip_eps: float = 0.2
    # Upper bound of the clipped ratio: max(clip_upper, 1 + clip_eps).
    clip_upper: float = 1.0
    # Optional clamps on the off-policy ratio f(p) (null = none).
    off_policy_max_clamp: float | None = None
    off_policy_min_clamp: float | None = None
    entropy_coeff: float = 0.001
    kl_coeff: float = 0.0
    kl_type: str = "k3"  # k1 | k3
    # "RL with SFT loss" ablation: NLL on trace tokens + on-policy policy gradient.
    sft_loss: bool = False
    sft_loss_coeff: float = 1.0
    loss_agg_mode: str = "luffy"
    # K of the "luffy" mode: weight K / (sequences * max response length); 64 reproduces the paper's run (see
    # luffy_megatron.algo.aggregation).
    luffy_micro_batch_seqs: int = 64
    # Tokens per chunk of the fused log-prob/entropy function (bounds its temporary memory).
    logprob_chunk_tokens: int = 1024
    # Leave samples with advantage exactly 0 out of the update when their loss is provably 0 (entropy_coeff = 0,
    # kl_coeff = 0, and no SFT loss on traces): same gradient, less compute. Token metrics (entropy, probabilities,
    # clip fraction) then cover the trained samples only; a step that trains none logs none of them.
    skip_zero_advantage: bool = True


@dataclass
class DataConfig:
    """Prompts with off-policy traces, in the paper's parquet schema."""

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    target_key: str = "target"
    ground_truth_key: str = "reward_model.ground_truth"
    data_source_key: str = "data_source"
    max_prompt_length: int = 1024
    max_response_length: int = 8192
    # Prompts per rollout step, and prompts per optimiser step (train_batch_size / mini_batch_size optimiser steps).
    train_batch_size: int = 128
    mini_batch_size: int = 64
    shuffle: bool = True
    seed: int = 1
    # keep | replace | remove the system message of each prompt.
    system_prompt: str = "keep"
    system_prompt_text: str | None = None
    # Rows that fail to parse: raise (default) or skip and count.
    skip_bad_rows: bool = False


@dataclass
class RewardConfig:
    """Rule-based verifier: think-format check + math-verify in a process pool."""

    num_workers: int = 2
    timeout_s: float = 5.0
    # A worker silent for timeout_s + hard_margin_s is killed and replaced (its item scores 0).
    hard_margin_s: float = 0.5
    require_think_format: bool = True
    # Multiple-choice letters for OOD sets (GPQA, MMLU-Pro).
    allow_choice_letters: bool = True


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine


@dataclass
class TrainerConfig:
    total_steps: int = 500
    seed: int = 1
    # In-training validation every N rollout steps (0 = never); avg@k per data source.
    val_interval: int = 0
    val_n: int = 1
    val_temperature: float = 0.6
    val_max_prompts: int | None = None


@dataclass
class CheckpointConfig:
    save_dir: str | None = None
    save_interval: int = 0  # rollout steps; 0 = only at the end
    keep_last: int = 2
    # Resume from the newest complete checkpoint in save_dir when there is one.
    resume: bool = True
    export_hf_at_end: bool = False


@dataclass
class LoggingConfig:
    out_dir: str = "outputs/run"
    tensorboard: bool = False
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    progress_bar: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Merge the schema defaults, a YAML file and ``key=value`` overrides into a typed :class:`RunConfig`.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types and malformed overrides.
    """
    merged = OmegaConf.structured(RunConfig)
    sources: list[tuple[str, Any]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            sources.append((str(p), OmegaConf.load(p)))
        except Exception as e:  # yaml syntax errors
            raise ConfigError(f"cannot parse config file {p}: {e}") from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    if overrides:
        try:
            sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse overrides {overrides}: {e}") from e
    for origin, src in sources:
        try:
            merged = OmegaConf.merge(merged, src)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"{origin}: invalid key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from e
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"missing or invalid value for {key!r}: {e}") from e
    assert isinstance(cfg, RunConfig)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass (for logs, checkpoints and comparisons)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def _positive(cfg: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            _fail(f"{prefix}.{name}", f"must be positive, got {value}")


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(key, f"{value!r} is not one of {list(allowed)}")


def read_hf_config(hf_path: str | Path, key: str = "model.hf_path") -> dict:
    """The ``config.json`` of an HF folder, with a clear error naming ``key`` when it is missing or malformed."""
    path = Path(hf_path) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{key}: no config.json in {hf_path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {path} is not valid JSON: {e}") from e


def validate_parallel(
    parallel: ParallelConfig, world_size: int, num_layers: int, num_heads: int, num_query_groups: int
) -> int:
    """Check a parallel layout against a model's shape; returns the data-parallel size."""
    tp, pp, vpp = parallel.tp, parallel.pp, parallel.vpp
    _positive(parallel, "parallel", ("tp", "pp", "vpp", "max_tokens_per_micro_batch"))
    if num_heads % tp:
        _fail("parallel.tp", f"{tp} does not divide the {num_heads} attention heads")
    if num_query_groups % tp:
        _fail("parallel.tp", f"{tp} does not divide the {num_query_groups} query groups (key/value heads)")
    stages = pp * (vpp or 1)
    if num_layers % stages:
        key = "parallel.vpp" if vpp else "parallel.pp"
        _fail(key, f"pp * vpp = {stages} does not divide the {num_layers} layers")
    if vpp is not None and pp < 2:
        _fail("parallel.vpp", "virtual pipeline stages need parallel.pp >= 2")
    if world_size % (tp * pp):
        _fail("parallel", f"world size {world_size} is not divisible by tp * pp = {tp * pp}")
    if parallel.backend is not None:
        _choice(parallel.backend, "parallel.backend", ("nccl", "gloo"))
    return world_size // (tp * pp)


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Check every value that can be checked without building anything. Raises :class:`ConfigError`."""
    m, r, a, d = cfg.model, cfg.rollout, cfg.algorithm, cfg.data
    _choice(m.dtype, "model.dtype", DTYPES)
    hf = read_hf_config(m.hf_path)
    if m.megatron_checkpoint is not None and not Path(m.megatron_checkpoint).is_dir():
        _fail("model.megatron_checkpoint", f"directory not found: {m.megatron_checkpoint}")

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    heads = hf.get("num_attention_heads")
    layers = hf.get("num_hidden_layers")
    if not isinstance(heads, int) or not isinstance(layers, int):
        _fail("model.hf_path", f"config.json in {m.hf_path} lacks num_attention_heads / num_hidden_layers")
    groups = hf.get("num_key_value_heads") or heads
    dp = validate_parallel(cfg.parallel, world_size, layers, heads, groups)
    _choice(r.backend, "rollout.backend", ("hf", "sglang"))
    _positive(r, "rollout", ("n", "temperature", "top_p", "hf_batch_size"))
    if not 0 < r.top_p <= 1:
        _fail("rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    if r.n_off < 0:
        _fail("rollout.n_off", f"must be >= 0, got {r.n_off}")
    if r.n_off >= r.n:
        _fail("rollout.n_off", f"{r.n_off} must be smaller than rollout.n = {r.n} (at least one on-policy sample)")
    s = r.sglang
    _choice(s.weight_sync, "rollout.sglang.weight_sync", ("disk", "distributed", "tensor"))
    if r.backend == "sglang" and not s.launch and not s.urls:
        _fail("rollout.sglang.urls", "give server URLs or set rollout.sglang.launch=true")
    if r.backend == "sglang" and s.weight_sync == "disk" and not s.weight_sync_dir:
        _fail("rollout.sglang.weight_sync_dir", "required with rollout.sglang.weight_sync=disk (a shared filesystem)")
    _positive(s, "rollout.sglang", ("num_servers", "tp_size", "max_concurrency", "request_timeout_s"))
    if not 0 < s.mem_fraction_static < 1:
        _fail("rollout.sglang.mem_fraction_static", f"must be in (0, 1), got {s.mem_fraction_static}")

    _choice(a.off_policy_reshape, "algorithm.off_policy_reshape", ON_OFF_RESHAPES)
    _choice(a.on_policy_reshape, "algorithm.on_policy_reshape", ON_OFF_RESHAPES)
    _choice(a.loss_agg_mode, "algorithm.loss_agg_mode", LOSS_AGG_MODES)
    _choice(a.kl_type, "algorithm.kl_type", ("k1", "k3"))
    _positive(
        a,
        "algorithm",
        (
            "off_policy_reshape_gamma",
            "on_policy_reshape_gamma",
            "adv_eps",
            "logprob_chunk_tokens",
            "luffy_micro_batch_seqs",
        ),
    )
    if a.clip_eps <= 0 or a.clip_eps >= 1:
        _fail("algorithm.clip_eps", f"must be in (0, 1), got {a.clip_eps}")
    for name in ("entropy_coeff", "kl_coeff", "sft_loss_coeff"):
        if getattr(a, name) < 0:
            _fail(f"algorithm.{name}", f"must be >= 0, got {getattr(a, name)}")
    if a.kl_coeff > 0:
        # The loss supports k1/k3 penalties; the trainer does not build a reference model yet.
        _fail("algorithm.kl_coeff", "the trainer has no reference model yet: set it to 0 (the paper's recipe)")

    _positive(d, "data", ("max_prompt_length", "max_response_length", "train_batch_size", "mini_batch_size"))
    if d.train_batch_size % d.mini_batch_size:
        _fail("data.mini_batch_size", f"{d.mini_batch_size} does not divide data.train_batch_size {d.train_batch_size}")
    if d.mini_batch_size % dp:
        _fail("data.mini_batch_size", f"{d.mini_batch_size} prompts cannot be split over {dp} data-parallel ranks")
    _choice(d.system_prompt, "data.system_prompt", ("keep", "replace", "remove"))
    if d.system_prompt == "replace" and not d.system_prompt_text:
        _fail("data.system_prompt_text", "required when data.system_prompt=replace")
    if not d.train_files:
        _fail("data.train_files", "at least one training file is required")
    for key, files in (("data.train_files", d.train_files), ("data.val_files", d.val_files)):
        for f in files:
            if not _exists_or_glob(f):
                _fail(key, f"no such file or directory: {f}")
    if d.max_prompt_length + d.max_response_length > hf.get("max_position_embeddings", 1 << 30):
        _fail(
            "data.max_response_length",
            f"prompt + response = {d.max_prompt_length + d.max_response_length} exceeds the model's "
            f"max_position_embeddings {hf['max_position_embeddings']}",
        )

    _positive(cfg.reward, "reward", ("num_workers", "timeout_s", "hard_margin_s"))
    o = cfg.optimizer
    _positive(o, "optimizer", ("lr",))
    _choice(o.lr_decay_style, "optimizer.lr_decay_style", ("constant", "linear", "cosine"))
    for name in ("min_lr", "weight_decay", "clip_grad", "lr_warmup_steps"):
        if getattr(o, name) < 0:
            _fail(f"optimizer.{name}", f"must be >= 0, got {getattr(o, name)}")
    _positive(cfg.trainer, "trainer", ("total_steps", "val_n"))
    c = cfg.checkpoint
    if c.keep_last < 1:
        _fail("checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
    if c.save_interval < 0:
        _fail("checkpoint.save_interval", f"must be >= 0, got {c.save_interval}")


def _exists_or_glob(path: str) -> bool:
    """True for an existing path, a glob with matches, or a Hugging Face dataset name (``owner/name``); a
    ``@split`` suffix names a split of a dataset folder or hub dataset."""
    if "@" in path and not Path(path).exists():
        path = path.rsplit("@", 1)[0]
    if Path(path).exists():
        return True
    if any(ch in path for ch in "*?["):
        import glob

        return bool(glob.glob(path))
    # An HF hub dataset name: no extension, not absolute, at most one slash.
    return not path.startswith((".", "/")) and path.count("/") == 1 and "." not in Path(path).name


def iter_leaves(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a config dataclass, for printing a run's full configuration."""
    out: list[tuple[str, Any]] = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.extend(iter_leaves(value, key + "."))
        else:
            out.append((key, value))
    return out
