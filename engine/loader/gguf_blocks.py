"""llama.cpp's 5-bit and K-quant blocks taken apart: unsigned codes in element order, plus the
block constants, so that every weight is `scale * code + bias` for one scale and bias per group.

Layouts (bytes, little-endian; "sub-block" = the elements sharing one scale):

- Q5_0 (22 B / 32): f16 d, u32 qh, 16 B qs. Element i < 16: low nibble of qs[i], element i + 16:
  its high nibble; bit i of qh is element i's fifth bit. w = d * (code - 16).
- Q5_1 (24 B / 32): f16 d, f16 m, u32 qh, 16 B qs as Q5_0. w = d * code + m.
- Q4_K (144 B / 256): f16 d, f16 dmin, 12 B of 6-bit (sc, m) pairs for 8 sub-blocks of 32, 128 B
  qs: byte i of chunk j (32 B) holds element i of sub-block 2j (low nibble) and 2j+1 (high).
  w = d*sc * code - dmin*m.
- Q5_K (176 B / 256): f16 d, f16 dmin, 12 B scales as Q4_K, 32 B qh (bit s of byte i is the fifth
  bit of element i of sub-block s), 128 B qs as Q4_K. w = d*sc * code - dmin*m.
- Q6_K (210 B / 256): 128 B ql, 64 B qh, 16 x int8 sc, f16 d; 16 sub-blocks of 16.
  w = d*sc * (code - 32).
- Q3_K (110 B / 256): 32 B hmask, 64 B qs (2 low bits), 12 B of 6-bit sc stored +32, f16 d;
  16 sub-blocks of 16. code = low bits + 4 * hmask bit; w = d*(sc-32) * (code - 4).
- Q2_K (84 B / 256): 16 B of (sc | m << 4), 64 B qs, f16 d, f16 dmin; 16 sub-blocks of 16.
  w = d*sc * code - dmin*m.

The bit shuffles follow gguf-py's `gguf.quants` (which mirrors llama.cpp's `dequantize_row_*`);
tests compare every type against it. Every function takes uint8 `[..., rows, blocks, block_bytes]`
and returns codes `[..., rows, blocks * block_elements]` (uint8) and per-block constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

QK_K = 256


@dataclass(frozen=True, slots=True)
class Groups32:
    """Codes in element order with a float32 scale and bias per 32 elements (both exact)."""

    codes: np.ndarray  # uint8 [..., rows, cols] (uint32 words once packed)
    scales: np.ndarray  # float32 [..., rows, cols/32]
    biases: np.ndarray  # float32 [..., rows, cols/32]


@dataclass(frozen=True, slots=True)
class SubBlocks16:
    """Codes in element order with the K-quant constants as the file has them: per 16-element
    sub-block one small integer (and a second one, the min, for Q2_K, packed into the same byte),
    per 256-element super-block an f16 `d` (and `dmin`)."""

    codes: np.ndarray  # uint8 [..., rows, cols] (uint32 words once packed)
    sub_scales: np.ndarray  # int8 (Q6_K, Q3_K: the signed scale) or uint8 (Q2_K: sc | m << 4)
    d: np.ndarray  # float16 [..., rows, cols/256]
    dmin: np.ndarray | None  # float16 [..., rows, cols/256], Q2_K only


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian f16 at byte `offset` of every block: float16 [..., rows, blocks]."""
    return np.ascontiguousarray(blocks[..., offset : offset + 2]).view("<f2")[..., 0]


def _rows(x: np.ndarray) -> np.ndarray:
    """[..., rows, blocks, per_block] -> [..., rows, blocks * per_block]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def _bits(x: np.ndarray, shifts: list[int], mask: int) -> np.ndarray:
    """[..., n] -> [..., len(shifts), n]: (x >> s) & mask for each shift."""
    s = np.array(shifts, dtype=x.dtype).reshape(len(shifts), 1)
    return (x[..., None, :] >> s) & x.dtype.type(mask)


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: qh uint8 [..., 4] (a u32), qs [..., 16] -> codes [..., 32]."""
    low = _bits(qs, [0, 4], 0x0F).reshape(*qs.shape[:-1], 32)
    high = _bits(qh, list(range(8)), 1)  # [..., 8, 4]: bit b of byte k is element 8k + b
    high = np.swapaxes(high, -1, -2).reshape(*qh.shape[:-1], 32)
    return low | (high << np.uint8(4))


def q5_0(blocks: np.ndarray) -> Groups32:
    d = _f16(blocks, 0).astype(np.float32)
    codes = _q5_codes(blocks[..., 2:6], blocks[..., 6:22])
    return Groups32(_rows(codes), d, -16.0 * d)


