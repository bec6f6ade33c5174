"""Model families (HF config -> Megatron config and parameter names) and the GPTModel builder."""

from __future__ import annotations

from typing import Any

from luffy_megatron.config import ConfigError
from luffy_megatron.models import llama, qwen2, qwen3, qwen3_moe
from luffy_megatron.models.family import ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (qwen2.FAMILY, llama.FAMILY, qwen3.FAMILY, qwen3_moe.FAMILY)}


def get_family(hf_config: dict[str, Any]) -> ModelFamily:
    """The family of an HF ``config.json`` (by ``architectures``, else ``model_type``)."""
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if any(a in family.hf_architectures for a in archs) or model_type in family.hf_model_types:
            if "attention_bias" in hf_config and bool(hf_config["attention_bias"]) != family.qkv_bias:
                raise ConfigError(
                    f"attention_bias={hf_config['attention_bias']} is not supported for family {family.name}"
                )
            return family
    supported = sorted(a for f in FAMILIES.values() for a in f.hf_architectures)
    raise ConfigError(f"unsupported architecture {archs or model_type!r}; supported: {', '.join(supported)}")


__all__ = ["FAMILIES", "ModelFamily", "get_family"]
