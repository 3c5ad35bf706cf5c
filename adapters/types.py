"""The records LoRA code passes around: parsed weights, and an adapter's identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.lora.request import TARGETABLE, LoRAWeights

__all__ = ["TARGETABLE", "AdapterVersion", "LoRAWeights", "ParsedAdapter"]


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
    """An adapter's identity: (name, version, sha256 digests of its weights and config files).

    ``cache_key`` (both digests, fixed when the version is stored) enters every KV-cache block
    hash of requests using it and names its device slot: two adapters never share KV blocks or
    a slot, and the same files uploaded under another name do.
    """

    name: str
    version: int
    digest: str  # "sha256:<hex>" of the weights file
    config_digest: str  # "sha256:<hex>" of the config file
    rank: int
    target_modules: tuple[str, ...]
    created: float
    weights_path: Path
    config_path: Path

    @property
    def cache_key(self) -> str:
        return f"{self.digest}+{self.config_digest}"
