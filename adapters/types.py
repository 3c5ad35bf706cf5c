"""The records LoRA code passes around: parsed weights, and an adapter's identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The projections a LoRA may target, by their Hugging Face module path inside a layer.
TARGETABLE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True, slots=True)
class LoRAWeights:
    """One adapted projection of one layer: ``W x + scale * B (A x)``.

    a: [r, in_features]; b: [out_features, r] (PEFT's orientation), float32.
    """

    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, slots=True)
class ParsedAdapter:
    """A validated adapter, whatever format it came in.

    ``modules`` maps (layer index, module path from TARGETABLE) to its weights.
    """

    format: str  # "peft" or "mlx-lm"
    rank: int  # the largest rank of any module
    target_modules: tuple[str, ...]  # module paths from TARGETABLE, sorted
    modules: dict[tuple[int, str], LoRAWeights]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """An adapter's identity: (name, version, sha256 digest of its weights file).

    The digest enters every KV-cache block hash of requests using it, so two adapters never
    share KV blocks, and the same weights uploaded under another name do.
    """

    name: str
    version: int
    digest: str  # "sha256:<hex>"
    rank: int
    target_modules: tuple[str, ...]
    created: float
    weights_path: Path
    config_path: Path
