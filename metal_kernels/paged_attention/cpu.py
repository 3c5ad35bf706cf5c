"""Paged decode attention on the CPU: plain MLX, shaped for what MLX's CPU ops cost.

The reference gathers each sequence's blocks and calls fused attention. On the CPU, MLX has no
fused attention: ``scaled_dot_product_attention`` expands into a matmul per (sequence, query
head), elementwise passes over every query head's scores, and a matmul per (sequence, query
head) again. A decode query is a single row, so each of those matmuls is a matrix-vector
product paying a whole BLAS call.

Here the query heads that share a KV head are folded into the rows of one matmul ([gqa, D] @
[D, L] per sequence and KV head), so there are ``gqa`` times fewer BLAS calls, and the scale is
applied to the query ([H, D] numbers) rather than to the scores. The keys and values are
gathered row by row (a row: one slot's D numbers for one KV head) straight into [B, Hkv, L, D],
through an index built once per step (with the mask), so BLAS reads them in place. Measured
on a 2-core AMD EPYC with OpenBLAS (SmolLM2-135M shapes: 9 query heads, 3 KV heads, head
size 64; 16 sequences of 176 tokens): 1.1 ms per layer against the reference's 3.0 ms; decode
at 16 sequences went from 81 to 105 tokens/s (docs/architecture.md).

Same contract as the reference, to float32 rounding: rows of sequences of length 0 are zeros,
positions past a sequence's length (and outside its window) are masked.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import mlx.core as mx
import numpy as np

from metal_kernels import cpu_kernels


class _StepIndex(threading.local):
    """What every layer of a decode step reads the same way, built for the first layer only:
    the pool rows each (sequence, KV head, position) gathers, and the mask of visible positions
    (one per attention window).

    Every layer of a step passes the same ``block_tables`` and ``seq_lens`` arrays (MLX arrays
    are immutable, and the references held here keep their ids from being reused). One per
    thread: engines on other threads keep theirs.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.inputs: tuple[mx.array, mx.array] | None = None
        self.rows: mx.array | None = None
        self.masks: dict[tuple[int | None, bool], mx.array | np.ndarray] = {}

    def __call__(
        self, block_tables: mx.array, seq_lens: mx.array, block_size: int, num_kv_heads: int,
        window: int | None, num_blocks: int | None = None, host: bool = False,
    ) -> tuple[mx.array, mx.array | np.ndarray]:  # fmt: skip
        """``num_blocks`` set: the pool is head-major, and the rows are whole blocks. ``host``:
        the mask as a NumPy array."""
        key = (block_size, num_kv_heads, num_blocks)
        same = self.inputs is not None and self.inputs[0] is block_tables
        if not (same and self.inputs[1] is seq_lens and self.key == key):
            heads = mx.arange(num_kv_heads)[None, :, None]
            if num_blocks is not None:
                # [B, Hkv, n]: row (kv * num_blocks + block) of the pool seen as
                # [Hkv * num_blocks, block_size * D]
                self.rows = heads * num_blocks + block_tables[:, None, :]
            else:
                n = block_tables.shape[1]
                pos = mx.arange(n * block_size)
                slots = block_tables[:, pos // block_size] * block_size + (pos % block_size)
                # [B, Hkv, L]: row (slot * Hkv + kv) of the pool seen as [slots * Hkv, D]
                self.rows = slots[:, None, :] * num_kv_heads + heads
            self.inputs, self.key, self.masks = (block_tables, seq_lens), key, {}
        if (window, host) not in self.masks:
            width = block_tables.shape[1] * block_size
            xp = np if host else mx  # NumPy for a softmax taken in NumPy (see ``_attend``)
            k_pos = xp.arange(width)[None, :]  # [1, L]
            lens = (np.asarray(seq_lens) if host else seq_lens)[:, None]  # [B, 1]
            visible = k_pos < lens
            if window is not None:
                visible = visible & (k_pos >= lens - window)
            self.masks[window, host] = visible[:, None, None, :]  # [B, 1, 1, L]
        return self.rows, self.masks[window, host]


_step_index = _StepIndex()


def paged_decode_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    seq_lens: mx.array,
    *,
    block_size: int,
    window: int | None,
    scale: float,
) -> mx.array:
    """q [B, H, 1, D]; pools [slots, Hkv, D]; tables [B, n]; seq_lens [B] -> [B, H, 1, D]."""
    D = q.shape[3]
    Hkv = k_pool.shape[1]
    host = _softmax_on_host(q)
    rows, visible = _step_index(block_tables, seq_lens, block_size, Hkv, window, None, host)
    # One gather of whole rows lays each (sequence, KV head)'s keys out as a contiguous [L, D]
    # matrix, which BLAS reads transposed as it is: no second, strided copy.
    keys = k_pool.reshape(-1, D)[rows]  # [B, Hkv, L, D]
    values = v_pool.reshape(-1, D)[rows]
    return _attend(q, keys, values, visible, seq_lens, scale)


