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


def test_cpu_rms_norm_is_mlx_fallback_bit_for_bit_and_takes_gradients():
    """The compiled RMSNorm computes what ``mx.fast.rms_norm`` computes on the CPU, in the same
    order, so every float is equal; training differentiates through it."""
    from engine.models.activations import RMSNorm

    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        for shape in ((1, 7, 512), (3, 64), (1, 1, 9, 64)):
            x = (mx.random.normal(shape, key=mx.random.key(3)) * 3).astype(dtype)
            ours, theirs = RMSNorm(shape[-1], eps=1e-5), nn.RMSNorm(shape[-1], eps=1e-5)
            ours.weight = theirs.weight = mx.random.normal((shape[-1],)).astype(dtype)
            got, want = ours(x), theirs(x)
            assert got.dtype == want.dtype and mx.array_equal(got, want).item(), (dtype, shape)
    x = mx.random.normal((4, 16), key=mx.random.key(4))
    ours, theirs = RMSNorm(16, eps=1e-6), nn.RMSNorm(16, eps=1e-6)
    got = mx.grad(lambda v: ours(v).sum())(x)
    want = mx.grad(lambda v: theirs(v).sum())(x)
    assert mx.allclose(got, want, atol=1e-6).item()


def test_cpu_rope_from_step_tables_is_mlx_fallback_bit_for_bit():
    """Rotating with cos/sin computed once per step equals ``mx.fast.rope`` with each row's
    own position, for plain and scaled frequencies, partial rotation and bfloat16."""
    from engine.config import RopeConfig
    from engine.models.base import RoPE

    configs = (RopeConfig(theta=500000.0, dims=64), RopeConfig(dims=32, scaling="linear", factor=2))
    positions = mx.array([0, 7, 100, 4095, 33], dtype=mx.int32)
    for config in configs:
        rope = RoPE(config)
        for dtype in (mx.float32, mx.bfloat16):
            for width in (config.dims, 2 * config.dims):  # the whole head, or its first half
                rows = (mx.random.normal((5, 3, 1, width), key=mx.random.key(5)) * 2).astype(dtype)
                want = rope(rows, positions)
                got = rope.rotate(rows, rope.tables(positions, dtype))
                assert mx.array_equal(got, want).item(), (config, dtype, width)
