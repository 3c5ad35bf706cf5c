"""An adapter version as the engine takes it: a ``LoRARequest`` whose ``load`` reads and
validates the stored files on the engine thread when a device slot first needs them."""

from __future__ import annotations

from functools import partial

from adapters.format import parse_adapter
from adapters.types import AdapterVersion
from engine.config import ModelConfig
from engine.lora.request import LoRAModules, LoRARequest


def lora_request(version: AdapterVersion, base: ModelConfig, max_rank: int) -> LoRARequest:
    """``load`` is a plain function of picklable values, so a request carrying the adapter can
    be sent to the other ranks of a tensor-parallel server (which read the same files)."""
    return LoRARequest(
        name=version.name,
        version=version.version,
        key=version.cache_key,
        rank=version.rank,
        load=partial(_load, version, base, max_rank),
    )


def _load(version: AdapterVersion, base: ModelConfig, max_rank: int) -> LoRAModules:
    parsed = parse_adapter(
        version.config_path.read_bytes(),
        version.weights_path.read_bytes(),
        base,
        max_rank=max_rank,
        max_bytes=1 << 62,  # checked when it was uploaded
    )
    return parsed.modules
