#!/usr/bin/env python
"""One-command check of the GPU path (``make gpu-check``): prints a pass/fail/skip table and writes JSON.

Stages, in order (each skipped with its reason when the machine cannot run it or the time budget is spent):

1. ``te_spec_build``: the policy built with transformer-engine's layer spec (CUDA + TE).
2. ``roundtrip``: HF -> Megatron -> HF with the project's converters, every tensor bit-identical (TE spec on GPU,
   local spec on CPU).
3. ``logits_vs_hf``: Megatron logits vs ``transformers`` on the same weights. CPU: fp32, max |diff| <= 1e-4. GPU:
   bf16; both models' log-softmax against transformers in fp32, and Megatron's bf16 error must be at most
   2x transformers' own bf16 error + 1e-3 (mean over tokens and vocabulary; the max is reported).
4. ``fused_logprob``: the fused vocab-parallel log-prob/entropy vs an fp64 full-vocabulary reference; on CUDA at
   V=151,936, T=8,192 (bf16 logits, tolerance 2e-3) with the peak extra memory of forward+backward vs the naive path;
   on CPU at V=4,099, T=512 (fp32, tolerance 1e-4).
5. ``mfu``: the packed policy update at Qwen2.5-7B's layer shapes (hidden 3584, 28 heads, 4 KV heads, FFN 18944, the
   full 152,064 vocabulary; 2 layers, random weights), TE, bf16, on one GPU: ``tools/bench_throughput.py`` on LUFFY's
   length mix (4 prompts x 8), tokens/s and MFU against the GPU's dense bf16 peak (``metrics.perf.PEAK_FLOPS``). On
   CPU the same path runs at a tiny shape in fp32 (tokens/s, no MFU).
6. ``luffy_train``: 20 LUFFY steps (``luffy_megatron.train.cli`` under torchrun, one process per GPU) of a
   Qwen2-0.5B-shaped model made offline from its config (random weights, the synthetic addition task) with TE, bf16,
   packed micro-batches (as in the GPU recipes of configs/), the distributed optimizer and NCCL; rollouts by a
   colocated SGLang server on CUDA that the trainer launches itself from its torchrun worker when sglang is
   installed (memory released during training, tensor weight sync), else by the in-process engine on CPU with
   32-token responses; tokens/s and MFU from the loop's metrics (steps 3-20); the final policy exported as HF. A
   server the trainer leaves running (found by ``MARK_ENV`` in its environment) is killed and fails the stage.
7. ``sglang_sync`` (sglang installed): a real server on the GPU(s), colocated (memory released and resumed), tensor
   sync (and distributed sync on a second GPU when there is one) of perturbed weights with GB/s, and the rollout
   vs trainer log-prob gap after the sync (the trainer side is ``transformers`` in bf16 holding the synced weights;
   mean gap <= 0.1 and <= a tenth of the gap before the sync).
8. ``sglang_export``: the step-20 HF export loads in SGLang and generates.

Without a GPU the CPU-runnable stages run and the tool exits 0 (non-zero only when a stage fails). The JSON report
is rewritten (atomically) after every stage, so a run killed part-way leaves the stages it finished.

The default budget, 480 s, leaves 120 s under a 10-minute wall-clock limit on the whole command (the machines it is
meant for kill it there): the margin covers what the budget does not count (interpreter start-up and imports before
the clock starts, stopping servers, writing the report) and a stage that overruns its estimate (``NEED_S``, checked
only when the stage starts).
Usage: ``python tools/gpu_check.py [--out outputs/gpu_check] [--budget-s 480] [--stages roundtrip fused_logprob]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Qwen2.5-0.5B's architecture (config.json of the public checkpoint), with random weights.
QWEN2_05B = dict(
    family="qwen2",
    vocab_size=151936,
    hidden_size=896,
    layers=24,
    heads=14,
    kv_heads=2,
    intermediate_size=4864,
    tie_embeddings=True,
    rope_theta=1e6,
    max_position_embeddings=32768,
    ascii_only=True,
    chat_template="compact",
    randomize_all=False,
)
#: The trainer's copy in ``sglang_sync`` has its (tied) embeddings scaled by this: peaked distributions far from the
#: server's initial weights, with logits small enough for bf16 (a larger scale makes bf16 rounding of the logits the
#: gap). The gap after a sync must be at most GAP_TOL (mean |log-prob difference|, bf16 on both sides).
EMBED_SCALE, GAP_TOL = 4.0, 0.1
SMALL = dict(family="qwen2", vocab_size=397, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=160)
#: The ``mfu`` stage's model: Qwen2.5-7B's layer shapes (config.json of the public checkpoint), two layers.
QWEN25_7B_LAYERS = dict(
    family="qwen2", hidden_size=3584, heads=28, kv_heads=4, intermediate_size=18944, vocab_size=152064, layers=2
)
#: The default ``--budget-s``: 120 s under a 10-minute wall-clock limit on the whole command (module docstring).
DEFAULT_BUDGET_S = 480.0
#: Seconds each stage needs at least on a GPU (skipped when less is left); together within DEFAULT_BUDGET_S.
NEED_S = {
    "te_spec_build": 20.0,
    "roundtrip": 20.0,
    "logits_vs_hf": 20.0,
    "fused_logprob": 30.0,
    "mfu": 45.0,
    "luffy_train": 130.0,
    "sglang_sync": 110.0,
    "sglang_export": 55.0,
}
#: Set (to a value unique to the run) in the environment of the SGLang server the trainer launches in ``luffy_train``.
MARK_ENV = "LUFFY_GPU_CHECK_RUN"


class Skip(Exception):
    """A stage that cannot run here; the message is the reason."""


@dataclass
class StageResult:
    name: str
    status: str  # pass | fail | skip
    seconds: float
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ctx:
    out: Path
    deadline: float
    steps: int
    cuda: bool
    gpus: int
    shared: dict[str, Any] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float) -> float:
        """The time left for a stage that needs at least ``seconds``; skips it otherwise."""
        left = self.remaining()
        if left < seconds:
            raise Skip(f"time budget: {left:.0f}s left, the stage needs about {seconds:.0f}s")
        return left


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _small_model(ctx: Ctx) -> Path:
    from luffy_megatron.models.tiny import make_tiny_model

    path = ctx.out / "small_model"
    if not (path / "config.json").is_file():
        make_tiny_model(path, **SMALL, seed=3)
    return path


def _megatron(ctx: Ctx) -> None:
    from luffy_megatron.convert.checkpoint import setup_parallel

    setup_parallel(1, 1)


# ------------------------------------------------------------------------------------------------------------------
# Stages 1-3: model build, conversion, logits
# ------------------------------------------------------------------------------------------------------------------
def stage_te_spec_build(ctx: Ctx) -> dict:
    if not ctx.cuda:
        raise Skip("no CUDA device: transformer-engine's layer spec builds only on a GPU")
    if not has("transformer_engine"):
        raise Skip("transformer_engine is not installed (pip install .[gpu], see docs/rollout.md)")
    from luffy_megatron.config import read_hf_config
    from luffy_megatron.models.builder import build_gpt_model, build_transformer_config, model_spec

    ctx.need(NEED_S["te_spec_build"])
    _megatron(ctx)
    spec = model_spec(read_hf_config(_small_model(ctx)))
    chunks = build_gpt_model(spec, build_transformer_config(spec, dtype="bfloat16"), use_transformer_engine=True)
    te_modules = sorted(
        {
            type(m).__name__
            for m in chunks[0].modules()
            if type(m).__module__.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine"))
        }
    )
    names = [n for n, _ in chunks[0].named_parameters()]
    fused = [n for n in names if n.endswith("layer_norm_weight")]
    if not te_modules or len(fused) != 2 * spec.hf_config["num_hidden_layers"]:
        raise AssertionError(f"not a TE model: modules {te_modules}, fused norms {fused}")
    return {"te_modules": te_modules, "fused_norm_params": len(fused), "parameters": len(names)}


def stage_roundtrip(ctx: Ctx) -> dict:
    from safetensors.torch import load_file

    from luffy_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf

    ctx.need(NEED_S["roundtrip"])
    src = _small_model(ctx)
    mcore = convert_hf_to_megatron(src, ctx.out / "roundtrip_megatron", overwrite=True)
    back = convert_megatron_to_hf(mcore, ctx.out / "roundtrip_hf", overwrite=True)

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(src), tensors(back)
    differ = sorted(n for n in a if n not in b or not torch.equal(a[n], b[n]))
    if set(a) != set(b) or differ:
        raise AssertionError(f"not bit-identical: {differ[:5]}, missing {sorted(set(a) ^ set(b))[:5]}")
    from luffy_megatron.models.builder import transformer_engine_available

    return {"tensors": len(a), "bit_identical": True, "transformer_engine": transformer_engine_available()}


def _megatron_logits(hf_dir: Path, dtype: str, tokens: torch.Tensor) -> torch.Tensor:
    from luffy_megatron.config import read_hf_config
    from luffy_megatron.convert.checkpoint import build_model
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec

    spec = model_spec(read_hf_config(hf_dir))
    chunks = build_model(spec, 1, 1, dtype)
    load_hf_weights(chunks, spec, hf_dir)
    model = chunks[0].eval()
    dev = next(model.parameters()).device
    pos = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens.to(dev), pos, attention_mask=None)[..., : spec.vocab_size].float().cpu()


def stage_logits_vs_hf(ctx: Ctx) -> dict:
    from transformers import AutoModelForCausalLM

    ctx.need(NEED_S["logits_vs_hf"])
    _megatron(ctx)
    hf_dir = _small_model(ctx)
    tokens = torch.randint(0, 397, (2, 96), generator=torch.Generator().manual_seed(0))
    dev = "cuda" if ctx.cuda else "cpu"

    def hf(dtype: torch.dtype) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
        with torch.no_grad():
            return model(tokens.to(dev)).logits.float().cpu()

    if not ctx.cuda:
        diff = (_megatron_logits(hf_dir, "float32", tokens) - hf(torch.float32)).abs().max().item()
        if diff > 1e-4:
            raise AssertionError(f"fp32 logits differ by {diff:.2e} > 1e-4")
        return {"dtype": "float32", "max_abs_diff": diff, "tolerance": 1e-4}
    ref = hf(torch.float32).log_softmax(-1)
    meg = (_megatron_logits(hf_dir, "bfloat16", tokens).log_softmax(-1) - ref).abs()
    hfb = (hf(torch.bfloat16).log_softmax(-1) - ref).abs()
    limit = 2 * hfb.mean().item() + 1e-3
    out = {
        "dtype": "bfloat16",
        "megatron_bf16_mean_err": meg.mean().item(),
        "megatron_bf16_max_err": meg.max().item(),
        "transformers_bf16_mean_err": hfb.mean().item(),
        "transformers_bf16_max_err": hfb.max().item(),
        "limit_mean": limit,
    }
    if out["megatron_bf16_mean_err"] > limit:
        raise AssertionError(f"Megatron bf16 log-softmax error {out} exceeds 2 x transformers' bf16 error + 1e-3")
    return out


# ------------------------------------------------------------------------------------------------------------------
# Stage 4: fused log-prob / entropy
# ------------------------------------------------------------------------------------------------------------------
def _naive(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = logits.float().log_softmax(-1)
    return logp_all.gather(-1, target[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def _peak_extra(fn: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def stage_fused_logprob(ctx: Ctx) -> dict:
    from luffy_megatron.algo.logprob import vocab_parallel_logprob_entropy

    ctx.need(NEED_S["fused_logprob"] if ctx.cuda else 5)
    vocab, tokens = (151936, 8192) if ctx.cuda else (4099, 512)
    dev, dtype, tol = ("cuda", torch.bfloat16, 2e-3) if ctx.cuda else ("cpu", torch.float32, 1e-4)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=g, device=dev) * 3).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=g, device=dev)
    logp, ent = vocab_parallel_logprob_entropy(logits, target)
    ref_all = logits.double().log_softmax(-1)  # fp64 full-vocabulary reference
    ref_logp = ref_all.gather(-1, target[:, None]).squeeze(-1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    del ref_all
    err_logp = (logp.double() - ref_logp).abs().max().item()
    err_ent = (ent.double() - ref_ent).abs().max().item()
    out: dict[str, Any] = {
        "vocab": vocab,
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "max_err_logp": err_logp,
        "max_err_entropy": err_ent,
        "tolerance": tol,
    }
    if ctx.cuda:

        def run(fn: Callable) -> Callable[[], None]:
            def go() -> None:
                x = logits.detach().requires_grad_(True)
                lp, en = fn(x, target)
                (lp.sum() + en.sum()).backward()

            return go

        fused = _peak_extra(run(lambda x, t: vocab_parallel_logprob_entropy(x, t)))
        out["fused_peak_extra_gib"] = fused / 2**30
        try:
            naive = _peak_extra(run(_naive))
            out.update(naive_peak_extra_gib=naive / 2**30, naive_over_fused=naive / max(fused, 1))
        except torch.cuda.OutOfMemoryError:
            out["naive_peak_extra_gib"] = "out of memory"
    if err_logp > tol or err_ent > tol:
        raise AssertionError(f"fused vs fp64: log-prob error {err_logp:.2e}, entropy error {err_ent:.2e} > {tol}")
    return out


# ------------------------------------------------------------------------------------------------------------------
# Stage 5: MFU of the packed update at 7B layer shapes
# ------------------------------------------------------------------------------------------------------------------
def stage_mfu(ctx: Ctx) -> dict:
    left = ctx.need(NEED_S["mfu"] if ctx.cuda else 10)
    shape = QWEN25_7B_LAYERS if ctx.cuda else {**SMALL, "layers": 2}
    prompts, n, dtype = (4, 8, "bfloat16") if ctx.cuda else (1, 2, "float32")
    out = ctx.out / "mfu.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench_throughput.py"), "--layouts", "tp1pp1dp1"]
    for key in ("family", "hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "vocab_size"):
        cmd += [f"--{key.replace('_', '-')}", str(shape[key])]
    cmd += ["--length-dist", "luffy", "--prompts", str(prompts), "--n", str(n), "--dtype", dtype]
    cmd += ["--max-tokens-per-micro-batch", "16384", "--steps", "3", "--warmup", "1", "--out", str(out)]
    _run_logged(cmd, ctx.out / "mfu.log", timeout_s=left)
    [result] = json.loads(out.read_text())["results"]
    if "error" in result:
        raise AssertionError(f"bench_throughput failed: {result['error'][-1500:]}")
    train = result["train"]
    details = {
        "device": result["device"],
        "dtype": dtype,
        "shape": {k: shape[k] for k in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size")},
        "tokens_per_step": result["tokens_per_step"],
        "tokens_per_s": train["tokens_per_s"],
        "seconds_per_step": train["seconds_per_step"],
        "mfu": train["mfu"],
        "computed_over_real": result["tokens"]["computed_over_real"],
    }
    if ctx.cuda and not train["mfu"]:
        details["mfu_missing"] = f"no dense {dtype} peak for {result['device']} in metrics.perf.PEAK_FLOPS"
    return details


# ------------------------------------------------------------------------------------------------------------------
# Stage 6: 20 LUFFY steps
# ------------------------------------------------------------------------------------------------------------------
def _qwen05b(ctx: Ctx) -> Path:
    from luffy_megatron.data.synthetic import tokenizer_corpus
    from luffy_megatron.models.tiny import make_tiny_model

    path = ctx.out / "qwen2_0.5b_shape"
    if not (path / "config.json").is_file():
        make_tiny_model(path, **QWEN2_05B, corpus=tokenizer_corpus(), seed=1)
    return path


def _run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> None:
    """Run ``cmd`` with its output in ``log``; raises with the log tail on failure or timeout."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            raise AssertionError(f"timed out after {timeout_s:.0f}s; log {log}:\n{log.read_text()[-3000:]}") from None
    if rc != 0:
        raise AssertionError(f"exit code {rc}; log {log}:\n{log.read_text()[-3000:]}")


