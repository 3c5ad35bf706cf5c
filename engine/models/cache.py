"""The contiguous KV cache: one growing buffer of keys and values per layer.

This is the simple, obviously-correct cache the model forward was first written against; the
paged cache of the serving engine is checked against it.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one layer for a batch of sequences that advance in lockstep.

    Invariant: ``keys[..., :offset, :]`` holds the keys of positions ``0 .. offset-1``. The buffer
    grows in steps of ``step`` positions so decode does not reallocate every token.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None  # [B, Hkv, capacity, D]
        self.values: mx.array | None = None  # [B, Hkv, capacity, D]
        self.offset = 0

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
