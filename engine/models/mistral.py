"""Mistral: Llama's block with sliding-window attention."""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig, common_from_hf, layer_windows_from_hf

GGUF_QK_PERMUTED = True


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    window = hf.get("sliding_window")
    return ModelConfig(
        **common_from_hf(hf), layer_windows=layer_windows_from_hf(hf, window and int(window))
    )
