"""A fast GGUF (v2/v3, little-endian) reader: metadata as plain Python, tensors as memmap views.

Why not `gguf.GGUFReader`: it builds a numpy view per array item and per string, so a file with
a 49k-token vocabulary and 49k merges takes 6-10 s to open (152k tokens: over 15 s), paid by every
server start and test. Here a numeric array is one `np.frombuffer`, a string array one tight loop
over the mapped bytes, and tensor data is only described: each tensor is a read-only view.

Parity contract (tested against `gguf.GGUFReader`): `metadata` equals
`{name: field.contents() for name, field in reader.fields.items()}` (the three `GGUF.*` header
keys included), except that an array of arrays stays nested here where `contents()` flattens it;
each tensor's `data` has the dtype and shape of `ReaderTensor.data`: row-major with ne0 last for
F32/F16/F64/I8..I64, and uint8 `[..., rows, bytes_per_row]` for every block type (BF16 included).

File layout (all little-endian): magic "GGUF", u32 version, u64 tensor count, u64 kv count; the
key/values (string key, u32 value type, value); the tensor infos (string name, u32 n_dims,
u64 dims[n_dims] with ne0 first, u32 ggml type, u64 offset into the data section); padding to
`general.alignment` (default 32); the data section. A string is a u64 byte length and UTF-8 bytes;
an array is a u32 item type, a u64 count and the items.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_V = GGUFValueType
_T = GGMLQuantizationType

# struct formats double as numpy dtypes ("<f" is float32, "<?" bool, ...).
_SCALAR_FORMATS = {
    _V.UINT8: "<B",
    _V.INT8: "<b",
    _V.UINT16: "<H",
    _V.INT16: "<h",
    _V.UINT32: "<I",
    _V.INT32: "<i",
    _V.FLOAT32: "<f",
    _V.BOOL: "<?",
    _V.UINT64: "<Q",
    _V.INT64: "<q",
    _V.FLOAT64: "<d",
}
_SCALARS = {t: struct.Struct(f) for t, f in _SCALAR_FORMATS.items()}
_ARRAY_DTYPES = {t: np.dtype(f) for t, f in _SCALAR_FORMATS.items()}
_U32 = _SCALARS[_V.UINT32]
_U64 = _SCALARS[_V.UINT64]
# Types whose elements are plain numbers; every other type is exposed as its raw bytes.
_ELEMENT_DTYPES = {
    _T.F32: np.dtype(np.float32),
    _T.F16: np.dtype(np.float16),
    _T.F64: np.dtype(np.float64),
    _T.I8: np.dtype(np.int8),
    _T.I16: np.dtype(np.int16),
    _T.I32: np.dtype(np.int32),
    _T.I64: np.dtype(np.int64),
}
_HEADER_BYTES = 24  # magic, version, tensor count, kv count
_MIN_KV_BYTES = 8 + 4  # an empty key and a value type
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands, or is truncated or corrupt."""


