"""What set reconciliation needs from an event store, and an in-memory index that provides it.

Sync (`cellmesh.state.sync`) works on opaque items: each event is a `SyncItem(key, id)` where
`id` is the event's 32-byte id (BLAKE3 of its encoding, computed locally, never taken from the
wire) and `key` a u64 both replicas derive from the event itself (its timestamp in milliseconds,
say, so recent events cluster at the end of the key space and a small recent difference is found
in few ranges). Items are ordered by (key, id). A *bound* is a point in the same space (also a
`SyncItem`): a range [lo, hi) holds the items with lo <= item < hi.

A store plugs into sync by implementing `SyncStoreView` for one channel: five methods, nothing
about the wire. `SortedSyncIndex` is the ordered index with prefix sums that makes `summarize`
O(log n); a durable store can keep one in memory (40 bytes of key material per event) next to its
tables. `MemorySyncStore` is the reference implementation used by tests, the simulator and the
benchmark.

Fingerprints (Meyer, "Range-Based Set Reconciliation", 2023; the Negentropy construction): each
item contributes ``v(id) = BLAKE3("cellmesh sync item v1" || id)`` read as a 256-bit integer; a
range's summary is (count, sum of v mod 2**256); its fingerprint is the first 16 bytes of
``BLAKE3("cellmesh sync fingerprint v1" || sum (32 bytes, little-endian) || count (u64 LE))``.
Addition is used rather than XOR because XOR is linear over GF(2): 257 chosen items give a
collision by Gaussian elimination, whereas colliding sums need a generalised-birthday search
over ids the attacker must obtain by hashing whole signed events. Hashing the id again makes the
contribution independent of how ids are built (they are opaque here).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

import blake3

__all__ = [
    "FINGERPRINT_LEN",
    "ID_LEN",
    "INFINITY",
    "LOWEST",
    "MAX_KEY",
    "Added",
    "MemorySyncStore",
    "RangeSummary",
    "SortedSyncIndex",
    "SyncItem",
    "SyncStoreView",
    "fingerprint",
    "item_value",
    "summarize_items",
    "timestamp_key",
]

ID_LEN = 32
FINGERPRINT_LEN = 16
MAX_KEY = 2**64 - 1
_MOD = 2**256
_ITEM_DOMAIN = b"cellmesh sync item v1\x00"
_FP_DOMAIN = b"cellmesh sync fingerprint v1\x00"
_SETTLE_MIN = 1024
"""Pending additions an index keeps apart (and scans per query) before merging them in."""


class SyncItem(NamedTuple):
    """An item (or a bound) in the reconciliation key space, ordered by (key, id).

    A tuple, not a dataclass, on purpose: the index bisects lists of 10**5 of them, and tuple
    comparison runs in C.
    """

    key: int
    id: bytes


LOWEST = SyncItem(0, bytes(ID_LEN))
"""The lower end of the key space (every item is >= LOWEST)."""
INFINITY = SyncItem(MAX_KEY + 1, bytes(ID_LEN))
"""The upper end of the key space (every item is < INFINITY)."""


class RangeSummary(NamedTuple):
    """How many items a range holds and the sum of their values mod 2**256."""

    size: int
    total: int


class Added(NamedTuple):
    """What `add_encoded` did: the event's item, and whether it was new to the store."""

    item: SyncItem
    new: bool


def item_value(event_id: bytes) -> int:
    """An item's contribution to a range fingerprint (see the module docstring)."""
    return int.from_bytes(blake3.blake3(_ITEM_DOMAIN + event_id).digest(), "little")


def summarize_items(items: Iterable[SyncItem]) -> RangeSummary:
    """The summary of `items`, computed the slow way (O(n) hashes): for stores without an index."""
    n = 0
    total = 0
    for it in items:
        n += 1
        total += item_value(it.id)
    return RangeSummary(n, total % _MOD)


def fingerprint(summary: RangeSummary) -> bytes:
    """The 16-byte fingerprint of a range summary."""
    data = (
        _FP_DOMAIN
        + (summary.total % _MOD).to_bytes(32, "little")
        + summary.size.to_bytes(8, "little")
    )
    return blake3.blake3(data).digest(length=FINGERPRINT_LEN)


class SyncStoreView(Protocol):
    """The store of one channel, as sync sees it. Bounds and items are `SyncItem`s."""

    def summarize(self, lo: SyncItem, hi: SyncItem) -> RangeSummary:
        """Count and value sum of the items in [lo, hi)."""
        ...

    def items_in_range(
        self, lo: SyncItem, hi: SyncItem, limit: int | None = None
    ) -> Sequence[SyncItem]:
        """The items in [lo, hi) in ascending order; the first `limit` of them if given."""
        ...

    def has(self, event_id: bytes) -> bool:
        """True if the store holds the event with this id."""
        ...

    def get_encoded(self, event_id: bytes) -> bytes | None:
        """The event's encoding as it travels between replicas, or None if absent."""
        ...

    def add_encoded(self, data: bytes) -> Added | None:
        """Validate and store an event received from a peer (the store checks signatures and
        computes the id itself). None if the store rejects it."""
        ...


