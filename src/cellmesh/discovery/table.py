"""The peer table: who we have heard, since when, how to reach them, and when they expire.

Theory of operation
-------------------
One entry per CellID, created by the first verified beacon from it. Readers never see the
mutable entries: `get`, `records` and the discovery events hand out frozen `PeerRecord` snapshots.

Freshness (`check`, run before the signature is verified, so it can only ever cause drops):

* the beacon's timestamp must be within `skew_ms` of our wall clock: older is ``stale``, newer is
  ``future``. This bounds how long a captured beacon can be replayed at all;
* its sequence number must be above the last one accepted from that CellID: equal is
  ``duplicate`` (the same beacon twice, e.g. over IPv4 and IPv6), lower is ``replay``.
* a peer that expired leaves a *tombstone* (its last seq and timestamp). Its beacons are accepted
  again if the seq is higher, or, for a node that restarted and lost its counter, if the
  timestamp is later than the last one we accepted. A replay of an old beacon satisfies neither.

Expiry: a peer expires `expiry_multiplier` (default 3) times the interval it announced after its
last accepted beacon, i.e. after that many missed announcements. A min-heap of (deadline, CellID)
finds the next deadline. It is lazy: a beacon that only pushes a peer's deadline later touches
no heap (the common case: one beacon per peer per interval); when the old heap entry comes up,
it is moved on to the peer's current deadline. So the heap costs O(log n) per *expiry period*
per peer, not per beacon.

Bounded size: at most `max_peers` entries. A new peer arriving at a full table evicts the least
recently *heard* one (an `OrderedDict` in last-seen order, so O(1)); tombstones are bounded the
same way.

*Local seniority*: `first_seen` is our own monotonic time of first contact in this life of the
peer (it restarts after expiry). It is never taken from the peer's claims, so a peer cannot make
itself look older than it is.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from dataclasses import dataclass
from enum import Enum

from cellmesh.discovery.beacon import Addr, Beacon, Capabilities
from cellmesh.discovery.mesh import MembershipCert
from cellmesh.identity.cellid import CellId

__all__ = ["PeerRecord", "PeerState", "PeerTable", "Update"]

_CONTENT_FIELDS = (
    "noise_static",
    "name",
    "node_type",
    "zone",
    "ego",
    "caps",
    "tags",
    "addresses",
    "cert",
)


class PeerState(Enum):
    """Where a peer is in its life in our table."""

    ALIVE = "alive"
    EXPIRED = "expired"
    EVICTED = "evicted"


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A frozen snapshot of one peer.

    Times `first_seen`, `last_seen` and `expires_at` are our monotonic clock (seconds);
    `timestamp_ms` is the peer's own wall clock from its last beacon. `addresses` are what the
    peer announces; `observed_addr` is where its last beacon came from (for an IPv6 link-local
    peer the driver adds the interface scope). `interval` is the announcement interval the peer
    promised (seconds, after clamping).
    """

    cell_id: CellId
    public_key: bytes
    noise_static: bytes
    name: str
    node_type: str
    zone: str
    ego: int
    caps: Capabilities
    tags: tuple[tuple[str, str], ...]
    addresses: tuple[Addr, ...]
    observed_addr: Addr
    first_seen: float
    last_seen: float
    seq: int
    timestamp_ms: int
    interval: float
    expires_at: float
    cert: MembershipCert | None
    state: PeerState = PeerState.ALIVE

    def seniority(self, now: float) -> float:
        """How long we have known this peer without a break (local seniority), in seconds."""
        return now - self.first_seen


