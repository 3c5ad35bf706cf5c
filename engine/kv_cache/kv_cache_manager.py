"""Per-request block tables on top of the block pool: prefix hits, slot allocation, freeing.

Vocabulary after vLLM v1's ``kv_cache_manager.py``. The scheduler calls, per request and step:
``get_computed_blocks`` (first schedule only) → ``allocate_slots`` → (model step) → ``free`` at
finish, abort or preemption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.kv_cache.block_pool import BlockPool, KVBlock, hash_block
from engine.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    """Cumulative counts for ``candlewick_prefix_cache_{queries,hits}_total``, in tokens.

    Counted once per admission (a successful ``allocate_slots`` for a request holding no blocks),
    so a request that waits for memory and is looked up again is not counted twice; a request
    resumed after preemption is a new admission.
    """

    requests: int = 0
    queries: int = 0
    hits: int = 0


class KVCacheManager:
    """Which blocks each running request holds, and which of its tokens the prefix cache serves.

    Invariants (on top of ``BlockPool``'s, checked by the tests after every operation):
    - a block's ref_cnt equals the number of requests whose table holds it; a table holds a block
      at most once; after every request is freed, all ``num_blocks - 1`` blocks are free again;
    - a table covers at least the request's computed tokens: ``len(table) * block_size >=
      num_computed_tokens``; only FULL blocks are ever hashed, so a partial last block is never
      shared;
    - ``request.block_hashes[i]`` is the chained hash of the request's block i, salted with its
      ``cache_salt``; a block is found by hash only if its tokens and whole prefix match.

    Blocks are cached when ``allocate_slots`` schedules them full, before the model step writes
    them, as vLLM does: a request admitted later in the same step may hit them. The model runner
    must therefore write all of a step's KV to the cache before attention reads it (paged
    attention does so layer by layer).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert block_size >= 1
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of the table already hashed
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        """The block table: entry i holds tokens [i * block_size, (i + 1) * block_size)."""
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request's full blocks, and the tokens it covers.

        At most ``num_tokens - 1`` tokens: the last token is always recomputed so the step yields
        its logits (a fully cached prompt drops its last block hit, as vLLM does). Changes no pool
        state; pass the result straight to ``allocate_slots``, before any other allocation.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._update_block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock] = ()
    ) -> list[KVBlock] | None:
        """Make room for ``num_new_tokens`` tokens after the computed ones; the blocks added.

        The computed tokens are ``request.num_computed_tokens`` plus those of
        ``new_computed_blocks``: the prefix hit, passed on the request's first allocation before
        the scheduler adds its tokens to ``num_computed_tokens``. Returns None, changing nothing,
        when the pool lacks blocks; cached free blocks count as free, but a hit block that is free
        now is taken by this very call, so it counts against the budget too.
        """
        assert num_new_tokens >= 0
        table = self.req_to_blocks.get(request.request_id)
        is_admission = table is None
        if new_computed_blocks:
            assert is_admission and request.num_computed_tokens == 0, "hits only on admission"
            for block, block_hash in zip(new_computed_blocks, request.block_hashes, strict=False):
                assert block.block_hash == block_hash, f"hit {block} was evicted or reused"
        num_held = len(table or ()) + len(new_computed_blocks)
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = max(0, num_required - num_held)
        num_revived = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks + num_revived > self.block_pool.num_free_blocks:
            return None

        table = self.req_to_blocks.setdefault(request.request_id, [])
        self.block_pool.touch(new_computed_blocks)
        table.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        table.extend(new_blocks)
        if self.enable_prefix_caching:
            if is_admission:
                self._count_admission(request, len(new_computed_blocks))
            self._cache_full_blocks(request, table, num_computed + num_new_tokens)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first (see ``BlockPool.free_blocks``). Idempotent.

        The same call for finish, abort and preemption: a preempted request's full blocks stay
        cached, so its resumption usually hits them.
        """
        table = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if table:
            self.block_pool.free_blocks(reversed(table))

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], num_tokens: int) -> None:
        """Hash and register the blocks full once ``num_tokens`` tokens are in, as far as known."""
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        num_cached = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= num_cached:
            return
        self._update_block_hashes(request)
        self.block_pool.cache_full_blocks(request, table, num_full, num_cached)
        self.num_cached_blocks[request.request_id] = num_full

    def _count_admission(self, request: Request, num_hit_blocks: int) -> None:
        self.num_cached_blocks[request.request_id] = num_hit_blocks
        stats = self.prefix_cache_stats
        stats.requests += 1
        stats.queries += request.num_tokens
        stats.hits += num_hit_blocks * self.block_size

    def _update_block_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` over every full block of its known tokens."""
        num_full = request.num_tokens // self.block_size
        start = len(request.block_hashes)
        if start >= num_full:
            return
        tokens = request.all_token_ids
        extra_keys = () if request.cache_salt is None else (request.cache_salt,)
        parent = request.block_hashes[-1] if start else None
        for i in range(start, num_full):
            chunk = tokens[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, chunk, extra_keys)
            request.block_hashes.append(parent)
