"""Device slots: which adapters are resident in the model's stacked LoRA weights.

Only the engine thread calls this (it writes MLX arrays). A running request pins its adapter's
slot; unpinned resident adapters stay loaded and are evicted least recently used first when a
new adapter needs a slot. The same weights and config under two names share one slot.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import mlx.core as mx

from adapters.format import parse_adapter
from adapters.types import TARGETABLE, AdapterVersion
from engine.models.base import CausalLM
from engine.models.lora import LoRABatch, LoRALinear
from engine.request import Request

log = logging.getLogger(__name__)


def slot_bytes(model: CausalLM, max_rank: int, dtype: mx.Dtype) -> int:
    """Device bytes one slot takes across every targetable projection of every layer."""
    total = 0
    for layer in model.model.layers:
        for path in TARGETABLE:
            out_f, in_f = _shape(_module(layer, path))
            total += (in_f + out_f) * max_rank * dtype.size
    return total


class AdapterSlots:
    """``max_loras`` slots (1..max_loras) plus the null slot 0 of base-model tokens.

    Invariants: ``refs[s]`` is the number of running requests using slot s; a resident slot is
    in ``lru`` iff ``refs[s] == 0``; ``key_of[s]`` is None iff slot s is empty.
    """

    def __init__(self, model: CausalLM, max_loras: int, max_rank: int, dtype: mx.Dtype) -> None:
        self.model, self.max_rank, self.dtype = model, max_rank, dtype
        self.batch = LoRABatch()
        self.layers: dict[tuple[int, str], LoRALinear] = {}
        for i, layer in enumerate(model.model.layers):
            for path in TARGETABLE:
                base = _module(layer, path)
                out_f, in_f = _shape(base)
                lora = LoRALinear(base, in_f, out_f, max_loras + 1, max_rank, dtype, self.batch)
                _replace(layer, path, lora)
                self.layers[(i, path)] = lora
        mx.eval([m._a for m in self.layers.values()], [m._b for m in self.layers.values()])
        self.key_of: list[str | None] = [None] * (max_loras + 1)
        self.refs = [0] * (max_loras + 1)
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.loads = 0

    @property
    def resident(self) -> int:
        return sum(k is not None for k in self.key_of)

    def acquire(self, request: Request) -> bool:
        """Give ``request`` its adapter's slot, loading it if needed; False if every slot is
        pinned by running requests (the request waits)."""
        version = request.lora
        if version is None:
            request.lora_slot = 0
            return True
        key = request.cache_salt or version.digest
        if key in self.key_of:
            slot = self.key_of.index(key)
        else:
            slot = self._free_slot()
            if slot is None:
                return False
            self._load(slot, key, version)
        self.refs[slot] += 1
        self.lru.pop(slot, None)
        request.lora_slot = slot
        return True

    def release(self, request: Request) -> None:
        slot = request.lora_slot
        if slot == 0:
            return
        self.refs[slot] -= 1
        assert self.refs[slot] >= 0
        if self.refs[slot] == 0:
            self.lru[slot] = None  # most recently used last
        request.lora_slot = 0

    def set_step(self, token_slots: list[int]) -> None:
        """The slot of each token of the coming forward pass (flattened order)."""
        if any(token_slots):
            self.batch.token_slots = mx.array(token_slots, dtype=mx.uint32)
        else:
            self.batch.token_slots = None

    def _free_slot(self) -> int | None:
        for slot in range(1, len(self.key_of)):
            if self.key_of[slot] is None:
                return slot
        if not self.lru:
            return None
        slot, _ = self.lru.popitem(last=False)
        log.info("evicting adapter %s from slot %d", self.key_of[slot], slot)
        self.key_of[slot] = None
        return slot

    def _load(self, slot: int, key: str, version: AdapterVersion) -> None:
        parsed = parse_adapter(
            version.config_path.read_bytes(),
            version.weights_path.read_bytes(),
            self.model.config,
            max_rank=self.max_rank,
            max_bytes=1 << 62,
        )
        for (i, path), lora in self.layers.items():
            w = parsed.modules.get((i, path))
            if w is None:
                lora.set_slot(slot, None, None)
            else:
                a = mx.array(w.a.T)  # [in, r]
                b = mx.array(w.b.T * w.scale)  # [r, out], scale folded in
                lora.set_slot(slot, a, b)
        mx.eval([m._a for m in self.layers.values()], [m._b for m in self.layers.values()])
        self.key_of[slot] = key
        self.loads += 1
        log.info("loaded adapter %s v%d into slot %d", version.name, version.version, slot)


def _module(layer, path: str):
    """The base projection at ``path`` (unwrapped if an earlier engine already adapted it)."""
    parent, name = path.split(".")
    module = getattr(getattr(layer, parent), name)
    return module.base if isinstance(module, LoRALinear) else module


def _replace(layer, path: str, module) -> None:
    parent, name = path.split(".")
    setattr(getattr(layer, parent), name, module)


def _shape(linear) -> tuple[int, int]:
    """(out_features, in_features) of a dense or affine-quantized linear layer."""
    if hasattr(linear, "scales"):
        out_f, packed = linear.weight.shape
        return out_f, packed * 32 // linear.bits
    return tuple(linear.weight.shape)
