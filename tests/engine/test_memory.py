"""KV cache sizing from what each backend really reports in ``mx.device_info()``.

The dicts below are kept as data:
- CPU: ``mx.device_info()`` of mlx 0.32.4 (``mlx[cpu]``) on a Linux x86-64 machine, as read.
- Metal: ``mx.metal.device_info()`` of an M2 Ultra (192 GB) as published in MLX's pull request
  #1060; later versions add ``device_name``, ``memory_size`` (``hw.memsize``) and
  ``resource_limit`` beside the same keys.
- CUDA: ``mx.device_info()`` and ``mx.get_memory_limit()`` of mlx 0.32.4 (``mlx-cuda-13``) on
  an idle NVIDIA H100 80GB HBM3 (driver 580.159.04), as read before anything was allocated
  (``loadtests/gpu_startup_check.sh`` prints them); only the uuid and bus id are blanked.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from engine.config import EngineConfig, ModelConfig, RopeConfig
from engine.memory import (
    CPU_DEFAULT_KV_CAP,
    KVCacheTooSmall,
    MemoryReading,
    UnknownDeviceMemory,
    available_memory,
    kv_budget,
    num_kv_blocks,
)
from engine.models.paged import PagedKVStore

GiB = 1 << 30

CPU_INFO = {"architecture": "x86_64", "device_name": "AMD EPYC"}
METAL_INFO = {
    "max_recommended_working_set_size": 188743680000,
    "max_buffer_length": 115964116992,
    "architecture": "applegpu_g14d",
}
H100_TOTAL = 85520809984  # 81559 MiB, as nvidia-smi reports it
CUDA_INFO = {
    "total_memory": H100_TOTAL,
    "free_memory": 84465090560,
    "compute_capability_minor": 0,
    "compute_capability_major": 9,
    "pci_bus_id": "0000:00:00.0",
    "uuid": "GPU-00000000-0000-0000-0000-000000000000",
    "architecture": "sm_90",
    "device_name": "NVIDIA H100 80GB HBM3",
}
CUDA_MEMORY_LIMIT = 80766618828  # mx.get_memory_limit() on that card


def llama8b_shape(max_positions: int = 131072) -> ModelConfig:
    """Llama-3-8B's attention shape: 32 layers, 8 KV heads of 128."""
    return ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, dims=128),
        max_position_embeddings=max_positions,
    )


def test_cpu_takes_half_the_available_ram_up_to_the_cap():
    small = MemoryReading(is_cpu=True, info=CPU_INFO, free_ram=3 * GiB)
    assert available_memory(small).nbytes == 3 * GiB
    assert kv_budget(EngineConfig(), small).nbytes == 3 * GiB // 2
    large = MemoryReading(is_cpu=True, info=CPU_INFO, free_ram=64 * GiB)
    budget = kv_budget(EngineConfig(), large)
    assert budget.nbytes == CPU_DEFAULT_KV_CAP and "cap" in budget.source


def test_metal_takes_half_the_working_set_left_after_the_weights():
    weights = 16 * GiB
    reading = MemoryReading(is_cpu=False, info=METAL_INFO, active=weights)
    assert available_memory(reading).nbytes == 188743680000 - weights
    budget = kv_budget(EngineConfig(), reading)
    assert budget.nbytes == (188743680000 - weights) // 2
    assert "max_recommended_working_set_size" in budget.source
    # Without the working set, the whole unified memory is the ceiling.
    only_size = MemoryReading(is_cpu=False, info={"memory_size": 192 * GiB}, active=weights)
    assert available_memory(only_size).nbytes == 176 * GiB


