"""The bounded in-memory chunk cache: LRU eviction, budgets, pins, integrity."""

from __future__ import annotations

import pytest

from cellmesh.state.blob_cache import ChunkStore, IntegrityError, LRUChunkStore, check_block
from cellmesh.state.chunking import chunk_id


def blk(i: int, size: int = 100) -> tuple[bytes, bytes]:
    data = i.to_bytes(4, "big") * (size // 4)
    return chunk_id(data), data


def test_is_a_chunk_store() -> None:
    assert isinstance(LRUChunkStore(10), ChunkStore)


def test_put_get_has_and_dedup() -> None:
    c = LRUChunkStore(1000)
    bid, data = blk(1)
    assert not c.has(bid)
    assert c.get(bid) is None
    assert c.put(bid, data)
    assert not c.put(bid, data)  # stored once
    assert c.has(bid)
    assert bid in c
    assert c.get(bid) == data
    assert len(c) == 1
    assert c.total_bytes == 100
    s = c.statistics()
    assert (s.puts, s.duplicates, s.hits, s.misses) == (1, 1, 1, 1)


def test_wrong_id_is_refused() -> None:
    c = LRUChunkStore(1000)
    bid, data = blk(1)
    with pytest.raises(IntegrityError):
        c.put(bid, data + b"x")
    with pytest.raises(IntegrityError):
        check_block(bid[:10], data)
    assert len(c) == 0


def test_evicts_least_recently_used_by_bytes() -> None:
    c = LRUChunkStore(max_bytes=300)
    ids = []
    for i in range(3):
        bid, data = blk(i)
        c.put(bid, data)
        ids.append(bid)
    c.get(ids[0])  # 0 is now the most recently used; 1 is the oldest
    bid3, data3 = blk(3)
    assert c.put(bid3, data3)
    assert not c.has(ids[1])
    assert c.has(ids[0])
    assert c.has(ids[2])
    assert c.has(bid3)
    assert c.total_bytes == 300
    s = c.statistics()
    assert (s.evictions, s.evicted_bytes) == (1, 100)


def test_has_does_not_refresh() -> None:
    c = LRUChunkStore(max_bytes=200)
    a, da = blk(1)
    b, db = blk(2)
    c.put(a, da)
    c.put(b, db)
    c.has(a)
    x, dx = blk(3)
    c.put(x, dx)
    assert not c.has(a)


def test_block_count_bound() -> None:
    c = LRUChunkStore(max_bytes=10**6, max_blocks=5)
    for i in range(20):
        bid, data = blk(i)
        c.put(bid, data)
        assert len(c) <= 5
    assert c.statistics().evictions == 15


def test_big_block_evicts_many_and_oversize_declined() -> None:
    c = LRUChunkStore(max_bytes=1000)
    for i in range(10):
        bid, data = blk(i)
        c.put(bid, data)
    big, dbig = blk(99, 800)
    assert c.put(big, dbig)
    assert c.total_bytes <= 1000
    assert len(c) == 3
    huge, dhuge = blk(100, 2000)
    assert not c.put(huge, dhuge)
    assert c.statistics().declined == 1


def test_pins_survive_eviction() -> None:
    c = LRUChunkStore(max_bytes=300)
    a, da = blk(1)
    c.pin(a)  # a pin may come before the block
    c.put(a, da)
    for i in range(2, 10):
        bid, data = blk(i)
        c.put(bid, data)
    assert c.has(a)
    assert c.statistics().pinned == 1
    # Pinned blocks fill the budget: nothing unpinned fits.
    b, db = blk(50, 200)
    c.pin(b)
    c.put(b, db)
    x, dx = blk(60)
    assert not c.put(x, dx)
    c.unpin(a)
    assert c.put(x, dx)
    assert not c.has(a)
    assert c.delete(b)
    assert not c.delete(b)
    assert c.total_bytes == 100


def test_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        LRUChunkStore(0)
    with pytest.raises(ValueError, match="max_blocks"):
        LRUChunkStore(10, 0)
