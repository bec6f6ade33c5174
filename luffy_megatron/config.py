"""One typed configuration tree for a whole run.

A run is described by a YAML file in ``configs/`` plus ``key=value`` overrides (omegaconf dotlist syntax, e.g.
``parallel.tp=2 algorithm.off_policy_reshape=no_reshape``). Unknown keys and wrong types are rejected by omegaconf's
structured merge; everything else is checked by :func:`luffy_megatron.config_checks.validate`, which runs before any
model is built and names the offending key in its message.

The defaults are the LUFFY paper's recipe for Qwen2.5-Math-7B (Yan et al. 2025, the released ``train.sh``): n=8 with
one off-policy trace, policy shaping p/(p+0.1), no clipping, no std normalisation, the "luffy" aggregation, entropy
bonus 0.001, no KL, AdamW lr 1e-6, 128 prompts per step, mini-batches of 64, prompts up to 1024 and responses up to
8192 tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


#: Parameter/compute dtype names of configs and command lines (``models.family.TORCH_DTYPES`` maps them to torch).
DTYPES = ("float32", "bfloat16", "float16")


# The names of each option family, defined once: the config checks accept exactly these values, and the code that
# dispatches on an option keys its table by these members (a test checks that every table covers its enumeration).
class Reshape(str, Enum):
    """``algorithm.on_policy_reshape`` / ``off_policy_reshape`` (formulas in :mod:`luffy_megatron.algo.loss`)."""

    NO_RESHAPE = "no_reshape"
    P_DIV_P = "p_div_p"
    LOGP = "logp"
    P_LOGP = "p_logp"
    SQUARE_ROOT = "square_root"
    POW = "pow"


class AggMode(str, Enum):
    """``algorithm.loss_agg_mode`` (formulas in :mod:`luffy_megatron.algo.aggregation`)."""

    LUFFY = "luffy"
    TOKEN_MEAN = "token_mean"
    SEQ_MEAN_TOKEN_MEAN = "seq_mean_token_mean"
    SEQ_MEAN_TOKEN_SUM = "seq_mean_token_sum"


class KLType(str, Enum):
    """``algorithm.kl_type``: ``k1 = logp - ref`` or verl's ``low_var_kl`` (``k3``)."""

    K1 = "k1"
    K3 = "k3"


class WeightSync(str, Enum):
    """``rollout.sglang.weight_sync``: a safetensors folder on a shared filesystem, a NCCL broadcast group, or
    tensors in the request body (colocated servers)."""

    DISK = "disk"
    DISTRIBUTED = "distributed"
    TENSOR = "tensor"


class ServerDevice(str, Enum):
    """``rollout.sglang.device`` of launched servers; ``cpu`` is SGLang's CPU engine (small models, tests, CI)."""

    CUDA = "cuda"
    CPU = "cpu"


class GroupBackend(str, Enum):
    """``rollout.sglang.weight_sync_backend``; ``auto``: NCCL where the trainer has CUDA, else gloo."""

    AUTO = "auto"
    NCCL = "nccl"
    GLOO = "gloo"


class SystemPrompt(str, Enum):
    """``data.system_prompt``: what happens to each prompt's system message."""

    KEEP = "keep"
    REPLACE = "replace"
    REMOVE = "remove"


class RolloutBackend(str, Enum):
    """``rollout.backend``: in-process transformers or SGLang servers."""

    HF = "hf"
    SGLANG = "sglang"


class RolloutIS(str, Enum):
    """``algorithm.rollout_is`` (null = off): how on-policy tokens are corrected for the rollout engine being the
    behaviour policy (formulas in :mod:`luffy_megatron.algo.rollout_is`)."""

    TOKEN_TIS = "token_tis"
    SEQ_TIS = "seq_tis"
    SEQ_MASK = "seq_mask"


class OnPolicyBaseline(str, Enum):
    """``algorithm.on_policy_baseline``: what an on-policy sample's reward is compared with
    (:mod:`luffy_megatron.algo.advantages`). ``group_mean`` is LUFFY's: the mean of the whole group, traces included.
    ``on_policy_mean``: the mean of the group's on-policy samples; traces keep LUFFY's advantage either way."""

    GROUP_MEAN = "group_mean"
    ON_POLICY_MEAN = "on_policy_mean"


class DynamicSamplingSignal(str, Enum):
    """``algorithm.dynamic_sampling_signal``: which rewards of a group must differ for it to be kept
    (:mod:`luffy_megatron.train.dynamic_sampling`)."""

    ON_POLICY = "on_policy"
    GROUP = "group"


class TokenDispatcher(str, Enum):
    """``parallel.moe_token_dispatcher``: megatron-core's ``moe_token_dispatcher_type`` (docs/training.md)."""

    ALLTOALL = "alltoall"
    ALLGATHER = "allgather"


class TrainerMode(str, Enum):
    """``trainer.mode``: ``rl`` (LUFFY and its baselines) or ``sft`` (token-mean cross entropy on the traces; no
    generation: :mod:`luffy_megatron.train.sft`)."""

    RL = "rl"
    SFT = "sft"


