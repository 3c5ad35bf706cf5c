"""How many threads the CPU's BLAS gets while the engine serves: every core the other programs
leave free.

On a machine that runs nothing else, every core is fastest: on 2 cores, 2 OpenBLAS threads
decode a 58M float32 llama ~20% faster than 1, at 1 stream and at 16 (docs/benchmarks.md). But
the BLAS splits each product evenly between its threads, so one core taken by another program
stalls every product on the thread that waits for it, and its spinning workers take the core
back: with one busy program beside it, 2 threads served half of what 1 did. So the engine's
process watches how much CPU the rest of the machine uses (its own threads excepted; the HTTP
server's process counts as another program) and gives the BLAS the cores left over: one fewer
as soon as others use more than ``DOWN_AT`` of a core, one more back once they have used less
than ``UP_BELOW`` for ``UP_AFTER`` windows in a row. Only where the thread count is ours (the
user set none) and the library can change it (`cpu_blas.set_threads`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WINDOW_S = 0.5  # one reading of the machine's CPU use
DOWN_AT = 0.4  # others' cores above which the BLAS gives one up
UP_BELOW = 0.2  # others' cores below which it may take one back...
UP_AFTER = 3  # ...after this many windows in a row
_TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds spent so far: by every process on the cores we may use, and by this one."""

    wall: float  # time.monotonic() when read
    busy: float
    own: float


def busy_seconds(stat: str, cores: Collection[int]) -> float:
    """CPU seconds spent busy on ``cores`` since boot, from /proc/stat's per-core lines: user,
    nice, system, irq and softirq (not idle, iowait, or steal: time the hypervisor gave to
    other machines is not a program here wanting a core)."""
    total = 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        fields = [int(x) for x in rest.split()]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        total += user + nice + system + irq + softirq
    return total * _TICK_S


def read_sample(cores: Collection[int]) -> CpuSample:
    times = os.times()
    stat = Path("/proc/stat").read_text()
    return CpuSample(time.monotonic(), busy_seconds(stat, cores), times.user + times.system)


def others_cores(before: CpuSample, after: CpuSample) -> float:
    """How many cores' worth of CPU everything but this process used between two samples."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others / wall)


class ThreadPolicy:
    """The BLAS's thread count for each window's reading of others' CPU use."""

    def __init__(self, cores: int, threads: int) -> None:
        self.cores, self.threads = cores, threads
        self._calm = 0  # windows in a row that would allow more threads

    def left_over(self, others: float, margin: float) -> int:
        """Cores left when others' use, less ``margin`` of a core, is rounded up to cores."""
        return max(1, self.cores - max(0, math.ceil(others - margin)))

    def observe(self, others: float) -> int | None:
        """The new thread count after a window where others used ``others`` cores, or None
        when it stays."""
        if (down := self.left_over(others, DOWN_AT)) < self.threads:
            self.threads, self._calm = down, 0
            return down
        up = self.left_over(others, UP_BELOW)
        self._calm = self._calm + 1 if up > self.threads else 0
        if self._calm >= UP_AFTER:
            self.threads, self._calm = up, 0
            return up
        return None


def govern(
    apply: Callable[[int, float], None],
    threads: int,
    stop: threading.Event,
    *,
    cores: Collection[int] | None = None,
    read: Callable[[Collection[int]], CpuSample] = read_sample,
) -> None:
    """Until ``stop`` is set: read the machine's CPU use every ``WINDOW_S`` and call
    ``apply(threads, others)`` whenever the thread count should change. Runs on a thread of
    its own."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    policy = ThreadPolicy(len(cores), threads)
    before = read(cores)
    while not stop.wait(WINDOW_S):
        after = read(cores)
        others = others_cores(before, after)
        before = after
        if (changed := policy.observe(others)) is not None:
            apply(changed, others)
