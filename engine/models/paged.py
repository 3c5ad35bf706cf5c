"""The paged KV cache on the device: one pool of fixed-size blocks per layer, written through a
slot mapping and read through per-sequence block tables.

Which blocks a sequence owns is decided in pure Python (``engine/kv_cache``); this file only
moves keys and values. A step's tokens arrive flattened into one row [1, T]: decode tokens first
(one per sequence), then each prefill chunk. Everything but attention (projections, MLP) runs
on all T tokens at once; attention splits them back by sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from engine.config import ModelConfig
from engine.models.attention import prefill_attention, shape_bucket
from metal_kernels.paged_attention import (
    gather_kv,
    gather_kv_head_major,
    paged_decode_attention,
    paged_decode_attention_head_major,
)


@dataclass(frozen=True, slots=True)
class PrefillSegment:
    """``length`` query tokens starting at flat index ``start``; after them the sequence holds
    ``seq_len`` tokens in the blocks of ``block_table`` [1, n]."""

    start: int
    length: int
    seq_len: int
    block_table: mx.array


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where each of a step's T tokens sits and which keys it may see."""

    positions: mx.array  # [T] int32: each token's position in its sequence
    slot_mapping: mx.array  # [T] int32: pool slot receiving each token's K/V
    num_decodes: int  # tokens 0 .. num_decodes-1 are single-token decodes
    decode_block_tables: mx.array | None  # [num_decodes, n] int32, padded with block 0
    decode_seq_lens: mx.array | None  # [num_decodes] int32
    prefills: tuple[PrefillSegment, ...]
    block_size: int
    # On the CPU: each RoPE's cos and sin at ``positions``, computed by the first layer that
    # rotates (``PagedLayerCache.rotate``), keyed by its config and dtype.
    rope_tables: dict = field(default_factory=dict, compare=False, repr=False)


def plans_attention_per_shape(dtype: mx.Dtype) -> bool:
    """Whether fused attention on this device builds a plan for every new shape: MLX's CUDA
    backend does (cuDNN) in float16 and bfloat16; Metal and the CPU do not."""
    return mx.cuda.is_available() and mx.default_device() == mx.gpu and dtype in _CUDNN_DTYPES


_CUDNN_DTYPES = (mx.float16, mx.bfloat16)


class PagedKVStore:
    """The block pools of every layer: keys and values [num_blocks * block_size, Hkv, D] (slot-
    major, what the GPU kernels read), or with ``head_major`` [Hkv, num_blocks * block_size, D]
    (each KV head's block one contiguous run, so the CPU's decode attention copies whole blocks
    where it would copy rows; CPU only: the engine's choice there, with steps not overlapped).

    Block 0 is the null block: padding slots write there and nothing reads it unmasked.
    ``stable_prefill_shapes`` pads prefill attention to a few shapes (`prefill_attention`);
    None decides by device.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: mx.Dtype,
        stable_prefill_shapes: bool | None = None,
        head_major: bool = False,
    ):
        # head_major makes the CPU's decode ~15% faster at 16 sequences; with steps overlapped
        # (pipelined) a write then sometimes fails to update a pool in place and copies it
        # (125 MiB a layer at the CPU's default budget: first tokens 15-300 ms late), so the
        # engine uses it only with steps not overlapped (engine.engine_core.EngineCore).
        self.head_major = head_major
        slots = num_blocks * block_size
        shape = (
            (cfg.num_kv_heads, slots, cfg.head_dim)
            if head_major
            else (slots, cfg.num_kv_heads, cfg.head_dim)
        )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.dtype = dtype
        if stable_prefill_shapes is None:
            stable_prefill_shapes = plans_attention_per_shape(dtype)
        self.stable_prefill_shapes = stable_prefill_shapes
        self.keys = [mx.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        self.values = [mx.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        mx.eval(self.keys, self.values)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: mx.Dtype) -> int:
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.size

    def layer_caches(self, meta: AttentionMetadata, windows: list[int | None]) -> list:
        return [PagedLayerCache(self, i, meta, w) for i, w in enumerate(windows)]

    def warm_up(self, max_chunk: int, windows: list[int | None]) -> None:
        """Run prefill attention once for every first-chunk shape up to ``max_chunk`` tokens,
        so that plans built per shape (see ``stable_prefill_shapes``) are built now rather than
        during the first requests. MLX keeps those plans per thread: call this on the thread
        that runs the model."""
        if not self.stable_prefill_shapes:
            return
        for length in sorted({shape_bucket(n) for n in range(1, max_chunk + 1)}):
            q = mx.zeros((1, self.num_heads, length, self.head_dim), self.dtype)
            kv = mx.zeros((1, self.num_kv_heads, length, self.head_dim), self.dtype)
            for window in set(windows):
                out = prefill_attention(
                    q, kv, kv, offset=0, window=window, scale=1.0, stable_shapes=True
                )
                mx.eval(out)

    @property
    def state(self) -> list[mx.array]:
        return self.keys + self.values

    def slot_major(self, pool: mx.array) -> mx.array:
        """``pool`` seen as [slots, Hkv, D], whichever layout it has."""
        return pool.transpose(1, 0, 2) if self.head_major else pool

    def write(self, layer: int, slots: mx.array, k: mx.array, v: mx.array) -> None:
        """This step's keys and values [Hkv, T, D] into ``slots`` [T] of the layer's pools.
        Only the store references a pool, so MLX's scatter updates it in place."""
        if self.head_major:
            self.keys[layer][:, slots] = k
            self.values[layer][:, slots] = v
        else:
            self.keys[layer][slots] = k.transpose(1, 0, 2)  # [T, Hkv, D]
            self.values[layer][slots] = v.transpose(1, 0, 2)

    def gather(self, pool: mx.array, block_table: mx.array) -> mx.array:
        """The keys (or values) of the blocks in ``block_table`` [B, n]: [B, Hkv, n * bs, D]."""
        if self.head_major:
            return gather_kv_head_major(pool, block_table, self.block_size)
        return gather_kv(pool, block_table, self.block_size)


