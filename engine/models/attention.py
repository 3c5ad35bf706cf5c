"""The one attention function every layer calls, and the masks it takes.

Everything about *which* keys a query may see lives here, so a different KV layout or a custom
kernel replaces this module's function and nothing else.
"""

from __future__ import annotations

import mlx.core as mx

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