def _marked_pids(mark: str) -> list[int]:
    """The processes whose environment holds ``MARK_ENV=mark`` (a launched server and its children)."""
    tag, pids = f"{MARK_ENV}={mark}".encode(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):  # gone, or another user's
            if tag in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
    return pids


def _stop_marked(mark: str, grace_s: float) -> list[int]:
    """Kill the processes marked ``mark`` that are still alive after ``grace_s``; returns their ids."""
    deadline = time.monotonic() + grace_s
    while (pids := _marked_pids(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    return pids


def stage_luffy_train(ctx: Ctx) -> dict:
    if not ctx.cuda:
        raise Skip("no CUDA device: this stage trains with TE, bf16 and NCCL (the CPU loop runs in make demo/test)")
    if not has("transformer_engine"):
        raise Skip("transformer_engine is not installed")
    from luffy_megatron.data.synthetic import write_task
    from luffy_megatron.metrics.logger import read_jsonl
    from luffy_megatron.platform.ports import free_port_block

    left = ctx.need(NEED_S["luffy_train"])
    model = _qwen05b(ctx)
    task = ctx.out / "task"
    if not (task / "train.parquet").is_file():
        write_task(task, num_train=2000, num_val=64, seed=1, system_prompt=None)
    run_dir = ctx.out / "luffy_train"
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    mark = f"{os.getpid()}-{time.time_ns()}"
    overrides = [
        f"model.hf_path={model}",
        "model.dtype=bfloat16",
        "model.use_transformer_engine=true",
        "parallel.use_distributed_optimizer=true",
        "parallel.backend=nccl",
        "parallel.max_tokens_per_micro_batch=16384",
        "parallel.pack_sequences=true",
        f"data.train_files=[{task / 'train.parquet'}]",
        "data.val_files=[]",
        "trainer.val_interval=0",
        f"trainer.total_steps={ctx.steps}",
        f"logging.out_dir={run_dir}",
        "logging.progress_bar=false",
        "checkpoint.export_hf_at_end=true",
        "reward.num_workers=2",
    ]
    if has("sglang"):  # a colocated server on GPU 0 that the torchrun worker launches, weights synced by CUDA IPC
        overrides += [
            "rollout.backend=sglang",
            "rollout.sglang.launch=true",
            "rollout.sglang.device=cuda",
            "rollout.sglang.colocate=true",
            "rollout.sglang.weight_sync=tensor",
            "rollout.sglang.weight_sync_backend=auto",
            "rollout.sglang.mem_fraction_static=0.3",
            f"rollout.sglang.base_port={free_port_block()}",
            "rollout.sglang.context_length=2048",
            f"rollout.sglang.startup_timeout_s={min(left - 60, 300):.0f}",
            f"rollout.sglang.env.{MARK_ENV}={mark}",
            "data.max_response_length=256",
            "data.train_batch_size=16",
            "data.mini_batch_size=16",
        ]
    else:  # the in-process engine generates on CPU: short responses keep 20 steps within the budget
        overrides += [
            "rollout.backend=hf",
            "data.max_response_length=32",
            "data.train_batch_size=8",
            "data.mini_batch_size=8",
        ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ctx.gpus}",
        "-m",
        "luffy_megatron.train.cli",
        str(REPO / "configs" / "tiny_cpu_luffy.yaml"),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "8"}
    try:
        _run_logged(cmd, ctx.out / "luffy_train.log", min(left - 10, 420), env)
    except BaseException:  # a trainer killed at the timeout cannot stop its server (which has its own session)
        _stop_marked(mark, grace_s=0)
        raise
    if leftover := _stop_marked(mark, grace_s=10):
        raise AssertionError(f"the trainer exited with its SGLang server still running (now killed: {leftover})")
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "perf/tokens_per_s" in r]
    if len(rows) != ctx.steps:
        raise AssertionError(f"{len(rows)} of {ctx.steps} steps logged")
    ctx.shared["export"] = run_dir / "hf_final"
    timed = rows[2:] or rows  # the first steps include compilation and allocator warm-up
    mean = lambda key: sum(r[key] for r in timed) / len(timed)  # noqa: E731
    mfu = mean("perf/mfu") if all("perf/mfu" in r for r in timed) else None  # absent on a GPU without a peak
    return {
        "gpus": ctx.gpus,
        "steps": len(rows),
        "tokens_per_s": mean("perf/tokens_per_s"),
        "mfu": mfu,
        "step_s": mean("perf/step_s"),
        "train_s": mean("time/train_s"),
        "weight_sync_s": mean("time/weight_sync_s"),
        "final_loss": rows[-1].get("actor/loss"),
        "rollout": "sglang" if has("sglang") else "hf (CPU)",
        "rollout_s": mean("time/rollout_s"),
        "mfu_peak_table": "luffy_megatron.metrics.perf.PEAK_FLOPS",
        "export": str(run_dir / "hf_final"),
    }


