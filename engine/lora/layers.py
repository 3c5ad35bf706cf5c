"""LoRA on the batch: every token adds the low-rank update of its own adapter.

Each adapted projection holds its adapters stacked: A [slots, in, r_max] and B [slots, r_max,
out], slot 0 all zeros (the "null" slot of base-model tokens), ranks padded with zeros (exact:
the padded columns contribute nothing) and the LoRA scale folded into B. A step sets one slot id
per token; ``gather_mm`` multiplies each token by its own slot's matrices, so requests for
different adapters and for the base model share one batch and one forward pass.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class LoRABatch:
    """Which slot each of the current step's tokens uses; shared by every LoRA layer.

    ``token_slots`` is None when no token of the step uses an adapter: the layers then cost
    nothing beyond the base projection.
    """

    def __init__(self) -> None:
        self.token_slots: mx.array | None = None  # [T] uint32


class LoRALinear(nn.Module):
    """A base projection (dense or quantized) plus per-token LoRA updates."""

    def __init__(
        self, base: nn.Module, in_features: int, out_features: int, num_slots: int,
        max_rank: int, dtype: mx.Dtype, batch: LoRABatch,
    ) -> None:  # fmt: skip
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        # Leading underscores: device state, not parameters to load or save.
        self._a = mx.zeros((num_slots, in_features, max_rank), dtype)
        self._b = mx.zeros((num_slots, max_rank, out_features), dtype)
        self._batch = batch

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        slots = self._batch.token_slots
        if slots is None:
            return y
        rows = x.reshape(-1, 1, self.in_features)  # [T, 1, in]
        xa = mx.gather_mm(rows, self._a, rhs_indices=slots)  # [T, 1, r]
        delta = mx.gather_mm(xa, self._b, rhs_indices=slots)  # [T, 1, out]
        return y + delta.reshape(y.shape).astype(y.dtype)

    def set_slot(self, slot: int, a: mx.array | None, b: mx.array | None) -> None:
        """Write one adapter into ``slot``: a [in, r], b [r, out] with the scale folded in; None
        clears the slot (the module is not adapted by that adapter)."""
        r_max = self._a.shape[2]
        pad_a = mx.zeros((self.in_features, r_max), self._a.dtype)
        pad_b = mx.zeros((r_max, self.out_features), self._b.dtype)
        if a is not None:
            r = a.shape[1]
            pad_a[:, :r] = a.astype(self._a.dtype)
            pad_b[:r, :] = b.astype(self._b.dtype)
        self._a[slot] = pad_a
        self._b[slot] = pad_b

    @property
    def nbytes(self) -> int:
        return self._a.nbytes + self._b.nbytes
