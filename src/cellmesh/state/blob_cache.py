"""Chunk stores: the `ChunkStore` interface and a size-bounded in-memory LRU implementation.

A chunk store maps a block id (BLAKE3-256 of the block) to the block's bytes. "Block" is the
unit the BLOCK_WANT / BLOCK_PUT exchange moves: a file chunk or a blob manifest. Because the key
*is* the hash of the value, a store never holds two copies of the same content (deduplication
comes free) and anyone can check a block against its id.

`LRUChunkStore` is the cache for "chunks of others" (issue 8, item 5): a node keeps blocks it
fetched or relays for peers up to a byte and count budget, evicting the least recently used
first. Blocks of the node's own blobs can be pinned so the cache never evicts them. The durable,
file-backed store lives in `cellmesh.node.blob_store` (files are only allowed in node/).

Every store checks `put` against the id (a mismatch raises `IntegrityError`): hashing is cheap
next to moving the bytes (BLAKE3 runs at GB/s), and a store that can hold a wrong block under a
good id would poison every peer it serves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import blake3

from cellmesh.errors import CellmeshError, CryptoError

__all__ = [
    "BLOCK_ID_LEN",
    "ChunkMissingError",
    "ChunkStore",
    "IntegrityError",
    "LRUChunkStore",
    "LRUStats",
    "check_block",
]

BLOCK_ID_LEN = 32
"""Bytes in a block id (BLAKE3-256)."""


class IntegrityError(CryptoError):
    """Content does not hash to the address it was given or claims (a corrupt or forged block)."""


class ChunkMissingError(CellmeshError):
    """A block a blob needs is not in the store."""


@runtime_checkable
class ChunkStore(Protocol):
    """Content-addressed block storage. Implementations: `LRUChunkStore` (memory, bounded) and
    `cellmesh.node.blob_store.FileChunkStore` (a directory, durable).

    Contract: `get` returns bytes whose BLAKE3 is `block_id`, or None; never wrong bytes.
    """

    def has(self, block_id: bytes) -> bool:
        """True if the store holds `block_id` (a cheap check; `get` may still find it corrupt)."""
        ...

    def get(self, block_id: bytes) -> bytes | None:
        """The block's bytes (verified against `block_id`), or None if absent or corrupt."""
        ...

    def put(self, block_id: bytes, data: bytes) -> bool:
        """Store `data` under `block_id`; True if newly stored, False if it was already there (or
        the store declined to keep it). Raises `IntegrityError` if BLAKE3(data) != block_id."""
        ...


def check_block(block_id: bytes, data: bytes | bytearray | memoryview) -> None:
    """Raise `IntegrityError` unless `block_id` is BLAKE3-256(`data`)."""
    if len(block_id) != BLOCK_ID_LEN or blake3.blake3(data).digest() != block_id:
        raise IntegrityError("block does not hash to its id")


@dataclass(frozen=True, slots=True)
class LRUStats:
    """A snapshot of an `LRUChunkStore`'s counters."""

    blocks: int
    bytes: int
    pinned: int
    hits: int
    misses: int
    puts: int
    duplicates: int
    evictions: int
    evicted_bytes: int
    declined: int


class LRUChunkStore:
    """An in-memory `ChunkStore` bounded by total bytes and block count, least recently used
    evicted first. `get` refreshes a block; `has` does not (peers probing must not keep junk warm).

    Pinned blocks (`pin`) are never evicted; they still count toward the budget, so a cache full
    of pinned blocks declines new unpinned ones (`put` returns False, counted in `declined`).
    """

    def __init__(self, max_bytes: int, max_blocks: int | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if max_blocks is not None and max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        self.max_bytes = max_bytes
        self.max_blocks = max_blocks
        # Unpinned blocks in LRU order (oldest first) and pinned blocks apart, so eviction walks
        # only what it may evict: a put costs O(blocks evicted), however many blocks are pinned.
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()
        self._held: dict[bytes, bytes] = {}
        self._pins: set[bytes] = set()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._puts = 0
        self._duplicates = 0
        self._evictions = 0
        self._evicted_bytes = 0
        self._declined = 0

    def __len__(self) -> int:
        return len(self._lru) + len(self._held)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._lru or block_id in self._held

    @property
    def total_bytes(self) -> int:
        """Bytes of block data held."""
        return self._bytes

    def has(self, block_id: bytes) -> bool:
        """True if the block is cached (does not refresh it)."""
        return block_id in self._lru or block_id in self._held

    def get(self, block_id: bytes) -> bytes | None:
        """The block, marked most recently used; None if not cached."""
        data = self._lru.get(block_id)
        if data is not None:
            self._lru.move_to_end(block_id)
        else:
            data = self._held.get(block_id)
            if data is None:
                self._misses += 1
                return None
        self._hits += 1
        return data

    def put(self, block_id: bytes, data: bytes) -> bool:
        """Cache a block (checked against its id), evicting old unpinned ones to make room.

        Returns False if it was already cached (it is refreshed) or cannot fit at all.
        """
        check_block(block_id, data)
        if block_id in self._lru:
            self._lru.move_to_end(block_id)
            self._duplicates += 1
            return False
        if block_id in self._held:
            self._duplicates += 1
            return False
        size = len(data)
        if not self._make_room(size):
            self._declined += 1
            return False
        if block_id in self._pins:
            self._held[block_id] = bytes(data)
        else:
            self._lru[block_id] = bytes(data)
        self._bytes += size
        self._puts += 1
        return True

    def delete(self, block_id: bytes) -> bool:
        """Drop a block (pinned or not; its pin stays); True if it was there."""
        data = self._lru.pop(block_id, None)
        if data is None:
            data = self._held.pop(block_id, None)
        if data is None:
            return False
        self._bytes -= len(data)
        return True

    def pin(self, block_id: bytes) -> None:
        """Never evict `block_id` (if it is not cached yet, the pin applies when it is put)."""
        self._pins.add(block_id)
        data = self._lru.pop(block_id, None)
        if data is not None:
            self._held[block_id] = data

    def unpin(self, block_id: bytes) -> None:
        """Let `block_id` be evicted again (it becomes the most recently used)."""
        self._pins.discard(block_id)
        data = self._held.pop(block_id, None)
        if data is not None:
            self._lru[block_id] = data

    def statistics(self) -> LRUStats:
        """A frozen snapshot of the counters."""
        return LRUStats(
            blocks=len(self),
            bytes=self._bytes,
            pinned=len(self._held),
            hits=self._hits,
            misses=self._misses,
            puts=self._puts,
            duplicates=self._duplicates,
            evictions=self._evictions,
            evicted_bytes=self._evicted_bytes,
            declined=self._declined,
        )

    def _make_room(self, size: int) -> bool:
        """Evict unpinned blocks, oldest first, until `size` more bytes and one more block fit;
        False (nothing evicted) if even evicting every unpinned block would not do."""
        if size > self.max_bytes:
            return False
        need_bytes = self._bytes + size - self.max_bytes
        need_blocks = 0 if self.max_blocks is None else len(self) + 1 - self.max_blocks
        if need_bytes <= 0 and need_blocks <= 0:
            return True
        victims: list[bytes] = []
        freed = 0
        for bid, data in self._lru.items():
            if freed >= need_bytes and len(victims) >= need_blocks:
                break
            victims.append(bid)
            freed += len(data)
        if freed < need_bytes or len(victims) < need_blocks:
            return False
        for bid in victims:
            data = self._lru.pop(bid)
            self._bytes -= len(data)
            self._evictions += 1
            self._evicted_bytes += len(data)
        return True
