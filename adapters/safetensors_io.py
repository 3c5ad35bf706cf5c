"""A strict, dependency-free safetensors reader for uploaded adapter weights.

Uploads are untrusted bytes, so this reader checks every offset and size before touching the data
and never raises anything but ``SafetensorsError``. It reads only what adapters are made of
(F32, F16, BF16) and hands back float32 numpy arrays. Layout: an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets
relative to the end of the header), then the tensor data.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# The header limit the reference implementation uses; a larger one is not a real adapter.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


class SafetensorsError(ValueError):
    """The bytes are not a safetensors file; the message says where they stop being one."""


@dataclass(frozen=True, slots=True)
class SafetensorsFile:
    """The readable tensors, in header order, and what was wrong with the rest.

    ``problems`` holds per-tensor faults (an unsupported dtype) that leave the file readable,
    so the caller can report them next to everything else.
    """

    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # float32, header order
    problems: list[str] = field(default_factory=list)


def read_safetensors(data: bytes) -> SafetensorsFile:
    """Parse ``data``; raise SafetensorsError if its structure is broken anywhere."""
    if len(data) < 8:
        raise SafetensorsError(f"{len(data)} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {header_len} is over {MAX_HEADER_BYTES} bytes")
    if 8 + header_len > len(data):
        raise SafetensorsError(
            f"header length {header_len} runs past the end of the {len(data)}-byte file"
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_unique)
    except SafetensorsError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise SafetensorsError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"header is a JSON {type(header).__name__}, not an object")

    body = memoryview(data)[8 + header_len :]
    out = SafetensorsFile()
    for name, entry in header.items():
        if name == "__metadata__":
            continue  # free-form strings; nothing in it changes how tensors are read
        dtype, shape, begin, end = _entry(name, entry, len(body))
        if dtype not in _ITEMSIZE:
            out.problems.append(
                f"tensor {name} has dtype {dtype}; adapter weights must be F32, F16 or BF16"
            )
            continue
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise SafetensorsError(
                f"tensor {name}: {end - begin} bytes of data for {dtype} shape {shape}"
            )
        out.tensors[name] = _decode(body[begin:end], dtype).reshape(shape)
    return out


def _entry(name: str, entry: object, body_len: int) -> tuple[str, list[int], int, int]:
    """One header entry's dtype, shape and data range, each checked for type and bounds."""
    if not isinstance(entry, dict):
        raise SafetensorsError(f"tensor {name}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise SafetensorsError(f"tensor {name}: dtype is missing or not a string")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SafetensorsError(f"tensor {name}: shape is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SafetensorsError(f"tensor {name}: data_offsets is not [begin, end] with begin <= end")
    if offsets[1] > body_len:
        raise SafetensorsError(
            f"tensor {name}: data ends at {offsets[1]}, past the {body_len} bytes of data"
        )
    return dtype, shape, offsets[0], offsets[1]


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object hook: a name given twice would silently keep only one of the tensors."""
    out = dict(pairs)
    if len(out) != len(pairs):
        twice = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise SafetensorsError(f"header names {', '.join(t[:100] for t in twice[:5])} twice")
    return out


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _decode(raw: memoryview, dtype: str) -> np.ndarray:
    """Little-endian bytes to a fresh float32 array (never a view of the upload)."""
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    # BF16 is the top half of a float32: widen the bits and shift them into place.
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


def write_safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    """Serialize float32/float16 arrays (tests and tools write adapters with this)."""
    names = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}
    header: dict[str, object] = {}
    chunks: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned, as the reference does
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)
