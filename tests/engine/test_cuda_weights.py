"""Quantized layers made dense on CUDA at load: when, from what the card reports, and that the
dense model computes what the quantized one does.

The plan reads a ``MemoryReading``; the readings here are the H100's own (tests/engine/
test_memory.py: ``mx.device_info()`` and the memory limit as read on the card) and the other
backends' reports, so the rule is checked against the numbers a CUDA server sees. The
conversion itself is plain MLX (dequantize, cast): it runs here on the CPU with a CUDA reading
passed in, and the dense float16 model must match the quantized one in float16.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.loader.cpu_weights import layer_bytes, quantized_layers
from engine.loader.cuda_weights import (
    DENSE_SHARE,
    apply_cuda_weights,
    cuda_weights_choice,
    plan_cuda_weights,
)
from engine.loader.gguf import load_gguf_model
from engine.memory import MemoryReading
from server.settings import ServerSettings
from tests.engine.test_cpu_weights import q4_model  # noqa: F401 (a fixture)
from tests.engine.test_memory import CPU_INFO, CUDA_INFO, CUDA_MEMORY_LIMIT, METAL_INFO
from tests.engine.test_models_vs_transformers import our_greedy

GIB = 1 << 30


def h100(free: int | None = None, active: int = 0) -> MemoryReading:
    info = CUDA_INFO if free is None else {**CUDA_INFO, "free_memory": free}
    return MemoryReading(is_cpu=False, info=info, active=active, limit=CUDA_MEMORY_LIMIT)


def load_q4(path, dtype=mx.float16) -> nn.Module:
    model, _ = load_gguf_model(path, dtype)
    return model


def test_the_choice_is_checked_before_loading():
    assert cuda_weights_choice(None) == cuda_weights_choice("") == "auto"
    assert cuda_weights_choice(" Dense ") == "dense"
    with pytest.raises(
        ValueError, match=r"--cuda-weights .* must be one of auto, dense, quantized"
    ):
        cuda_weights_choice("fast")
    with pytest.raises(ValueError, match="--cuda-weights"):
        ServerSettings(cuda_weights="fast")


def test_auto_on_an_h100_is_dense_when_the_growth_fits_and_quantized_when_it_does_not(
    q4_model,  # noqa: F811
):
    model = load_q4(q4_model)
    now, dense = layer_bytes(quantized_layers(model), mx.float16.size)
    growth = dense - now
    assert 0 < now < dense

    def plan(reading, **kw):
        return plan_cuda_weights(model, "auto", mx.float16, reading, **kw)

    idle = plan(h100())
    assert idle.dense and idle.dense_bytes == dense and idle.quantized_bytes == now
    assert "MLX memory limit" in idle.reason  # the limit binds on an idle card, not NVML's free
    # Half the available memory goes to the KV cache by default, DENSE_SHARE of the rest may
    # hold the growth.
    edge = int(growth / DENSE_SHARE * 2)
    assert plan(h100(free=edge)).dense
    assert not plan(h100(free=edge - 8)).dense
    # A KV budget the user set is kept free instead of the default share.
    assert plan(h100(free=edge), kv_cache_memory=edge // 2).dense
    assert not plan(h100(free=edge), kv_cache_memory=edge // 2 + 8).dense
    assert plan(h100(free=edge + 2 * GIB), kv_cache_memory=2 * GIB).dense
    # The user asked for quantized weights (--quantize), or for one side outright.
    assert not plan(h100(), quantized_on_request=True).dense
    assert plan_cuda_weights(model, "dense", mx.float16, h100(free=0)).dense
    assert not plan_cuda_weights(model, "quantized", mx.float16, h100()).dense
    # Not CUDA: Metal keeps its (precompiled) quantized kernels; the CPU has its own choice.
    metal = MemoryReading(is_cpu=False, info=METAL_INFO)
    cpu = MemoryReading(is_cpu=True, info=CPU_INFO, free_ram=64 * GIB)
    for reading in (metal, cpu):
        for mode in ("auto", "dense"):
            assert not plan_cuda_weights(model, mode, mx.float16, reading).dense


def test_dense_float16_computes_what_the_quantized_layers_do(q4_model, caplog):  # noqa: F811
    quantized = load_q4(q4_model)
    dense = load_q4(q4_model)
    caplog.set_level(logging.INFO, logger="engine.loader.cuda_weights")
    plan = apply_cuda_weights(dense, "auto", mx.float16, reading=h100())
    assert plan.dense and quantized_layers(dense) == {}
    n = len(quantized_layers(quantized))
    assert f"CUDA weights: {n} quantized layers made dense float16" in caplog.text
    assert dense.model.layers[0].mlp.up_proj.weight.dtype == mx.float16
    # Each dense weight is the layer's dequantization rounded to float16.
    layer = quantized.model.layers[1].self_attn.q_proj
    want = mx.dequantize(
        layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits
    ).astype(mx.float16)
    assert mx.array_equal(dense.model.layers[1].self_attn.q_proj.weight, want)
    prompt = np.random.default_rng(5).integers(3, 200, size=10).tolist()
    tokens_d, logits_d = our_greedy(dense, prompt, 8)
    tokens_q, logits_q = our_greedy(quantized, prompt, 8)
    assert tokens_d == tokens_q
    for d, q in zip(logits_d, logits_q, strict=True):
        np.testing.assert_allclose(d, q, rtol=0, atol=2e-2 * max(1.0, float(np.abs(q).max())))


def test_a_kept_quantized_model_says_why(q4_model, caplog):  # noqa: F811
    model = load_q4(q4_model)
    caplog.set_level(logging.INFO, logger="engine.loader.cuda_weights")
    plan = apply_cuda_weights(model, "auto", mx.float16, reading=h100(free=1))
    assert not plan.dense and quantized_layers(model)
    assert "CUDA weights stay quantized" in caplog.text and "dense float16 adds" in caplog.text
    caplog.clear()
    apply_cuda_weights(model, "auto", mx.float16, reading=MemoryReading(True, CPU_INFO))
    assert caplog.text == ""  # nothing to say on other devices
