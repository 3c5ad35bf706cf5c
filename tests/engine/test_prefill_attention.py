"""Prefill attention padded to a few shapes (as on CUDA, where cuDNN builds a plan per shape)
against the exact-shape call: same outputs for first chunks, continuations and sliding windows."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine.models.attention import (
    attention,
    attention_mask,
    cpu_attention,
    cpu_prefill_attention,
    prefill_attention,
    shape_bucket,
)

H, HKV, D = 4, 2, 16


def test_shape_bucket_has_four_sizes_per_doubling():
    assert [shape_bucket(n) for n in (1, 64, 65, 80, 81, 128, 129, 512, 513, 1000)] == [
        64, 64, 80, 80, 96, 128, 160, 512, 640, 1024,
    ]  # fmt: skip
    for n in range(1, 5000):
        b = shape_bucket(n)
        assert b >= n and (n <= 64 or b <= 1.25 * n)
    assert len({shape_bucket(n) for n in range(1, 513)}) == 13


CASES = [
    # (new tokens, tokens already cached, window)
    (1, 0, None),
    (7, 0, None),
    (64, 0, None),
    (65, 0, None),
    (100, 0, 48),  # a first chunk longer than the window: explicit mask
    (30, 0, 200),
    (1, 90, None),
    (13, 51, None),
    (80, 300, None),
    (40, 70, 32),
    (9, 120, 16),
]


@pytest.mark.parametrize(("n", "offset", "window"), CASES)
def test_padded_equals_exact(n, offset, window):
    rng = np.random.default_rng(n * 1000 + offset)
    total = 3 + offset + n + 5
    # As in a step: the chunk's rows are a slice of the step's tokens, a transposed view.
    q_all = mx.array(rng.standard_normal((1, total, H, D)), dtype=mx.float32).transpose(0, 2, 1, 3)
    kv = mx.array(rng.standard_normal((2, 1, offset + n, HKV, D)), dtype=mx.float32)
    q = q_all[:, :, 3 : 3 + n]
    k, v = kv[0].transpose(0, 2, 1, 3), kv[1].transpose(0, 2, 1, 3)
    kw = {"offset": offset, "window": window, "scale": D**-0.5}
    exact = prefill_attention(q, k, v, stable_shapes=False, **kw)
    padded = prefill_attention(q, k, v, stable_shapes=True, **kw)
    assert padded.shape == exact.shape == (1, H, n, D)
    np.testing.assert_allclose(np.array(padded), np.array(exact), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "offset", "window"), CASES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)])
def test_the_cpu_softmax_in_numpy_equals_mlx_fused_attention(n, offset, window, heads):
    """On the CPU, serving's prefill takes its softmax through NumPy (MLX's CPU exp is scalar):
    the same numbers as MLX's fused call, for first chunks, continuations, windows, GQA."""
    h, hkv = heads
    rng = np.random.default_rng(n * 7 + offset + h)
    q = mx.array(rng.standard_normal((1, h, n, D)), dtype=mx.float32)
    k, v = (mx.array(rng.standard_normal((1, hkv, offset + n, D)), dtype=mx.float32) for _ in "kv")
    with mx.stream(mx.cpu):
        got = cpu_prefill_attention(q, k, v, offset=offset, window=window, scale=D**-0.5)
        want = attention(q, k, v, scale=D**-0.5, mask=attention_mask(n, offset, window))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_serving_prefill_takes_the_numpy_softmax_on_the_cpu_in_float32_only(monkeypatch):
    import engine.models.attention as attention_module

    calls = []
    real = attention_module.cpu_prefill_attention
    monkeypatch.setattr(
        attention_module,
        "cpu_prefill_attention",
        lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw),
    )
    for dtype in (mx.float32, mx.float16):
        q = mx.zeros((1, H, 5, D), dtype=dtype)
        kv = mx.zeros((1, HKV, 5, D), dtype=dtype)
        mx.eval(prefill_attention(q, kv, kv, offset=0, window=None, scale=1.0, stable_shapes=False))
    on_cpu = mx.default_device() == mx.cpu
    assert calls == ([mx.float32] if on_cpu else [])


def test_the_cpu_softmax_with_a_key_mask_equals_mlx_fused_attention():
    """An encoder batch: sequences padded to one length, each query seeing its sequence's keys."""
    rng = np.random.default_rng(5)
    q, k, v = (mx.array(rng.standard_normal((3, H, 9, D)), dtype=mx.float32) for _ in "qkv")
    lengths = np.array([9, 4, 1])
    key_mask = np.arange(9)[None, :] < lengths[:, None]  # [B, L]
    with mx.stream(mx.cpu):
        got = cpu_attention(q, k, v, scale=0.3, visible=key_mask.reshape(3, 1, 1, 1, 9))
        want = attention(q, k, v, scale=0.3, mask=mx.array(key_mask[:, None, None, :]))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
