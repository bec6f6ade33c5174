"""HF -> Megatron -> HF for every family in one process (TP=PP=1): bit-identical tensors, equivalent config,
self-contained checkpoints, Megatron logits / loss / gradients equal to transformers' (fp32, 1e-4 absolute), bf16
export, refusal of a non-empty output folder, and no complete-looking output after an interrupted conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.dist_utils import run_distributed
from tests.fixtures_models import (
    FAMILIES,
    converted_vs_hf,
    hf_logits,
    hf_loss_and_grads,
    sample_tokens,
    tiny_checkpoint,
)

TOL = 1e-4


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for file in files:
        with safe_open(folder / file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def _roundtrip_worker(rank: int, world: int, cases: dict, tmp: Path) -> dict:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    import luffy_megatron.convert.checkpoint as ckpt_mod
    from luffy_megatron.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf

    report: dict = {}
    for family, (hf_dir, tokens, ref_logits, ref_loss, ref_grads) in cases.items():
        meg, back = tmp / f"{family}-megatron", tmp / f"{family}-hf"
        convert_hf_to_megatron(hf_dir, meg)
        convert_megatron_to_hf(meg, back)
        report[family] = converted_vs_hf(hf_dir, meg, tokens, ref_logits, ref_loss, ref_grads)

    family, hf_dir = "qwen2", cases["qwen2"][0]
    # bf16 export from the fp32 checkpoint
    convert_megatron_to_hf(tmp / "qwen2-megatron", tmp / "qwen2-bf16", dtype="bfloat16")
    # a non-empty output folder is refused, unless overwrite
    with pytest.raises(ConversionError, match="not empty"):
        convert_hf_to_megatron(hf_dir, tmp / "qwen2-megatron")
    convert_megatron_to_hf(tmp / "qwen2-megatron", tmp / "qwen2-hf", overwrite=True)

    # an interrupted conversion leaves neither the target nor its temporary folder
    def interrupted(*args, **kwargs):
        (Path(args[2]) / "model-00001-of-00001.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    original = ckpt_mod.save_hf_checkpoint
    ckpt_mod.save_hf_checkpoint = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_megatron_to_hf(tmp / "qwen2-megatron", tmp / "interrupted")
    finally:
        ckpt_mod.save_hf_checkpoint = original
    report["interrupted_leftovers"] = sorted(p.name for p in tmp.iterdir() if "interrupted" in p.name)
    return report


@pytest.mark.slow
def test_roundtrip_all_families(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cases = {}
    for family in FAMILIES:
        hf_dir = tiny_checkpoint(family)
        tokens = sample_tokens(hf_dir)
        cases[family] = (hf_dir, tokens, hf_logits(hf_dir, tokens), *hf_loss_and_grads(hf_dir, tokens))
    (report,) = run_distributed(_roundtrip_worker, 1, cases, tmp_path)
    print({k: v for k, v in report.items()})

    for family in FAMILIES:
        hf_dir, back, meg = cases[family][0], tmp_path / f"{family}-hf", tmp_path / f"{family}-megatron"
        assert report[family]["logits"] <= TOL, (family, report[family])
        assert report[family]["grads"] <= TOL, (family, report[family])
        assert report[family]["loss"] <= 1e-3, (family, report[family])  # a sum over 22 tokens
        # bit-identical tensors, same names, no vocabulary padding
        orig, got = _hf_tensors(hf_dir), _hf_tensors(back)
        assert sorted(orig) == sorted(got)
        for name, tensor in orig.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        # equivalent config; tokenizer and generation config carried through the Megatron checkpoint
        c0, c1 = json.loads((hf_dir / "config.json").read_text()), json.loads((back / "config.json").read_text())
        assert {k: v for k, v in c0.items() if k != "transformers_version"} == {
            k: v for k, v in c1.items() if k != "transformers_version"
        }
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
            assert (back / name).read_bytes() == (hf_dir / name).read_bytes(), name
            assert (meg / "hf" / name).exists()
        meta = json.loads((meg / "luffy_checkpoint.json").read_text())
        assert meta["family"] == family and meta["vocab_size"] == 397 and meta["dtype"] == "float32"
        model = AutoModelForCausalLM.from_pretrained(back)
        assert AutoTokenizer.from_pretrained(back).eos_token == "<|im_end|>"
        tokens = cases[family][1]
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, cases[family][2])

    bf16 = _hf_tensors(tmp_path / "qwen2-bf16")
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert json.loads((tmp_path / "qwen2-bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    orig = _hf_tensors(cases["qwen2"][0])
    assert all(torch.equal(bf16[n], orig[n].to(torch.bfloat16)) for n in orig)
    assert report["interrupted_leftovers"] == []
