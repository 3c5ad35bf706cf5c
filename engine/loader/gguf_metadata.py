"""Reading a GGUF file's key/value metadata into plain Python values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Memory-map a GGUF file; tensor data is read lazily through the returned reader."""
    return gguf.GGUFReader(str(path), "r")


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata field as str, int, float, bool or a list of those."""
    return {name: field.contents() for name, field in reader.fields.items()}
