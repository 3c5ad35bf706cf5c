"""Pooling on the device: a step's flat hidden states [T, D] into one vector per sequence.

A sequence may arrive whole (an encoder batch) or in chunks over several steps (a chunked
prefill on the paged engine), so pooling is split into three parts: ``reduce`` each sequence's
rows of this step to a partial [D], ``combine`` a sequence's partials in order, and ``finish``
(divide by the token count, normalize) once it has them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.pooling import PoolingConfig, PoolingMode

_SUMS = (PoolingMode.MEAN, PoolingMode.MEAN_SQRT_LEN, PoolingMode.WEIGHTED_MEAN)


@dataclass(frozen=True, slots=True)
class Segment:
    """``length`` rows from flat index ``start``, holding a sequence's tokens from its
    position ``position`` on."""

    start: int
    length: int
    position: int = 0


def reduce(mode: PoolingMode, hidden: mx.array, segments: Sequence[Segment]) -> mx.array:
    """Each segment's partial: its (weighted) sum, first row, last row or maximum.
    hidden: [T, D] -> [B, D]."""
    if mode in _SUMS:
        weights = np.zeros((len(segments), hidden.shape[0]), dtype=np.float32)  # [B, T]
        for b, s in enumerate(segments):
            if mode is PoolingMode.WEIGHTED_MEAN:
                weights[b, s.start : s.start + s.length] = np.arange(1, s.length + 1) + s.position
            else:
                weights[b, s.start : s.start + s.length] = 1.0
        return mx.array(weights).astype(hidden.dtype) @ hidden
    if mode is PoolingMode.CLS:
        return hidden[mx.array([s.start for s in segments])]
    if mode is PoolingMode.LAST:
        return hidden[mx.array([s.start + s.length - 1 for s in segments])]
    return mx.stack([hidden[s.start : s.start + s.length].max(axis=0) for s in segments])


def combine(mode: PoolingMode, earlier: mx.array, later: mx.array) -> mx.array:
    """Two partials of one sequence, ``earlier`` covering the tokens before ``later``'s."""
    if mode in _SUMS:
        return earlier + later
    if mode is PoolingMode.CLS:
        return earlier
    if mode is PoolingMode.LAST:
        return later
    return mx.maximum(earlier, later)


def finish(config: PoolingConfig, pooled: mx.array, counts: Sequence[int]) -> mx.array:
    """Whole partials [B, D] of sequences of ``counts`` tokens into embeddings (float32)."""
    pooled = pooled.astype(mx.float32)
    n = mx.array(np.asarray(counts, dtype=np.float32))[:, None]  # [B, 1]
    if config.mode is PoolingMode.MEAN:
        pooled = pooled / n
    elif config.mode is PoolingMode.MEAN_SQRT_LEN:
        pooled = pooled / mx.sqrt(n)
    elif config.mode is PoolingMode.WEIGHTED_MEAN:
        pooled = pooled / (n * (n + 1) / 2)
    if config.normalize:
        pooled = normalize(pooled)
    return pooled


def normalize(x: mx.array) -> mx.array:
    """L2-normalize the last axis, as torch's ``F.normalize`` (eps 1e-12)."""
    norm = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
    return x / mx.maximum(norm, 1e-12)
