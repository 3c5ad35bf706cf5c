"""Qwen3: RMSNorm on each head's queries and keys before RoPE; no projection biases by default."""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig, common_from_hf
from engine.models.qwen2 import qwen_layer_windows

GGUF_QK_PERMUTED = False


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **common_from_hf(hf),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        layer_windows=qwen_layer_windows(hf),
    )
