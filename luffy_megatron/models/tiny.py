"""Tiny random Hugging Face checkpoints with an offline-trained tokenizer, for tests and the CPU demo.

:func:`make_tiny_model` writes a folder that ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load offline:
``config.json``, ``model.safetensors``, ``generation_config.json`` and a byte-level BPE tokenizer trained in-process on
a small built-in corpus of math and chat text. The tokenizer follows the Qwen conventions the LUFFY models use:
special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), added tokens ``<think>`` / ``</think>``,
and Qwen's chat template, whose generation prompt ends with ``<|im_start|>assistant\\n<think>\\n`` (or a compact
one that keeps only the message texts and the ``<think>\\n`` opening, for tiny CPU runs).

Every tensor is random, including norm weights (1 + noise) and q/k/v biases, so that a wrong name or layout in a
conversion changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
FAMILY_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

# Qwen2's pre-tokenizer pattern: letters in runs, every digit its own pre-token (``\p{N}`` isolated).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
# Each message's text on its own line, then the open think block: a few tokens per prompt, for tiny CPU runs.
COMPACT_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- message['content'] + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<think>\\n' }}{%- endif %}"
)
CHAT_TEMPLATES = {"chatml": CHAT_TEMPLATE, "compact": COMPACT_CHAT_TEMPLATE}

_CORPUS = """\
<|im_start|>system
Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>
<|im_start|>user
What is 12 + 30?<|im_end|>
<|im_start|>assistant
<think>
We add the tens: 10 + 30 = 40, then the ones: 2 + 0 = 2. So 12 + 30 = 42.
</think>
The answer is \\boxed{42}.<|im_end|>
<|im_start|>user
Solve for x: 3x - 7 = 11.<|im_end|>
<|im_start|>assistant
<think>
Add 7 to both sides: 3x = 18. Divide by 3: x = 6. Check: 3 * 6 - 7 = 11.
</think>
Therefore x = \\boxed{6}.<|im_end|>
<|im_start|>user
Compute the sum of the first 10 positive integers.<|im_end|>
<|im_start|>assistant
<think>
The sum is n(n+1)/2 with n = 10, which is 10 * 11 / 2 = 55.
</think>
The sum is \\boxed{55}.<|im_end|>
Let f(x) = x^2 + 2x + 1. Then f(x) = (x + 1)^2, and f(3) = 16.
If a triangle has sides 3, 4 and 5, it is a right triangle because 3^2 + 4^2 = 5^2.
The probability of rolling a sum of 7 with two dice is 6/36 = 1/6.
What is the remainder when 2024 is divided by 7? Since 7 * 289 = 2023, the remainder is 1.
The derivative of sin(x) is cos(x); the integral of 1/x is ln|x| + C.
Find the greatest common divisor of 48 and 180. 180 = 3 * 48 + 36, 48 = 1 * 36 + 12, so gcd = 12.
A number is even if it is divisible by 2. The primes below 20 are 2, 3, 5, 7, 11, 13, 17 and 19.
Let me think about this carefully. First, note that the answer must be an integer. Wait, let me verify.
Hello! How can I help you today? Sure, here is a step-by-step solution.
0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > ^ % . , ; : ! ? \\frac{1}{2} \\sqrt{2} \\pi \\cdot \\times
"""


def default_corpus() -> str:
    """The built-in training text of the tiny tokenizer (math and chat in the Qwen chat format)."""
    return _CORPUS


def _byte_symbol(byte: int) -> str:
    """The character that byte-level BPE uses for ``byte`` (printable Latin-1 stands for itself; the other bytes take
    the code points from 256 up, in byte order: ``\\n`` is ``Ċ``, a space ``Ġ``)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if byte in printable:
        return chr(byte)
    return chr(256 + sum(1 for b in range(byte) if b not in printable))


