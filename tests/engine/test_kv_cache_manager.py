"""KVCacheManager: prefix hits, allocation, freeing; exact block ids and randomized invariants."""

from __future__ import annotations

import random
from collections import Counter

from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.engine.test_block_pool import check_pool_invariants

BS = 4  # block size in the hand-written tests


def make_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, list(tokens), SamplingParams(), cache_salt=salt)


def check_invariants(manager: KVCacheManager, requests: list[Request] = ()) -> None:
    holders: Counter[int] = Counter()
    for table in manager.req_to_blocks.values():
        table_ids = [block.block_id for block in table]
        assert len(set(table_ids)) == len(table_ids), table_ids
        holders.update(table_ids)
    check_pool_invariants(manager.block_pool, holders)
    for request in requests:
        table = manager.req_to_blocks.get(request.request_id, [])
        assert len(table) * manager.block_size >= request.num_computed_tokens


def admit(manager: KVCacheManager, request: Request, num_new: int | None = None) -> list[int]:
    """Look up the prefix, allocate, and mark everything scheduled computed; the block table."""
    hits, num_hit = manager.get_computed_blocks(request)
    num_new = request.num_tokens - num_hit if num_new is None else num_new
    assert manager.allocate_slots(request, num_new, hits) is not None
    request.num_computed_tokens = num_hit + num_new
    return manager.get_block_ids(request.request_id)


def decode(manager: KVCacheManager, request: Request, token: int) -> list[int]:
    request.append_output_token(token)
    num_new = request.num_tokens - request.num_computed_tokens
    assert manager.allocate_slots(request, num_new) is not None
    request.num_computed_tokens = request.num_tokens
    return manager.get_block_ids(request.request_id)


def assert_all_free(manager: KVCacheManager) -> None:
    assert manager.num_free_blocks == manager.block_pool.num_blocks - 1 and manager.usage == 0
    assert manager.req_to_blocks == {} and all(b.ref_cnt == 0 for b in manager.block_pool.blocks)
    check_invariants(manager)


def test_shared_prefix_hits_the_exact_blocks_and_counts_references():
    manager = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", range(10))
    assert manager.get_computed_blocks(a) == ([], 0)
    assert admit(manager, a) == [1, 2, 3]
    b = make_request("b", [*range(8), 99, 98, 97])
    hits, num_hit = manager.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [1, 2] and num_hit == 8
    assert [blk.block_id for blk in manager.allocate_slots(b, 3, hits)] == [4]
    assert manager.get_block_ids("b") == [1, 2, 4]
    assert [manager.block_pool.blocks[i].ref_cnt for i in range(1, 5)] == [2, 2, 1, 1]
    assert manager.prefix_cache_stats.queries == 21 and manager.prefix_cache_stats.hits == 8
    check_invariants(manager, [a, b])
    manager.free(a)
    assert [manager.block_pool.blocks[i].ref_cnt for i in range(1, 5)] == [1, 1, 0, 1]
    manager.free(b)
    assert_all_free(manager)


def test_partial_last_block_is_never_shared():
    manager = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", range(10))
    admit(manager, a)
    assert manager.block_pool.blocks[3].block_hash is None  # tokens 8, 9 only
    b = make_request("b", [*range(10), 10, 11, 12])
    hits, num_hit = manager.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [1, 2] and num_hit == 8


def test_different_salts_never_share_blocks():
    manager = KVCacheManager(num_blocks=20, block_size=BS)
    admit(manager, make_request("a", range(9), salt="adapter-x"))
    for rid, salt in (("none", None), ("y", "adapter-y")):
        assert manager.get_computed_blocks(make_request(rid, range(9), salt)) == ([], 0)
    hits, num_hit = manager.get_computed_blocks(make_request("x", range(9), salt="adapter-x"))
    assert [h.block_id for h in hits] == [1, 2] and num_hit == 8


def test_whole_prompt_cached_recomputes_the_last_block():
    manager = KVCacheManager(num_blocks=10, block_size=BS)
    admit(manager, make_request("a", range(8)))  # two full blocks, both cached
    hits, num_hit = manager.get_computed_blocks(make_request("b", range(8)))
    assert [h.block_id for h in hits] == [1] and num_hit == 4  # last prompt token needs logits
    hits, num_hit = manager.get_computed_blocks(make_request("c", range(9)))
    assert [h.block_id for h in hits] == [1, 2] and num_hit == 8


