"""How much memory the KV cache may take, and how many blocks that makes.

Each backend says how much memory it has in its own words (``mx.device_info()``):

- Metal: ``max_recommended_working_set_size`` (what macOS lets the GPU keep resident) and
  ``memory_size`` (all of the unified memory). Our own arrays (``mx.get_active_memory()``, the
  weights above all) come out of the working set.
- CUDA: ``total_memory`` and ``free_memory``, read from NVML for the whole card: other processes'
  use and ours are already taken out. MLX's buffer cache counts as used there but is ours to
  reuse, and MLX allocates nothing past ``mx.get_memory_limit()`` (95% of the card) beyond what
  is active.
- CPU: neither; the operating system's available RAM.

The KV cache gets a fraction of that (``EngineConfig.kv_cache_memory_fraction``); the rest is
room for activations. A budget that cannot hold the blocks a request needs is an error that
names the numbers and the flag to change, never a pool of zero blocks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx

from engine.config import EngineConfig, ModelConfig
from engine.models.paged import PagedKVStore

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_CAP = 2 << 30  # the CPU shares its memory with everything else: stay modest
MIN_BLOCKS = 2  # block 0 is the null block; a request needs at least one more


class KVCacheTooSmall(ValueError):
    """The KV cache budget holds fewer than ``MIN_BLOCKS`` blocks."""


class UnknownDeviceMemory(ValueError):
    """The GPU reports no memory size we know how to read."""


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """One look at the default device: what MLX reports about it and what we hold on it."""

    is_cpu: bool
    info: Mapping[str, str | int]  # mx.device_info()
    active: int = 0  # mx.get_active_memory(): our arrays
    cache: int = 0  # mx.get_cache_memory(): freed buffers MLX keeps for reuse
    limit: int = 0  # mx.get_memory_limit(): MLX allocates no further
    free_ram: int | None = None  # the operating system's available RAM (read on the CPU)

    @classmethod
    def now(cls) -> MemoryReading:
        is_cpu = mx.default_device() == mx.cpu
        return cls(
            is_cpu=is_cpu,
            info=mx.device_info(),
            active=mx.get_active_memory(),
            cache=mx.get_cache_memory(),
            limit=mx.get_memory_limit(),
            free_ram=available_ram() if is_cpu else None,
        )


@dataclass(frozen=True, slots=True)
class Available:
    """Bytes the KV cache may draw on, and where that number came from (for logs and errors)."""

    nbytes: int
    source: str


def available_ram() -> int | None:
    """MemAvailable on Linux (free RAM plus the page cache the kernel can drop), else free pages;
    None when the system says neither."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


CPU_UNKNOWN_RAM = 8 << 30  # assumed when the system does not say (the CPU cap applies anyway)


def available_memory(reading: MemoryReading) -> Available:
    """What the KV cache may draw on, from what this backend really reports."""
    info = reading.info
    if reading.is_cpu:
        if reading.free_ram is None:
            return Available(CPU_UNKNOWN_RAM, f"free RAM unknown, assumed {fmt(CPU_UNKNOWN_RAM)}")
        return Available(reading.free_ram, f"{fmt(reading.free_ram)} of available RAM")
    if "max_recommended_working_set_size" in info or "memory_size" in info:  # Metal
        key = "max_recommended_working_set_size"
        key = key if int(info.get(key) or 0) > 0 else "memory_size"
        total = int(info[key])
        return Available(
            max(total - reading.active, 0),
            f"Metal {key} {fmt(total)} less {fmt(reading.active)} in use",
        )
    if "free_memory" in info:  # CUDA
        free = int(info["free_memory"]) + reading.cache
        source = f"CUDA free_memory {fmt(int(info['free_memory']))}"
        if reading.cache:
            source += f" + {fmt(reading.cache)} in MLX's buffer cache"
        if reading.limit > 0 and reading.limit - reading.active < free:
            free = reading.limit - reading.active
            source = (
                f"MLX memory limit {fmt(reading.limit)} less {fmt(reading.active)} in use "
                f"(of {fmt(int(info.get('total_memory', 0)))}; {source})"
            )
        return Available(max(free, 0), source)
    raise UnknownDeviceMemory(
        f"cannot tell how much memory the GPU has: mx.device_info() reports only "
        f"{', '.join(sorted(info)) or 'nothing'}; set --kv-cache-memory"
    )


@dataclass(frozen=True, slots=True)
class KVBudget:
    nbytes: int
    source: str  # "--kv-cache-memory" or how the device's memory was read


def kv_budget(engine: EngineConfig, reading: MemoryReading | None = None) -> KVBudget:
    """``kv_cache_memory`` when set; otherwise a fraction of what the device has available, on
    the CPU at most ``CPU_DEFAULT_KV_CAP``."""
    if engine.kv_cache_memory is not None:
        return KVBudget(engine.kv_cache_memory, "--kv-cache-memory")
    reading = reading or MemoryReading.now()
    available = available_memory(reading)
    share = int(available.nbytes * engine.kv_cache_memory_fraction)
    source = f"{engine.kv_cache_memory_fraction:g} of {available.source}"
    if reading.is_cpu and share > CPU_DEFAULT_KV_CAP:
        share, source = CPU_DEFAULT_KV_CAP, f"the CPU default cap ({source} is more)"
    return KVBudget(share, source)


def num_kv_blocks(
    cfg: ModelConfig,
    engine: EngineConfig,
    dtype: mx.Dtype,
    reserved: int = 0,
    reading: MemoryReading | None = None,
) -> int:
    """Blocks that fit the memory budget less ``reserved`` bytes (adapter slots), and never
    more than the longest possible batch needs."""
    if engine.num_blocks is not None:
        return engine.num_blocks
    per_block = PagedKVStore.bytes_per_block(cfg, engine.block_size, dtype)
    budget = kv_budget(engine, reading)
    left = budget.nbytes - reserved
    ceiling = engine.max_num_seqs * -(-cfg.max_position_embeddings // engine.block_size) + 1
    blocks = min(max(left, 0) // per_block, ceiling)
    if blocks < MIN_BLOCKS:
        raise KVCacheTooSmall(too_small_message(budget, reserved, per_block, engine.max_loras))
    log.info(
        "KV cache: %d blocks of %s (%s) from a budget of %s: %s%s",
        blocks,
        fmt(per_block),
        dtype,
        fmt(budget.nbytes),
        budget.source,
        f", less {fmt(reserved)} for adapter slots" if reserved else "",
    )
    return blocks


def too_small_message(budget: KVBudget, reserved: int, per_block: int, max_loras: int) -> str:
    what = f"a KV cache budget of {fmt(budget.nbytes)} ({budget.source})"
    if reserved:
        what += (
            f" less {fmt(reserved)} for adapter slots (--max-loras {max_loras}) leaves "
            f"{fmt(budget.nbytes - reserved)}"
        )
    if budget.source == "--kv-cache-memory":
        fix = "raise --kv-cache-memory"
    else:
        fix = "set --kv-cache-memory (or free memory on the device)"
    if reserved:
        fix += " or lower --max-loras"
    return (
        f"{what}, less than the {MIN_BLOCKS} blocks of {fmt(per_block)} "
        f"({fmt(MIN_BLOCKS * per_block)}) the KV cache needs at the least: {fix}"
    )


def fmt(nbytes: int) -> str:
    """Bytes in binary units, e.g. '64.0 KiB', '-576.0 KiB', '30.02 GiB'."""
    size, sign = abs(nbytes), "-" if nbytes < 0 else ""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{sign}{size / (1 << shift):.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{nbytes} bytes"
