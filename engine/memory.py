"""How much memory the KV cache may take, and how many blocks that makes."""

from __future__ import annotations

import os

import mlx.core as mx

from engine.config import EngineConfig, ModelConfig
from engine.models.paged import PagedKVStore


def available_memory() -> int:
    """Bytes the KV cache may draw on: the device's working set on a GPU, free RAM on a CPU."""
    if mx.default_device() != mx.cpu:
        info = mx.device_info()
        total = int(info.get("max_recommended_working_set_size", info.get("memory_size", 0)))
        return max(total - mx.get_active_memory(), 0)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


CPU_DEFAULT_KV_CAP = 2 << 30  # the CPU shares its memory with everything else: stay modest


def default_kv_budget(engine: EngineConfig) -> int:
    """A fraction of free device memory; on the CPU at most CPU_DEFAULT_KV_CAP."""
    budget = int(available_memory() * engine.kv_cache_memory_fraction)
    return min(budget, CPU_DEFAULT_KV_CAP) if mx.default_device() == mx.cpu else budget


def num_kv_blocks(
    cfg: ModelConfig, engine: EngineConfig, dtype: mx.Dtype, reserved: int = 0
) -> int:
    """Blocks that fit the memory budget less ``reserved`` bytes (adapter slots), and never
    more than the longest possible batch needs."""
    if engine.num_blocks is not None:
        return engine.num_blocks
    per_block = PagedKVStore.bytes_per_block(cfg, engine.block_size, dtype)
    budget = (engine.kv_cache_memory or default_kv_budget(engine)) - reserved
    ceiling = engine.max_num_seqs * -(-cfg.max_position_embeddings // engine.block_size) + 1
    blocks = min(budget // per_block, ceiling)
    if blocks < 2:
        raise ValueError(
            f"a KV cache of {budget} bytes (after {reserved} for adapter slots) holds no block "
            f"({per_block} bytes each): raise --kv-cache-memory or lower --max-loras"
        )
    return blocks
