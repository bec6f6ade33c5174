"""The tiny-model kit: offline HF checkpoints with a Qwen-style tokenizer, loadable by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from luffy_megatron.models.tiny import make_tiny_model
from tests.fixtures_models import tiny_checkpoint


def test_tiny_checkpoint_loads_and_follows_qwen_conventions() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_checkpoint("qwen2")
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 397 and config["vocab_size"] % 128 != 0
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert config["eos_token_id"] == tok.eos_token_id and config["pad_token_id"] == tok.pad_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 128 + 7?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    ids = tok(prompt)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[pieces.index("1") : pieces.index("1") + 3] == ["1", "2", "8"]  # digits are single tokens
    assert "<think>" in pieces and tok.decode(ids) == prompt
    assert max(ids) < config["vocab_size"]
    gen = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert len(ids) < gen.shape[1] <= len(ids) + 4  # may stop early at a (random) eos
    # every tensor is random: no norm weight is all ones and no bias all zeros
    for name, p in model.named_parameters():
        assert p.std() > 0, name


def test_cli_options_shape_the_model(tmp_path: Path) -> None:
    out = make_tiny_model(
        tmp_path / "m",
        "llama",
        vocab_size=300,
        hidden_size=32,
        layers=3,
        heads=4,
        kv_heads=1,
        intermediate_size=48,
        tie_embeddings=True,
        split_digits=False,
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (300, 3, 1)
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()


def test_ascii_only_tokenizer_for_a_small_vocabulary(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from luffy_megatron.data.synthetic import expert_trace, problem_text, tokenizer_corpus

    out = make_tiny_model(tmp_path / "m", vocab_size=128, hidden_size=32, ascii_only=True, corpus=tokenizer_corpus(200))
    tok = AutoTokenizer.from_pretrained(out)  # Qwen2Tokenizer: byte-level BPE with Qwen's pattern, from the files
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) <= 128
    text = "Any printable ASCII: ~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/ \t\n 0123456789 xyz"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": problem_text(7, 85, 2)}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == prompt and "assistant" in pieces  # the task's words are merged into single tokens
    trace = tok.convert_ids_to_tokens(tok(expert_trace(7, 85, 2), add_special_tokens=False)["input_ids"])
    assert trace[0] == "<think>" and "</think>" in trace and "\\boxed" in trace
    assert trace[trace.index("{") + 1 : trace.index("}")] == ["9", "2"]  # digits stay single tokens


def test_compact_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from luffy_megatron.data.dataset import strip_think_prefix
    from luffy_megatron.data.synthetic import expert_trace, problem_text, tokenizer_corpus

    out = make_tiny_model(
        tmp_path / "m",
        vocab_size=128,
        hidden_size=32,
        ascii_only=True,
        chat_template="compact",
        corpus=tokenizer_corpus(200),
    )
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": problem_text(7, 85, 2)}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "Add.\n07+85=\n<think>\n"
    assert tok.convert_ids_to_tokens(tok(prompt)["input_ids"])[-2:] == ["<think>", "Ċ"]  # byte-level "\n"
    # The trace's own "<think>\n" is dropped after a prompt that opens the think block.
    assert strip_think_prefix(expert_trace(7, 85, 2), prompt).startswith("7+5=12;")
    try:
        make_tiny_model(tmp_path / "bad", vocab_size=128, hidden_size=32, ascii_only=True, chat_template="plain")
    except ValueError as e:
        assert "plain" in str(e) and "compact" in str(e)
    else:
        raise AssertionError("an unknown chat template was accepted")
