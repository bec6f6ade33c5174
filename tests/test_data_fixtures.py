"""Tokenizers for the data tests: the project's tiny offline tokenizer (luffy_megatron.models.tiny, as written by
tools/make_tiny_model.py; Qwen-style template whose generation prompt ends in ``<think>\n``), a variant without the
think prefix, and a self-contained fallback BPE used only if that module is unavailable.
"""

from __future__ import annotations

import copy
import functools

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
CHAT_TEMPLATE_NO_THINK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "<think>\n7+5=12;4+8+1=13\n</think>\n\\boxed{132}",
    "The answer is $\\frac{1}{2}$ so \\boxed{0.5}. Convert the point $(0,3)$ to polar coordinates.",
    "Let x be a real number with x^2 + 2x + 1 = 0. Find \\sqrt{8} and \\left( 3, \\frac{\\pi}{2} \\right).",
    "0123456789 + - * / = ( ) [ ] { } system user assistant reasoning Thought Solution",
]


@functools.lru_cache(maxsize=2)
def toy_tokenizer(think: bool = True):
    """The tiny project tokenizer; ``think=False`` swaps in a template whose generation prompt has no ``<think>``."""
    try:
        base = _tiny()
    except ImportError:
        return _fallback_tokenizer(think)
    if think:
        return base
    tok = copy.deepcopy(base)
    tok.chat_template = CHAT_TEMPLATE_NO_THINK
    return tok


@functools.lru_cache(maxsize=1)
def _tiny():
    from luffy_megatron.models.tiny import train_tokenizer

    return train_tokenizer(397)


def _fallback_tokenizer(think: bool):
    """A byte-level BPE tokenizer (vocab ~400) wrapped as PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE if think else CHAT_TEMPLATE_NO_THINK
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return toy_tokenizer(True)


def test_toy_tokenizer_round_trips_and_renders_think_prompt():
    tok = toy_tokenizer(True)
    text = tok.apply_chat_template([{"role": "user", "content": "47+85="}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n47+85=<|im_end|>\n<|im_start|>assistant\n<think>\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
