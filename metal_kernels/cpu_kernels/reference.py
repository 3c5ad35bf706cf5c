"""What the CPU kernels compute, in float64 NumPy: the definitions the start-up check and the
tests hold them to."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + erf(x / sqrt 2)), element by element."""
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.tolist()])


def packed_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, starts: Sequence[int], lens: Sequence[int],
    heads: int, d: int, scale: float,
) -> np.ndarray:  # fmt: skip
    """Each sequence's rows [start, start + len) of q, k, v ([tokens, heads * d]) attending to
    one another, every key visible; rows outside every sequence are 0."""
    out = np.zeros(q.shape)
    for s0, n in zip(starts, lens, strict=True):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            qs, ks, vs = (t[s0 : s0 + n, cols].astype(np.float64) for t in (q, k, v))
            scores = qs @ ks.T * scale
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[s0 : s0 + n, cols] = (p / p.sum(axis=1, keepdims=True)) @ vs
    return out


def paged_decode(
    q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, tables: np.ndarray,
    lens: Sequence[int], block: int, scale: float,
) -> np.ndarray:  # fmt: skip
    """q [b, h, d] against head-major pools [hkv, slots, d] through block tables [b, width]
    (no window): [b, h, d]; a sequence of length 0 gives zeros."""
    b, h, d = q.shape
    gqa = h // k_pool.shape[0]
    out = np.zeros((b, h, d))
    for i, n in enumerate(lens):
        slots = [int(tables[i, j // block]) * block + j % block for j in range(n)]
        for head in range(h if n > 0 else 0):
            keys, values = (p[head // gqa, slots].astype(np.float64) for p in (k_pool, v_pool))
            s = keys @ q[i, head].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[i, head] = p / p.sum() @ values
    return out
