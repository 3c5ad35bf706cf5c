"""What the engine tells the outside about itself: one frozen snapshot per step.

The engine thread replaces ``EngineCore.stats`` with a new ``EngineStats`` after every change;
another thread (the server's metrics scrape) reads whichever snapshot is current, never the
scheduler's or the block pool's live state.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MASK_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Observations counted per upper bound (not cumulative; the last count is past them all)."""

    bounds: tuple[float, ...] = MASK_BUCKETS
    counts: tuple[int, ...] = (0,) * (len(MASK_BUCKETS) + 1)
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """A latency histogram the engine thread fills and snapshots (no locks: one writer)."""

    def __init__(self, bounds: tuple[float, ...] = MASK_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.total)


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int = 0  # sequences in the running batch
    num_waiting: int = 0  # sequences waiting to be scheduled (new or preempted)
    kv_usage: float = 0.0  # fraction of KV blocks in use
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of which found cached
    num_preemptions: int = 0  # since start
    adapters_loaded: int = 0  # adapters resident in device slots
    adapter_loads: int = 0  # adapters written into a slot, since start
    num_kv_blocks: int = 0  # usable blocks of the pool
    tensor_parallel_size: int = 1  # ranks the model is sharded over
    mask_seconds: HistogramSnapshot = field(default_factory=HistogramSnapshot)  # per masked row
