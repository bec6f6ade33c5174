"""Validation of a :class:`~luffy_megatron.config.RunConfig`, one short check per section.

:func:`validate` runs once, before any model is built, and raises :class:`~luffy_megatron.config.ConfigError` whose
message starts with the offending key. The names an option accepts come from the table of the code that dispatches
on it: the enumerations of :mod:`luffy_megatron.config` (reshapes, aggregation modes, KL types, weight-sync modes,
system-prompt modes, rollout backends, rollout IS modes, dynamic-sampling signals, trainer modes). Nothing here
imports torch, so a configuration error answers at once.
"""

from __future__ import annotations

import glob
import os
import signal
from pathlib import Path
from typing import Any

from luffy_megatron.config import (
    DTYPES,
    AggMode,
    AlgorithmConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DynamicSamplingSignal,
    FaultToleranceConfig,
    GroupBackend,
    KLType,
    ModelConfig,
    OnPolicyBaseline,
    OptimizerConfig,
    ParallelConfig,
    Reshape,
    RolloutBackend,
    RolloutConfig,
    RolloutIS,
    RunConfig,
    ServerDevice,
    SystemPrompt,
    TokenDispatcher,
    TrainerMode,
    WeightSync,
    choices,
    read_hf_config,
)

__all__ = ["expert_count", "validate", "validate_parallel"]

