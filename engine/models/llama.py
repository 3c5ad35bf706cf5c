"""Llama 2 and 3 (and every model that ships as `llama`: SmolLM2, TinyLlama, stories)."""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig, common_from_hf

# llama.cpp's converter permutes Q/K rows so its rotate-adjacent-pairs RoPE applies; the
# GGUF loader undoes that for these architectures.
GGUF_QK_PERMUTED = True


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **common_from_hf(hf), qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False))
    )
