"""Tiny checkpoints and Megatron helpers shared by the model, conversion and rollout tests.

:func:`tiny_model` / :func:`save_tiny_model` are the rollout tests' tokenizer-free 2-layer Qwen2 (in memory, or as an
HF folder that the engines and real SGLang servers load). :func:`tiny_checkpoint` writes (once per test session) small
random HF checkpoints covering the odd cases: vocabulary not divisible by 128, GQA ratios 1, 2 and 4, tied and untied
embeddings, a head_dim that is not hidden/heads. The other helpers run inside ``run_distributed`` workers.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# name -> make_tiny_model arguments
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    # GQA ratio 4, tied embeddings, q/k/v biases
    "qwen2": dict(family="qwen2", heads=8, kv_heads=2, tie_embeddings=True, layers=2),
    # GQA ratio 1 (MHA), untied, 4 layers (PP=2 x VPP=2)
    "llama": dict(family="llama", heads=4, kv_heads=4, tie_embeddings=False, layers=4),
    # GQA ratio 2, QK-norm, head_dim 32 != hidden / heads
    "qwen3": dict(family="qwen3", heads=4, kv_heads=2, head_dim=32, tie_embeddings=False, layers=2),
}
FAMILIES = tuple(TINY_VARIANTS)
_ROOT: Path | None = None


def tiny_model(
    seed: int = 0, vocab: int = 32, eos: int = 1, scale: float = 1.0, max_positions: int = 256
) -> torch.nn.Module:
    """A random 2-layer Qwen2 (fp32); ``scale`` multiplies the output head to make distributions peaked."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def save_tiny_model(path: str | Path, seed: int = 0, **kw: Any) -> str:
    """Write :func:`tiny_model` as an HF folder; returns the path."""
    tiny_model(seed, **kw).save_pretrained(str(path))
    return str(path)


def tiny_checkpoint(name: str) -> Path:
    """Path of the session's tiny HF checkpoint ``name`` (see :data:`TINY_VARIANTS`), created on first use."""
    from luffy_megatron.models.tiny import make_tiny_model

    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="luffy-tiny-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    path = _ROOT / name
    if not (path / "config.json").exists():
        make_tiny_model(path, seed=len(name), **TINY_VARIANTS[name])
    return path


def sample_tokens(hf_dir: Path, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """Random token ids over the whole vocabulary (padding rows of Megatron's vocabulary never appear)."""
    vocab = json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model(tokens).logits.float()


def hf_loss_and_grads(hf_dir: Path, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Summed next-token cross-entropy (labels = tokens shifted left, last position dropped) and its gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logits = model(tokens).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum"
    )
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---- inside run_distributed workers ----


def init_parallel(tp: int, pp: int, vpp: int | None = None) -> None:
    from luffy_megatron.platform import init_model_parallel, setup_platform

    setup_platform()
    init_model_parallel(tp, pp, vpp)


def build_from_hf(
    hf_dir: Path, tp: int, pp: int, vpp: int | None = None, ckpt: Path | None = None, ddp: bool = False, **config_kw
):
    """(spec, config, chunks) with weights from the HF folder, or from a Megatron checkpoint when ``ckpt`` is given.

    ``ddp`` wraps the chunks in megatron's DDP and sets ``finalize_model_grads`` (data-parallel averaging, tied
    embedding and QK-norm gradient all-reduces), as the trainer does.
    """
    from luffy_megatron.convert import load_hf_weights, load_megatron_checkpoint
    from luffy_megatron.models.builder import build_gpt_model, build_transformer_config, model_spec

    spec = model_spec(json.loads((Path(hf_dir) / "config.json").read_text()), tp=tp)
    config = build_transformer_config(spec, tp=tp, pp=pp, vpp=vpp, **config_kw)
    ddp_config = None
    if ddp:
        from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
        config.finalize_model_grads_func = finalize_model_grads
    chunks = build_gpt_model(spec, config, ddp_config=ddp_config)
    if ckpt is None:
        load_hf_weights(chunks, spec, hf_dir)
    else:
        load_megatron_checkpoint(chunks, ckpt)
    return spec, config, chunks


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def pipeline_logits(chunks, config, spec, tokens: torch.Tensor, num_microbatches: int = 1) -> torch.Tensor | None:
    """Full-vocabulary logits through megatron's pipeline schedule (forward only); ``None`` off the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, _positions(batch), None)

        def loss_func(output):
            full = gather_from_tensor_model_parallel_region(output)[..., : spec.vocab_size]
            return output.sum() * 0, {"logits": full.detach()}

        return out, loss_func

    micro = list(tokens.chunk(num_microbatches))
    n_chunks = len(chunks)
    iters = [iter(micro) for _ in range(n_chunks)]
    for c in chunks:
        c.eval()
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if n_chunks > 1 else iters[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=micro[0].shape[1],
        micro_batch_size=micro[0].shape[0],
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([o["logits"].float() for o in out], dim=0)


def summed_ce(logits_shard: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Summed next-token cross-entropy over the true vocabulary (padded rows excluded, as transformers computes it).

    Megatron's own ``labels=`` loss runs softmax over the padded vocabulary (zero logits in the padding), which differs
    from an unpadded model by ~log(padded/true) per token.
    """
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    full = gather_from_tensor_model_parallel_region(logits_shard)[..., :vocab].float()
    return torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1), reduction="sum"
    )


