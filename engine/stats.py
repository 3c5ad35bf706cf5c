"""What the engine tells the outside about itself: one frozen snapshot per step.

The engine thread replaces ``EngineCore.stats`` with a new ``EngineStats`` after every change;
another thread (the server's metrics scrape) reads whichever snapshot is current, never the
scheduler's or the block pool's live state.
"""

from __future__ import annotations

from dataclasses import dataclass


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
