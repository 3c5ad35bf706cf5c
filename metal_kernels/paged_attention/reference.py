"""The plain-MLX reference for paged decode attention, and random cases to check kernels with.

The reference *is* the engine's gather path (``engine.models.attention.paged_decode_attention``):
one source of truth for what the kernels must compute. This module only adds the one thing the
engine never needs but a kernel contract must define: a sequence of length 0 attends to nothing,
and its output is zeros (the gather path would average the padding instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.models.attention import paged_decode_attention as _gather_paged_decode_attention


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
    """The engine's gather-and-mask attention, with rows of length-0 sequences set to zero.

    q: [B, H, 1, D]; k_pool, v_pool: [num_blocks * block_size, Hkv, D]; block_tables: [B, n]
    int32; seq_lens: [B] int32 -> [B, H, 1, D] in q's dtype.
    """
    out = _gather_paged_decode_attention(
        q,
        k_pool,
        v_pool,
        block_tables,
        seq_lens,
        block_size=block_size,
        window=window,
        scale=scale,
    )
    empty = (seq_lens <= 0)[:, None, None, None]  # [B, 1, 1, 1]
    return mx.where(empty, mx.zeros_like(out), out)


@dataclass(frozen=True, slots=True)
class PagedCase:
    """One random decode step: the arguments of ``paged_decode_attention``, ready to splat."""

    q: mx.array  # [B, H, 1, D]
    k_pool: mx.array  # [num_blocks * block_size, Hkv, D]
    v_pool: mx.array
    block_tables: mx.array  # [B, n] int32, padded with block 0
    seq_lens: mx.array  # [B] int32
    block_size: int
    window: int | None
    scale: float

    def args(self) -> tuple[mx.array, ...]:
        return (self.q, self.k_pool, self.v_pool, self.block_tables, self.seq_lens)

    def kwargs(self) -> dict:
        return {"block_size": self.block_size, "window": self.window, "scale": self.scale}

    def describe(self) -> str:
        B, H, _, D = self.q.shape
        Hkv = self.k_pool.shape[1]
        return (
            f"{self.q.dtype} B={B} H={H} Hkv={Hkv} D={D} block={self.block_size} "
            f"window={self.window} lens={self.seq_lens.tolist()} n={self.block_tables.shape[1]}"
        )


def random_case(
    seq_lens: list[int],
    *,
    num_kv_heads: int,
    gqa: int,
    head_dim: int,
    block_size: int,
    dtype: mx.Dtype,
    window: int | None = None,
    extra_blocks: int = 1,
    seed: int = 0,
) -> PagedCase:
    """A pool whose blocks are handed out in shuffled order, like a long-running block pool.

    Each sequence owns ceil(len / block_size) distinct blocks (never block 0, the null block);
    its table is padded with 0 to the widest sequence plus ``extra_blocks``, so kernels that
    read past a sequence's length read real-looking garbage, not zeros. Block 0 holds large
    values for the same reason.
    """
    rng = np.random.default_rng(seed)
    owned = [-(-max(n, 0) // block_size) for n in seq_lens]
    width = max([*owned, 0]) + extra_blocks
    num_blocks = 1 + sum(owned) + 2  # the null block, the owned blocks, two never used
    ids = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((len(seq_lens), width), np.int32)
    start = 0
    for i, k in enumerate(owned):
        tables[i, :k] = ids[start : start + k]
        start += k
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_pool = rng.standard_normal(shape, np.float32)
    v_pool = rng.standard_normal(shape, np.float32)
    k_pool[:block_size] = 50.0  # null block: loud if anyone attends to it
    v_pool[:block_size] = 50.0
    q = rng.standard_normal((len(seq_lens), num_kv_heads * gqa, 1, head_dim), np.float32)
    return PagedCase(
        q=mx.array(q).astype(dtype),
        k_pool=mx.array(k_pool).astype(dtype),
        v_pool=mx.array(v_pool).astype(dtype),
        block_tables=mx.array(tables),
        seq_lens=mx.array(np.asarray(seq_lens, np.int32)),
        block_size=block_size,
        window=window,
        scale=head_dim**-0.5,
    )