def choices(options: type[Enum]) -> tuple[str, ...]:
    """The config values an option family accepts, in declaration order."""
    return tuple(m.value for m in options)


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
    # Token budget of one micro-batch, counted as rows * its longest row: sequences are right-padded to the longest
    # one of their micro-batch (not to the maximum response length); a longer single sequence is a micro-batch alone.
    max_tokens_per_micro_batch: int = 16384
    # Samples of a micro-batch packed in one row (THD, attention per sample); false: right-padded rows.
    pack_sequences: bool = True
    # Distributed optimizer (ZeRO-1 over data-parallel ranks).
    use_distributed_optimizer: bool = True
    # Distributed backend: null = nccl when CUDA is available, gloo otherwise.
    backend: str | None = None
    # Sequence parallelism: the norms, residuals and dropout of each TP rank keep 1/tp of the sequence. null = on
    # whenever tp > 1 (Megatron's recommendation); true with tp = 1 is refused.
    sequence_parallel: bool | None = None
    # Expert parallelism (MoE models): each layer's experts split over ep ranks carved out of the data-parallel ones.
    ep: int = 1
    # TokenDispatcher. alltoall (default) sends a token only to the EP ranks of its top-k experts and runs every
    # layout; allgather gathers all tokens on every EP rank: ep = 1 only, not with packed rows under PP.
    moe_token_dispatcher: str = "alltoall"

    def sequence_parallel_on(self) -> bool:
        """Whether this layout runs with sequence parallelism (``sequence_parallel``, or null resolved by ``tp``)."""
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel


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
    weight_sync_backend: str = "auto"
    # Colocated servers release their memory during training.
    colocate: bool = False
    # Launched servers: device, Python (null: the trainer's), environment (added to the trainer's less torchrun's).
    device: str = "cuda"
    python: str | None = None
    env: dict[str, str] = field(default_factory=dict)
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
    # OnPolicyBaseline: the mean an on-policy sample is centred on. group_mean = LUFFY's, traces included;
    # on_policy_mean = the group's on-policy samples only (no shared advantage when they all fail; docs/algorithm.md).
    on_policy_baseline: str = "group_mean"
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
    # Rollout importance sampling of on-policy tokens: null | RolloutIS (see algo/rollout_is.py).
    rollout_is: str | None = None
    rollout_is_cap: float = 2.0
    # DAPO dynamic sampling; signal on_policy | group: does a trace's reward count? (see train/dynamic_sampling.py)
    dynamic_sampling: bool = False
    dynamic_sampling_signal: str = "on_policy"
    dynamic_sampling_max_rounds: int = 4
    # Tokens per chunk of the fused log-prob/entropy function (bounds its temporary memory).
    logprob_chunk_tokens: int = 1024
    # Leave samples with advantage exactly 0 out of the update when their loss is provably 0 (entropy_coeff = 0,
    # kl_coeff = 0, and no SFT loss on traces): same gradient, less compute. Token metrics (entropy, probabilities,
    # clip fraction) then cover the trained samples only; a step that trains none logs none of them.
    skip_zero_advantage: bool = True
    # Checks that wait for the GPU inside the update (NaN/inf inputs of the loss and log-probs, token ids inside the
    # vocabulary, aggregation counts): a clear error at the first bad micro-batch instead of a skipped update.
    # Off by default, so that the update's hot path never syncs with the host; the tests turn it on.
    debug_checks: bool = False


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
    # TrainerMode: rl | sft. sft trains each prompt's trace alone with the SFT loss (one optimiser step per
    # mini-batch, as rl); its config states the loss (algorithm.sft_loss=true, entropy_coeff=0, token_mean).
    mode: str = "rl"
    total_steps: int = 500
    seed: int = 1
    # In-training validation every N rollout steps (0 = never); avg@k per data source.
    val_interval: int = 0
    val_n: int = 1
    val_temperature: float = 0.6
    val_max_prompts: int | None = None
    # One-step-off async rollout (train/producer.py); torch threads of the HF engine's process (null: half).
    async_rollout: bool = False
    async_rollout_threads: int | None = None


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
class FaultToleranceConfig:
    """``fault_tolerance``: surviving time limits, preemption and dead rollout servers, and failing fast otherwise
    (docs/training.md, "Long jobs on Slurm")."""

    # Signals that ask the trainer to finish its current step, checkpoint and leave the requeue marker.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    # A file whose appearance asks the same (the sbatch examples create it on Slurm's warning signal); null = none.
    stop_file: str | None = None
    # Written (step and cause) when the trainer stopped early with a checkpoint; the batch script then requeues.
    # null = <checkpoint.save_dir>/REQUEUE.
    requeue_marker: str | None = None
    # A collective that waits longer fails the rank (a peer hangs); it must cover the longest rollout phase, which
    # the other ranks spend waiting for rank 0.
    collective_timeout_min: float = 30.0
    # Rollout servers (SGLang): health-check timeout, and how long the run may have no healthy server before it fails.
    health_timeout_s: float = 10.0
    servers_grace_s: float = 600.0
    # Before a generation a serving server is asked /health (a one-token generation, >= 1 s) at most this often; a
    # process exit or a failed request is seen at once, and every weight update asks every server.
    health_interval_s: float = 30.0
    # Restart a launched server that died (servers given as URLs are waited for instead).
    restart_servers: bool = True


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
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)


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
    for item in overrides or []:  # one at a time, so that the error names the override that does not parse
        try:
            sources.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        except Exception as e:  # omegaconf's grammar errors, and YAML's for values such as "[a,"
            raise ConfigError(f"cannot parse override {item!r}: {e}") from e
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


def read_hf_config(hf_path: str | Path, key: str = "model.hf_path") -> dict:
    """The ``config.json`` of an HF folder, with a clear error naming ``key`` when it is missing or malformed."""
    path = Path(hf_path) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{key}: no config.json in {hf_path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {path} is not valid JSON: {e}") from e


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