def test_cuda_takes_half_the_free_memory_within_mlx_limit():
    weights, cache = 15 * GiB, 2 * GiB
    free = int(CUDA_INFO["free_memory"]) - weights - cache  # NVML counts MLX's cache as used
    info = {**CUDA_INFO, "free_memory": free}
    reading = MemoryReading(
        is_cpu=False, info=info, active=weights, cache=cache, limit=CUDA_MEMORY_LIMIT
    )
    assert available_memory(reading).nbytes == min(free + cache, CUDA_MEMORY_LIMIT - weights)
    assert kv_budget(EngineConfig(), reading).nbytes == available_memory(reading).nbytes // 2
    # Another process holding most of the card: what is free decides, not the limit.
    crowded = MemoryReading(
        is_cpu=False, info={**CUDA_INFO, "free_memory": 3 * GiB}, limit=CUDA_MEMORY_LIMIT
    )
    assert available_memory(crowded).nbytes == 3 * GiB


def test_an_8b_model_gets_blocks_on_every_backend():
    cfg, engine = llama8b_shape(), EngineConfig(max_num_seqs=64)
    per_block = PagedKVStore.bytes_per_block(cfg, engine.block_size, mx.bfloat16)
    assert per_block == 2 * 32 * 16 * 8 * 128 * 2  # 2 MiB: keys and values, every layer
    weights = 15 * GiB
    readings = {
        "cuda": MemoryReading(
            is_cpu=False,
            info={**CUDA_INFO, "free_memory": int(CUDA_INFO["free_memory"]) - weights},
            active=weights,
            limit=CUDA_MEMORY_LIMIT,
        ),
        "metal": MemoryReading(is_cpu=False, info=METAL_INFO, active=weights),
        "cpu": MemoryReading(is_cpu=True, info=CPU_INFO, free_ram=48 * GiB),
    }
    for name, reading in readings.items():
        budget = kv_budget(engine, reading).nbytes
        blocks = num_kv_blocks(cfg, engine, mx.bfloat16, reserved=GiB // 2, reading=reading)
        assert blocks == (budget - GiB // 2) // per_block, name
        assert blocks >= 2, name


def test_the_pool_never_exceeds_what_the_longest_batch_needs():
    cfg = llama8b_shape(max_positions=256)  # 16 blocks a sequence
    engine = EngineConfig(max_num_seqs=4, kv_cache_memory=64 * GiB)
    assert num_kv_blocks(cfg, engine, mx.bfloat16) == 4 * 16 + 1


def test_a_gpu_that_reports_no_memory_is_an_error_naming_the_flag():
    reading = MemoryReading(is_cpu=False, info={"device_name": "x", "architecture": "y"})
    with pytest.raises(UnknownDeviceMemory, match=r"architecture, device_name.*--kv-cache-memory"):
        kv_budget(EngineConfig(), reading)
    # An explicit budget needs no reading at all.
    assert kv_budget(EngineConfig(kv_cache_memory=GiB), reading).nbytes == GiB


def test_too_small_a_budget_names_the_numbers_and_the_flags():
    cfg = llama8b_shape()
    engine = EngineConfig(kv_cache_memory=64 << 10, max_loras=4)
    with pytest.raises(KVCacheTooSmall) as e:
        num_kv_blocks(cfg, engine, mx.bfloat16, reserved=640 << 10)
    message = str(e.value)
    numbers = ("64.0 KiB", "640.0 KiB", "-576.0 KiB", "2.0 MiB")
    for part in (*numbers, "--kv-cache-memory", "--max-loras"):
        assert part in message, message
    # Positive but under two blocks, from the device: the fix named is the flag to set.
    reading = MemoryReading(is_cpu=False, info=METAL_INFO, active=188743680000 - (5 << 20))
    with pytest.raises(KVCacheTooSmall, match="set --kv-cache-memory"):
        num_kv_blocks(cfg, EngineConfig(), mx.bfloat16, reading=reading)


def test_the_reading_of_this_machine_is_usable():
    reading = MemoryReading.now()
    assert reading.is_cpu == (mx.default_device() == mx.cpu)
    assert available_memory(reading).nbytes > 0
