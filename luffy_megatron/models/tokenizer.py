"""What the trainer and the rollout engines read from an HF folder's tokenizer side: the tokenizer, its EOS ids and
the pad id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from luffy_megatron.config import ConfigError


def load_tokenizer(hf_path: str | Path) -> Any:
    """The HF folder's tokenizer (``AutoTokenizer``)."""
    return AutoTokenizer.from_pretrained(str(hf_path))


# The configuration files of an HF folder, in the order EOS ids are looked up.
HF_CONFIG_FILES = ("generation_config.json", "config.json")


def read_eos_token_ids(hf_path: str | Path) -> list[int]:
    """EOS ids of an HF folder: ``generation_config.json`` first, then ``config.json``; ``[]`` when none."""
    for name in HF_CONFIG_FILES:
        path = Path(hf_path) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is always masked out, so any id that exists will do)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ConfigError("model.hf_path: the tokenizer has neither a pad_token_id nor an eos_token_id")
