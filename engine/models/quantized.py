"""Layers whose weights stay in llama.cpp's 16-element sub-blocks (Q6_K, Q3_K, Q2_K).

MLX's affine quantization takes groups of 32, 64 or 128, so these formats cannot become
`nn.QuantizedLinear` without changing the weights. Instead each layer keeps the file's own numbers,
as compact as the file (codes packed in MLX's bit order, the per-sub-block integer scales, the f16
super-block `d`/`dmin`), and dequantizes them exactly in float32 when it is called, a bounded
chunk of rows at a time: the model never holds a dense copy of more than one chunk.

Exactness: a sub-block's scale `d * sc` (an f16 times an integer of at most 8 bits) and bias
(`-32 * scale`, `-4 * scale` or `dmin * m`) are exact in float32, and so is `scale * code + bias`,
so the dense rows equal llama.cpp's `dequantize_row_*` (and `gguf.quants.dequantize`) bit for bit.

Only plain MLX ops (view, shifts, masks, multiply-add) are used, so the path runs on every
backend. MLX's quantize and quantized_matmul refuse group 16; its `mx.dequantize` takes it on the
CPU and gives the same numbers (a test checks), but is slower there than the unpacking below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

SUB_BLOCK = 16  # elements per sub-block (one integer scale)
SUPER_BLOCK = 256  # elements per super-block (one f16 d, and dmin)
CHUNK_ELEMENTS = 1 << 22  # at most this many weights are dense at once (16 MiB in float32)


@dataclass(frozen=True, slots=True)
class SubBlockFormat:
    """w = scale * code + bias per sub-block, with scale = d * sc and
    bias = -offset * scale (Q6_K, Q3_K) or -dmin * m (Q2_K, whose sc and m share a byte)."""

    name: str
    bits: int
    offset: int
    has_min: bool

    @property
    def scales_dtype(self) -> mx.Dtype:
        return mx.uint8 if self.has_min else mx.int8


FORMATS = {
    "Q6_K": SubBlockFormat("Q6_K", bits=6, offset=32, has_min=False),
    "Q3_K": SubBlockFormat("Q3_K", bits=3, offset=4, has_min=False),
    "Q2_K": SubBlockFormat("Q2_K", bits=2, offset=0, has_min=True),
}


def sub_block_affine(
    fmt: SubBlockFormat, scales: mx.array, d: mx.array, dmin: mx.array | None
) -> tuple[mx.array, mx.array]:
    """Float32 scale and bias per sub-block, [..., rows, cols/16] each; exact."""
    *lead, n_sub = scales.shape
    per_super = (*lead, n_sub // SUB_BLOCK, SUB_BLOCK)  # 16 sub-blocks per super-block
    sc = (scales & 0x0F) if fmt.has_min else scales
    scale = d.astype(mx.float32)[..., None] * sc.astype(mx.float32).reshape(per_super)
    if fmt.has_min:
        m = (scales >> 4).astype(mx.float32).reshape(per_super)
        bias = -(dmin.astype(mx.float32)[..., None] * m)
    else:
        bias = scale * float(-fmt.offset)  # a power of two: exact
    return scale.reshape(*lead, n_sub), bias.reshape(*lead, n_sub)


def unpack_codes(weight: mx.array, bits: int) -> mx.array:
    """MLX-packed codes uint32 [..., cols*bits/32] -> uint8 [..., cols], with plain MLX ops.

    Each row is a little-endian bit stream, element j at bits [j*bits, (j+1)*bits): a run of
    `bits / g` bytes holds exactly `8 / g` codes (g = gcd(bits, 8): 4 codes in 3 bytes at 6 bits,
    8 in 3 at 3 bits, 4 in 1 at 2 bits). So the words are viewed as bytes, cut into runs, and
    each code of a run is shifted and masked out of its byte (and the next one where it
    straddles). Byte arithmetic is what makes this fast on the CPU: reading the words with a
    gather took five times as long, and MLX's own `mx.dequantize(group_size=16)` two to nine
    times (bits 2, 3, 6).
    """
    *lead, packed = weight.shape
    g = math.gcd(bits, 8)
    run_bytes, run_codes = bits // g, 8 // g
    runs = mx.view(weight, mx.uint8).reshape(*lead, packed * 4 // run_bytes, run_bytes)
    mask = (1 << bits) - 1
    codes = []
    for e in range(run_codes):
        byte, shift = divmod(e * bits, 8)
        code = runs[..., byte] >> shift
        if shift + bits > 8:
            code = code | (runs[..., byte + 1] << (8 - shift))
        codes.append(code & mask if shift + bits != 8 else code)
    return mx.stack(codes, axis=-1).reshape(*lead, packed * 32 // bits)


def dequantize_sub_blocks(
    fmt: SubBlockFormat, weight: mx.array, scales: mx.array, d: mx.array, dmin: mx.array | None
) -> mx.array:
    """The exact dense weight, float32 [..., rows, cols]: scale * code + bias per 16 codes."""
    scale, bias = sub_block_affine(fmt, scales, d, dmin)  # [..., rows, cols/16]
    codes = unpack_codes(weight, fmt.bits).astype(mx.float32)
    *lead, cols = codes.shape
    groups = codes.reshape(*lead, cols // SUB_BLOCK, SUB_BLOCK)
    return (groups * scale[..., None] + bias[..., None]).reshape(*lead, cols)


class _SubBlockWeights(nn.Module):
    """The parameters: `weight` (packed codes), `scales` (per-sub-block integers), `d` (and
    `dmin`); `bits` and the `scales` name let shape helpers treat it like a quantized layer."""

    def __init__(self, rows: int, cols: int, fmt: SubBlockFormat) -> None:
        super().__init__()
        if cols % SUPER_BLOCK:
            raise ValueError(f"{fmt.name} rows must be multiples of {SUPER_BLOCK}, not {cols}")
        self.fmt, self.bits = fmt, fmt.bits
        self.weight = mx.zeros((rows, cols * fmt.bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((rows, cols // SUB_BLOCK), dtype=fmt.scales_dtype)
        self.d = mx.zeros((rows, cols // SUPER_BLOCK), dtype=mx.float16)
        if fmt.has_min:
            self.dmin = mx.zeros((rows, cols // SUPER_BLOCK), dtype=mx.float16)
        self.freeze()

    def dense_rows(self, start: int, stop: int) -> mx.array:
        """float32 [stop - start, cols]: rows start..stop-1, dequantized."""
        dmin = self.dmin[start:stop] if self.fmt.has_min else None
        return dequantize_sub_blocks(
            self.fmt, self.weight[start:stop], self.scales[start:stop], self.d[start:stop], dmin
        )

    def matmul_t(self, x: mx.array) -> mx.array:
        """x @ W.T in float32 (the weights exact), cast back to x's dtype; x: [..., cols]."""
        rows, cols = self.weight.shape[0], x.shape[-1]
        step = max(1, CHUNK_ELEMENTS // cols)
        x32 = x.astype(mx.float32)
        parts = [x32 @ self.dense_rows(r, min(r + step, rows)).T for r in range(0, rows, step)]
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        return y.astype(x.dtype)  # [..., rows]


class SubBlockLinear(_SubBlockWeights):
    """A linear layer over sub-block weights [out_features, in_features] (the bias, if any,
    dense like the file's)."""

    def __init__(
        self, in_features: int, out_features: int, fmt: SubBlockFormat, bias: bool = False
    ) -> None:
        super().__init__(out_features, in_features, fmt)
        if bias:
            self.bias = mx.zeros((out_features,))
            self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.matmul_t(x)
        return y + self.bias if "bias" in self else y


class SubBlockEmbedding(_SubBlockWeights):
    """An embedding table in sub-blocks: looked-up rows are dequantized (float32); `as_linear`
    serves tied output heads."""

    def __init__(self, num_embeddings: int, dims: int, fmt: SubBlockFormat) -> None:
        super().__init__(num_embeddings, dims, fmt)

    def __call__(self, tokens: mx.array) -> mx.array:
        flat = tokens.reshape(-1)  # [T]
        dmin = self.dmin[flat] if self.fmt.has_min else None
        rows = dequantize_sub_blocks(
            self.fmt, self.weight[flat], self.scales[flat], self.d[flat], dmin
        )  # [T, dims]
        return rows.reshape(*tokens.shape, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.matmul_t(x)


def sub_block_module(module: nn.Module, fmt: SubBlockFormat) -> nn.Module:
    """The sub-block twin of an `nn.Linear` or an `nn.Embedding` (same shape)."""
    rows, cols = module.weight.shape
    if isinstance(module, nn.Embedding):
        return SubBlockEmbedding(rows, cols, fmt)
    if isinstance(module, nn.Linear):
        return SubBlockLinear(cols, rows, fmt, bias="bias" in module)
    raise ValueError(f"{type(module).__name__} cannot hold {fmt.name} weights")