# ------------------------------------------------------------------------------------------------------------------
# Stages 6-7: SGLang
# ------------------------------------------------------------------------------------------------------------------
def _sglang_ready(ctx: Ctx) -> None:
    if not ctx.cuda:
        raise Skip("no CUDA device: SGLang serves on GPUs only")
    if not has("sglang"):
        raise Skip("sglang is not installed (pip install .[gpu], see docs/rollout.md)")


def _server(ctx: Ctx, model: Path, name: str, gpu: int, weight_sync: str):
    """One colocated SGLang server (memory saver on) on GPU ``gpu``, wrapped in the project's engine."""
    from luffy_megatron.config import SGLangConfig
    from luffy_megatron.models.tokenizer import read_eos_token_ids
    from luffy_megatron.platform.ports import free_port_block
    from luffy_megatron.rollout.sglang.client import SGLangClient
    from luffy_megatron.rollout.sglang.engine import SGLangEngine
    from luffy_megatron.rollout.sglang.launcher import launch_servers

    cfg = SGLangConfig(
        launch=True,
        base_port=free_port_block(),
        mem_fraction_static=0.3,
        colocate=True,
        context_length=2048,
        startup_timeout_s=max(30.0, min(ctx.remaining() - 30, 300)),
        extra_args=["--base-gpu-id", str(gpu)] if gpu else [],
    )
    procs = launch_servers(cfg, str(model), log_dir=str(ctx.out / f"{name}_logs"))
    return SGLangEngine(
        SGLangClient([p.url for p in procs]),
        weight_sync=weight_sync,
        colocate=True,
        eos_token_ids=read_eos_token_ids(str(model)),
        processes=procs,
        master_address="127.0.0.1",
        group_backend="nccl",
    )