def pipeline_train_loss(chunks, config, spec, tokens: torch.Tensor, num_microbatches: int) -> float | None:
    """Forward and backward of :func:`summed_ce` through megatron's schedule.

    Returns the loss (sum over microbatches) on the last stage, ``None`` elsewhere. The schedule scales each
    microbatch's loss by ``1 / num_microbatches`` before backward.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = list(tokens.chunk(num_microbatches))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch, _positions(batch), None)

        def loss_func(output):
            loss = summed_ce(output, batch, spec.vocab_size)
            return loss, {"loss": loss.detach().clone()}  # the schedule divides ``loss`` in place

        return logits, loss_func

    n_chunks = len(chunks)
    iters = [iter(micro) for _ in range(n_chunks)]
    for c in chunks:
        c.train()
        c.zero_grad() if not hasattr(c, "zero_grad_buffer") else c.zero_grad_buffer()
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if n_chunks > 1 else iters[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=micro[0].shape[1],
        micro_batch_size=micro[0].shape[0],
        forward_only=False,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return float(sum(o["loss"] for o in out))


def grads_as_hf(chunks, spec) -> dict[str, torch.Tensor]:
    """Gradients of every parameter, named and laid out as HF tensors (through the export stream)."""
    from luffy_megatron.convert import iter_hf_weights

    params = [p for c in chunks for p in c.parameters()]
    saved = [p.data for p in params]
    try:
        for p in params:
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            p.data = torch.zeros_like(p.data) if g is None else g.to(p.dtype)
        return {n: t.clone() for bucket in iter_hf_weights(chunks, spec) for n, t in bucket}
    finally:
        for p, data in zip(params, saved):
            p.data = data


def write_train_assets(root: Path) -> Path:
    """A tiny qwen2 checkpoint (``root/model``) and a 64-problem synthetic task (``root/task``) for end-to-end runs."""
    from luffy_megatron.data.synthetic import write_task
    from luffy_megatron.models.tiny import make_tiny_model

    make_tiny_model(root / "model", family="qwen2", hidden_size=64, layers=2, heads=4, kv_heads=2)
    write_task(root / "task", num_train=64, num_val=8, seed=0, system_prompt=None)
    return root


def converted_vs_hf(hf_dir, ckpt, tokens, ref_logits, ref_loss, ref_grads, **build_kwargs) -> dict[str, float]:
    """The Megatron model loaded from the converted checkpoint ``ckpt`` (TP = PP = 1) against transformers' reference
    on the same ``tokens``: the largest |difference| of the logits, of the summed loss and of every gradient (HF
    names; both sides must have gradients for the same tensors)."""
    init_parallel(1, 1)
    spec, config, chunks = build_from_hf(hf_dir, 1, 1, ckpt=ckpt, **build_kwargs)
    logits = pipeline_logits(chunks, config, spec, tokens)
    chunks[0].train()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    loss = summed_ce(chunks[0](tokens, pos, None), tokens, spec.vocab_size)
    loss.backward()
    grads = grads_as_hf(chunks, spec)
    assert grads.keys() == ref_grads.keys(), sorted(grads.keys() ^ ref_grads.keys())
    return {
        "logits": (logits - ref_logits).abs().max().item(),
        "loss": abs(loss.item() - ref_loss),
        "grads": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
    }
