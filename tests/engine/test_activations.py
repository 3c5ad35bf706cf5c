"""The CPU's SwiGLU against float64 numpy (the exact function), and against MLX's own."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.models.activations import _tanh, swiglu


def test_rational_tanh_and_swiglu_are_within_float32_rounding_of_the_exact_functions():
    assert mx.default_device() == mx.cpu
    x = np.linspace(-40, 40, 400_001, dtype=np.float32)
    x64 = x.astype(np.float64)
    tanh = np.array(_tanh(mx.array(x))).astype(np.float64)
    assert np.abs(tanh - np.tanh(x64)).max() <= 4e-7  # a few float32 ulps of 1
    up = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    got = np.array(swiglu(mx.array(x), mx.array(up))).astype(np.float64)
    exact = x64 / (1 + np.exp(-x64)) * up
    assert np.all(np.abs(got - exact) <= 2.5e-7 * np.maximum(np.abs(x64), 1) * np.abs(up) + 1e-30)
    mlx = np.array(nn.silu(mx.array(x)) * mx.array(up)).astype(np.float64)
    assert np.abs(got - mlx).max() <= 1e-5


def test_swiglu_keeps_shape_and_dtype_and_takes_gradients():
    gate = mx.random.normal((3, 5, 8), key=mx.random.key(1))
    up = mx.random.normal((3, 5, 8), key=mx.random.key(2))
    assert swiglu(gate, up).shape == (3, 5, 8) and swiglu(gate, up).dtype == mx.float32
    assert swiglu(gate.astype(mx.bfloat16), up.astype(mx.bfloat16)).dtype == mx.bfloat16
    got = mx.grad(lambda g: swiglu(g, up).sum())(gate)
    want = mx.grad(lambda g: (nn.silu(g) * up).sum())(gate)
    assert mx.allclose(got, want, atol=1e-5).item()
