"""Which model types candlewick runs, and how each reads its configuration."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from engine.config import ConfigError, ModelConfig
from engine.models import llama, mistral, qwen2, qwen3

ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
}


def architecture(model_type: str) -> ModuleType:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ConfigError(
            f"model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        ) from None


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A config.json (as a dict) to a ModelConfig, by its `model_type`."""
    return architecture(hf.get("model_type", "")).config_from_hf(hf)