class _Entry:
    """The mutable row behind a `PeerRecord`."""

    __slots__ = (
        "addresses",
        "caps",
        "cell_id",
        "cert",
        "ego",
        "expires_at",
        "first_seen",
        "flags",
        "interval",
        "last_seen",
        "membership_until_ms",
        "name",
        "node_type",
        "noise_static",
        "observed_addr",
        "public_key",
        "scheduled",
        "seq",
        "static",
        "tags",
        "timestamp_ms",
        "zone",
    )

    def __init__(self, b: Beacon, now: float, addr: Addr, static: bytes, flags: int) -> None:
        f = b.fields
        self.cell_id = b.cell_id
        self.public_key = b.public_key
        self.noise_static = b.noise_static
        self.name = f.name
        self.node_type = f.node_type
        self.zone = f.zone
        self.ego = f.ego
        self.caps = f.caps
        self.tags = f.tags
        self.addresses = f.addresses
        self.cert = f.cert
        self.observed_addr = addr
        self.first_seen = now
        self.last_seen = now
        self.seq = f.seq
        self.timestamp_ms = f.timestamp_ms
        self.interval = 0.0
        self.expires_at = now
        self.scheduled = float("inf")  # the earliest deadline this entry has in the heap
        self.static = static
        self.flags = flags
        self.membership_until_ms: int | None = None

    def snapshot(self, state: PeerState = PeerState.ALIVE) -> PeerRecord:
        return PeerRecord(
            self.cell_id,
            self.public_key,
            self.noise_static,
            self.name,
            self.node_type,
            self.zone,
            self.ego,
            self.caps,
            self.tags,
            self.addresses,
            self.observed_addr,
            self.first_seen,
            self.last_seen,
            self.seq,
            self.timestamp_ms,
            self.interval,
            self.expires_at,
            self.cert,
            state,
        )


@dataclass(frozen=True, slots=True)
class Update:
    """What `PeerTable.apply` did with one beacon.

    `kind` is ``new``, ``changed`` or ``refresh``; `changed` names the fields that differ from
    the previous beacon (empty for ``new`` and ``refresh``); `evicted` is the peer pushed out to
    make room, if any.
    """

    kind: str
    record: PeerRecord | None
    previous: PeerRecord | None = None
    changed: frozenset[str] = frozenset()
    evicted: PeerRecord | None = None


