"""The one attention function every layer calls, and the masks it takes.

Everything about *which* keys a query may see lives here, so a different KV layout or a custom
kernel replaces this module's function and nothing else.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from metal_kernels.paged_attention import numpy_masked_softmax

Mask = mx.array | str | None


def attention_mask(q_len: int, offset: int, window: int | None) -> Mask:
    """Which keys each of ``q_len`` queries starting at position ``offset`` may attend to.

    Causal, and with a sliding ``window`` a query at position p sees keys p-window+1 .. p.
    Returns None when every key is visible, "causal" when the plain lower-right-aligned causal
    mask suffices, else a boolean mask [q_len, offset + q_len].
    """
    k_len = offset + q_len
    if window is None or k_len <= window:
        return None if q_len == 1 else "causal"
    q_pos = mx.arange(offset, k_len)[:, None]
    k_pos = mx.arange(k_len)[None, :]
    return (k_pos <= q_pos) & (q_pos - k_pos < window)


def attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: Mask) -> mx.array:
    """softmax(q·kᵀ·scale + mask)·v with grouped-query heads.

    q: [B, H, S, D]; k, v: [B, Hkv, L, D] (not repeated to H); returns [B, H, S, D].
    """
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def shape_bucket(n: int) -> int:
    """The smallest of 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ... (four sizes per
    doubling) that holds ``n``: at most a quarter more than ``n`` past 64."""
    if n <= 64:
        return 64
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def _pad_to(x: mx.array, length: int) -> mx.array:
    """``x`` [B, H, L, D] zero-padded at the end of axis 2 to ``length``, as a fresh row-major
    array (its strides depend on its shape alone)."""
    extra = length - x.shape[2]
    if extra == 0:
        return mx.contiguous(x)
    return mx.pad(x, [(0, 0), (0, 0), (0, extra), (0, 0)])


def prefill_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    offset: int,
    window: int | None,
    scale: float,
    stable_shapes: bool,
) -> mx.array:
    """A prefill chunk's attention: q [1, H, n, D] holds the queries at positions
    ``offset .. offset + n - 1``, k and v [1, Hkv, offset + n, D] every key up to the last one.

    With ``stable_shapes`` the call only ever sees a few shapes: q is zero-padded at its end to
    ``shape_bucket(n)`` rows, and k, v to match, so that backends which build a plan per shape
    and layout (MLX's cuDNN attention on CUDA takes ~37 ms to build one, then ~0.1 ms to run it)
    reuse their plans across chunks of every length. A first chunk pads k and v by as many rows
    as q, which keeps the lower-right causal mask exact; any other chunk pads k and v to the
    bucket of ``offset`` + the padded query count under an explicit mask. Padded queries see
    only earlier keys and padding, and their rows are dropped.
    """
    n = q.shape[2]
    if not stable_shapes:
        if numpy_softmax_pays(q):
            return cpu_prefill_attention(q, k, v, offset=offset, window=window, scale=scale)
        return attention(q, k, v, scale=scale, mask=attention_mask(n, offset, window))
    q_len = shape_bucket(n)
    if offset == 0 and (window is None or q_len <= window):
        k_len, mask = q_len, "causal"
    else:
        k_len = shape_bucket(offset + q_len)
        q_pos = mx.arange(offset, offset + q_len)[:, None]
        k_pos = mx.arange(k_len)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask = mask & (q_pos - k_pos < window)
    out = attention(_pad_to(q, q_len), _pad_to(k, k_len), _pad_to(v, k_len), scale=scale, mask=mask)
    return out[:, :, :n]


def cpu_prefill_attention(
    q: mx.array, k: mx.array, v: mx.array, *, offset: int, window: int | None, scale: float
) -> mx.array:
    """``prefill_attention``'s contract on the CPU, in float32, with the softmax in NumPy
    (``cpu_attention``). q [1, H, n, D] at positions ``offset ..``; k, v [1, Hkv, offset + n,
    D] -> [1, H, n, D]."""
    visible = _causal_visible(offset, q.shape[2], k.shape[2], window)
    return cpu_attention(q, k, v, scale=scale, visible=visible)


@functools.lru_cache(maxsize=8)
def _causal_visible(offset: int, n: int, length: int, window: int | None) -> np.ndarray:
    """[n, length]: which keys each query at ``offset ..`` sees (built once for every layer of
    a chunk; read-only)."""
    q_pos = np.arange(offset, offset + n)[:, None]
    k_pos = np.arange(length)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= q_pos - k_pos < window
    visible.setflags(write=False)
    return visible


def numpy_softmax_pays(q: mx.array) -> bool:
    """Whether serving's attention for ``q`` takes its softmax through NumPy
    (``cpu_attention``): on the CPU, in float32."""
    return q.dtype == mx.float32 and mx.default_device() == mx.cpu


def cpu_attention(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, visible: np.ndarray
) -> mx.array:
    """softmax(q·kᵀ·scale) over the ``visible`` keys, times v, on the CPU in float32, with the
    softmax in NumPy.

    MLX's CPU ``exp`` is a scalar loop (~16 ns an element on a 2-core EPYC); NumPy's is
    vectorized (~3 ns), and a prefill chunk's or an encoder batch's softmax is its attention's
    largest cost: a 512-query chunk against 790 keys took 70 ms a layer through MLX's fused call
    against 28 ms here (docs/benchmarks.md). The scores are evaluated here (the engine's step
    waits for them, as the CPU's ``async_eval`` nearly does anyway) and read in place; the
    probabilities go back to MLX for the product with the values. Serving only: nothing here
    is differentiable.

    q [B, H, S, D]; k, v [B, Hkv, L, D]; ``visible`` a bool array that broadcasts to [B, Hkv,
    H // Hkv, S, L] -> [B, H, S, D]. A row with no visible key comes out NaN (as from MLX).
    """
    B, H, S, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    gqa = H // Hkv
    folded = (q * mx.array(scale, q.dtype)).reshape(B, Hkv, gqa * S, D)
    scores = folded @ k.swapaxes(-1, -2)  # [B, Hkv, gqa * S, L]
    probs = numpy_masked_softmax(scores.reshape(B, Hkv, gqa, S, L), visible)
    out = mx.array(probs.reshape(B, Hkv, gqa * S, L)) @ v  # [B, Hkv, gqa * S, D]
    return out.reshape(B, H, S, D)
