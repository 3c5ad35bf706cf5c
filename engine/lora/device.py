"""The adapters' weights on the device: every targetable projection of the model wrapped in a
``LoRALinear`` holding all slots stacked, and the per-token slot ids of the current step."""

from __future__ import annotations

import logging

import mlx.core as mx

from engine.lora.layers import LoRABatch, LoRALinear
from engine.lora.request import TARGETABLE
from engine.lora.slot_table import SlotLoad
from engine.models.base import CausalLM

log = logging.getLogger(__name__)


def slot_bytes(model: CausalLM, max_rank: int, dtype: mx.Dtype) -> int:
    """Device bytes one slot takes across every targetable projection of every layer."""
    total = 0
    for layer in model.model.layers:
        for path in TARGETABLE:
            out_f, in_f = _shape(_module(layer, path))
            total += (in_f + out_f) * max_rank * dtype.size
    return total


class DeviceLoRA:
    """Wraps the model's projections (once, at engine start) and writes adapters into slots.

    Only the engine thread calls it. Slot 0 stays all zeros: base-model tokens add nothing.
    """

    def __init__(self, model: CausalLM, num_slots: int, max_rank: int, dtype: mx.Dtype) -> None:
        self.model, self.max_rank, self.dtype = model, max_rank, dtype
        self.batch = LoRABatch()
        self.layers: dict[tuple[int, str], LoRALinear] = {}
        self._shard: dict[tuple[int, str], object] = {}  # a sharded layer's slicing of A and B
        for i, layer in enumerate(model.model.layers):
            for path in TARGETABLE:
                base = _module(layer, path)
                out_f, in_f = _shape(base)
                lora = LoRALinear(base, in_f, out_f, num_slots + 1, max_rank, dtype, self.batch)
                owner, name = _site(layer, path)
                setattr(owner, name, lora)
                self.layers[(i, path)] = lora
                if hasattr(owner, "shard_lora"):
                    self._shard[(i, path)] = owner.shard_lora
        mx.eval(self._arrays())

    def load(self, load: SlotLoad) -> None:
        """Write one adapter into its slot (reads and validates its files through ``load``)."""
        modules = load.lora.load()
        for key, lora in self.layers.items():
            w = modules.get(key)
            if w is None:
                lora.set_slot(load.slot, None, None)
            else:
                if w.rank > self.max_rank:
                    raise ValueError(
                        f"adapter {load.lora.name!r} has rank {w.rank}; slots hold {self.max_rank}"
                    )
                a = mx.array(w.a.T)  # [in, r]
                b = mx.array(w.b.T * w.scale)  # [r, out], scale folded in
                if (shard := self._shard.get(key)) is not None:  # this rank's slice
                    a, b = shard(a, b)
                lora.set_slot(load.slot, a, b)
        mx.eval(self._arrays())
        log.info("loaded adapter %s v%d into slot %d", load.lora.name, load.lora.version, load.slot)

    def set_step(self, token_slots: list[int]) -> None:
        """The slot of each token of the coming forward pass (flattened order)."""
        if any(token_slots):
            self.batch.token_slots = mx.array(token_slots, dtype=mx.uint32)
        else:
            self.batch.token_slots = None

    def _arrays(self) -> list[mx.array]:
        return [m._a for m in self.layers.values()] + [m._b for m in self.layers.values()]


def _site(layer, path: str) -> tuple:
    """The module holding the projection at ``path`` and its attribute name: inside a
    tensor-parallel wrapper (``inner``) when there is one, so that an adapter's update joins
    the wrapper's sum."""
    parent, name = path.split(".")
    owner = getattr(layer, parent)
    if hasattr(getattr(owner, name), "shard_lora"):
        owner, name = getattr(owner, name), "inner"
    return owner, name


def _module(layer, path: str):
    """The base projection at ``path`` (unwrapped if an earlier engine already adapted it)."""
    module = getattr(*_site(layer, path))
    return module.base if isinstance(module, LoRALinear) else module


def _shape(linear) -> tuple[int, int]:
    """(out_features, in_features) of a dense or affine-quantized linear layer."""
    if hasattr(linear, "scales"):
        out_f, packed = linear.weight.shape
        return out_f, packed * 32 // linear.bits
    return tuple(linear.weight.shape)
