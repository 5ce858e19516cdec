"""The gateway cache: a bounded CellID -> "how we last reached it" table (issue 6, item 3).

The seed designs kept a fixed 64-entry CellID table. Here it is a bounded cache with a
deterministic eviction rule, filled only from *completed handshakes*: an entry says that a
session with `cell` was authenticated through `via` (whatever key the driver uses for a path: a
(host, port) address, or the CellID of the relay that carried the handshake). Nothing
unauthenticated can insert or refresh an entry, so a spoofed datagram cannot redirect traffic.

Eviction: least recently used first (learning or a `lookup` hit counts as use; `get` does not),
so the gateways a node actually talks through survive a burst of one-off handshakes. Entries
older than `max_age` since they were learned are dropped on access and by `expire`. Every
operation is O(1) except `expire` and `entries`. Pure: `now` is passed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from cellmesh.errors import LocalProtocolError

__all__ = ["GatewayCache", "GatewayEntry", "GatewayStats"]

A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class GatewayEntry(Generic[A]):
    """One cached gateway."""

    cell: bytes
    via: A
    """The driver's key for the path the handshake completed over."""
    learned_at: float
    """When the latest handshake through `via` completed."""
    last_used: float
    """When it was last learned or returned by `lookup`."""
    hits: int
    """`lookup` hits since it was learned."""


@dataclass(frozen=True, slots=True)
class GatewayStats:
    """A snapshot of a gateway cache's counters."""

    entries: int
    capacity: int
    learned: int
    hits: int
    misses: int
    evicted: int
    expired: int


class GatewayCache(Generic[A]):
    """A bounded, LRU-evicted CellID -> gateway cache (module docstring)."""

    def __init__(self, capacity: int = 64, max_age: float | None = 3600.0) -> None:
        """`capacity`: entries held (the seeds' table had 64). `max_age`: seconds an entry
        stays valid after the handshake that taught it (None: no age limit)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_age is not None and not (max_age > 0 and math.isfinite(max_age)):
            raise ValueError(f"max_age must be a finite number > 0 or None, got {max_age!r}")
        self.capacity = capacity
        self.max_age = max_age
        self._entries: OrderedDict[bytes, GatewayEntry[A]] = OrderedDict()
        self._learned = 0
        self._hits = 0
        self._misses = 0
        self._evicted = 0
        self._expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, cell: object) -> bool:
        return cell in self._entries

    def learn_gateway(self, cell: bytes, via_addr_key: A, now: float) -> GatewayEntry[A] | None:
        """Record that a handshake with `cell` completed through `via_addr_key` at `now`.

        Replaces any older entry for `cell`. Returns the entry evicted to make room, if any.
        Raises `LocalProtocolError` for a CellID that is not 16 bytes."""
        if len(cell) != 16:
            raise LocalProtocolError("a CellID is 16 bytes")
        cell = bytes(cell)
        self._learned += 1
        evicted: GatewayEntry[A] | None = None
        if cell in self._entries:
            del self._entries[cell]
        elif len(self._entries) >= self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self._evicted += 1
        self._entries[cell] = GatewayEntry(cell, via_addr_key, now, now, 0)
        return evicted

    def lookup(self, cell: bytes, now: float) -> A | None:
        """The gateway for `cell`, or None; a hit counts as use (moves it away from eviction)."""
        e = self._live(cell, now)
        if e is None:
            self._misses += 1
            return None
        self._hits += 1
        self._entries[cell] = GatewayEntry(e.cell, e.via, e.learned_at, now, e.hits + 1)
        self._entries.move_to_end(cell)
        return e.via

    def get(self, cell: bytes, now: float) -> GatewayEntry[A] | None:
        """The entry for `cell` without counting it as use, or None."""
        return self._live(cell, now)

    def forget(self, cell: bytes) -> bool:
        """Drop the entry for `cell` (its session failed); True if there was one."""
        return self._entries.pop(cell, None) is not None

    def expire(self, now: float) -> int:
        """Drop every entry older than `max_age`; returns how many."""
        if self.max_age is None:
            return 0
        limit = now - self.max_age
        stale = [c for c, e in self._entries.items() if e.learned_at <= limit]
        for c in stale:
            del self._entries[c]
        self._expired += len(stale)
        return len(stale)

    def entries(self) -> list[GatewayEntry[A]]:
        """Every entry, least recently used first (the next to be evicted first)."""
        return list(self._entries.values())

    def statistics(self) -> GatewayStats:
        """A frozen snapshot of the counters."""
        return GatewayStats(
            entries=len(self._entries),
            capacity=self.capacity,
            learned=self._learned,
            hits=self._hits,
            misses=self._misses,
            evicted=self._evicted,
            expired=self._expired,
        )

    def _live(self, cell: bytes, now: float) -> GatewayEntry[A] | None:
        e = self._entries.get(cell)
        if e is None:
            return None
        if self.max_age is not None and now - e.learned_at >= self.max_age:
            del self._entries[cell]
            self._expired += 1
            return None
        return e
