"""GGUF tensors as MLX arrays, with llama.cpp's quantized blocks kept quantized.

Q8_0, Q4_0 and Q4_1 blocks are 32 elements sharing one f16 scale (and, for Q4_1, an f16 minimum):
exactly MLX's affine quantization `w = scale * q + bias` with unsigned `q` and group size 32. So
instead of dequantizing a GGUF file (four to eight times the memory, and a different model than the
one the user chose), each block is re-encoded bit for bit: the integers are re-packed into MLX's
layout and the block constants become `scales` / `biases`. The result feeds `mx.quantized_matmul`
directly, and dequantizing it in float32 reproduces llama.cpp's dequantization exactly.

Q5_0 and Q5_1 are the same with 5-bit codes. Q4_K and Q5_K hold 32-element sub-blocks too, with a
6-bit scale and min under an f16 super-block `d`/`dmin`: the group's scale `d*sc` and bias
`-dmin*m` have up to 17 significant bits, exact in float32 but (in these files) in float16 for
only ~7% of groups and in bfloat16 for ~1%, so their scales and biases are always float32,
whatever `dtype` is asked for. Q6_K, Q3_K and Q2_K have 16-element sub-blocks, which MLX's affine
groups (32, 64, 128) cannot hold: they become `SubBlockQuantized`, served by the layers of
`engine.models.quantized` (see there). Block layouts: `engine.loader.gguf_blocks`.

MLX's packing, found with `mx.quantize` / `mx.dequantize` on known data: element `j` of a row
lives in uint32 word `j * bits // 32`, at bit `(j * bits) % 32` (the first element in the least
significant bits). On a little-endian host that means 8-bit codes are the row's bytes in order,
and 4-bit codes pair elements (2k, 2k+1) into byte k, low nibble first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import gguf
import mlx.core as mx
import numpy as np

from engine.loader import gguf_blocks
from engine.loader.gguf_reader import GGUFTensor
from engine.models.quantized import FORMATS, SubBlockFormat, dequantize_sub_blocks

_T = gguf.GGMLQuantizationType
GROUP_SIZE = 32
SUPPORTED_TYPES = (
    *(_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1),
    *(_T.Q4_K, _T.Q5_K, _T.Q6_K, _T.Q3_K, _T.Q2_K),
)
_LITTLE_U32 = np.dtype("<u4")


class UnsupportedTensorType(ValueError):
    """A tensor whose GGML type has no exact MLX encoding here (IQ-quants, ternary, ...).

    `file` and `others` (further (tensor, type) pairs of the same file) are given when a whole
    file is checked before loading, so one message reports every problem.
    """

    def __init__(
        self,
        tensor_name: str,
        type_name: str,
        file: str | None = None,
        others: Sequence[tuple[str, str]] = (),
    ) -> None:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        where = f"{file}: " if file else ""
        more = ""
        if others:
            listed = ", ".join(f"{name!r} ({kind})" for name, kind in others[:4])
            more = f"; so do {len(others)} more: {listed}" + (", ..." if len(others) > 4 else "")
        super().__init__(
            f"{where}tensor {tensor_name!r} has type {type_name}, which candlewick cannot load yet"
            f"{more} (supported: {supported}; IQ and ternary types have no exact MLX encoding: "
            "use a K-quant, Q8_0 or F16 file of the model)"
        )
        self.tensor_name = tensor_name
        self.type_name = type_name
        self.file = file
        self.others = tuple(others)


def check_types(file: str, tensors: Sequence[GGUFTensor]) -> None:
    """Raise `UnsupportedTensorType` naming every tensor of an unsupported type, if any."""
    bad = [(t.name, t.tensor_type.name) for t in tensors if t.tensor_type not in SUPPORTED_TYPES]
    if bad:
        (name, kind), *others = bad
        raise UnsupportedTensorType(name, kind, file=file, others=others)


@dataclass(frozen=True, slots=True)
class AffineQuantized:
    """A weight in MLX's affine layout: w[r, c] = scales[r, c//g] * q[r, c] + biases[r, c//g].

    Rows are output features (HF orientation), so `mx.quantized_matmul(x, ..., transpose=True)`
    computes `x @ W.T`. Leading axes (stacked experts) are allowed; "rows" is always axis -2.
    """

    weight: mx.array  # uint32 [rows, cols*bits/32]
    scales: mx.array  # [rows, cols/group_size]
    biases: mx.array  # [rows, cols/group_size]
    bits: int
    group_size: int = GROUP_SIZE

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape: [rows, cols]."""
        *lead, packed = self.weight.shape
        return (*lead, packed * 32 // self.bits)

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype of scales, biases and `dequantize()`'s result."""
        return self.scales.dtype

    def dequantize(self) -> mx.array:
        """Dense weight in the scales' dtype, computed in float32 and rounded once.

        MLX's own dequantize rounds `scale * q` in the scales' dtype before adding the bias; with
        float16 scales and Q8_0's offset of 128 that double rounding errs by up to d/8 on weights
        near zero. Computing in float32 instead gives llama.cpp's value exactly (d is an f16 and q
        has at most 8 bits, so `d * q` is exact in float32), then rounds it once to the dtype.
        """
        dense = mx.dequantize(
            self.weight,
            self.scales.astype(mx.float32),
            self.biases.astype(mx.float32),
            group_size=self.group_size,
            bits=self.bits,
        )  # float32 [rows, cols]
        return dense.astype(self.scales.dtype)

    def take_rows(self, index: np.ndarray | mx.array) -> AffineQuantized:
        """Select or permute rows (output features); exact, since every row owns its groups.

        Used to undo llama.cpp's Q/K head permutation and to look up embedding rows.
        """
        index = mx.array(index) if isinstance(index, np.ndarray) else index
        return AffineQuantized(
            weight=mx.take(self.weight, index, axis=-2),
            scales=mx.take(self.scales, index, axis=-2),
            biases=mx.take(self.biases, index, axis=-2),
            bits=self.bits,
            group_size=self.group_size,
        )


@dataclass(frozen=True, slots=True)
class SubBlockQuantized:
    """A weight in 16-element sub-blocks (Q6_K, Q3_K, Q2_K), as compact as the file: the codes
    in MLX's packing, the per-sub-block integer scales and the f16 super-block constants.
    `engine.models.quantized` defines the numbers and the layers that compute with them."""

    weight: mx.array  # uint32 [rows, cols*bits/32]
    scales: mx.array  # int8 (Q6_K, Q3_K) or uint8 (Q2_K: sc | m << 4) [rows, cols/16]
    d: mx.array  # float16 [rows, cols/256]
    dmin: mx.array | None  # float16 [rows, cols/256], Q2_K only
    fmt: SubBlockFormat

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, packed = self.weight.shape
        return (*lead, packed * 32 // self.fmt.bits)

    @property
    def dtype(self) -> mx.Dtype:
        return mx.float32

    def dequantize(self) -> mx.array:
        """The exact dense weight, float32."""
        return dequantize_sub_blocks(self.fmt, self.weight, self.scales, self.d, self.dmin)

    def take_rows(self, index: np.ndarray | mx.array) -> SubBlockQuantized:
        index = mx.array(index) if isinstance(index, np.ndarray) else index
        dmin = None if self.dmin is None else mx.take(self.dmin, index, axis=-2)
        return SubBlockQuantized(
            weight=mx.take(self.weight, index, axis=-2),
            scales=mx.take(self.scales, index, axis=-2),
            d=mx.take(self.d, index, axis=-2),
            dmin=dmin,
            fmt=self.fmt,
        )

    def arrays(self) -> dict[str, mx.array]:
        """The layer parameters, by name."""
        named = {"weight": self.weight, "scales": self.scales, "d": self.d}
        return named if self.dmin is None else {**named, "dmin": self.dmin}


Quantized = AffineQuantized | SubBlockQuantized


def dense(t: mx.array | Quantized) -> mx.array:
    """The tensor as a plain array, dequantizing if needed (norms, embeddings on lookup, tests)."""
    return t.dequantize() if isinstance(t, (AffineQuantized, SubBlockQuantized)) else t


def tensor_to_mlx(tensor: gguf.ReaderTensor | GGUFTensor, dtype: mx.Dtype) -> mx.array | Quantized:
    """One GGUF tensor in PyTorch/HF orientation ([out_features, in_features] for a linear).

    GGUF lists dimensions innermost first (ne0 = in_features), and `GGUFReader` already exposes
    `tensor.data` reversed, row-major: [rows, cols] for dense types and [rows, bytes per row] for
    block types. So no transpose is needed; quantized blocks only need re-packing.

    Float tensors become dense `dtype`; Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 become `AffineQuantized` with
    scales and biases in `dtype` (float32 and float16 hold the f16 block constants exactly,
    bfloat16 rounds them to 8 significant bits; a float16 bias of -128*d overflows only for
    weights past 65504, which float16 cannot hold anyway); Q4_K/Q5_K `AffineQuantized` with
    float32 scales and biases; Q6_K/Q3_K/Q2_K `SubBlockQuantized`. 1-D tensors (norms, biases)
    are always dense.
    """
    kind = tensor.tensor_type
    data = np.asarray(tensor.data)
    if kind in (_T.F32, _T.F16):
        return mx.array(data).astype(dtype)
    if kind == _T.BF16:
        bits = np.ascontiguousarray(data).view(np.uint16)  # [rows, cols]
        return mx.view(mx.array(bits), mx.bfloat16).astype(dtype)
    convert = _BLOCK_CONVERTERS.get(kind)
    if convert is None:
        raise UnsupportedTensorType(tensor.name, kind.name)
    if data.ndim == 1:
        return convert(data[None], dtype).dequantize()[0].astype(dtype)
    return convert(data, dtype)


def _split_blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    """[..., rows, row_bytes] uint8 -> [..., rows, blocks, block_bytes] (a view, no copy)."""
    *lead, row_bytes = data.shape
    assert row_bytes % block_bytes == 0, (row_bytes, block_bytes)
    return data.reshape(*lead, row_bytes // block_bytes, block_bytes)


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian f16 at byte `offset` of every block, as float32 [..., rows, blocks]."""
    raw = np.ascontiguousarray(blocks[..., offset : offset + 2])
    return raw.view("<f2")[..., 0].astype(np.float32)


def _pack_rows(codes: np.ndarray) -> mx.array:
    """Packed code bytes [..., rows, blocks, bytes] -> uint32 [..., rows, row_bytes/4]."""
    *lead, blocks, nbytes = codes.shape
    row_bytes = np.ascontiguousarray(codes).reshape(*lead, blocks * nbytes)
    return mx.array(row_bytes.view(_LITTLE_U32))


def _repack_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGML's 4-bit order -> MLX's, per block of 16 bytes.

    GGML: byte i holds element i (low nibble) and element i+16 (high nibble).
    MLX:  byte k holds element 2k (low nibble) and element 2k+1 (high nibble).
    """
    even, odd = qs[..., 0::2], qs[..., 1::2]  # [..., blocks, 8] each
    first_half = (even & 0x0F) | (odd << 4)  # elements 0..15
    second_half = (even >> 4) | (odd & 0xF0)  # elements 16..31
    return np.concatenate([first_half, second_half], axis=-1)  # [..., blocks, 16]


def _q8_0(data: np.ndarray, dtype: mx.Dtype) -> AffineQuantized:
    """Block: f16 d, 32 x int8 q; x = d*q = d*(q+128) - 128*d."""
    blocks = _split_blocks(data, 34)
    d = _f16_field(blocks, 0)  # [..., rows, blocks]
    codes = blocks[..., 2:] ^ np.uint8(0x80)  # int8 q + 128 as uint8, [..., rows, blocks, 32]
    return AffineQuantized(
        weight=_pack_rows(codes),
        scales=mx.array(d).astype(dtype),
        biases=mx.array(-128.0 * d).astype(dtype),
        bits=8,
    )


def _q4_0(data: np.ndarray, dtype: mx.Dtype) -> AffineQuantized:
    """Block: f16 d, 16 bytes of nibbles q; x = d*(q-8) = d*q - 8*d."""
    blocks = _split_blocks(data, 18)
    d = _f16_field(blocks, 0)  # [..., rows, blocks]
    return AffineQuantized(
        weight=_pack_rows(_repack_nibbles(blocks[..., 2:])),
        scales=mx.array(d).astype(dtype),
        biases=mx.array(-8.0 * d).astype(dtype),
        bits=4,
    )


def _q4_1(data: np.ndarray, dtype: mx.Dtype) -> AffineQuantized:
    """Block: f16 d, f16 m, 16 bytes of nibbles q; x = d*q + m."""
    blocks = _split_blocks(data, 20)
    d = _f16_field(blocks, 0)  # [..., rows, blocks]
    m = _f16_field(blocks, 2)  # [..., rows, blocks]
    return AffineQuantized(
        weight=_pack_rows(_repack_nibbles(blocks[..., 4:])),
        scales=mx.array(d).astype(dtype),
        biases=mx.array(m).astype(dtype),
        bits=4,
    )


CHUNK_BYTES = 1 << 22  # file bytes unpacked at once: bounds the temporaries (~16 B per weight)


def _unpack_rows(data: np.ndarray, block_bytes: int, unpack, bits: int):
    """`unpack` (a `gguf_blocks` function) over chunks of rows, with the codes packed for MLX:
    the same dataclass, `codes` holding uint32 words; every field keeps data's leading shape."""
    *lead, row_bytes = data.shape
    rows = data.reshape(-1, row_bytes)
    step = max(1, CHUNK_BYTES // row_bytes)
    chunks = []
    for start in range(0, rows.shape[0], step):
        unpacked = unpack(_split_blocks(rows[start : start + step], block_bytes))
        chunks.append(replace(unpacked, codes=gguf_blocks.pack_codes(unpacked.codes, bits)))
    joined = {
        f.name: None
        if getattr(chunks[0], f.name) is None
        else np.concatenate([getattr(c, f.name) for c in chunks]).reshape(*lead, -1)
        for f in fields(chunks[0])
    }
    return type(chunks[0])(**joined)


def _groups32(unpack, block_bytes: int, bits: int, exact_dtype: bool):
    """A converter for a format whose `unpack` gives 32-element groups (`gguf_blocks`); the
    scales and biases are cast to the requested dtype only where that dtype holds them exactly
    in general (Q5_0/Q5_1: f16 block constants), else kept float32 (Q4_K/Q5_K)."""

    def convert(data: np.ndarray, dtype: mx.Dtype) -> AffineQuantized:
        groups = _unpack_rows(data, block_bytes, unpack, bits)
        keep = dtype if exact_dtype else mx.float32
        return AffineQuantized(
            weight=mx.array(groups.codes),
            scales=mx.array(groups.scales).astype(keep),
            biases=mx.array(groups.biases).astype(keep),
            bits=bits,
        )

    return convert


def _sub_blocks16(unpack, block_bytes: int, fmt: SubBlockFormat):
    def convert(data: np.ndarray, dtype: mx.Dtype) -> SubBlockQuantized:
        blocks = _unpack_rows(data, block_bytes, unpack, fmt.bits)
        return SubBlockQuantized(
            weight=mx.array(blocks.codes),
            scales=mx.array(blocks.sub_scales),
            d=mx.array(blocks.d),
            dmin=None if blocks.dmin is None else mx.array(blocks.dmin),
            fmt=fmt,
        )

    return convert


_BLOCK_CONVERTERS = {
    _T.Q8_0: _q8_0,
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q5_0: _groups32(gguf_blocks.q5_0, 22, bits=5, exact_dtype=True),
    _T.Q5_1: _groups32(gguf_blocks.q5_1, 24, bits=5, exact_dtype=True),
    _T.Q4_K: _groups32(gguf_blocks.q4_k, 144, bits=4, exact_dtype=False),
    _T.Q5_K: _groups32(gguf_blocks.q5_k, 176, bits=5, exact_dtype=False),
    _T.Q6_K: _sub_blocks16(gguf_blocks.q6_k, 210, FORMATS["Q6_K"]),
    _T.Q3_K: _sub_blocks16(gguf_blocks.q3_k, 110, FORMATS["Q3_K"]),
    _T.Q2_K: _sub_blocks16(gguf_blocks.q2_k, 84, FORMATS["Q2_K"]),
}