@dataclass(frozen=True, slots=True, eq=False)
class GGUFTensor:
    """One tensor's description and a zero-copy view of its bytes (eq=False: `data` is an array)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: ne0 (the contiguous axis) first
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute byte offset in the file
    data: np.ndarray  # read-only memmap: [..., ne1, ne0], or uint8 [..., rows, bytes per row]


class GGUFFile:
    """A parsed GGUF file: `metadata`, `tensors`, and the mapping their data lives in.

    The header is parsed eagerly (small, and every caller needs it); tensor bytes are touched only
    when a caller reads `tensor.data`, and the mapping lives as long as any tensor view does.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < _HEADER_BYTES:
            raise GGUFFormatError(
                f"{self.path}: {size} bytes is too short for a GGUF header ({_HEADER_BYTES} bytes)"
            )
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self._map), self.path)
        self.version = self._read_preamble(cursor)
        tensor_count, kv_count = cursor.u64(), cursor.u64()
        cursor.check_count(kv_count, _MIN_KV_BYTES, "key/value pairs")
        cursor.check_count(tensor_count, _MIN_TENSOR_INFO_BYTES, "tensors")
        self.metadata: dict[str, Any] = {
            "GGUF.version": self.version,
            "GGUF.tensor_count": tensor_count,
            "GGUF.kv_count": kv_count,
        }
        self.alignment = DEFAULT_ALIGNMENT
        for _ in range(kv_count):
            self._read_kv(cursor)
        infos = [_read_tensor_info(cursor) for _ in range(tensor_count)]
        self.data_offset = -(-cursor.pos // self.alignment) * self.alignment
        self.tensors: list[GGUFTensor] = self._build_tensors(infos, size)

    def _read_preamble(self, cursor: _Cursor) -> int:
        magic = bytes(cursor.buf[:4])
        if magic != MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {magic!r}, want {MAGIC!r})")
        cursor.pos = 4
        version = cursor.u32()
        if version & 0xFFFF == 0 and version != 0:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            raise GGUFFormatError(
                f"{self.path}: big-endian GGUF (version {swapped}); only little-endian is supported"
            )
        if version not in SUPPORTED_VERSIONS:
            raise GGUFFormatError(
                f"{self.path}: GGUF version {version} is not supported (supported: 2, 3)"
            )
        return version

    def _read_kv(self, cursor: _Cursor) -> None:
        start = cursor.pos
        key = cursor.string()
        vtype = cursor.u32()
        if key in self.metadata:
            raise GGUFFormatError(f"{self.path}: duplicate metadata key {key!r} at byte {start}")
        value = cursor.value(vtype, key)
        if key == "general.alignment":
            if vtype != _V.UINT32 or value == 0 or value & (value - 1):
                raise GGUFFormatError(
                    f"{self.path}: general.alignment must be a UINT32 power of two, not {value!r}"
                )
            self.alignment = value
        self.metadata[key] = value

    def _build_tensors(self, infos: list[_TensorInfo], file_size: int) -> list[GGUFTensor]:
        tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for info in infos:
            if info.name in seen:
                raise GGUFFormatError(f"{self.path}: duplicate tensor name {info.name!r}")
            seen.add(info.name)
            try:
                kind = _T(info.raw_type)
                block_size, type_size = GGML_QUANT_SIZES[kind]
            except (ValueError, KeyError):
                raise GGUFFormatError(
                    f"{self.path}: tensor {info.name!r} has unknown ggml type {info.raw_type}"
                ) from None
            n_elements = math.prod(info.dims)
            n_bytes = n_elements * type_size // block_size
            shape = tuple(reversed(info.dims))  # row-major: ne0 last
            dtype = _ELEMENT_DTYPES.get(kind)
            if dtype is None:
                if not shape or shape[-1] % block_size:
                    raise GGUFFormatError(
                        f"{self.path}: tensor {info.name!r} of type {kind.name} has shape "
                        f"{info.dims}, whose ne0 is not a multiple of the block size {block_size}"
                    )
                dtype = np.dtype(np.uint8)
                shape = (*shape[:-1], shape[-1] // block_size * type_size)
            start = self.data_offset + info.offset
            if start + n_bytes > file_size:
                raise GGUFFormatError(
                    f"{self.path}: truncated: tensor {info.name!r} needs bytes "
                    f"[{start}, {start + n_bytes}) but the file has {file_size}"
                )
            data = self._map[start : start + n_bytes].view(dtype).reshape(shape)
            tensors.append(GGUFTensor(info.name, kind, info.dims, n_elements, n_bytes, start, data))
        return tensors


@dataclass(frozen=True, slots=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order, ne0 first
    raw_type: int
    offset: int  # relative to the data section


def _read_tensor_info(cursor: _Cursor) -> _TensorInfo:
    name = cursor.string()
    n_dims = cursor.u32()
    cursor.check_count(n_dims, 8, f"dimensions for tensor {name!r}")
    dims = tuple(cursor.u64() for _ in range(n_dims))
    return _TensorInfo(name, dims, cursor.u32(), cursor.u64())


class _Cursor:
    """A read position in the mapped header. Every read is bounds-checked, so a truncated file
    fails with the byte where it ran out rather than a struct.error or a silently short slice."""

    __slots__ = ("buf", "path", "pos")

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def _truncated(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(
            f"{self.path}: truncated or corrupt: {what} runs past the end of the file "
            f"({len(self.buf)} bytes) at byte {self.pos}"
        )

    def check_count(self, count: int, min_item_bytes: int, what: str) -> None:
        """Refuse a count the rest of the file cannot hold (a corrupt count would loop for ever)."""
        if count * min_item_bytes > len(self.buf) - self.pos:
            raise self._truncated(f"{count} {what}")

    def take(self, n: int, what: str) -> int:
        """Advance past `n` bytes, returning where they start."""
        start = self.pos
        if start + n > len(self.buf):
            raise self._truncated(what)
        self.pos = start + n
        return start

    def scalar(self, fmt: struct.Struct, what: str = "a number") -> Any:
        return fmt.unpack_from(self.buf, self.take(fmt.size, what))[0]

    def u32(self) -> int:
        return self.scalar(_U32)

    def u64(self) -> int:
        return self.scalar(_U64)

    def string(self, what: str = "a string") -> str:
        n = self.u64()
        start = self.take(n, what)
        # Strict, like gguf's `contents()`: a vocabulary with mangled bytes is worse than an error.
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, key: str) -> Any:
        """One metadata value of type `vtype` as plain Python; arrays of arrays stay nested."""
        if vtype == _V.STRING:
            return self.string(f"the value of {key!r}")
        if vtype == _V.ARRAY:
            return self.array(key)
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GGUFFormatError(f"{self.path}: {key!r} has unknown value type {vtype}")
        return self.scalar(fmt, f"the value of {key!r}")

    def array(self, key: str) -> list[Any]:
        item_type, count = self.u32(), self.u64()
        if item_type == _V.STRING:
            return self._strings(count, key)
        if item_type == _V.ARRAY:
            self.check_count(count, 12, f"arrays in {key!r}")
            return [self.array(key) for _ in range(count)]
        dtype = _ARRAY_DTYPES.get(item_type)
        if dtype is None:
            raise GGUFFormatError(f"{self.path}: {key!r} has unknown array item type {item_type}")
        self.check_count(count, dtype.itemsize, f"items of {key!r}")
        start = self.take(count * dtype.itemsize, f"the items of {key!r}")
        return np.frombuffer(self.buf, dtype, count, start).tolist()

    def _strings(self, count: int, key: str) -> list[str]:
        """The hot loop (vocabularies and merges): locals only, one bounds check at the end."""
        self.check_count(count, 8, f"strings in {key!r}")
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                append(str(buf[pos : pos + n], "utf-8"))
                pos += n
        except struct.error:
            pos = len(buf) + 1
        except UnicodeDecodeError as e:
            if pos + n <= len(buf):  # else the file ended inside this string
                raise GGUFFormatError(
                    f"{self.path}: item {len(out)} of {key!r} is not valid UTF-8 ({e})"
                ) from None
            pos = len(buf) + 1
        self.pos = min(pos, len(buf))
        if pos > len(buf):
            raise self._truncated(f"the strings of {key!r}")
        return out