def paged_decode_attention_head_major(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    seq_lens: mx.array,
    *,
    block_size: int,
    window: int | None,
    scale: float,
) -> mx.array:
    """The same, from pools laid out head-major, [Hkv, slots, D] (the CPU's layout: see
    ``PagedKVStore``). A block of one KV head is then block_size x D contiguous numbers, and the
    gather copies whole blocks straight into [B, Hkv, L, D]: block_size times fewer, larger
    copies than row by row (each a memcpy call in MLX's gather; at 16 sequences of ~140 tokens
    the rows' 147k copies a step were a quarter of the step's stream thread time)."""
    kernel = decode_kernel()
    if kernel is not None and q.dtype == k_pool.dtype == v_pool.dtype == mx.float32:
        out = decode_in_place(
            kernel, q, k_pool, v_pool, block_tables, seq_lens,
            block_size=block_size, window=window, scale=scale,
        )  # fmt: skip
        if out is not None:
            return out
    B, D = q.shape[0], q.shape[3]
    Hkv, num_slots, _ = k_pool.shape
    num_blocks = num_slots // block_size
    host = _softmax_on_host(q)
    rows, visible = _step_index(block_tables, seq_lens, block_size, Hkv, window, num_blocks, host)
    blocks, width = (Hkv * num_blocks, block_size * D), block_tables.shape[1] * block_size
    keys = k_pool.reshape(blocks)[rows].reshape(B, Hkv, width, D)
    values = v_pool.reshape(blocks)[rows].reshape(B, Hkv, width, D)
    return _attend(q, keys, values, visible, seq_lens, scale)


@functools.cache
def decode_kernel() -> Any | None:
    """The CPU kernels library's paged decode attention (``metal_kernels.cpu_kernels``, preloaded
    by the CLI), or None where this process has not got it."""
    return cpu_kernels.function("candlewick_paged_decode", cpu_kernels.PAGED_DECODE)


def decode_in_place(
    kernel: Any, q: mx.array, k_pool: mx.array, v_pool: mx.array, block_tables: mx.array,
    seq_lens: mx.array, *, block_size: int, window: int | None, scale: float,
) -> mx.array | None:  # fmt: skip
    """``paged_decode_attention_head_major`` by the library's kernel: each (sequence, KV head)
    reads its keys and values block by block where they lie in the pools, its query heads
    sharing each row read, with the softmax in between; no gathered copy, one call a layer.
    The step waits for the layer's queries and pools here (the NumPy softmax it replaces
    waited for the scores). None where the pools are not plain C-ordered arrays."""
    B, H, _, D = q.shape
    Hkv, num_slots, _ = k_pool.shape
    mx.eval(q, k_pool, v_pool, block_tables, seq_lens)
    keys, values = np.asarray(k_pool), np.asarray(v_pool)  # the pools' own memory: no copy
    if not (keys.flags.c_contiguous and values.flags.c_contiguous):
        return None
    queries = np.ascontiguousarray(np.asarray(q).reshape(B, H, D))
    tables = np.ascontiguousarray(np.asarray(block_tables), dtype=np.int32)
    lens = np.ascontiguousarray(np.asarray(seq_lens), dtype=np.int32)
    out = np.empty((B, H, D), np.float32)
    kernel(
        queries.ctypes.data, keys.ctypes.data, values.ctypes.data, num_slots,
        tables.ctypes.data, tables.shape[1], lens.ctypes.data, B, H, Hkv, D, block_size,
        window or 0, scale, out.ctypes.data,
    )  # fmt: skip
    return mx.array(out).reshape(B, H, 1, D)


def _attend(
    q: mx.array, keys: mx.array, values: mx.array, visible: mx.array | np.ndarray,
    seq_lens: mx.array, scale: float,
) -> mx.array:  # fmt: skip
    """q [B, H, 1, D] against keys and values [B, Hkv, L, D], positions ``visible``."""
    B, H, _, D = q.shape
    Hkv = keys.shape[1]
    # Query heads h = kv * gqa + g share KV head kv: fold them into the rows of one product.
    folded = (q * mx.array(scale, q.dtype)).reshape(B, Hkv, H // Hkv, D)
    scores = folded @ keys.swapaxes(-1, -2)  # [B, Hkv, gqa, L]
    if isinstance(visible, np.ndarray):
        probs = mx.array(numpy_masked_softmax(scores, visible))
    else:
        scores = mx.where(visible, scores, mx.array(-mx.inf, scores.dtype))
        probs = mx.softmax(scores, axis=-1, precise=True)
    out = (probs @ values).reshape(B, H, 1, D)
    # A row with nothing visible is all -inf: its softmax is NaN, and its output zeros.
    empty = (seq_lens <= 0)[:, None, None, None]
    return mx.where(empty, mx.zeros_like(out), out)


def _softmax_on_host(q: mx.array) -> bool:
    """float32 takes its softmax in NumPy: MLX's CPU ``exp`` is a scalar loop (~16 ns an
    element here), NumPy's vectorized (~3 ns). At 16 sequences of ~140 tokens MLX's softmax and
    mask took ~0.3 ms a layer. The step waits for each layer's scores (the CPU's ``async_eval``
    nearly does anyway), as the prefill path's NumPy softmax does."""
    return q.dtype == mx.float32


def numpy_masked_softmax(scores: mx.array, visible: np.ndarray) -> np.ndarray:
    """The softmax of ``scores`` over its last axis where ``visible`` (a bool array that
    broadcasts to it), in float32 NumPy: the scores are evaluated here and read in place. A
    row with nothing visible comes out NaN, as MLX's does. Serving's prefill attention and the
    BERT encoder take theirs here too (``engine.models.attention.cpu_attention``)."""
    mx.eval(scores)
    probs = np.where(visible, np.asarray(scores), np.float32(-np.inf))
    with np.errstate(invalid="ignore"):
        probs -= probs.max(axis=-1, keepdims=True)
        np.exp(probs, out=probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs
