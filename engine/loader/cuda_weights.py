"""On CUDA, quantized weights run as dense float16/bfloat16 copies when the memory allows.

MLX's CUDA backend multiplies more than one row by quantized weights with CUTLASS kernels it
compiles (NVRTC) the first time each variant runs: 30-38 s each on an H100 (a prompt's row
count, then a batch's; `docs/benchmarks.md`), so a server on quantized weights stalls for half a
minute whenever a batch of a new size class first appears, and the default model's first chat
took 66 s. Those kernels are also slower than a dense GEMM and fall further behind as batches
grow (mlx-lm's 8B at 4 bits: 98 tokens/s at 32 streams against 1020 in bf16). A dense copy in the
model's compute dtype runs on cuBLAS, compiled in advance.

The choice (``--cuda-weights``, env ``CANDLEWICK_CUDA_WEIGHTS``), on a CUDA device only:

- ``auto`` (default): dense when the growth (dense bytes in the compute dtype less the quantized
  bytes they replace) is at most ``DENSE_SHARE`` of the device memory left once the KV cache's
  budget is set aside (``--kv-cache-memory`` where given, else the default fraction of what the
  device has); otherwise quantized, with a log line saying why. A model the user asked to
  quantize while loading (``--quantize``) stays quantized: the memory was the point.
- ``dense``: dense whatever the memory; ``quantized``: keep the quantized layers.

The dense weights are the dequantization rounded to the compute dtype (as the quantized kernels
round their dequantized values), made one layer at a time. Metal and the CPU are not concerned
(Metal's quantized kernels are precompiled and fast; the CPU has ``--cpu-weights``).
"""

from __future__ import annotations

import logging

import mlx.core as mx

from engine.config import EngineConfig
from engine.loader.cpu_weights import (
    WeightsPlan,
    dense_fits,
    densify,
    forced_choice,
    layer_bytes,
    quantized_layers,
    weights_choice,
)
from engine.memory import MemoryReading, UnknownDeviceMemory, available_memory, fmt

log = logging.getLogger(__name__)

DENSE_SHARE = 0.5  # of the device memory left after the KV budget the dense copy may grow into


def cuda_weights_choice(value: str | None) -> str:
    return weights_choice(value, "cuda")


def is_cuda(reading: MemoryReading) -> bool:
    """A GPU that reports CUDA's memory keys (Metal reports others; the CPU none)."""
    return not reading.is_cpu and "free_memory" in reading.info


def plan_cuda_weights(
    model,
    mode: str,
    dtype: mx.Dtype,
    reading: MemoryReading,
    *,
    kv_cache_memory: int | None = None,
    quantized_on_request: bool = False,
) -> WeightsPlan:
    """Whether to make the quantized layers of ``model`` dense ``dtype`` (the rule above)."""
    mode = cuda_weights_choice(mode)
    layers = quantized_layers(model)
    if not layers:
        return WeightsPlan(False, "no quantized layers")
    now, dense = layer_bytes(layers, dtype.size)

    def plan(is_dense: bool, reason: str) -> WeightsPlan:
        return WeightsPlan(is_dense, reason, now, dense)

    if not is_cuda(reading):
        return plan(False, "not a CUDA device")
    forced = forced_choice(mode, "--cuda-weights", quantized_on_request)
    if forced is not None:
        return plan(*forced)
    try:
        available = available_memory(reading)
    except UnknownDeviceMemory as e:
        return plan(False, str(e))
    if kv_cache_memory is not None:
        kv, kv_source = kv_cache_memory, "--kv-cache-memory"
    else:
        fraction = EngineConfig().kv_cache_memory_fraction
        kv, kv_source = int(available.nbytes * fraction), "the KV cache's default budget"
    fits, room = dense_fits(dense - now, available.nbytes, kv, DENSE_SHARE)
    numbers = (
        f"dense {_name(dtype)} adds {fmt(dense - now)}; {DENSE_SHARE:g} of the "
        f"{fmt(available.nbytes)} available ({available.source}) less {fmt(kv)} for {kv_source} "
        f"is {fmt(room)}"
    )
    return plan(fits, numbers)


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # mlx.core.float16 -> float16


def apply_cuda_weights(
    model,
    mode: str,
    dtype: mx.Dtype,
    *,
    kv_cache_memory: int | None = None,
    quantized_on_request: bool = False,
    reading: MemoryReading | None = None,
) -> WeightsPlan:
    """Plan for the default device and carry it out, saying what was chosen in the log."""
    reading = reading or MemoryReading.now()
    plan = plan_cuda_weights(
        model,
        mode,
        dtype,
        reading,
        kv_cache_memory=kv_cache_memory,
        quantized_on_request=quantized_on_request,
    )
    if plan.dense:
        n = densify(model, dtype)
        log.info(
            "CUDA weights: %d quantized layers made dense %s (%s -> %s): %s",
            n,
            _name(dtype),
            fmt(plan.quantized_bytes),
            fmt(plan.dense_bytes),
            plan.reason,
        )
    elif is_cuda(reading) and plan.quantized_bytes:
        level = logging.INFO if cuda_weights_choice(mode) == "quantized" else logging.WARNING
        log.log(
            level,
            "CUDA weights stay quantized (%s): MLX compiles its quantized matmul the first time "
            "each batch size class runs (about 30 s each) and it is slower than dense under "
            "batching; %s",
            fmt(plan.quantized_bytes),
            plan.reason,
        )
    return plan
