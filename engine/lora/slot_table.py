"""Which adapter sits in which device slot: pure bookkeeping, decided by the scheduler.

The scheduler assigns a running request its adapter's slot (loading it into a free or
least-recently-used one when needed) and the model runner writes the weights of every newly
assigned slot before the step that first uses it. No MLX in here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from engine.lora.request import LoRARequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SlotLoad:
    """Write ``lora``'s weights into device slot ``slot`` before the step runs."""

    slot: int
    lora: LoRARequest


class SlotTable:
    """``num_slots`` adapter slots (1..num_slots) beside the null slot 0 of base-model tokens.

    Invariants: ``refs[s]`` counts the running requests using slot s; a resident slot is in
    ``lru`` iff ``refs[s] == 0``; ``key_of[s]`` is None iff slot s is empty. Equal keys share a
    slot, so the same weights under two names are loaded once.
    """

    def __init__(self, num_slots: int) -> None:
        self.key_of: list[str | None] = [None] * (num_slots + 1)
        self.refs = [0] * (num_slots + 1)
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.loads = 0  # adapter loads since start
        self._pending: list[SlotLoad] = []

    @property
    def resident(self) -> int:
        return sum(k is not None for k in self.key_of)

    def acquire(self, lora: LoRARequest | None) -> int | None:
        """The slot for ``lora`` (0 for the base model), pinned; None if every slot is pinned
        by running requests and the request must wait."""
        if lora is None:
            return 0
        if lora.key in self.key_of:
            slot = self.key_of.index(lora.key)
        else:
            slot = self._free_slot()
            if slot is None:
                return None
            self.key_of[slot] = lora.key
            self.loads += 1
            self._pending.append(SlotLoad(slot, lora))
        self.refs[slot] += 1
        self.lru.pop(slot, None)
        return slot

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        self.refs[slot] -= 1
        assert self.refs[slot] >= 0, f"slot {slot} released more often than acquired"
        if self.refs[slot] == 0:
            self.lru[slot] = None  # most recently used last

    def forget(self, slot: int) -> None:
        """Empty ``slot`` whose load failed; its requests are failed, which releases them."""
        self.key_of[slot] = None

    def take_loads(self) -> tuple[SlotLoad, ...]:
        """The slots assigned since the last call, whose weights the runner must write."""
        loads, self._pending = tuple(self._pending), []
        return loads

    def _free_slot(self) -> int | None:
        for slot in range(1, len(self.key_of)):
            if self.key_of[slot] is None:
                return slot
        if not self.lru:
            return None
        slot, _ = self.lru.popitem(last=False)
        log.info("evicting adapter %s from slot %d", self.key_of[slot], slot)
        # A load queued for this slot in the same step is superseded by the new one.
        self._pending = [p for p in self._pending if p.slot != slot]
        self.key_of[slot] = None
        return slot