def train_tokenizer(
    vocab_size: int,
    corpus: str | None = None,
    split_digits: bool = True,
    ascii_only: bool = False,
    chat_template: str = "chatml",
):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with at most ``vocab_size`` tokens (specials included).

    ``split_digits`` uses Qwen's pre-tokenizer pattern, so every digit is its own token; otherwise GPT-2's pattern.
    ``ascii_only`` starts from the printable ASCII bytes, tab and newline (98 symbols) instead of all 256, for
    vocabularies of about a hundred tokens; other bytes then have no token and are dropped, as ``Qwen2Tokenizer``
    (which ``AutoTokenizer`` uses for these checkpoints) has no unknown token. Use it only for ASCII text.
    ``chat_template``: ``chatml`` (Qwen's) or ``compact`` (message texts, one per line, then ``<think>\\n``).
    """
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat_template {chat_template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    tok = Tokenizer(models.BPE())
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if ascii_only:
        alphabet = [_byte_symbol(b) for b in (0x09, 0x0A, *range(0x20, 0x7F))]
    else:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    text = corpus if corpus is not None else default_corpus()
    # Train without the special and think markers (added whole) so the merges go to the text itself.
    for marker in (*SPECIAL_TOKENS, *THINK_TOKENS):
        text = text.replace(marker, "")
    tok.train_from_iterator(text.splitlines() * 4, trainer=trainer)
    return _wrap(tok, vocab_size, CHAT_TEMPLATES[chat_template])


def _wrap(tok, vocab_size: int, chat_template: str):
    """The ``transformers`` tokenizer around a trained ``tokenizers`` BPE: Qwen's specials, think tokens, template."""
    tok.add_tokens(list(THINK_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.chat_template = chat_template
    if len(fast) > vocab_size:
        raise ValueError(f"tokenizer has {len(fast)} tokens, more than vocab_size={vocab_size}")
    return fast


# The experts and router of a tiny qwen3_moe: 4 experts of width 32, top-2 with renormalised probabilities (as
# Qwen3-30B-A3B), Qwen's auxiliary-loss coefficient, every layer sparse.
TINY_MOE: dict[str, Any] = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)


def tiny_hf_config(
    family: str,
    *,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate_size: int,
    tie_embeddings: bool,
    head_dim: int | None = None,
    rope_theta: float | None = None,
    max_position_embeddings: int = 4096,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    moe: dict[str, Any] | None = None,
):
    """A ``transformers`` config object for a tiny model of ``family`` (``rope_theta``: None = the family's usual).

    ``moe`` (qwen3_moe only): ``Qwen3MoeConfig`` fields of the experts and router, over :data:`TINY_MOE`.
    """
    if family not in FAMILY_ARCHITECTURES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILY_ARCHITECTURES)}")
    if moe and family != "qwen3_moe":
        raise ValueError(f"moe={moe!r} is for family qwen3_moe only, not {family!r}")
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size}, heads={heads}, kv_heads={kv_heads}: need heads | hidden and kv | heads"
        )
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_embeddings,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        architectures=[FAMILY_ARCHITECTURES[family]],
    )
    head_dim = head_dim or hidden_size // heads
    if family == "qwen2":
        return Qwen2Config(**common, rope_theta=rope_theta or 1000000.0, use_sliding_window=False)
    if family == "llama":
        return LlamaConfig(
            **common, head_dim=head_dim, rope_theta=rope_theta or 500000.0, attention_bias=False, mlp_bias=False
        )
    qwen3 = dict(head_dim=head_dim, rope_theta=rope_theta or 1000000.0, attention_bias=False, use_sliding_window=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, **qwen3, **{**TINY_MOE, **(moe or {})})
    return Qwen3Config(**common, **qwen3)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Make every tensor random (norms 1 + noise, biases noise) so a mapping error changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif name.endswith(".bias"):
            param.copy_(0.1 * noise)
        else:
            param.copy_(0.05 * noise)


def make_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2",
    *,
    vocab_size: int = 397,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 160,
    head_dim: int | None = None,
    tie_embeddings: bool = False,
    seed: int = 0,
    corpus: str | None = None,
    split_digits: bool = True,
    ascii_only: bool = False,
    chat_template: str = "chatml",
    rope_theta: float | None = None,
    randomize_all: bool = True,
    max_position_embeddings: int = 4096,
    moe: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random HF checkpoint with a trained tokenizer to ``out_dir`` (created if needed); return it.

    ``vocab_size`` is the model's vocabulary (embedding rows); the tokenizer has at most that many tokens, like real
    Qwen checkpoints whose embedding is larger than the tokenizer. The default 397 is not a multiple of 128, so
    Megatron's vocabulary padding is exercised. ``randomize_all`` makes norms and biases random too (for conversion
    tests); without it the model keeps ``transformers``' own initialisation (weights ~ N(0, 0.02), unit norms, zero
    biases), the usual start for training from scratch. ``moe`` (family qwen3_moe): expert and router fields over
    :data:`TINY_MOE` (e.g. ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``, ``norm_topk_prob``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(
        vocab_size, corpus, split_digits=split_digits, ascii_only=ascii_only, chat_template=chat_template
    )
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = tiny_hf_config(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        tie_embeddings=tie_embeddings,
        head_dim=head_dim,
        rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        moe=moe,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if randomize_all:
        _randomize(model, seed)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=True, temperature=1.0, top_p=1.0
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
