"""Random but valid K-quant blocks, for rows longer than the shared fixtures' (several
super-blocks per row).

gguf-py can dequantize the K-quants but not quantize them, and every bit pattern is a valid block
except the f16 fields: so blocks are random bytes whose `d` (and `dmin`) are set to finite values
that keep the weights small (|w| of order 0.1), including a few edge cases (zero, negative zero,
negative, subnormal).
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

# Byte offsets of the f16 super-block fields, and a magnitude for them that keeps |w| ~ 0.1.
F16_FIELDS = {
    T.Q4_K: ((0, 2), 2e-4),
    T.Q5_K: ((0, 2), 1e-4),
    T.Q6_K: ((208,), 5e-5),
    T.Q3_K: ((108,), 2e-3),
    T.Q2_K: ((80, 82), 5e-3),
}
K_TYPES = tuple(F16_FIELDS)


def random_blocks(kind: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, cols/256 * type_size]: random blocks with tame, finite f16 fields."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    n = cols // block
    raw = rng.integers(0, 256, size=(rows, n, size), dtype=np.uint8)
    offsets, magnitude = F16_FIELDS[kind]
    for offset in offsets:
        value = rng.uniform(0.25, 1.5, size=(rows, n)) * magnitude
        value *= rng.choice([-1.0, 1.0], size=(rows, n), p=[0.1, 0.9])
        field = value.astype("<f2")
        flat = field.reshape(-1)
        specials = np.array([0.0, -0.0, 6e-8, -3e-6], dtype="<f2")  # zero, -0, subnormals
        flat[: min(len(flat), len(specials))] = specials[: len(flat)]
        raw[..., offset : offset + 2] = field.view(np.uint8).reshape(rows, n, 2)
    return raw.reshape(rows, n * size)
