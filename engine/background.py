"""Long work that shares the device with serving (training), run on the engine thread in
bounded units between serving steps.

Only the engine thread touches MLX, so work like training cannot run on a thread of its own;
it runs in units, each bounded (one micro-batch of training), between the engine's steps. Which
step a unit follows is decided by one policy, here, and nowhere in the step loop:

- nothing running or waiting: units run back to back (the device would idle otherwise);
- requests waiting for a place in the batch: no unit runs (serving is at capacity; work
  resumes once the queue is empty);
- requests running and none waiting: one unit after every ``serve_steps`` serving steps, so
  serving keeps at least ``serve_steps`` steps out of every ``serve_steps + 1`` and a stream's
  tokens are late by at most one unit.

A unit changes nothing serving reads (not the scheduler, the KV cache, the adapter slots or
the sampler's key stream), so a running stream's tokens are the ones it would have had alone.
"""

from __future__ import annotations

import logging
import queue
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from engine.stats import EngineStats

log = logging.getLogger(__name__)


class BackgroundWork(Protocol):
    def run_unit(self) -> bool:
        """Run one bounded unit on the engine thread; False once the work is over (done,
        cancelled or failed: the work reports which to its owner itself)."""
        ...


@dataclass(frozen=True, slots=True)
class InterleavePolicy:
    """When a unit of background work may follow a step (see the module docstring)."""

    serve_steps: int = 4

    def __post_init__(self) -> None:
        if self.serve_steps < 1:
            raise ValueError(f"serve_steps must be at least 1, got {self.serve_steps}")

    def due(self, stats: EngineStats, steps_since_unit: int) -> bool:
        if stats.num_waiting > 0:
            return False
        return stats.num_running == 0 or steps_since_unit >= self.serve_steps


class Background:
    """The engine thread's background works: first come, first run, one unit at a time.

    ``add`` may be called from any thread; everything else runs on the engine thread.
    """

    def __init__(self, policy: InterleavePolicy | None = None) -> None:
        self.policy = policy or InterleavePolicy()
        self._new: queue.SimpleQueue[BackgroundWork] = queue.SimpleQueue()
        self._works: deque[BackgroundWork] = deque()
        self._steps_since_unit = 0

    def add(self, work: BackgroundWork) -> None:
        self._new.put(work)

    @property
    def pending(self) -> bool:
        return bool(self._works) or not self._new.empty()

    def after_step(self, stats: EngineStats, stepped: bool) -> None:
        """Called after each turn of the step loop (``stepped``: a serving step ran); runs one
        unit when the policy says it is due."""
        while not self._new.empty():
            self._works.append(self._new.get())
        self._steps_since_unit += stepped
        if not self._works or not self.policy.due(stats, self._steps_since_unit):
            return
        self._steps_since_unit = 0
        work = self._works[0]
        try:
            more = work.run_unit()
        except Exception:  # a work reports its own failures; this one did not
            log.exception("background work failed")
            more = False
        if not more:
            self._works.popleft()
