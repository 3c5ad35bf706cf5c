"""BlockPool: exact block ids for allocation, LRU eviction, ref counts and the hash map."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVBlock, hash_block
from engine.request import Request
from engine.sampling_params import SamplingParams


def check_pool_invariants(pool: BlockPool, holders: Counter[int] | None = None) -> None:
    """Ref counts equal holders, queued iff ref 0, hash map and block hashes agree."""
    queued = [block.block_id for block in pool.free_queue]
    assert len(queued) == len(set(queued)) == pool.num_free_blocks
    for block in pool.free_queue:
        assert block.prev_free is not None and block.prev_free.next_free is block
        assert block.next_free is not None and block.next_free.prev_free is block
    null = pool.null_block
    assert null.block_id == 0 and null.ref_cnt == 0 and null.block_hash is None
    assert 0 not in queued and (holders is None or holders[0] == 0)
    queued_set = set(queued)
    for block in pool.blocks[1:]:
        assert block.ref_cnt >= 0
        assert (block.ref_cnt == 0) == (block.block_id in queued_set), block
        assert (block.prev_free is None) == (block.block_id not in queued_set), block
        if holders is not None:
            assert block.ref_cnt == holders[block.block_id], block
        if block.block_hash is not None:
            assert pool.cached_blocks[block.block_hash] is block
    for block_hash, block in pool.cached_blocks.items():
        assert block.block_hash == block_hash
    assert 0.0 <= pool.usage <= 1.0


def make_request(tokens: list[int], block_hashes: list[int] | None = None) -> Request:
    request = Request("r", tokens, SamplingParams())
    request.block_hashes = block_hashes or []
    return request


def ids(blocks: list[KVBlock]) -> list[int]:
    return [block.block_id for block in blocks]


def test_hash_block_is_chained_salted_and_unambiguous():
    root = hash_block(None, (1, 2))
    assert root == hash_block(None, [1, 2])  # deterministic, sequence type irrelevant
    assert root != hash_block(None, (2, 1))
    assert hash_block(root, (3, 4)) != hash_block(None, (3, 4))
    assert hash_block(root, (3, 4)) != hash_block(hash_block(None, (9, 9)), (3, 4))
    assert root != hash_block(None, (1, 2), ("adapter-a",))
    assert hash_block(None, (1, 2), ("a",)) != hash_block(None, (1, 2), ("b",))
    assert root != hash_block(None, (1, 2), ("",))  # no salt differs from an empty salt
    assert hash_block(None, (1, 2), ("ab",)) != hash_block(None, (1, 2), ("a", "b"))
    assert 0 <= root < 2**256


def test_allocation_hands_out_ids_in_order_and_never_the_null_block():
    pool = BlockPool(5)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    assert ids(pool.get_new_blocks(2)) == [1, 2]
    assert ids(pool.get_new_blocks(2)) == [3, 4]
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    assert all(block.ref_cnt == 1 for block in pool.blocks[1:])
    with pytest.raises(AssertionError):
        pool.get_new_blocks(1)
    check_pool_invariants(pool)


def test_free_in_reverse_makes_tail_blocks_evicted_first():
    pool = BlockPool(6)
    request = make_request(list(range(6)), [11, 12, 13])
    blocks = pool.get_new_blocks(3)  # 1, 2, 3
    pool.cache_full_blocks(request, blocks, num_full_blocks=3)
    pool.free_blocks(reversed(blocks))
    assert ids(list(pool.free_queue)) == [4, 5, 3, 2, 1]
    assert pool.usage == 0.0
    # Untouched blocks go first, then the request's tail; its head block 1 survives longest.
    assert ids(pool.get_new_blocks(3)) == [4, 5, 3]
    assert pool.get_cached_block(13) is None and pool.blocks[3].block_hash is None
    assert pool.get_cached_block(11) is pool.blocks[1]
    assert pool.get_cached_block(12) is pool.blocks[2]
    check_pool_invariants(pool)


def test_touch_revives_a_cached_free_block_from_the_middle_of_the_queue():
    pool = BlockPool(6)
    request = make_request(list(range(4)), [21, 22])
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(request, blocks, num_full_blocks=2)
    pool.free_blocks(reversed(blocks))
    assert ids(list(pool.free_queue)) == [3, 4, 5, 2, 1]
    hit = pool.get_cached_block(22)
    assert hit is pool.blocks[2]
    pool.touch([hit])
    pool.touch([hit])  # a second holder
    assert hit.ref_cnt == 2 and ids(list(pool.free_queue)) == [3, 4, 5, 1]
    pool.free_blocks([hit])
    assert hit.ref_cnt == 1 and 2 not in ids(list(pool.free_queue))
    pool.free_blocks([hit])
    assert ids(list(pool.free_queue)) == [3, 4, 5, 1, 2]  # refreshed: now most recent
    assert pool.get_cached_block(22) is hit  # still cached while free
    check_pool_invariants(pool)


def test_cache_full_blocks_registers_only_the_new_range_and_first_writer_wins():
    pool = BlockPool(6)
    first = pool.get_new_blocks(2)
    pool.cache_full_blocks(make_request([0] * 4, [31, 32]), first, num_full_blocks=1)
    assert pool.get_cached_block(31) is first[0] and first[1].block_hash is None
    pool.cache_full_blocks(make_request([0] * 4, [31, 32]), first, 2, num_cached_blocks=1)
    assert pool.get_cached_block(32) is first[1]
    # The same content computed into other blocks (no hit) stays unhashed: one block per hash.
    dup = pool.get_new_blocks(2)
    pool.cache_full_blocks(make_request([0] * 4, [31, 32]), dup, num_full_blocks=2)
    assert dup[0].block_hash is None and pool.get_cached_block(31) is first[0]
    check_pool_invariants(pool)


def test_free_of_an_unheld_block_is_an_error():
    pool = BlockPool(3)
    with pytest.raises(AssertionError):
        pool.free_blocks([pool.blocks[1]])
    with pytest.raises(AssertionError):
        pool.free_blocks([pool.null_block])


def test_caching_disabled_registers_nothing():
    pool = BlockPool(4, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(make_request([0] * 4, [41, 42]), blocks, num_full_blocks=2)
    assert pool.cached_blocks == {} and all(b.block_hash is None for b in blocks)


def test_reset_prefix_cache_forgets_free_and_held_blocks():
    pool = BlockPool(5)
    request = make_request(list(range(4)), [51, 52])
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(request, blocks, num_full_blocks=2)
    pool.free_blocks([blocks[1]])  # one free-but-cached, one held
    pool.reset_prefix_cache()
    assert pool.cached_blocks == {} and all(b.block_hash is None for b in pool.blocks)
    assert pool.get_cached_block(51) is None and pool.num_free_blocks == 3
    pool.free_blocks([blocks[0]])
    assert pool.num_free_blocks == 4
    check_pool_invariants(pool, Counter())


def test_free_queue_removes_from_head_middle_and_tail():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[0])
    queue.remove(blocks[4])
    assert ids(list(queue)) == [1, 3] and len(queue) == 2
    queue.append(blocks[2])
    assert queue.popleft() is blocks[1] and ids(list(queue)) == [3, 2]
    assert blocks[1].prev_free is None and blocks[1].next_free is None