def _logprob_gap(engine, model: torch.nn.Module) -> dict[str, float]:
    """Sample with the server, score the same tokens with ``model`` (teacher forcing): mean/max |log-prob gap|."""
    from luffy_megatron.rollout.base import SamplingParams

    prompts = [[11 + i, 40 + i, 7, 9 + i] for i in range(8)]
    outs = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=64, temperature=1.0, seed=1))
    gaps: list[float] = []
    with torch.no_grad():
        for prompt, row in zip(prompts, outs):
            for o in row:
                if not o.output_ids:
                    continue
                ids = torch.tensor([prompt + o.output_ids], device="cuda")
                lp = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
                mine = lp.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).cpu()
                gaps += (mine - torch.tensor(o.logprobs)).abs().tolist()
    if not gaps:
        raise AssertionError("the server generated no tokens")
    return {"mean": sum(gaps) / len(gaps), "max": max(gaps), "tokens": float(len(gaps))}


def stage_sglang_sync(ctx: Ctx) -> dict:
    from transformers import AutoModelForCausalLM

    _sglang_ready(ctx)
    ctx.need(NEED_S["sglang_sync"])
    model = _qwen05b(ctx)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    trainer = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():  # peaked, clearly different distributions: a sync that did nothing cannot pass
        trainer.get_input_embeddings().weight.mul_(EMBED_SCALE)
    gpu = 1 if ctx.gpus > 1 else 0
    engine = _server(ctx, model, "sglang_sync", gpu, "tensor")
    out: dict[str, Any] = {"server_gpu": gpu}
    try:
        free0 = torch.cuda.mem_get_info(gpu)[0]
        engine.release_memory()
        free1 = torch.cuda.mem_get_info(gpu)[0]
        engine.resume_memory()
        out["released_gib"] = (free1 - free0) / 2**30
        if out["released_gib"] < 0.5:
            raise AssertionError(f"release_memory freed only {out['released_gib']:.2f} GiB")
        out["gap_before_sync"] = _logprob_gap(engine, trainer)
        named = [(n, p.detach()) for n, p in trainer.named_parameters()]
        modes = ["tensor"] + (["distributed"] if ctx.gpus > 1 else [])
        for version, mode in enumerate(modes, start=1):
            engine.weight_sync = mode
            engine.update_weights(iter(named), version=version)
            out[f"{mode}_sync"] = dict(engine.last_sync)
            out[f"gap_after_{mode}_sync"] = _logprob_gap(engine, trainer)
            out[f"gap_after_{mode}_sync_vs_unsynced_model"] = _logprob_gap(engine, base)
        if ctx.gpus == 1:
            out["distributed_sync"] = "skipped: NCCL cannot put the trainer and the server on one GPU"
    finally:
        engine.close()
    for mode in ("tensor", "distributed"):
        gap = out.get(f"gap_after_{mode}_sync")
        if gap and not (gap["mean"] <= GAP_TOL and gap["mean"] <= 0.1 * out["gap_before_sync"]["mean"]):
            raise AssertionError(f"{mode} sync: log-prob gap {gap['mean']:.3f} (before {out['gap_before_sync']})")
    return out