def q5_1(blocks: np.ndarray) -> Groups32:
    d = _f16(blocks, 0).astype(np.float32)
    m = _f16(blocks, 2).astype(np.float32)
    codes = _q5_codes(blocks[..., 4:8], blocks[..., 8:24])
    return Groups32(_rows(codes), d, m)


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 6-bit (sc, m) for 8 sub-blocks, uint8 [..., 8] each."""
    d, m, m_d = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_groups(blocks: np.ndarray, codes: np.ndarray) -> Groups32:
    """Q4_K/Q5_K: scale d*sc and bias -dmin*m per sub-block of 32 (exact in float32: an f16 has 11
    significant bits and sc, m have 6)."""
    d = _f16(blocks, 0).astype(np.float32)[..., None]  # [..., rows, blocks, 1]
    dmin = _f16(blocks, 2).astype(np.float32)[..., None]
    sc, mn = _k_scale_min(blocks[..., 4:16])  # [..., rows, blocks, 8]
    scales = d * sc.astype(np.float32)
    biases = -(dmin * mn.astype(np.float32))
    return Groups32(_rows(codes), _rows(scales), _rows(biases))


def q4_k(blocks: np.ndarray) -> Groups32:
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    codes = _bits(qs, [0, 4], 0x0F)  # [..., 4, 2, 32]: sub-block 2j, then 2j+1
    return _k_groups(blocks, codes.reshape(*blocks.shape[:-1], QK_K))


def q5_k(blocks: np.ndarray) -> Groups32:
    qh = blocks[..., 16:48]  # [..., 32]
    qs = blocks[..., 48:176].reshape(*blocks.shape[:-1], 4, 32)
    low = _bits(qs, [0, 4], 0x0F).reshape(*blocks.shape[:-1], 8, 32)
    high = _bits(qh, list(range(8)), 1)  # [..., 8, 32]: sub-block s, element i
    return _k_groups(blocks, (low | (high << np.uint8(4))).reshape(*blocks.shape[:-1], QK_K))


def q6_k(blocks: np.ndarray) -> SubBlocks16:
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 64)
    qh = blocks[..., 128:192].reshape(*lead, 2, 32)
    low = _bits(ql, [0, 4], 0x0F).reshape(*lead, 8, 32)
    high = _bits(qh, [0, 2, 4, 6], 0x03).reshape(*lead, 8, 32)
    codes = (low | (high << np.uint8(4))).reshape(*lead, QK_K)
    sub_scales = blocks[..., 192:208].view(np.int8)
    return SubBlocks16(_rows(codes), _rows(sub_scales), _f16(blocks, 208), None)


def q3_k(blocks: np.ndarray) -> SubBlocks16:
    lead = blocks.shape[:-1]
    hmask = blocks[..., 0:32]
    qs = blocks[..., 32:96].reshape(*lead, 2, 32)
    low = _bits(qs, [0, 2, 4, 6], 0x03).reshape(*lead, QK_K)
    high = _bits(hmask, list(range(8)), 1).reshape(*lead, QK_K)
    codes = low | (high << np.uint8(2))  # the hmask bit set means +4 (q = code - 4)
    packed = blocks[..., 96:108]
    lo = _bits(packed[..., 0:8], [0, 4], 0x0F).reshape(*lead, 16)
    hi = _bits(packed[..., 8:12], [0, 2, 4, 6], 0x03).reshape(*lead, 16)
    sub_scales = ((lo | (hi << np.uint8(4))).astype(np.int16) - 32).astype(np.int8)
    return SubBlocks16(_rows(codes), _rows(sub_scales), _f16(blocks, 108), None)


def q2_k(blocks: np.ndarray) -> SubBlocks16:
    lead = blocks.shape[:-1]
    qs = blocks[..., 16:80].reshape(*lead, 2, 32)
    codes = _bits(qs, [0, 2, 4, 6], 0x03).reshape(*lead, QK_K)
    sub_scales = blocks[..., 0:16]  # low nibble sc, high nibble m, kept packed
    return SubBlocks16(_rows(codes), _rows(sub_scales), _f16(blocks, 80), _f16(blocks, 82))


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., cols] -> MLX's packing, uint32 [..., cols * bits / 32].

    MLX reads each row as one little-endian bit stream, element j at bits [j*bits, (j+1)*bits)
    (codes of 3, 5 or 6 bits straddle words). A run of 8/g codes fills exactly bits/g bytes
    (g = gcd(bits, 8)), so each run is assembled in the smallest unsigned integer that holds it
    (a byte at 2, 4 and 8 bits, 32 bits at 3 and 6, 64 at 5) and its low bytes are kept.
    """
    *lead, cols = codes.shape
    assert cols % 32 == 0, cols
    g = math.gcd(bits, 8)
    run_codes, run_bytes = 8 // g, bits // g
    acc = np.dtype("u1" if run_bytes == 1 else "<u4" if run_bytes <= 4 else "<u8")
    runs = codes.reshape(*lead, cols // run_codes, run_codes)
    word = runs[..., 0].astype(acc)
    for e in range(1, run_codes):
        word |= runs[..., e].astype(acc) << acc.type(e * bits)
    row_bytes = word[..., None].view(np.uint8)[..., :run_bytes]  # [..., runs, run_bytes]
    return np.ascontiguousarray(row_bytes).reshape(*lead, cols * bits // 8).view("<u4")