# Megatron's names (OptimizerParamScheduler, torch.distributed); nothing of ours dispatches on them.
LR_DECAY_STYLES = ("constant", "linear", "cosine")
DIST_BACKENDS = ("nccl", "gloo")


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Check every value that can be checked without building anything. Raises :class:`ConfigError`."""
    hf = check_model(cfg.model)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    groups = hf.get("num_key_value_heads") or heads
    experts = expert_count(hf)[1]
    dp = validate_parallel(cfg.parallel, world_size, layers, heads, groups, experts if isinstance(experts, int) else 0)
    check_rollout(cfg.rollout)
    check_algorithm(cfg.algorithm)
    check_data(cfg.data, dp, hf.get("max_position_embeddings"))
    _positive(cfg.reward, "reward", ("num_workers", "timeout_s", "hard_margin_s"))
    check_optimizer(cfg.optimizer)
    _positive(cfg.trainer, "trainer", ("total_steps", "val_n"))
    check_checkpoint(cfg.checkpoint)
    check_rollout_efficiency(cfg)
    check_trainer_mode(cfg)
    check_start_checkpoint(cfg)
    check_fault_tolerance(cfg.fault_tolerance)


def check_model(m: ModelConfig) -> dict:
    """The model section; returns the HF ``config.json`` (checked to name the layer and head counts)."""
    _choice(m.dtype, "model.dtype", DTYPES)
    hf = read_hf_config(m.hf_path)
    if m.megatron_checkpoint is not None and not Path(m.megatron_checkpoint).is_dir():
        _fail("model.megatron_checkpoint", f"directory not found: {m.megatron_checkpoint}")
    if not isinstance(hf.get("num_attention_heads"), int) or not isinstance(hf.get("num_hidden_layers"), int):
        _fail("model.hf_path", f"config.json in {m.hf_path} lacks num_attention_heads / num_hidden_layers")
    return hf


def expert_count(hf: dict) -> tuple[str, Any]:
    """The key and value of an HF config's routed experts per layer: ``num_experts`` (Qwen's configs) or
    ``num_local_experts`` (transformers >= 5 writes that name); the value is None for a dense model."""
    key = "num_experts" if "num_experts" in hf else "num_local_experts"
    return key, hf.get(key)


def validate_parallel(
    parallel: ParallelConfig,
    world_size: int,
    num_layers: int,
    num_heads: int,
    num_query_groups: int,
    num_experts: int = 0,
) -> int:
    """Check a parallel layout against a model's shape (``num_experts`` 0: a dense model); returns the data-parallel
    size."""
    tp, pp, vpp = parallel.tp, parallel.pp, parallel.vpp
    _positive(parallel, "parallel", ("tp", "pp", "vpp", "ep", "max_tokens_per_micro_batch"))
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
    if parallel.sequence_parallel and tp < 2:
        _fail("parallel.sequence_parallel", "shards the sequence over the tensor-parallel ranks: needs parallel.tp > 1")
    if parallel.backend is not None:
        _choice(parallel.backend, "parallel.backend", DIST_BACKENDS)
    dp = world_size // (tp * pp)
    _check_experts(parallel, dp, num_experts)
    return dp


def _check_experts(parallel: ParallelConfig, dp: int, num_experts: int) -> None:
    """Expert parallelism and the MoE layers' requirements in megatron-core 0.19: the expert grid is (expert TP = tp)
    x ep x expert DP x pp over the same ranks, so ep divides the data-parallel size; an MoE layer trains under TP only
    with sequence parallelism; the allgather dispatcher gathers equal token blocks from every EP rank (the micro-batches
    of data-parallel ranks differ here) and refuses variable sequence lengths (packed rows under PP)."""
    ep, dispatcher = parallel.ep, parallel.moe_token_dispatcher
    _choice(dispatcher, "parallel.moe_token_dispatcher", choices(TokenDispatcher))
    if ep > 1 and not num_experts:
        _fail("parallel.ep", f"{ep} splits the experts of a mixture-of-experts model; this model is dense")
    if num_experts and num_experts % ep:
        _fail("parallel.ep", f"{ep} does not divide the {num_experts} experts of each layer")
    if dp % ep:
        _fail("parallel.ep", f"{ep} does not divide the data-parallel size world_size / (tp * pp) = {dp}")
    if not num_experts:
        return
    if parallel.tp > 1 and not parallel.sequence_parallel_on():
        _fail("parallel.sequence_parallel", "false: megatron trains MoE layers under parallel.tp > 1 only with it")
    if dispatcher == TokenDispatcher.ALLGATHER and ep > 1:
        _fail(
            "parallel.moe_token_dispatcher", f"allgather needs equal micro-batches on the {ep} EP ranks; use alltoall"
        )
    if dispatcher == TokenDispatcher.ALLGATHER and parallel.pack_sequences and parallel.pp > 1:
        _fail(
            "parallel.moe_token_dispatcher",
            "allgather does not run packed rows under parallel.pp > 1 (variable sequence lengths): use alltoall",
        )


def check_rollout(r: RolloutConfig) -> None:
    """Sampling, the group size and the SGLang servers."""
    _choice(r.backend, "rollout.backend", choices(RolloutBackend))
    _positive(r, "rollout", ("n", "temperature", "top_p", "hf_batch_size"))
    if not 0 < r.top_p <= 1:
        _fail("rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    if r.n_off < 0:
        _fail("rollout.n_off", f"must be >= 0, got {r.n_off}")
    if r.n_off >= r.n:
        _fail("rollout.n_off", f"{r.n_off} must be smaller than rollout.n = {r.n} (at least one on-policy sample)")
    s = r.sglang
    _choice(s.weight_sync, "rollout.sglang.weight_sync", choices(WeightSync))
    _choice(s.weight_sync_backend, "rollout.sglang.weight_sync_backend", choices(GroupBackend))
    _choice(s.device, "rollout.sglang.device", choices(ServerDevice))
    if r.backend == RolloutBackend.SGLANG and not s.launch and not s.urls:
        _fail("rollout.sglang.urls", "give server URLs or set rollout.sglang.launch=true")
    if r.backend == RolloutBackend.SGLANG and s.weight_sync == WeightSync.DISK and not s.weight_sync_dir:
        _fail("rollout.sglang.weight_sync_dir", "required with rollout.sglang.weight_sync=disk (a shared filesystem)")
    _positive(s, "rollout.sglang", ("num_servers", "tp_size", "max_concurrency", "request_timeout_s"))
    if not 0 < s.mem_fraction_static < 1:
        _fail("rollout.sglang.mem_fraction_static", f"must be in (0, 1), got {s.mem_fraction_static}")


def check_algorithm(a: AlgorithmConfig) -> None:
    """Everything the loss, the advantages and the aggregation read."""
    _choice(a.off_policy_reshape, "algorithm.off_policy_reshape", choices(Reshape))
    _choice(a.on_policy_reshape, "algorithm.on_policy_reshape", choices(Reshape))
    _choice(a.loss_agg_mode, "algorithm.loss_agg_mode", choices(AggMode))
    _choice(a.kl_type, "algorithm.kl_type", choices(KLType))
    _choice(a.on_policy_baseline, "algorithm.on_policy_baseline", choices(OnPolicyBaseline))
    positive = ("off_policy_reshape_gamma", "on_policy_reshape_gamma", "adv_eps", "logprob_chunk_tokens")
    _positive(a, "algorithm", (*positive, "luffy_micro_batch_seqs"))
    if a.clip_eps <= 0 or a.clip_eps >= 1:
        _fail("algorithm.clip_eps", f"must be in (0, 1), got {a.clip_eps}")
    _non_negative(a, "algorithm", ("entropy_coeff", "kl_coeff", "sft_loss_coeff"))
    if a.kl_coeff > 0:
        # The loss supports k1/k3 penalties; the trainer does not build a reference model yet.
        _fail("algorithm.kl_coeff", "the trainer has no reference model yet: set it to 0 (the paper's recipe)")


def check_rollout_efficiency(cfg: RunConfig) -> None:
    """Rollout importance sampling, dynamic sampling and one-step-off asynchronous rollout."""
    a, t = cfg.algorithm, cfg.trainer
    if a.rollout_is is not None:
        _choice(a.rollout_is, "algorithm.rollout_is", choices(RolloutIS))
    if not a.rollout_is_cap > 1:
        _fail("algorithm.rollout_is_cap", f"must be > 1, got {a.rollout_is_cap}")
    _choice(a.dynamic_sampling_signal, "algorithm.dynamic_sampling_signal", choices(DynamicSamplingSignal))
    _positive(a, "algorithm", ("dynamic_sampling_max_rounds",))
    _positive(t, "trainer", ("async_rollout_threads",))
    if t.async_rollout and cfg.rollout.backend == RolloutBackend.SGLANG and cfg.rollout.sglang.colocate:
        _fail("trainer.async_rollout", "needs servers of their own: set rollout.sglang.colocate=false")


def check_trainer_mode(cfg: RunConfig) -> None:
    """``trainer.mode=sft``: the config states the loss it trains (the trace's token-mean NLL and nothing else) and
    asks for nothing that generates during training."""
    _choice(cfg.trainer.mode, "trainer.mode", choices(TrainerMode))
    if cfg.trainer.mode != TrainerMode.SFT:
        return
    a, why = cfg.algorithm, "with trainer.mode=sft"
    needed = (
        ("algorithm.sft_loss", a.sft_loss, True, "the loss of every trace token is its NLL"),
        ("algorithm.entropy_coeff", a.entropy_coeff, 0.0, "no entropy bonus"),
        ("algorithm.loss_agg_mode", a.loss_agg_mode, AggMode.TOKEN_MEAN.value, "a mean over the trace tokens"),
        ("algorithm.dynamic_sampling", a.dynamic_sampling, False, "nothing is generated to filter"),
        ("algorithm.rollout_is", a.rollout_is, None, "there are no sampled tokens to correct"),
        ("trainer.async_rollout", cfg.trainer.async_rollout, False, "nothing is generated while training"),
    )
    for key, value, want, reason in needed:
        if value != want:
            _fail(key, f"must be {_yaml(want)} {why} ({reason}), got {_yaml(value)}")
    _positive(a, "algorithm", ("sft_loss_coeff",))


def check_start_checkpoint(cfg: RunConfig) -> None:
    """A run that starts from another run's training checkpoint saves its own elsewhere: in the same save_dir it would
    resume that run instead (its step, optimizer and schedule)."""
    start, save_dir = cfg.model.megatron_checkpoint, cfg.checkpoint.save_dir
    if start and save_dir and cfg.checkpoint.resume:
        start_dir, own = Path(start).resolve(), Path(save_dir).resolve()
        if own in (start_dir, start_dir.parent):
            _fail("checkpoint.save_dir", f"{save_dir} holds model.megatron_checkpoint {start}: give this run its own")


def _yaml(value: Any) -> str:
    """A config value as a YAML file or an override writes it."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_fault_tolerance(ft: FaultToleranceConfig) -> None:
    for name in ft.stop_signals:
        if not isinstance(getattr(signal, name, None), signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            _fail("fault_tolerance.stop_signals", f"{name!r} is not a signal that can be caught (e.g. SIGUSR1)")
    _positive(ft, "fault_tolerance", ("collective_timeout_min", "health_timeout_s", "servers_grace_s"))
    if ft.health_interval_s < 0:
        _fail("fault_tolerance.health_interval_s", f"must be >= 0, got {ft.health_interval_s}")


def check_data(d: DataConfig, dp: int, max_positions: int | None) -> None:
    """Batch sizes against the data-parallel size, the files, and the lengths against the model's positions."""
    _positive(d, "data", ("max_prompt_length", "max_response_length", "train_batch_size", "mini_batch_size"))
    if d.train_batch_size % d.mini_batch_size:
        _fail("data.mini_batch_size", f"{d.mini_batch_size} does not divide data.train_batch_size {d.train_batch_size}")
    if d.mini_batch_size % dp:
        _fail("data.mini_batch_size", f"{d.mini_batch_size} prompts cannot be split over {dp} data-parallel ranks")
    _choice(d.system_prompt, "data.system_prompt", choices(SystemPrompt))
    if d.system_prompt == SystemPrompt.REPLACE and not d.system_prompt_text:
        _fail("data.system_prompt_text", "required when data.system_prompt=replace")
    if not d.train_files:
        _fail("data.train_files", "at least one training file is required")
    for key, files in (("data.train_files", d.train_files), ("data.val_files", d.val_files)):
        for f in files:
            if not _exists_or_glob(f):
                _fail(key, f"no such file or directory: {f}")
    total = d.max_prompt_length + d.max_response_length
    if max_positions is not None and total > max_positions:
        _fail(
            "data.max_response_length",
            f"prompt + response = {total} exceeds the model's max_position_embeddings {max_positions}",
        )


def check_optimizer(o: OptimizerConfig) -> None:
    _positive(o, "optimizer", ("lr",))
    _choice(o.lr_decay_style, "optimizer.lr_decay_style", LR_DECAY_STYLES)
    _non_negative(o, "optimizer", ("min_lr", "weight_decay", "clip_grad", "lr_warmup_steps"))


def check_checkpoint(c: CheckpointConfig) -> None:
    if c.keep_last < 1:
        _fail("checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
    _non_negative(c, "checkpoint", ("save_interval",))


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def _positive(cfg: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            _fail(f"{prefix}.{name}", f"must be positive, got {value}")


def _non_negative(cfg: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(cfg, name)}")


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(key, f"{value!r} is not one of {list(allowed)}")


def _exists_or_glob(path: str) -> bool:
    """True for an existing path, a glob with matches, or a Hugging Face dataset name (``owner/name``); a
    ``@split`` suffix names a split of a dataset folder or hub dataset."""
    if "@" in path and not Path(path).exists():
        path = path.rsplit("@", 1)[0]
    if Path(path).exists():
        return True
    if any(ch in path for ch in "*?["):
        return bool(glob.glob(path))
    # An HF hub dataset name: no extension, not absolute, at most one slash.
    return not path.startswith((".", "/")) and path.count("/") == 1 and "." not in Path(path).name