def stage_sglang_export(ctx: Ctx) -> dict:
    from luffy_megatron.rollout.base import SamplingParams

    _sglang_ready(ctx)
    export = ctx.shared.get("export")
    if export is None or not (Path(export) / "config.json").is_file():
        raise Skip("no HF export: the luffy_train stage did not run or failed")
    ctx.need(NEED_S["sglang_export"])
    engine = _server(ctx, Path(export), "sglang_export", 0, "tensor")
    try:
        # Per-prompt counts as the trainer sends them (a prompt with a trace gets one sample fewer).
        outs = engine.generate([[11, 40, 7], [12, 41, 8]], SamplingParams(n=2, max_new_tokens=16, seed=1), [2, 1])
    finally:
        engine.close()
    if [len(row) for row in outs] != [2, 1]:
        raise AssertionError(f"asked for counts [2, 1], got {[len(row) for row in outs]}")
    lengths = [len(o.output_ids) for row in outs for o in row]
    finite = all(torch.isfinite(torch.tensor(o.logprobs)).all() for row in outs for o in row if o.logprobs)
    if not lengths or min(lengths) == 0 or not finite:
        raise AssertionError(f"export generated lengths {lengths}, finite log-probs {finite}")
    return {"export": str(export), "lengths": lengths}


# ------------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------------
STAGES: dict[str, Callable[[Ctx], dict]] = {
    "te_spec_build": stage_te_spec_build,
    "roundtrip": stage_roundtrip,
    "logits_vs_hf": stage_logits_vs_hf,
    "fused_logprob": stage_fused_logprob,
    "mfu": stage_mfu,
    "luffy_train": stage_luffy_train,
    "sglang_sync": stage_sglang_sync,
    "sglang_export": stage_sglang_export,
}