class PeerTable:
    """A bounded table of peers with replay and freshness checks. See the module docstring."""

    def __init__(
        self,
        max_peers: int = 4096,
        expiry_multiplier: float = 3.0,
        skew: float = 120.0,
        min_interval: float = 0.01,
        max_interval: float = 3600.0,
    ) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        if expiry_multiplier < 1:
            raise ValueError("expiry_multiplier must be >= 1")
        self.max_peers = max_peers
        self.expiry_multiplier = expiry_multiplier
        self.skew_ms = int(skew * 1000)
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._peers: OrderedDict[bytes, _Entry] = OrderedDict()
        self._tombs: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._heap: list[tuple[float, bytes]] = []
        self.version = 0
        """Changes whenever the expiry heap changes (lets a caller cache `next_expiry`)."""
        self.drops: Counter[str] = Counter()
        """Beacons refused by `check`, by reason (``stale``, ``future``, ``duplicate``, ``replay``)."""

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, cell_id: object) -> bool:
        return cell_id in self._peers

    # ----------------------------------------------------------------- reading

    def get(self, cell_id: bytes) -> PeerRecord | None:
        """A snapshot of `cell_id`'s entry, or None."""
        e = self._peers.get(cell_id)
        return e.snapshot() if e is not None else None

    def records(self) -> list[PeerRecord]:
        """Snapshots of every peer, oldest first contact first."""
        return sorted((e.snapshot() for e in self._peers.values()), key=lambda r: r.first_seen)

    def cell_ids(self) -> list[bytes]:
        """The CellIDs of every peer (no snapshots made)."""
        return list(self._peers)

    def entry(self, cell_id: bytes) -> _Entry | None:
        """The live entry (for the discovery core's fast path only; do not keep it)."""
        return self._peers.get(cell_id)

    # ----------------------------------------------------------------- freshness

    def check(self, cell_id: bytes, seq: int, timestamp_ms: int, wall_ms: int) -> bool:
        """True when a beacon with this seq and timestamp may be accepted; else count why not."""
        if timestamp_ms < wall_ms - self.skew_ms:
            self.drops["stale"] += 1
            return False
        if timestamp_ms > wall_ms + self.skew_ms:
            self.drops["future"] += 1
            return False
        e = self._peers.get(cell_id)
        if e is not None:
            if seq > e.seq:
                return True
            self.drops["duplicate" if seq == e.seq else "replay"] += 1
            return False
        tomb = self._tombs.get(cell_id)
        if tomb is not None and seq <= tomb[0] and timestamp_ms <= tomb[1]:
            self.drops["replay"] += 1
            return False
        return True

    # ----------------------------------------------------------------- writing

    def _deadline(self, e: _Entry, interval_ms: int, now: float) -> None:
        interval = min(max(interval_ms / 1000.0, self.min_interval), self.max_interval)
        e.interval = interval
        e.last_seen = now
        deadline = e.expires_at = now + self.expiry_multiplier * interval
        if deadline < e.scheduled:
            # Only a deadline earlier than the one already in the heap needs a new heap entry;
            # a later one is found when the old entry comes up (`next_expiry`).
            e.scheduled = deadline
            self.version += 1
            heapq.heappush(self._heap, (deadline, e.cell_id))
            if len(self._heap) > 4 * len(self._peers) + 64:
                self._heap = [(x.expires_at, x.cell_id) for x in self._peers.values()]
                heapq.heapify(self._heap)
                for x in self._peers.values():
                    x.scheduled = x.expires_at

    def apply(self, b: Beacon, now: float, addr: Addr, static: bytes, flags: int) -> Update:
        """Record a verified, fresh beacon (call `check` first). Returns what changed."""
        f = b.fields
        e = self._peers.get(b.cell_id)
        if e is None:
            evicted = None
            if len(self._peers) >= self.max_peers:
                _, old = self._peers.popitem(last=False)
                self._bury(old)
                evicted = old.snapshot(PeerState.EVICTED)
            e = _Entry(b, now, addr, static, flags)
            self._peers[b.cell_id] = e
            self._tombs.pop(b.cell_id, None)
            self._deadline(e, f.interval_ms, now)
            return Update("new", e.snapshot(), evicted=evicted)
        previous = e.snapshot()
        changed = frozenset(
            name for name in _CONTENT_FIELDS if getattr(e, name) != _beacon_value(b, name)
        )
        if changed:
            e.noise_static = b.noise_static
            e.name, e.node_type, e.zone, e.ego = f.name, f.node_type, f.zone, f.ego
            e.caps, e.tags, e.addresses, e.cert = f.caps, f.tags, f.addresses, f.cert
        e.static = static
        e.flags = flags
        self._touch(e, f.seq, f.timestamp_ms, f.interval_ms, now, addr)
        if changed:
            return Update("changed", e.snapshot(), previous, changed)
        return Update("refresh", None)

    def refresh(
        self, cell_id: bytes, seq: int, timestamp_ms: int, interval_ms: int, now: float, addr: Addr
    ) -> None:
        """Record a verified, fresh beacon whose static region did not change (fast path)."""
        e = self._peers[cell_id]
        self._touch(e, seq, timestamp_ms, interval_ms, now, addr)

    def _touch(
        self, e: _Entry, seq: int, timestamp_ms: int, interval_ms: int, now: float, addr: Addr
    ) -> None:
        e.seq = seq
        e.timestamp_ms = timestamp_ms
        e.observed_addr = addr
        self._peers.move_to_end(e.cell_id)
        self._deadline(e, interval_ms, now)

    def _bury(self, e: _Entry) -> None:
        self._tombs[e.cell_id] = (e.seq, e.timestamp_ms)
        self._tombs.move_to_end(e.cell_id)
        while len(self._tombs) > self.max_peers:
            self._tombs.popitem(last=False)

    def remove(self, cell_id: bytes) -> PeerRecord | None:
        """Forget a peer now (it keeps a tombstone); returns its last snapshot."""
        e = self._peers.pop(cell_id, None)
        if e is None:
            return None
        self._bury(e)
        return e.snapshot(PeerState.EXPIRED)

    # ----------------------------------------------------------------- expiry

    def next_expiry(self) -> float | None:
        """The earliest expiry deadline, or None for an empty table."""
        heap = self._heap
        peers = self._peers
        while heap:
            t, cell = heap[0]
            e = peers.get(cell)
            if e is None or e.scheduled != t:
                heapq.heappop(heap)  # a removed peer, or superseded by an earlier deadline
            elif e.expires_at > t:
                heapq.heapreplace(heap, (e.expires_at, cell))  # refreshed since: move it on
                e.scheduled = e.expires_at
            else:
                return t
            self.version += 1
        return None

    def expire(self, now: float) -> list[PeerRecord]:
        """Remove every peer whose deadline is at or before `now`; return their snapshots."""
        out: list[PeerRecord] = []
        heap = self._heap
        while True:
            t = self.next_expiry()
            if t is None or t > now:
                return out
            _, cell = heapq.heappop(heap)
            self.version += 1
            e = self._peers.pop(cell)
            self._bury(e)
            out.append(e.snapshot(PeerState.EXPIRED))


def _beacon_value(b: Beacon, name: str) -> object:
    if name == "noise_static":
        return b.noise_static
    return getattr(b.fields, name)
