"""On the CPU, quantized weights become their exact float32 dequantization when they fit.

MLX's CPU quantized matmul is quick for one row and slow for many: a prompt of 100 tokens or
16 streams decoding together run several times slower than the same matmul on dense float32
weights through a real BLAS. So on the CPU a quantized model's linear and embedding layers
(``QuantizedLinear``, ``QuantizedEmbedding`` and the 16-element sub-block layers of
engine.models.quantized) are replaced at load by plain ``nn.Linear`` / ``nn.Embedding`` layers
holding the weights the quantized ones compute with, dequantized in float32. No number changes:
``mx.dequantize`` in float32 gives the file's values exactly (as ``gguf.quants.dequantize``
does), so only the speed and the memory differ.

The choice (``--cpu-weights``, env ``CANDLEWICK_CPU_WEIGHTS``):

- ``auto`` (default): dense on the CPU when the growth (dense float32 bytes less the quantized
  bytes they replace) is at most ``DENSE_RAM_SHARE`` of the RAM left once the KV cache's budget
  is set aside (``--kv-cache-memory`` where given, else the CPU default: half the available RAM,
  at most 2 GiB); otherwise quantized, with a log line saying why it stays slow. A model the
  user asked to quantize while loading (``--quantize``) stays quantized.
- ``dense``: dense on the CPU whatever the memory.
- ``quantized``: keep the quantized layers.

Metal keeps quantized weights (its quantized kernels are fast); CUDA has its own choice
(engine.loader.cuda_weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from engine.memory import CPU_DEFAULT_KV_CAP, CPU_UNKNOWN_RAM, available_ram, fmt
from engine.models.quantized import CHUNK_ELEMENTS, SubBlockEmbedding, SubBlockLinear

log = logging.getLogger(__name__)

WEIGHTS_CHOICES = ("auto", "dense", "quantized")
DENSE_RAM_SHARE = 0.5  # of the RAM left after the KV budget the dense copy may grow into

QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding, SubBlockLinear, SubBlockEmbedding)


def weights_choice(value: str | None, device: str = "cpu") -> str:
    """The validated ``--{device}-weights`` setting; None and '' mean ``auto``."""
    if value is None or value == "":
        return "auto"
    choice = str(value).strip().lower()
    if choice not in WEIGHTS_CHOICES:
        raise ValueError(
            f"--{device}-weights (CANDLEWICK_{device.upper()}_WEIGHTS) must be one of "
            f"{', '.join(WEIGHTS_CHOICES)}, got {value!r}"
        )
    return choice


def cpu_weights_choice(value: str | None) -> str:
    return weights_choice(value, "cpu")


@dataclass(frozen=True, slots=True)
class WeightsPlan:
    """Whether a device's quantized layers become dense, and why (for the log line)."""

    dense: bool
    reason: str
    quantized_bytes: int = 0  # the quantized layers' parameters now
    dense_bytes: int = 0  # the same layers dense


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> every quantized linear or embedding layer of ``model``."""
    return {
        path: m
        for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, QUANTIZED_TYPES)
    }


def _rows_cols(m: nn.Module) -> tuple[int, int]:
    rows, packed = m.weight.shape
    return rows, packed * 32 // m.bits


def layer_bytes(layers: dict[str, nn.Module], itemsize: int = 4) -> tuple[int, int]:
    """(bytes the layers hold now, bytes they would hold as dense weights of ``itemsize``
    bytes a number: float32 by default)."""
    now = sum(v.nbytes for m in layers.values() for _, v in tree_flatten(m.parameters()))
    dense = 0
    for m in layers.values():
        rows, cols = _rows_cols(m)
        dense += rows * cols * itemsize + (m.bias.nbytes if "bias" in m else 0)
    return now, dense


def plan_cpu_weights(
    model: nn.Module,
    mode: str,
    *,
    is_cpu: bool,
    free_ram: int | None,
    kv_cache_memory: int | None = None,
    quantized_on_request: bool = False,
) -> WeightsPlan:
    """Whether to make ``model``'s quantized layers dense (see the module docstring's rule).

    ``free_ram``: the available RAM now (None: unknown); ``kv_cache_memory``: the KV budget the
    user set, if any; ``quantized_on_request``: the weights were quantized while loading because
    the user asked for it."""
    mode = cpu_weights_choice(mode)
    layers = quantized_layers(model)
    if not layers:
        return WeightsPlan(False, "no quantized layers")
    now, dense = layer_bytes(layers)

    def plan(is_dense: bool, reason: str) -> WeightsPlan:
        return WeightsPlan(is_dense, reason, now, dense)

    if not is_cpu:
        return plan(False, "a GPU runs quantized weights fast")
    forced = forced_choice(mode, "--cpu-weights", quantized_on_request)
    if forced is not None:
        return plan(*forced)
    ram = free_ram if free_ram is not None else CPU_UNKNOWN_RAM
    if kv_cache_memory is not None:
        kv, kv_source = kv_cache_memory, "--kv-cache-memory"
    else:
        kv, kv_source = min(ram // 2, CPU_DEFAULT_KV_CAP), "the KV cache's default budget"
    fits, room = dense_fits(dense - now, ram, kv, DENSE_RAM_SHARE)
    numbers = (
        f"dense float32 adds {fmt(dense - now)}; {DENSE_RAM_SHARE:g} of the {fmt(ram)} available "
        f"RAM less {fmt(kv)} for {kv_source} is {fmt(room)}"
    )
    return plan(fits, numbers)


def forced_choice(mode: str, flag: str, quantized_on_request: bool) -> tuple[bool, str] | None:
    """(dense?, why) when the user decided (``flag`` dense or quantized, or ``--quantize``);
    None when the memory rule decides."""
    if mode == "dense":
        return True, f"{flag} dense"
    if mode == "quantized":
        return False, f"{flag} quantized"
    if quantized_on_request:
        return False, "the weights were quantized on request (--quantize)"
    return None


def dense_fits(growth: int, memory: int, kv: int, share: float) -> tuple[bool, int]:
    """Whether dense copies growing the weights by ``growth`` bytes fit ``share`` of the memory
    left after the KV budget ``kv``; and that room."""
    room = int(max(memory - kv, 0) * share)
    return growth <= room, room


def dense_weight(m: nn.Module) -> mx.array:
    """The float32 weight [rows, cols] a quantized layer computes with, exactly."""
    if isinstance(m, (SubBlockLinear, SubBlockEmbedding)):
        rows, cols = _rows_cols(m)
        step = max(1, CHUNK_ELEMENTS // cols)
        parts = [m.dense_rows(r, min(r + step, rows)) for r in range(0, rows, step)]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
    return mx.dequantize(
        m.weight,
        m.scales,
        m.get("biases"),
        group_size=m.group_size,
        bits=m.bits,
        mode=m.mode,
        dtype=mx.float32,
    )


def dense_layer(m: nn.Module, dtype: mx.Dtype = mx.float32) -> nn.Module:
    """The plain ``nn.Linear`` / ``nn.Embedding`` twin of a quantized layer (weights evaluated)."""
    weight = dense_weight(m).astype(dtype)
    rows, cols = weight.shape
    if isinstance(m, (nn.QuantizedEmbedding, SubBlockEmbedding)):
        out: nn.Module = nn.Embedding(rows, cols)
    else:
        out = nn.Linear(cols, rows, bias="bias" in m)
        if "bias" in m:
            out.bias = m.bias
    out.weight = weight
    mx.eval(out.parameters())  # one layer at a time: the peak is the model plus one dense layer
    return out


def densify(model: nn.Module, dtype: mx.Dtype = mx.float32) -> int:
    """Replace every quantized layer of ``model`` by its dense twin; returns how many."""
    layers = quantized_layers(model)
    if layers:
        model.update_modules(
            tree_map_with_path(
                lambda path, m: dense_layer(m, dtype) if path in layers else m,
                model.leaf_modules(),
                is_leaf=nn.Module.is_module,
            )
        )
    return len(layers)


def apply_cpu_weights(
    model: nn.Module,
    mode: str,
    dtype: mx.Dtype = mx.float32,
    *,
    kv_cache_memory: int | None = None,
    quantized_on_request: bool = False,
) -> WeightsPlan:
    """Plan for the default device and carry it out, saying what was chosen in the log."""
    is_cpu = mx.default_device() == mx.cpu
    plan = plan_cpu_weights(
        model,
        mode,
        is_cpu=is_cpu,
        free_ram=available_ram() if is_cpu else None,
        kv_cache_memory=kv_cache_memory,
        quantized_on_request=quantized_on_request,
    )
    if plan.dense:
        n = densify(model, dtype)
        log.info(
            "CPU weights: %d quantized layers made dense %s (%s -> %s): %s",
            n,
            dtype,
            fmt(plan.quantized_bytes),
            fmt(plan.dense_bytes),
            plan.reason,
        )
    elif is_cpu and plan.quantized_bytes:
        level = logging.INFO if mode == "quantized" else logging.WARNING
        log.log(
            level,
            "CPU weights stay quantized (%s): prompts and batched decoding run several times "
            "slower than dense float32 on the CPU; %s",
            fmt(plan.quantized_bytes),
            plan.reason,
        )
    return plan