def test_allocation_failure_changes_nothing_and_counts_revived_hits():
    manager = KVCacheManager(num_blocks=5, block_size=BS)
    pool = manager.block_pool
    a = make_request("a", range(8))
    assert admit(manager, a) == [1, 2]
    manager.free(a)  # free queue: 3, 4, 2, 1 (1 and 2 still cached)
    c = make_request("c", range(50, 58))
    assert admit(manager, c) == [3, 4]
    b = make_request("b", [*range(8), 60, 61, 62, 63, 64])
    hits, num_hit = manager.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [1, 2] and num_hit == 8
    # 2 new blocks fit in the 2 free ones only if the 2 free hits weren't taken by this call too.
    before = (manager.num_free_blocks, dict(pool.cached_blocks), [x.ref_cnt for x in pool.blocks])
    stats_before = (manager.prefix_cache_stats.queries, manager.prefix_cache_stats.hits)
    assert manager.allocate_slots(b, 5, hits) is None
    after = (manager.num_free_blocks, dict(pool.cached_blocks), [x.ref_cnt for x in pool.blocks])
    assert after == before and manager.get_block_ids("b") == [] and "b" not in manager.req_to_blocks
    assert (manager.prefix_cache_stats.queries, manager.prefix_cache_stats.hits) == stats_before
    check_invariants(manager, [b, c])
    manager.free(c)  # free queue: 2, 1, 4, 3
    assert [blk.block_id for blk in manager.allocate_slots(b, 5, hits)] == [4, 3]
    assert manager.get_block_ids("b") == [1, 2, 4, 3]
    assert manager.get_computed_blocks(make_request("c2", range(50, 59)))[1] == 0  # c evicted
    manager.free(b)
    assert_all_free(manager)


def test_generated_tokens_that_fill_a_block_are_cached():
    manager = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", range(6))
    assert admit(manager, a) == [1, 2]
    decode(manager, a, 100)  # KV of token 6
    assert manager.block_pool.blocks[2].block_hash is None
    decode(manager, a, 101)  # KV of token 7 fills block 2
    assert manager.block_pool.blocks[2].block_hash == a.block_hashes[1]
    assert decode(manager, a, 102) == [1, 2, 3]
    manager.free(a)
    b = make_request("b", a.all_token_ids)  # 0..5, 100, 101, 102
    hits, num_hit = manager.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [1, 2] and num_hit == 8


def test_preemption_resumes_from_its_own_cached_blocks():
    manager = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", range(9))
    assert admit(manager, a) == [1, 2, 3]
    for token in (100, 101, 102):
        decode(manager, a, token)  # tokens 9..11: block 3 now full and cached
    a.append_output_token(103)
    manager.free(a)  # preempted
    manager.free(a)  # idempotent
    a.num_computed_tokens = 0
    assert admit(manager, a) == [1, 2, 3, 4]  # 12 of its 13 tokens hit
    assert manager.prefix_cache_stats.requests == 2 and manager.prefix_cache_stats.hits == 12
    manager.free(a)
    assert_all_free(manager)


def test_no_block_leaks_after_finish_abort_and_preemption():
    manager = KVCacheManager(num_blocks=12, block_size=BS)
    done, aborted, preempted = (make_request(r, range(i, i + 10)) for i, r in enumerate("dap"))
    admit(manager, done)
    admit(manager, aborted, num_new=5)  # chunked prefill, aborted midway
    admit(manager, preempted)
    decode(manager, done, 7)
    manager.free(aborted)
    manager.free(preempted)
    preempted.num_computed_tokens = 0
    admit(manager, preempted)
    for request in (done, preempted, aborted):
        manager.free(request)
    assert_all_free(manager)


def test_reset_prefix_cache_drops_every_hit():
    manager = KVCacheManager(num_blocks=10, block_size=BS)
    running = make_request("r", range(100, 109))
    admit(manager, running)
    finished = make_request("f", range(9))
    admit(manager, finished)
    manager.free(finished)
    manager.reset_prefix_cache()
    assert manager.get_computed_blocks(make_request("x", range(9))) == ([], 0)
    assert manager.get_computed_blocks(make_request("y", range(100, 109))) == ([], 0)
    decode(manager, running, 5)
    manager.free(running)
    assert_all_free(manager)


