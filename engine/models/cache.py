"""What a layer's attention asks of a KV cache, and the contiguous cache.

A layer hands its cache the queries and keys to rotate and then q, k, v to attend with; the
cache knows the positions, stores the new keys and values and decides which keys each query
sees. The contiguous ``KVCache`` here is the simple, obviously-correct one the model was first
written against; the paged cache of the serving engine is checked against it.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from engine.models.attention import attention, attention_mask


class LayerCache(Protocol):
    def rotate(self, rope: nn.Module, x: mx.array) -> mx.array:
        """Apply ``rope`` at the positions of the new tokens. x: [B, H, S, D]."""
        ...

    def attend(self, q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
        """Store k, v [B, Hkv, S, D] and attend q [B, H, S, D] over everything visible."""
        ...


class KVCache:
    """Keys and values of one layer for a batch of sequences that advance in lockstep.

    Invariant: ``keys[..., :offset, :]`` holds the keys of positions ``0 .. offset-1``. The buffer
    grows in steps of ``step`` positions so decode does not reallocate every token.
    """

    step = 256

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self.keys: mx.array | None = None  # [B, Hkv, capacity, D]
        self.values: mx.array | None = None  # [B, Hkv, capacity, D]
        self.offset = 0

    def rotate(self, rope: nn.Module, x: mx.array) -> mx.array:
        return rope(x, self.offset)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
        mask = attention_mask(q.shape[2], self.offset, self.window)
        keys, values = self.update_and_fetch(k, v)
        return attention(q, keys, values, scale=scale, mask=mask)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys/values [B, Hkv, S, D]; return all of them so far [B, Hkv, offset, D]."""
        start, new = self.offset, keys.shape[2]
        if self.keys is None or start + new > self.keys.shape[2]:
            self._grow(keys, values, start + new)
        self.keys[..., start : start + new, :] = keys
        self.values[..., start : start + new, :] = values
        self.offset = start + new
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, D = keys.shape
        capacity = -(-needed // self.step) * self.step
        grown_k = mx.zeros((B, H, capacity, D), keys.dtype)
        grown_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
        if self.keys is not None:
            grown_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            grown_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = grown_k, grown_v

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The arrays to evaluate alongside a step's output."""
        return () if self.keys is None else (self.keys, self.values)
