"""The shared HF-folder helpers: EOS ids (generation_config.json before config.json), the pad id, the dtype names."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.config import DTYPES, ConfigError
from luffy_megatron.models.family import TORCH_DTYPES, torch_dtype
from luffy_megatron.models.tokenizer import load_tokenizer, pad_token_id, read_eos_token_ids


def test_eos_ids_prefer_generation_config_and_accept_lists(tmp_path):
    assert read_eos_token_ids(tmp_path) == []
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert read_eos_token_ids(tmp_path) == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645]}))
    assert read_eos_token_ids(tmp_path) == [151643, 151645]
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert read_eos_token_ids(tmp_path) == [7]  # no EOS there: fall back to config.json


def test_pad_id_falls_back_to_eos_and_fails_without_either():
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=5)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=5)) == 5
    with pytest.raises(ConfigError, match="neither a pad_token_id nor an eos_token_id"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_tiny_model_tokenizer_and_eos(tmp_path):
    from luffy_megatron.models.tiny import make_tiny_model

    make_tiny_model(tmp_path / "m", family="qwen2", hidden_size=32, layers=1, heads=2, kv_heads=1)
    tok = load_tokenizer(tmp_path / "m")
    assert tok.eos_token_id in read_eos_token_ids(tmp_path / "m")
    assert pad_token_id(tok) == tok.pad_token_id


def test_one_dtype_name_map():
    assert tuple(TORCH_DTYPES) == DTYPES
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigError, match="'fp8' is not one of"):
        torch_dtype("fp8")