def run_stage(name: str, fn: Callable[[Ctx], dict], ctx: Ctx) -> StageResult:
    t0 = time.perf_counter()
    try:
        details = fn(ctx)
        return StageResult(name, "pass", time.perf_counter() - t0, details=details)
    except Skip as e:
        return StageResult(name, "skip", time.perf_counter() - t0, reason=str(e))
    except Exception as e:
        (ctx.out / f"{name}.traceback.txt").write_text(traceback.format_exc())
        return StageResult(name, "fail", time.perf_counter() - t0, reason=f"{type(e).__name__}: {e}"[:2000])
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
    }
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
    for pkg in ("megatron-core", "transformer-engine", "sglang", "sglang-router", "transformers"):
        with contextlib.suppress(Exception):
            info[pkg] = importlib.metadata.version(pkg)
    return info


def print_table(results: list[StageResult]) -> None:
    width = max(len(r.name) for r in results)
    print(f"\n{'stage':<{width}}  status  seconds  detail")
    for r in results:
        detail = r.reason or ", ".join(f"{k}={_short(v)}" for k, v in list(r.details.items())[:6])
        print(f"{r.name:<{width}}  {r.status:<6}  {r.seconds:7.1f}  {detail}")


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_short(x)}" for k, x in list(v.items())[:3]) + "}"
    return str(v)[:60]


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON atomically: a reader (or a kill) never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: make gpu-check, or python tools/gpu_check.py --stages roundtrip fused_logprob --out /tmp/gc",
    )
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check", help="work folder and JSON report")
    ap.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="total time budget (stages past it are skipped)"
    )
    ap.add_argument("--steps", type=int, default=20, help="LUFFY steps of the training stage")
    ap.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=list(STAGES), help="stages to run")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA device found: running the CPU-runnable stages only")
    ctx = Ctx(args.out, time.monotonic() + args.budget_s, args.steps, cuda, torch.cuda.device_count())
    names = [n for n in STAGES if n in args.stages]
    path = args.out / "gpu_check.json"
    # Written before the first stage and after every stage, so that a run killed part-way leaves the stages it did;
    # ok: every stage ran and none failed.
    report = dict(machine=machine(), budget_s=args.budget_s, stages=[], pending=names, ok=False)
    write_report(path, report)
    results: list[StageResult] = []
    for name in names:
        print(f"[gpu-check] {name} ...", flush=True)
        results.append(run_stage(name, STAGES[name], ctx))
        print(f"[gpu-check] {name}: {results[-1].status} ({results[-1].seconds:.1f}s)", flush=True)
        pending = names[len(results) :]
        ok = not pending and all(r.status != "fail" for r in results)
        report.update(stages=[asdict(r) for r in results], pending=pending, ok=ok)
        write_report(path, report)
    print_table(results)
    print(f"\nreport: {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