class SortedSyncIndex:
    """An ordered set of `SyncItem`s with O(log n) range counts and value sums.

    Settled items live in a sorted list with prefix sums of their values. New items go to a
    small *pending* list first, consulted by every query beside the settled ones; it is merged
    in (one sort of a mostly sorted list, which Timsort does in about linear time, and one prefix
    rebuild) only when it outgrows an eighth of the index. So a replica receiving 10**5 events
    pays O(n log n) in all, not O(n**2) of list insertions, and a session that interleaves a few
    arrivals with range queries does not rebuild the prefix sums after each message.
    Memory: one tuple, one dict entry and one prefix-sum integer per item.
    """

    def __init__(self, items: Iterable[SyncItem] = ()) -> None:
        self._items: list[SyncItem] = []
        self._values: dict[bytes, int] = {}
        self._pending: list[SyncItem] = []
        self._pending_sorted = True
        self._prefix: list[int] | None = None
        for it in items:
            self.add(it)

    def __len__(self) -> int:
        return len(self._values)

    def has(self, event_id: bytes) -> bool:
        """True if an item with this id is in the index."""
        return event_id in self._values

    def add(self, item: SyncItem) -> bool:
        """Insert `item`; False if its id is already present."""
        if item.id in self._values:
            return False
        self._values[item.id] = item_value(item.id)
        self._pending.append(item)
        self._pending_sorted = False
        return True

    def discard(self, item: SyncItem) -> bool:
        """Remove `item` (retention); False if it was not there."""
        if item.id not in self._values:
            return False
        self._settle()
        i = bisect.bisect_left(self._items, item)
        if i >= len(self._items) or self._items[i] != item:
            return False
        del self._items[i]
        del self._values[item.id]
        self._prefix = None
        return True

    def _settle(self) -> None:
        if self._pending:
            self._items.extend(self._pending)
            self._items.sort()
            self._pending.clear()
            self._pending_sorted = True
            self._prefix = None

    def _ready(self) -> list[int]:
        """Make queries possible: merge a large pending list, sort a small one; return the
        prefix sums of the settled items."""
        if len(self._pending) > max(_SETTLE_MIN, len(self._items) // 8):
            self._settle()
        elif not self._pending_sorted:
            self._pending.sort()
            self._pending_sorted = True
        if self._prefix is None:
            values = self._values
            self._prefix = list(
                itertools.accumulate((values[it.id] for it in self._items), initial=0)
            )
        return self._prefix

    def summarize(self, lo: SyncItem, hi: SyncItem) -> RangeSummary:
        """Count and value sum of the items in [lo, hi)."""
        prefix = self._ready()
        i = bisect.bisect_left(self._items, lo)
        j = bisect.bisect_left(self._items, hi)
        count = max(0, j - i)
        total = prefix[j] - prefix[i] if j > i else 0
        if self._pending:
            pi = bisect.bisect_left(self._pending, lo)
            pj = bisect.bisect_left(self._pending, hi)
            if pj > pi:
                count += pj - pi
                values = self._values
                total += sum(values[it.id] for it in self._pending[pi:pj])
        return RangeSummary(count, total % _MOD)

    def items_in_range(
        self, lo: SyncItem, hi: SyncItem, limit: int | None = None
    ) -> Sequence[SyncItem]:
        """The items in [lo, hi), ascending; at most `limit` of them."""
        self._ready()
        i = bisect.bisect_left(self._items, lo)
        j = bisect.bisect_left(self._items, hi)
        if limit is not None:
            j = min(j, i + max(0, limit))
        settled = self._items[i:j] if j > i else []
        if not self._pending:
            return settled
        pi = bisect.bisect_left(self._pending, lo)
        pj = bisect.bisect_left(self._pending, hi)
        if limit is not None:
            pj = min(pj, pi + max(0, limit))
        if pj <= pi:
            return settled
        merged = sorted(settled + self._pending[pi:pj])
        return merged if limit is None else merged[:limit]

    def ids(self) -> set[bytes]:
        """Every id in the index (a copy)."""
        return set(self._values)


def timestamp_key(data: bytes) -> int | None:
    """The default `MemorySyncStore` key: the event's first 8 bytes as a big-endian u64 (a
    timestamp in ms in the test encoding); None (reject) if it is shorter."""
    if len(data) < 8:
        return None
    return int.from_bytes(data[:8], "big")


class MemorySyncStore:
    """A `SyncStoreView` held in memory: encoded events by id plus a `SortedSyncIndex`.

    `key_of(data)` derives an event's key from its encoding and validates it (None rejects the
    event); the id is BLAKE3-256 of the encoding. Used by tests, the simulator and the benchmark,
    and as the model a durable store's view should behave like.
    """

    def __init__(
        self,
        key_of: Callable[[bytes], int | None] = timestamp_key,
        max_event_size: int = 1 << 20,
    ) -> None:
        self.key_of = key_of
        self.max_event_size = max_event_size
        self.index = SortedSyncIndex()
        self._events: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._events)

    def add_encoded(self, data: bytes) -> Added | None:
        """Store an event (see `SyncStoreView.add_encoded`)."""
        if not 0 < len(data) <= self.max_event_size:
            return None
        key = self.key_of(data)
        if key is None or not 0 <= key <= MAX_KEY:
            return None
        eid = blake3.blake3(data).digest()
        item = SyncItem(key, eid)
        if eid in self._events:
            return Added(item, False)
        self._events[eid] = bytes(data)
        self.index.add(item)
        return Added(item, True)

    def get_encoded(self, event_id: bytes) -> bytes | None:
        """The encoded event, or None."""
        return self._events.get(event_id)

    def has(self, event_id: bytes) -> bool:
        """True if the event is stored."""
        return event_id in self._events

    def summarize(self, lo: SyncItem, hi: SyncItem) -> RangeSummary:
        """See `SortedSyncIndex.summarize`."""
        return self.index.summarize(lo, hi)

    def items_in_range(
        self, lo: SyncItem, hi: SyncItem, limit: int | None = None
    ) -> Sequence[SyncItem]:
        """See `SortedSyncIndex.items_in_range`."""
        return self.index.items_in_range(lo, hi, limit)

    def ids(self) -> set[bytes]:
        """Every event id held (a copy)."""
        return set(self._events)
