"""Qwen2 / Qwen2.5: biases on the Q, K and V projections, optional sliding window."""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig, common_from_hf, layer_windows_from_hf

GGUF_QK_PERMUTED = False


def qwen_layer_windows(hf: dict[str, Any]) -> tuple[int | None, ...]:
    """Qwen's sliding window applies only when `use_sliding_window` is set, and then (in
    configs older than transformers 5's `layer_types`) to layers from `max_window_layers` on."""
    n = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window") or not window:
        return (None,) * n
    if hf.get("layer_types"):
        return layer_windows_from_hf(hf, int(window))
    first = int(hf.get("max_window_layers", n))
    return tuple(int(window) if i >= first else None for i in range(n))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**common_from_hf(hf), qkv_bias=True, layer_windows=qwen_layer_windows(hf))