def test_prefix_caching_disabled_never_hits():
    manager = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    admit(manager, make_request("a", range(9)))
    assert manager.get_computed_blocks(make_request("b", range(9))) == ([], 0)
    assert manager.block_pool.cached_blocks == {}


class RandomSchedule:
    """A toy scheduler driving the manager at random, with a fake KV cache as the oracle.

    Every computed slot holds what real KV depends on, ``(salt, all tokens up to it)``; after every
    operation each request's computed slots must still hold exactly that, so a wrong prefix hit,
    a shared partial block or a write into another request's block shows up.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.manager = KVCacheManager(rng.randint(4, 12), rng.choice([1, 2, 4]))
        self.bases = [[rng.randrange(3) for _ in range(12)] for _ in range(3)]
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.kv: dict[tuple[int, int], tuple] = {}  # (block id, offset) -> slot content
        self.counts: Counter[str] = Counter()
        self.next_id = 0

    def add(self) -> None:
        base = self.rng.choice(self.bases)
        tokens = base[: self.rng.randint(1, 12)] + [self.rng.randrange(3)] * self.rng.randint(0, 3)
        salt = self.rng.choice([None, None, "a"])
        self.waiting.append(make_request(f"r{self.next_id}", tokens, salt))
        self.next_id += 1

    def step(self, request: Request) -> None:
        manager = self.manager
        waiting = request in self.waiting
        hits, num_hit = manager.get_computed_blocks(request) if waiting else ([], 0)
        chunk = self.rng.randint(1, request.num_tokens - request.num_computed_tokens - num_hit)
        if manager.allocate_slots(request, chunk, hits) is None:
            self.counts["no room"] += 1
            if request in self.running:
                self.preempt(request)
            return
        if waiting:
            self.counts["hit tokens"] += num_hit
            self.waiting.remove(request)
            self.running.append(request)
            request.num_computed_tokens = num_hit
        table = manager.req_to_blocks[request.request_id]
        start = request.num_computed_tokens
        for pos in range(start, start + chunk):
            block = table[pos // manager.block_size]
            assert block.ref_cnt == 1, "wrote into a shared block"
            self.kv[block.block_id, pos % manager.block_size] = self.expected(request, pos)
        request.num_computed_tokens += chunk
        if request.num_computed_tokens == request.num_tokens:
            if request.num_tokens >= 20:
                self.finish(request)
            else:
                request.append_output_token(self.rng.randrange(3))

    def preempt(self, request: Request) -> None:
        self.counts["preempted"] += 1
        self.manager.free(request)
        request.num_computed_tokens = 0
        self.running.remove(request)
        self.waiting.append(request)

    def finish(self, request: Request) -> None:  # finish and abort alike
        self.manager.free(request)
        self.manager.free(request)
        (self.running if request in self.running else self.waiting).remove(request)

    def expected(self, request: Request, pos: int) -> tuple:
        return request.cache_salt, tuple(request.all_token_ids[: pos + 1])

    def check(self) -> None:
        check_invariants(self.manager, self.waiting + self.running)
        assert not any(r.request_id in self.manager.req_to_blocks for r in self.waiting)
        for request in self.running:
            table = self.manager.req_to_blocks[request.request_id]
            for pos in range(request.num_computed_tokens):
                slot = table[pos // self.manager.block_size].block_id, pos % self.manager.block_size
                assert self.kv[slot] == self.expected(request, pos), (request, pos)

    def run(self, num_ops: int) -> None:
        for _ in range(num_ops):
            requests = self.waiting + self.running
            op = self.rng.random()
            if op < 0.25 or not requests:
                self.add()
            elif op < 0.85:
                self.step(self.rng.choice(requests))
            elif op < 0.93 and self.running:
                self.preempt(self.rng.choice(self.running))
            else:
                self.finish(self.rng.choice(requests))
            self.check()
        for request in self.waiting + self.running:
            self.finish(request)
        assert_all_free(self.manager)


def test_random_interleavings_keep_invariants_and_leak_nothing():
    totals: Counter[str] = Counter()
    for seed in range(200):
        schedule = RandomSchedule(random.Random(seed))
        schedule.run(num_ops=80)
        totals += schedule.counts
    # The run exercised what it claims to: prefix hits, full pools and preemption.
    assert totals["hit tokens"] > 0 and totals["no room"] > 0 and totals["preempted"] > 0, totals
