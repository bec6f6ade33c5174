"""FLOP accounting: the model's training FLOPs and each GPU's dense peak per dtype, for MFU.

Used by the training loop (``perf/mfu``) and ``tools/bench_throughput.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# Dense (no 2:4 sparsity) peak FLOP/s per GPU and dtype, from NVIDIA's data sheets: H100/H800 and H200 (the "H100
# Tensor Core GPU" and "H200 Tensor Core GPU" data sheets; SXM, PCIe and NVL columns), H20 (NVIDIA's H20 product
# brief), A100/A800 ("A100 Tensor Core GPU" data sheet; PCIe and SXM share tensor peaks), B200 and GB200 ("HGX B200" /
# "GB200 NVL72" data sheets, per GPU), L40S, L4 and A10 (their product data sheets). The data sheets print tensor-core
# numbers "with sparsity"; these are half of those. "tf32" is the tensor-core peak a float32 matmul reaches when
# TF32 is allowed (torch.backends.cuda.matmul.allow_tf32), "float32" the CUDA-core peak otherwise.
T = 1e12
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "B200": {"bfloat16": 2250 * T, "float16": 2250 * T, "tf32": 1100 * T, "float32": 75 * T},
    "GB200": {"bfloat16": 2500 * T, "float16": 2500 * T, "tf32": 1250 * T, "float32": 80 * T},
    "H200": {"bfloat16": 989 * T, "float16": 989 * T, "tf32": 494 * T, "float32": 67 * T},
    "H200 NVL": {"bfloat16": 835 * T, "float16": 835 * T, "tf32": 418 * T, "float32": 60 * T},
    "GH200": {"bfloat16": 989 * T, "float16": 989 * T, "tf32": 494 * T, "float32": 67 * T},
    "H100": {"bfloat16": 989 * T, "float16": 989 * T, "tf32": 494 * T, "float32": 67 * T},
    "H100 NVL": {"bfloat16": 835 * T, "float16": 835 * T, "tf32": 418 * T, "float32": 60 * T},
    "H100 PCIe": {"bfloat16": 756 * T, "float16": 756 * T, "tf32": 378 * T, "float32": 51 * T},
    "H800": {"bfloat16": 989 * T, "float16": 989 * T, "tf32": 494 * T, "float32": 67 * T},
    "H800 PCIe": {"bfloat16": 756 * T, "float16": 756 * T, "tf32": 378 * T, "float32": 51 * T},
    "H20": {"bfloat16": 148 * T, "float16": 148 * T, "tf32": 74 * T, "float32": 44 * T},
    "A100": {"bfloat16": 312 * T, "float16": 312 * T, "tf32": 156 * T, "float32": 19.5 * T},
    "A800": {"bfloat16": 312 * T, "float16": 312 * T, "tf32": 156 * T, "float32": 19.5 * T},
    "L40S": {"bfloat16": 362 * T, "float16": 362 * T, "tf32": 183 * T, "float32": 91.6 * T},
    "L4": {"bfloat16": 121 * T, "float16": 121 * T, "tf32": 60 * T, "float32": 30.3 * T},
    "A10": {"bfloat16": 125 * T, "float16": 125 * T, "tf32": 62.5 * T, "float32": 31.2 * T},
}
# The model in a CUDA device name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H200 NVL", ...), as a
# whole word so that H20 is not H200 and A10 not A100.
_MODEL = re.compile(r"\b(GB200|B200|GH200|H200|H100|H800|H20|A100|A800|L40S|L4|A10)\b")
_VARIANT = re.compile(r"\b(PCIE|NVL)\b")


def gpu_key(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` row of a CUDA device name, or None for a GPU not in the table."""
    name = device_name.upper()
    model = _MODEL.search(name)
    if model is None:
        return None
    variant = _VARIANT.search(name)
    if variant is not None:
        key = f"{model.group(1)} {'PCIe' if variant.group(1) == 'PCIE' else 'NVL'}"
        if key in PEAK_FLOPS:
            return key
    return model.group(1)


def peak_flops(device_name: str, dtype: str, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of one GPU for ``dtype`` ("bfloat16", "float16", "float32"), None when unknown.

    ``tf32``: float32 matmuls may use TF32 tensor cores (then their peak is the TF32 one).
    """
    key = gpu_key(device_name)
    if key is None:
        return None
    if dtype == "float32" and tf32:
        dtype = "tf32"
    return PEAK_FLOPS[key].get(dtype)


def forward_flops(hf_config: dict[str, Any], vocab_size: int, seq_lens: Iterable[int]) -> float:
    """FLOPs of one forward pass over sequences of the given lengths (each its own causal attention).

    Matmuls count 2 FLOPs per multiply-add: 2 x (every weight except the embedding lookup) per token, plus the
    causal attention's QK^T and scores x V (each 2 * heads * head_dim * s^2 / 2 per layer for a sequence of s).
    """
    h, layers, ffn = hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["intermediate_size"]
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or h // heads
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * ffn  # q, o + k, v projections; gated MLP
    weights = layers * per_layer + h * vocab_size  # + the output layer
    lens = list(seq_lens)
    attention = sum(2 * layers * heads * head_dim * s * s for s in lens)
    return 2 * weights * sum(lens) + attention


def model_flops(spec: Any, seq_lens: Iterable[int]) -> float:
    """Training FLOPs of one optimiser step over sequences of ``seq_lens`` tokens: 3 x forward (the backward pass
    costs two forwards), without activation recomputation."""
    return 3 * forward_flops(spec.hf_config, spec.vocab_size, seq_lens)


def mfu(flops: float, seconds: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s per GPU over the GPU's peak."""
    return flops / seconds / world_size / peak
