"""Opening a GGUF file and reading its key/value metadata as plain Python values.

Both go through `engine.loader.gguf_reader.GGUFFile`, which parses the header in milliseconds
where `gguf.GGUFReader` takes seconds on a real vocabulary; these names stay for their callers.
"""

from __future__ import annotations

import os
from typing import Any

from engine.loader.gguf_reader import GGUFFile


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse the header and memory-map the file; tensor data is read only when a view is used."""
    return GGUFFile(path)


def read_metadata(file: GGUFFile) -> dict[str, Any]:
    """Every metadata field as str, int, float, bool or a (nested) list of those, plus the header's
    `GGUF.version`, `GGUF.tensor_count` and `GGUF.kv_count`."""
    return file.metadata
