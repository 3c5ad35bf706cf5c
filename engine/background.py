"""Long work that shares the device with serving (training), run on the engine thread in
bounded units between serving steps.

Only the engine thread touches MLX, so work like training cannot run on a thread of its own;
it runs in units, each bounded (one micro-batch of training), between the engine's steps. Which
step a unit follows is decided by one policy, here, and nowhere in the step loop:

- nothing running or waiting for ``idle_grace`` seconds: units run back to back (the device
  would idle otherwise). The grace keeps a unit from starting in the moment between a batch
  finishing and its clients' next requests arriving, which would make each of them wait a
  whole unit;
- requests waiting for a place in the batch: no unit runs (serving is at capacity; work
  resumes once the queue is empty);
- requests running and none waiting: a unit once at least ``serve_steps`` serving steps ran
  since the last one *and* serving has had, since then, at least ``serve_share / (1 -
  serve_share)`` times that unit's duration. So serving keeps at least ``serve_steps`` steps
  and at least ``serve_share`` of the engine thread's time while requests run, whatever a unit
  costs against a step (on a CPU, one training micro-batch can cost as much as dozens of decode
  steps), and a stream's tokens are late by at most one unit at a time.

A unit changes nothing serving reads (not the scheduler, the KV cache, the adapter slots or
the sampler's key stream), so a running stream's tokens are the ones it would have had alone.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from engine.stats import EngineStats

log = logging.getLogger(__name__)

GRACE_POLL = 0.002  # seconds the engine thread rests per turn during the idle grace


class BackgroundWork(Protocol):
    def run_unit(self) -> bool:
        """Run one bounded unit on the engine thread; False once the work is over (done,
        cancelled or failed: the work reports which to its owner itself)."""
        ...


class Cancellable(Protocol):
    def cancel(self) -> None:
        """Stop the work at its next unit (any thread)."""
        ...


@dataclass(frozen=True, slots=True)
class InterleavePolicy:
    """When a unit of background work may follow a step (see the module docstring)."""

    serve_steps: int = 4
    serve_share: float = 2 / 3  # of the engine thread's time while requests run, at least
    idle_grace: float = 0.25  # seconds with nothing to serve before units run back to back

    def __post_init__(self) -> None:
        if self.serve_steps < 1:
            raise ValueError(f"serve_steps must be at least 1, got {self.serve_steps}")
        if not 0 <= self.serve_share < 1:
            raise ValueError(f"serve_share must be in [0, 1), got {self.serve_share}")
        if self.idle_grace < 0:
            raise ValueError(f"idle_grace must be at least 0, got {self.idle_grace}")

    def due(
        self,
        stats: EngineStats,
        steps_since_unit: int,
        seconds_since_unit: float = float("inf"),
        last_unit_seconds: float = 0.0,
        idle_seconds: float = float("inf"),
    ) -> bool:
        """``idle_seconds``: how long nothing has run or waited (0 while something does)."""
        if stats.num_waiting > 0:
            return False
        if stats.num_running == 0:
            return idle_seconds >= self.idle_grace
        owed = last_unit_seconds * self.serve_share / (1 - self.serve_share)
        return steps_since_unit >= self.serve_steps and seconds_since_unit >= owed


class Background:
    """The engine thread's background works: first come, first run, one unit at a time.

    ``add`` may be called from any thread; everything else runs on the engine thread.
    """

    def __init__(
        self,
        policy: InterleavePolicy | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.policy = policy or InterleavePolicy()
        self.clock = clock
        self._new: queue.SimpleQueue[BackgroundWork] = queue.SimpleQueue()
        self._works: deque[BackgroundWork] = deque()
        self._steps_since_unit = 0
        self._unit_end = float("-inf")  # when the last unit ended
        self._busy = float("-inf")  # when something last ran or waited
        self._unit_seconds = 0.0  # how long it took

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
        if not self._works:
            return
        now = self.clock()
        serving = stepped or stats.num_running or stats.num_waiting
        if serving:
            self._busy = now
        since, idle = now - self._unit_end, now - self._busy
        if not self.policy.due(stats, self._steps_since_unit, since, self._unit_seconds, idle):
            # Resting only in the idle grace: a serving step must never wait for it.
            if not serving and idle < self.policy.idle_grace:
                time.sleep(GRACE_POLL)  # the loop comes straight back: do not spin meanwhile
            return
        self._steps_since_unit = 0
        work = self._works[0]
        try:
            more = work.run_unit()
        except Exception:  # a work reports its own failures; this one did not
            log.exception("background work failed")
            more = False
        self._unit_end = self.clock()
        self._unit_seconds = self._unit_end - now
        if not more:
            self._works.popleft()