class PagedLayerCache:
    """One layer's view of the store for one step (implements ``LayerCache``)."""

    def __init__(self, store: PagedKVStore, layer: int, meta: AttentionMetadata, window):
        self.store, self.layer, self.meta, self.window = store, layer, meta, window

    def rotate(self, rope: nn.Module, x: mx.array) -> mx.array:
        # x: [1, H, T, D] -> per-token rows [T, H, 1, D], each at its own position.
        rows = x.transpose(2, 1, 0, 3)
        if mx.default_device() != mx.cpu:
            return rope(rows, self.meta.positions).transpose(2, 1, 0, 3)
        key = (rope.config, x.dtype)
        if (tables := self.meta.rope_tables.get(key)) is None:
            tables = self.meta.rope_tables[key] = rope.tables(self.meta.positions, x.dtype)
        return rope.rotate(rows, tables).transpose(2, 1, 0, 3)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
        meta, store, i = self.meta, self.store, self.layer
        store.write(i, meta.slot_mapping, k[0], v[0])  # first: a token attends to its own key
        k_pool, v_pool = store.keys[i], store.values[i]
        outs = []
        if meta.num_decodes:
            qd = q[0, :, : meta.num_decodes].transpose(1, 0, 2)[:, :, None, :]  # [Bd, H, 1, D]
            decode = (
                paged_decode_attention_head_major if store.head_major else paged_decode_attention
            )
            out = decode(
                qd,
                k_pool,
                v_pool,
                meta.decode_block_tables,
                meta.decode_seq_lens,
                block_size=meta.block_size,
                window=self.window,
                scale=scale,
            )
            outs.append(out[:, :, 0, :].transpose(1, 0, 2)[None])  # [1, H, Bd, D]
        for seg in meta.prefills:
            span = slice(seg.start, seg.start + seg.length)
            qs = q[:, :, span]  # [1, H, S, D]
            if seg.seq_len == seg.length:
                # A sequence's first chunk sees only its own tokens: this step's k, v as they
                # are, no trip through the pool.
                keys, values = k[:, :, span], v[:, :, span]
            else:
                keys = store.gather(k_pool, seg.block_table)[:, :, : seg.seq_len]
                values = store.gather(v_pool, seg.block_table)[:, :, : seg.seq_len]
            outs.append(
                prefill_attention(
                    qs,
                    keys,
                    values,
                    offset=seg.seq_len - seg.length,
                    window=self.window,
                    scale=scale,
                    stable_shapes=store.stable_prefill_shapes,
                )
            )
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
