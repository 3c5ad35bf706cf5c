"""The plain-MLX reference for paged decode attention, and random cases to check kernels with.

The reference gathers each sequence's blocks out of the pool and runs fused attention under a
mask: what the kernels must compute, and what the engine runs where no kernel applies (the CPU).
A sequence of length 0 attends to nothing, and its output is zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


def gather_kv(pool: mx.array, block_table: mx.array, block_size: int) -> mx.array:
    """The keys (or values) of the blocks in ``block_table``, in order.

    pool: [num_blocks * block_size, Hkv, D]; block_table: [B, n] -> [B, Hkv, n * block_size, D].
    """
    num_slots, heads, dim = pool.shape
    blocks = pool.reshape(num_slots // block_size, block_size, heads, dim)[block_table]
    B, n = block_table.shape
    return blocks.reshape(B, n * block_size, heads, dim).transpose(0, 2, 1, 3)


def gather_kv_head_major(pool: mx.array, block_table: mx.array, block_size: int) -> mx.array:
    """``gather_kv`` from a head-major pool: [Hkv, num_blocks * block_size, D] -> [B, Hkv,
    n * block_size, D]."""
    heads, num_slots, dim = pool.shape
    blocks = pool.reshape(heads, num_slots // block_size, block_size, dim)[:, block_table]
    B, n = block_table.shape
    return blocks.reshape(heads, B, n * block_size, dim).transpose(1, 0, 2, 3)


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
    """One new query per sequence against its cached context, read through its block table:
    gather each sequence's blocks, mask what lies past its length (or outside the window), fused
    attention; rows of length-0 sequences are zero.

    q: [B, H, 1, D]; k_pool, v_pool: [num_blocks * block_size, Hkv, D]; block_tables: [B, n]
    int32, padded with the null block 0; seq_lens: [B] int32 context lengths including the new
    token -> [B, H, 1, D] in q's dtype.
    """
    keys = gather_kv(k_pool, block_tables, block_size)
    values = gather_kv(v_pool, block_tables, block_size)
    k_pos = mx.arange(keys.shape[2])[None, :]  # [1, L]
    lens = seq_lens[:, None]  # [B, 1]
    visible = k_pos < lens
    if window is not None:
        visible = visible & (k_pos >= lens - window)
    mask = visible[:, None, None, :]  # [B, 1, 1, L]
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
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
