"""The pool of fixed-size KV blocks: allocation, ref counts, the prefix-cache map, LRU eviction.

Vocabulary after vLLM v1's ``block_pool.py``. Pure Python: block ids index the model runner's
paged KV tensors, but nothing here touches them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from engine.request import Request

BlockHash = int


def hash_block(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[str, ...] = ()
) -> BlockHash:
    """The hash of one full block, chained to its parent so it names the whole prefix.

    SHA-256 of a canonical, length-prefixed byte encoding, not Python's ``hash``: ``hash`` of an
    int tuple is a 64-bit non-cryptographic mix (``hash(n) == n`` for small ints), so a client
    could craft a prompt whose block collides with another tenant's and read its KV. SHA-256 makes
    that infeasible, is deterministic across processes and machines, and costs ~1 µs per block,
    paid once per block. ``extra_keys`` carries the request's ``cache_salt`` (e.g. an adapter
    digest), so different salts never share a block.
    """
    h = hashlib.sha256()
    h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(32, "little"))
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    h.update(struct.pack("<I", len(extra_keys)))
    for key in extra_keys:
        data = key.encode()
        h.update(struct.pack("<I", len(data)) + data)
    return int.from_bytes(h.digest(), "little")


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of ``block_size`` token slots. Compared by identity.

    ``block_hash`` is set iff the block is registered in the pool's hash map (findable by a prefix
    lookup). ``prev_free`` / ``next_free`` link it into the free queue; both are None off it.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Blocks with ref_cnt 0, in eviction order: the head is popped first (least recently freed).

    A doubly linked list through the blocks themselves with two sentinels, so taking a cached free
    block back out of the middle (a prefix hit) is O(1); a deque would make that O(n).
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        block = self._head.next_free
        while block is not self._tail:
            assert block is not None
            yield block
            block = block.next_free

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        assert block is not None and block is not self._tail, "free queue is empty"
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        assert block.prev_free is None and block.next_free is None, f"{block} already queued"
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free, block.next_free = last, self._tail
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not queued"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self._len -= 1


class BlockPool:
    """All KV blocks, who holds them, and which full ones are findable by hash.

    Invariants (checked by the tests after every operation):
    - block 0 is the *null block*: never handed out, never queued, ref_cnt 0; the model runner
      points padding slots at it. ``num_blocks - 1`` blocks are usable.
    - a block's ref_cnt equals the number of requests holding it;
    - a block is in the free queue iff its ref_cnt is 0 (free blocks may still be cached: they are
      evicted lazily, from the queue's head, only when handed out again);
    - ``block.block_hash == h`` iff ``cached_blocks[h] is block``; at most one block per hash
      (first writer wins: a duplicate computed concurrently stays unhashed, a plain block).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        assert num_blocks >= 2, "need the null block and at least one usable block"
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached_blocks: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``get_new_blocks`` can hand out, cached-but-unused ones included."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by some request, 0..1."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Pop ``n`` blocks from the free queue's head, evicting their hashes; each gets ref 1."""
        assert 0 <= n <= self.num_free_blocks, f"asked for {n}, {self.num_free_blocks} free"
        blocks = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on each block (a prefix hit), pulling free ones out of the queue."""
        for block in blocks:
            assert block is not self.null_block
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_full_blocks(
        self,
        request: Request,
        blocks: Sequence[KVBlock],
        num_full_blocks: int,
        num_cached_blocks: int = 0,
    ) -> None:
        """Register ``blocks[num_cached_blocks:num_full_blocks]``, now full, under their hashes.

        ``blocks`` is the request's whole block table; ``request.block_hashes`` must already cover
        the first ``num_full_blocks`` blocks. Blocks before ``num_cached_blocks`` were registered
        earlier (or were prefix hits) and are skipped.
        """
        if not self.enable_caching:
            return
        assert num_full_blocks <= min(len(blocks), len(request.block_hashes))
        for i in range(num_cached_blocks, num_full_blocks):
            block, block_hash = blocks[i], request.block_hashes[i]
            assert block.block_hash is None, f"{block} is already cached"
            if block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                self.cached_blocks[block_hash] = block

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; those reaching 0 join the free queue's tail.

        Pass a request's blocks in reverse order so its tail is evicted before its head: the
        shared-prefix blocks, most likely to be hit again, stay cached longest.
        """
        for block in blocks:
            assert block is not self.null_block and block.ref_cnt > 0, f"{block} is not held"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget every hash; held blocks keep their KV for their holders, unfindable."""
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None
