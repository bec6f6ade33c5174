"""FLOP accounting: the forward FLOP model against torch's FLOP counter on a real HF model, and the peak table for
every GPU name it knows (the device names torch.cuda.get_device_name() reports)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from luffy_megatron.metrics.perf import PEAK_FLOPS, forward_flops, gpu_key, mfu, model_flops, peak_flops

T = 1e12


@pytest.mark.parametrize("seq_lens", [[37], [5, 64, 200]])
def test_forward_flops_match_torch_flop_counter_minus_the_causal_half(seq_lens):
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(cfg).eval()
    counted = 0
    for s in seq_lens:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randint(0, 300, (1, s)))
        counted += counter.get_total_flops()
    # The counter charges QK^T and scores x V over the full s x s square; half of it is masked out under causality.
    masked = sum(2 * cfg.num_hidden_layers * cfg.num_attention_heads * 16 * s * s for s in seq_lens)
    assert forward_flops(cfg.to_dict(), 300, seq_lens) == counted - masked


def test_training_flops_are_three_forwards_and_mfu_divides_by_world_and_peak():
    hf = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 160, "num_attention_heads": 4}
    spec = SimpleNamespace(hf_config=hf, vocab_size=300)
    assert model_flops(spec, [50, 8000, 300]) == 3 * forward_flops(hf, 300, [50, 8000, 300])
    assert mfu(8e15, 2.0, 4, 1e15) == 1.0


# (name reported by torch.cuda.get_device_name(), row, dense bf16, float32 without / with TF32) from the data sheets
GPUS = [
    ("NVIDIA B200", "B200", 2250 * T, 75 * T, 1100 * T),
    ("NVIDIA GB200", "GB200", 2500 * T, 80 * T, 1250 * T),
    ("NVIDIA H200", "H200", 989 * T, 67 * T, 494 * T),
    ("NVIDIA H200 NVL", "H200 NVL", 835 * T, 60 * T, 418 * T),
    ("NVIDIA GH200 480GB", "GH200", 989 * T, 67 * T, 494 * T),
    ("NVIDIA H100 80GB HBM3", "H100", 989 * T, 67 * T, 494 * T),
    ("NVIDIA H100 NVL", "H100 NVL", 835 * T, 60 * T, 418 * T),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756 * T, 51 * T, 378 * T),
    ("NVIDIA H800", "H800", 989 * T, 67 * T, 494 * T),
    ("NVIDIA H800 PCIe", "H800 PCIe", 756 * T, 51 * T, 378 * T),
    ("NVIDIA H20", "H20", 148 * T, 44 * T, 74 * T),
    ("NVIDIA A100-SXM4-80GB", "A100", 312 * T, 19.5 * T, 156 * T),
    ("NVIDIA A100 80GB PCIe", "A100", 312 * T, 19.5 * T, 156 * T),
    ("NVIDIA A800-SXM4-80GB", "A800", 312 * T, 19.5 * T, 156 * T),
    ("NVIDIA L40S", "L40S", 362 * T, 91.6 * T, 183 * T),
    ("NVIDIA L4", "L4", 121 * T, 30.3 * T, 60 * T),
    ("NVIDIA A10", "A10", 125 * T, 31.2 * T, 62.5 * T),
]


@pytest.mark.parametrize(("name", "row", "bf16", "fp32", "tf32"), GPUS, ids=[g[0] for g in GPUS])
def test_peak_flops_per_gpu_name(name, row, bf16, fp32, tf32):
    assert gpu_key(name) == row
    assert peak_flops(name, "bfloat16") == peak_flops(name, "float16") == bf16
    assert peak_flops(name, "float32") == fp32
    assert peak_flops(name, "float32", tf32=True) == tf32


def test_every_table_row_is_tested_and_unknown_gpus_have_no_peak():
    assert {g[1] for g in GPUS} == set(PEAK_FLOPS)
    for name in ("cpu", "NVIDIA GeForce RTX 4090", "NVIDIA H2", "AMD Instinct MI300X"):
        assert peak_flops(name, "bfloat16") is None
