"""Blobs (Dataforts): fetching a blob's blocks from several peers at once, and serving them.

Theory of operation
-------------------
A blob is a manifest block plus the chunk blocks it lists (`cellmesh.state.blob_manifest`); every
block is addressed by its BLAKE3-256. Two sans-IO cores move blocks between peers with the
messages of `cellmesh.state.blob_messages`:

`BlobFetcher` gets one blob into a `ChunkStore`. It first fetches the manifest (unless it is
given or already stored), then every chunk not already in the store. Each block is *assigned* to
one peer at a time: a BLOCK_WANT names it, the peer answers with BLOCK_PUT pieces, and the
fetcher reassembles the pieces of that one assignment into a buffer of the expected size. Only a
complete block is checked against its id; a mismatch (or a piece that overlaps another, lies
outside the block, is smaller than 466 bytes without ending the block, or contradicts the expected
size, or any undecodable message) bans that peer
for the rest of this fetch: its blocks go back to the queue and are assigned to other peers. The
bad block is counted as rejected and never stored.

Scheduling: at most `max_in_flight_per_peer` blocks per peer and `max_in_flight_total` overall.
The next block goes to the usable peer with the lowest expected completion time,
``(in_flight + 1) * ewma_block_seconds``, so peers that answer fast get more work; a peer not yet
measured estimates 0 and is tried first. An assignment with no piece for `request_timeout`
seconds is abandoned (BLOCK_CANCEL sent), the block is reassigned and the peer's estimate is
raised to the timeout; `max_timeouts_per_peer` timeouts in a row drop the peer. NACK NOT_FOUND
marks the peer as lacking that block; NACK BUSY rests the peer for `busy_backoff` seconds. When
nothing is left to assign, idle capacity duplicates the oldest outstanding blocks to a second
peer (endgame, as in BitTorrent): the first complete copy wins and the other is cancelled. The
fetch fails when some block has no peer left that could serve it.

`BlobServer` answers BLOCK_WANT from a `ChunkStore`: ids it lacks get NACK NOT_FOUND at once,
the rest are queued per peer (at most `max_queued_blocks`; beyond that NACK BUSY) and sent as
pieces no larger than the requester's `max_put`, paced per peer by a token bucket of bytes
(`rate`, `burst`), round-robin between peers. It tracks at most `max_peers` peers with work.

Both cores take `now` from the caller and never read a clock; neither raises on bad input from
the network: undecodable messages are counted (and, for the fetcher, ban the sender).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import blake3

from cellmesh.errors import DecodeError, LocalProtocolError
from cellmesh.state.blob_cache import (
    ChunkMissingError,
    ChunkStore,
    IntegrityError,
    LRUChunkStore,
    LRUStats,
)
from cellmesh.state.blob_manifest import (
    MAX_MANIFEST_SIZE,
    ChunkRef,
    Manifest,
    ManifestBuilder,
    assemble_blob,
    iter_blob,
    load_manifest,
    pull_manifest,
    push_manifest,
    store_blob,
    store_chunks,
)
from cellmesh.state.blob_messages import (
    MAX_BLOCK_MESSAGE,
    MAX_IDS_PER_MESSAGE,
    MIN_PUT_SIZE,
    PUT_HEADER_LEN,
    BlockCancel,
    BlockNack,
    BlockPut,
    BlockWant,
    NackReason,
    pull_block_message,
    push_block_message,
)
from cellmesh.state.chunking import ChunkerParams, chunk_id

__all__ = [
    "BlobFetcher",
    "BlobServer",
    "BlockFetched",
    "BlockRejected",
    "ChunkMissingError",
    "ChunkRef",
    "ChunkStore",
    "ChunkerParams",
    "FetchComplete",
    "FetchEvent",
    "FetchFailed",
    "FetchProgress",
    "FetchSettings",
    "FetchState",
    "IntegrityError",
    "LRUChunkStore",
    "LRUStats",
    "Manifest",
    "ManifestBuilder",
    "PeerBanned",
    "PeerDropped",
    "PeerFetchStats",
    "PeerId",
    "ServeSettings",
    "ServeStats",
    "assemble_blob",
    "iter_blob",
    "load_manifest",
    "pull_manifest",
    "push_manifest",
    "store_blob",
    "store_chunks",
]

PeerId = bytes
"""A peer's identity as the driver names it (a CellID in cellmesh; any bytes work)."""
_U32 = 2**32


# ------------------------------------------------------------------------------ fetcher


@dataclass(frozen=True, slots=True)
class FetchSettings:
    """Limits and timings of one `BlobFetcher`. Times in seconds, sizes in bytes."""

    max_in_flight_per_peer: int = 4
    """Blocks requested from one peer and not yet complete."""
    max_in_flight_total: int = 16
    """Blocks requested from all peers together (bounds reassembly memory: x 4 MiB at worst)."""
    max_put: int = MAX_BLOCK_MESSAGE
    """The largest BLOCK_PUT we accept: set it to the transport's message size."""
    request_timeout: float = 10.0
    """An assignment with no piece for this long is abandoned and the block reassigned."""
    max_timeouts_per_peer: int = 3
    """Consecutive timeouts after which a peer is dropped from this fetch."""
    busy_backoff: float = 1.0
    """How long a peer that answered NACK BUSY gets no new requests."""
    endgame: bool = True
    """Duplicate outstanding blocks to idle peers once nothing is left to assign."""
    max_events: int = 4096
    """Events kept for `next_event` before the oldest are dropped (and counted)."""

    def __post_init__(self) -> None:
        if self.max_in_flight_per_peer < 1 or self.max_in_flight_total < 1:
            raise ValueError("in-flight limits must be at least 1")
        if not MIN_PUT_SIZE <= self.max_put <= MAX_BLOCK_MESSAGE:
            raise ValueError(f"max_put must be in [{MIN_PUT_SIZE}, {MAX_BLOCK_MESSAGE}]")
        if not self.request_timeout > 0 or self.busy_backoff < 0:
            raise ValueError("request_timeout must be > 0 and busy_backoff >= 0")
        if self.max_timeouts_per_peer < 1 or self.max_events < 1:
            raise ValueError("max_timeouts_per_peer and max_events must be at least 1")


class FetchState(Enum):
    """Where a fetch is."""

    MANIFEST = "manifest"
    """Fetching the manifest block."""
    CHUNKS = "chunks"
    """Fetching the chunks the manifest lists."""
    COMPLETE = "complete"
    """Every block is in the store, verified."""
    FAILED = "failed"
    """Some block cannot be had from any peer left; see `failure`."""


@dataclass(frozen=True, slots=True)
class BlockFetched:
    """A block arrived complete and matched its id; it is in the store."""

    block_id: bytes
    peer: PeerId
    size: int


@dataclass(frozen=True, slots=True)
class BlockRejected:
    """A block (or piece) from `peer` was refused; the block will be fetched elsewhere."""

    block_id: bytes
    peer: PeerId
    reason: str


@dataclass(frozen=True, slots=True)
class PeerBanned:
    """`peer` broke the protocol or sent a corrupt block; it gets nothing more in this fetch."""

    peer: PeerId
    reason: str


@dataclass(frozen=True, slots=True)
class PeerDropped:
    """`peer` timed out too often in a row; it gets nothing more in this fetch."""

    peer: PeerId
    reason: str


@dataclass(frozen=True, slots=True)
class FetchComplete:
    """The whole blob is in the store (reassemble it with `assemble_blob` / `iter_blob`)."""

    blob_id: bytes
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class FetchFailed:
    """The fetch cannot finish."""

    blob_id: bytes
    reason: str


FetchEvent = BlockFetched | BlockRejected | PeerBanned | PeerDropped | FetchComplete | FetchFailed


@dataclass(frozen=True, slots=True)
class FetchProgress:
    """A snapshot of a fetch. Block counts include the manifest once it is known."""

    state: FetchState
    blocks_total: int
    blocks_done: int
    bytes_total: int
    bytes_done: int
    in_flight: int
    rejected_blocks: int
    stale_pieces: int
    timeouts: int
    banned_peers: int
    usable_peers: int
    events_dropped: int

    @property
    def fraction(self) -> float:
        """Bytes done / bytes total (1.0 for an empty blob once its manifest is known)."""
        return 1.0 if self.bytes_total == 0 else self.bytes_done / self.bytes_total


@dataclass(frozen=True, slots=True)
class PeerFetchStats:
    """What one peer did in this fetch."""

    blocks: int
    bytes: int
    in_flight: int
    timeouts: int
    rejected: int
    ewma_seconds: float | None
    banned: bool
    dropped: bool


class _Intervals:
    """Disjoint half-open byte ranges, merged as they touch; `add` refuses overlaps."""

    __slots__ = ("covered", "ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.covered = 0

    def add(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self.starts, a)
        if i > 0 and self.ends[i - 1] > a:
            return False
        if i < len(self.starts) and self.starts[i] < b:
            return False
        self.covered += b - a
        # Merge with the neighbours it touches so in-order pieces keep one interval.
        if i > 0 and self.ends[i - 1] == a:
            self.ends[i - 1] = b
            if i < len(self.starts) and self.starts[i] == b:
                self.ends[i - 1] = self.ends[i]
                del self.starts[i], self.ends[i]
            return True
        if i < len(self.starts) and self.starts[i] == b:
            self.starts[i] = a
            return True
        self.starts.insert(i, a)
        self.ends.insert(i, b)
        return True


@dataclass(slots=True, eq=False)
class _Assignment:
    peer: PeerId
    block_id: bytes
    request_id: int
    size: int | None  # None: a manifest whose size the first piece announces
    sent_at: float
    last_activity: float
    buf: bytearray | None = None
    got: _Intervals = field(default_factory=_Intervals)


@dataclass(slots=True, eq=False)
class _FetchPeer:
    in_flight: dict[bytes, _Assignment] = field(default_factory=dict)
    lacks: set[bytes] = field(default_factory=set)
    ewma: float | None = None
    busy_until: float = 0.0
    consecutive_timeouts: int = 0
    timeouts: int = 0
    rejected: int = 0
    blocks: int = 0
    bytes: int = 0
    banned: bool = False
    dropped: bool = False

    @property
    def out(self) -> bool:
        return self.banned or self.dropped


_MIN_PIECE = MIN_PUT_SIZE - PUT_HEADER_LEN
"""Bytes every piece but a block's last must carry (466)."""
_EWMA_ALPHA = 0.25  # weight of the newest sample: reacts within a few blocks, smooths jitter


class BlobFetcher:
    """Fetch blob `blob_id` from `peers` into `store` (see the module docstring).

    Drive it like every sans-IO core: feed `receive(peer, data, now)`, send what
    `messages_to_send(now)` returns (each item is (peer, message bytes)), call `handle_timer(now)`
    at `get_timer()`, and drain `next_event()`. Done when `state` is COMPLETE or FAILED.
    """

    def __init__(
        self,
        blob_id: bytes,
        peers: Iterable[PeerId],
        store: ChunkStore,
        now: float,
        settings: FetchSettings | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        if len(blob_id) != 32:
            raise LocalProtocolError("a blob id is 32 bytes")
        if manifest is not None and manifest.blob_id != blob_id:
            raise LocalProtocolError("the manifest given does not match the blob id")
        self.blob_id = blob_id
        self.settings = settings if settings is not None else FetchSettings()
        self._store = store
        self._now = now
        self._peers: dict[PeerId, _FetchPeer] = {}
        for p in peers:
            self.add_peer(p)
        self._needed: dict[bytes, int | None] = {}  # block id -> size (None: unknown yet)
        self._unassigned: dict[bytes, None] = {}  # ordered set: blocks waiting for a peer
        self._retry: dict[bytes, None] = {}  # released blocks: assigned before the rest
        self._assigned: dict[bytes, list[_Assignment]] = {}
        self._outbox: list[tuple[PeerId, bytes]] = []
        self._events: deque[FetchEvent] = deque()
        self._events_dropped = 0
        self._next_request = 1
        self._manifest: Manifest | None = None
        self._state = FetchState.MANIFEST
        self._failure: str | None = None
        self._check_needed = True  # with no peer at all, the first call fails the fetch
        self._blocks_total = 0
        self._bytes_total = 0
        self._blocks_done = 0
        self._bytes_done = 0
        self._rejected = 0
        self._stale = 0
        self._timeouts = 0
        self._malformed = 0
        self._unexpected = 0
        if manifest is None:
            try:
                manifest = load_manifest(blob_id, store)
            except IntegrityError as exc:
                self._fail(f"stored manifest is unusable: {exc}")
                return
        if manifest is None:
            self._want(blob_id, None)
        else:
            self._begin_chunks(manifest, have_manifest_block=store.has(blob_id))

    # ------------------------------------------------------------------ public state

    @property
    def state(self) -> FetchState:
        """MANIFEST, CHUNKS, COMPLETE or FAILED."""
        return self._state

    @property
    def done(self) -> bool:
        """True once COMPLETE or FAILED."""
        return self._state in (FetchState.COMPLETE, FetchState.FAILED)

    @property
    def manifest(self) -> Manifest | None:
        """The blob's manifest, once known."""
        return self._manifest

    @property
    def failure(self) -> str | None:
        """Why the fetch failed (None unless FAILED)."""
        return self._failure

    def progress(self) -> FetchProgress:
        """A frozen snapshot of how far the fetch is."""
        return FetchProgress(
            state=self._state,
            blocks_total=self._blocks_total,
            blocks_done=self._blocks_done,
            bytes_total=self._bytes_total,
            bytes_done=self._bytes_done,
            in_flight=sum(len(v) for v in self._assigned.values()),
            rejected_blocks=self._rejected,
            stale_pieces=self._stale,
            timeouts=self._timeouts,
            banned_peers=sum(1 for p in self._peers.values() if p.banned),
            usable_peers=sum(1 for p in self._peers.values() if not p.out),
            events_dropped=self._events_dropped,
        )

    def peer_stats(self) -> dict[PeerId, PeerFetchStats]:
        """Per-peer counters (frozen snapshots)."""
        return {
            pid: PeerFetchStats(
                blocks=p.blocks,
                bytes=p.bytes,
                in_flight=len(p.in_flight),
                timeouts=p.timeouts,
                rejected=p.rejected,
                ewma_seconds=p.ewma,
                banned=p.banned,
                dropped=p.dropped,
            )
            for pid, p in self._peers.items()
        }

    def next_event(self) -> FetchEvent | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ peers

    def add_peer(self, peer: PeerId) -> None:
        """Add a peer that has the blob (a peer already known keeps its state, bans included)."""
        if peer not in self._peers:
            self._peers[peer] = _FetchPeer()

    def remove_peer(self, peer: PeerId, now: float) -> None:
        """Forget a peer that went away; its outstanding blocks go to other peers."""
        self._now = now
        p = self._peers.pop(peer, None)
        if p is not None:
            for a in list(p.in_flight.values()):
                self._release(a)
            self._check_needed = True

    # ------------------------------------------------------------------ input

    def receive(self, peer: PeerId, data: bytes, now: float) -> None:
        """Feed one block-exchange message from `peer`. Never raises on bad input."""
        self._now = now
        p = self._peers.get(peer)
        if p is None or p.out or self.done:
            self._unexpected += 1
            return
        try:
            msg = pull_block_message(data)
        except DecodeError as exc:
            self._malformed += 1
            self._ban(peer, p, f"undecodable message: {exc}")
            return
        if isinstance(msg, BlockPut):
            self._on_put(peer, p, msg)
        elif isinstance(msg, BlockNack):
            self._on_nack(peer, p, msg)
        else:
            self._unexpected += 1  # WANT or CANCEL sent to a fetcher: not for us

    def _on_put(self, peer: PeerId, p: _FetchPeer, m: BlockPut) -> None:
        a = p.in_flight.get(m.block_id)
        if a is None or a.request_id != m.request_id:
            self._stale += 1  # a late piece of a cancelled or timed-out request
            return
        if a.size is None:
            if m.block_size > MAX_MANIFEST_SIZE:
                self._reject(peer, p, a, f"manifest size {m.block_size} over the limit")
                return
            a.size = m.block_size
        if m.block_size != a.size:
            self._reject(peer, p, a, f"block size {m.block_size}, expected {a.size}")
            return
        end = m.offset + len(m.data)
        if PUT_HEADER_LEN + len(m.data) > self.settings.max_put:
            self._reject(peer, p, a, "piece larger than the max_put we asked for")
            return
        if len(m.data) < _MIN_PIECE and end != a.size:
            # Honest servers cut pieces of at least MIN_PUT_SIZE - header; tiny pieces would only
            # serve to make reassembly bookkeeping expensive.
            self._reject(peer, p, a, "piece smaller than the minimum")
            return
        if not a.got.add(m.offset, end):
            self._reject(peer, p, a, "overlapping piece")
            return
        if a.buf is None:
            a.buf = bytearray(a.size)
        a.buf[m.offset : end] = m.data
        a.last_activity = self._now
        if a.got.covered == a.size:
            self._complete(peer, p, a)

    def _complete(self, peer: PeerId, p: _FetchPeer, a: _Assignment) -> None:
        assert a.buf is not None
        assert a.size is not None
        data = bytes(a.buf)
        if blake3.blake3(data).digest() != a.block_id:
            self._reject(peer, p, a, "block does not hash to its id")
            return
        # Drop every assignment of this block: this one is done, endgame twins are cancelled.
        for other in self._assigned.pop(a.block_id, []):
            op = self._peers.get(other.peer)
            if op is not None:
                op.in_flight.pop(other.block_id, None)
            if other is not a:
                self._queue_cancel(other)
        self._unassigned.pop(a.block_id, None)
        self._retry.pop(a.block_id, None)
        sample = self._now - a.sent_at
        p.ewma = sample if p.ewma is None else (1 - _EWMA_ALPHA) * p.ewma + _EWMA_ALPHA * sample
        p.consecutive_timeouts = 0
        p.blocks += 1
        p.bytes += a.size
        self._store.put(a.block_id, data)
        if self._needed.pop(a.block_id) is None:
            self._bytes_total += a.size  # the manifest: its size was unknown until now
        self._blocks_done += 1
        self._bytes_done += a.size
        self._emit(BlockFetched(a.block_id, peer, a.size))
        if self._state is FetchState.MANIFEST:
            try:
                manifest = pull_manifest(data)
            except DecodeError as exc:
                # The block is exactly what the id names, so the peer is not at fault: the id
                # we were given is not a blob's.
                self._fail(f"block {self.blob_id.hex()} is not a blob manifest: {exc}")
                return
            self._begin_chunks(manifest, have_manifest_block=True)
        elif not self._needed:
            self._finish()

    def _on_nack(self, peer: PeerId, p: _FetchPeer, m: BlockNack) -> None:
        for bid in m.ids:
            a = p.in_flight.get(bid)
            if a is None or a.request_id != m.request_id:
                self._stale += 1
                continue
            if m.reason is NackReason.BUSY:
                p.busy_until = self._now + self.settings.busy_backoff
            else:
                p.lacks.add(bid)
                self._check_needed = True
            self._release(a)

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """When `handle_timer` is next due: the earliest request deadline, or the end of a
        BUSY rest while blocks wait for a peer. None when the fetch is over."""
        if self.done:
            return None
        t: float | None = None
        timeout = self.settings.request_timeout
        for assignments in self._assigned.values():
            for a in assignments:
                d = a.last_activity + timeout
                if t is None or d < t:
                    t = d
        if self._unassigned or self._retry:
            for p in self._peers.values():
                if not p.out and p.busy_until > self._now and (t is None or p.busy_until < t):
                    t = p.busy_until
        return t

    def handle_timer(self, now: float) -> None:
        """Abandon assignments silent for `request_timeout` and penalise their peers."""
        self._now = now
        if self.done:
            return
        timeout = self.settings.request_timeout
        expired = [
            a
            for assignments in self._assigned.values()
            for a in assignments
            if a.last_activity + timeout <= now
        ]
        for a in expired:
            p = self._peers.get(a.peer)
            if p is None or a.block_id not in p.in_flight:
                continue  # already released while handling an earlier expiry of this peer
            self._timeouts += 1
            p.timeouts += 1
            p.consecutive_timeouts += 1
            # Penalise: a peer that made us wait a whole timeout is estimated that slow.
            p.ewma = timeout if p.ewma is None else max(p.ewma, timeout)
            self._queue_cancel(a)
            self._release(a)
            if p.consecutive_timeouts >= self.settings.max_timeouts_per_peer:
                p.dropped = True
                for other in list(p.in_flight.values()):
                    self._queue_cancel(other)
                    self._release(other)
                self._emit(PeerDropped(a.peer, f"{p.consecutive_timeouts} timeouts in a row"))
                self._check_needed = True

    # ------------------------------------------------------------------ output

    def messages_to_send(self, now: float) -> list[tuple[PeerId, bytes]]:
        """Take the messages to send now: cancellations, then BLOCK_WANTs for new assignments."""
        self._now = now
        if not self.done:
            if self._check_needed:
                self._check_obtainable()
            if not self.done:
                self._assign()
        out, self._outbox = self._outbox, []
        return out

    def _assign(self) -> None:
        s = self.settings
        in_flight = sum(len(v) for v in self._assigned.values())
        batches: dict[PeerId, list[bytes]] = {}
        # Released blocks first, then the rest in manifest order (a reader can start early).
        for queue in (self._retry, self._unassigned):
            for bid in list(queue):
                if in_flight >= s.max_in_flight_total:
                    break
                peer = self._best_peer(bid)
                if peer is None:
                    continue
                del queue[bid]
                self._start(peer, bid, batches)
                in_flight += 1
        waiting = self._retry or self._unassigned
        if s.endgame and not waiting and in_flight < s.max_in_flight_total:
            # Oldest outstanding first: they are the likeliest stragglers.
            lone = sorted(
                (v[0] for v in self._assigned.values() if len(v) == 1), key=lambda a: a.sent_at
            )
            for a in lone:
                if in_flight >= s.max_in_flight_total:
                    break
                peer = self._best_peer(a.block_id, exclude=a.peer)
                if peer is None:
                    continue
                self._start(peer, a.block_id, batches)
                in_flight += 1
        for peer, ids in batches.items():
            for i in range(0, len(ids), MAX_IDS_PER_MESSAGE):
                part = ids[i : i + MAX_IDS_PER_MESSAGE]
                rid = self._request_id()
                for bid in part:
                    self._peers[peer].in_flight[bid].request_id = rid
                want = BlockWant(rid, s.max_put, tuple(part))
                self._outbox.append((peer, push_block_message(want)))

    def _start(self, peer: PeerId, bid: bytes, batches: dict[PeerId, list[bytes]]) -> None:
        a = _Assignment(peer, bid, 0, self._needed[bid], self._now, self._now)
        self._peers[peer].in_flight[bid] = a
        self._assigned.setdefault(bid, []).append(a)
        batches.setdefault(peer, []).append(bid)

    def _best_peer(self, bid: bytes, exclude: PeerId | None = None) -> PeerId | None:
        best: PeerId | None = None
        best_score = 0.0
        cap = self.settings.max_in_flight_per_peer
        for pid, p in self._peers.items():
            if (
                p.out
                or pid == exclude
                or len(p.in_flight) >= cap
                or p.busy_until > self._now
                or bid in p.lacks
                or bid in p.in_flight
            ):
                continue
            score = (len(p.in_flight) + 1) * (p.ewma if p.ewma is not None else 0.0)
            if best is None or score < best_score:
                best, best_score = pid, score
        return best

    def _request_id(self) -> int:
        rid = self._next_request
        self._next_request = rid + 1 if rid + 1 < _U32 else 1
        return rid

    # ------------------------------------------------------------------ bookkeeping

    def _want(self, bid: bytes, size: int | None) -> None:
        self._needed[bid] = size
        self._unassigned[bid] = None
        self._blocks_total += 1
        self._bytes_total += size or 0

    def _begin_chunks(self, manifest: Manifest, have_manifest_block: bool) -> None:
        self._manifest = manifest
        self._state = FetchState.CHUNKS
        if not have_manifest_block:
            encoded = push_manifest(manifest)
            self._store.put(chunk_id(encoded), encoded)
        if self._blocks_total == 0:  # the manifest was known: count it as a done block
            self._blocks_total = self._blocks_done = 1
        for cid, size in manifest.unique_chunks().items():
            self._blocks_total += 1
            self._bytes_total += size
            if self._store.has(cid):
                self._blocks_done += 1
                self._bytes_done += size
            else:
                self._needed[cid] = size
                self._unassigned[cid] = None
        if not self._needed:
            self._finish()

    def _release(self, a: _Assignment) -> None:
        """Take `a` off its peer; the block waits for another peer unless a twin covers it."""
        p = self._peers.get(a.peer)
        if p is not None and p.in_flight.get(a.block_id) is a:
            del p.in_flight[a.block_id]
        twins = self._assigned.get(a.block_id)
        if twins is not None:
            twins[:] = [t for t in twins if t is not a]
            if not twins:
                del self._assigned[a.block_id]
        if a.block_id in self._needed and a.block_id not in self._assigned:
            self._retry[a.block_id] = None

    def _reject(self, peer: PeerId, p: _FetchPeer, a: _Assignment, reason: str) -> None:
        self._rejected += 1
        p.rejected += 1
        self._emit(BlockRejected(a.block_id, peer, reason))
        self._ban(peer, p, reason)

    def _ban(self, peer: PeerId, p: _FetchPeer, reason: str) -> None:
        p.banned = True
        for a in list(p.in_flight.values()):
            self._release(a)
        self._emit(PeerBanned(peer, reason))
        self._check_needed = True

    def _queue_cancel(self, a: _Assignment) -> None:
        p = self._peers.get(a.peer)
        if p is not None and not p.out:
            msg = push_block_message(BlockCancel(a.request_id, (a.block_id,)))
            self._outbox.append((a.peer, msg))

    def _check_obtainable(self) -> None:
        """Fail if some needed block has no peer left that might serve it."""
        self._check_needed = False
        usable = [p for p in self._peers.values() if not p.out]
        if not usable:
            self._fail("no usable peer left")
            return
        for bid in self._needed:
            if all(bid in p.lacks for p in usable):
                self._fail(f"no peer left has block {bid.hex()}")
                return

    def _finish(self) -> None:
        self._state = FetchState.COMPLETE
        assert self._manifest is not None
        self._emit(FetchComplete(self.blob_id, self._manifest))

    def _fail(self, reason: str) -> None:
        self._state = FetchState.FAILED
        self._failure = reason
        for p in self._peers.values():
            for a in list(p.in_flight.values()):
                self._queue_cancel(a)
            p.in_flight.clear()
        self._assigned.clear()
        self._unassigned.clear()
        self._retry.clear()
        self._emit(FetchFailed(self.blob_id, reason))

    def _emit(self, ev: FetchEvent) -> None:
        if len(self._events) >= self.settings.max_events:
            self._events.popleft()
            self._events_dropped += 1
        self._events.append(ev)


# ------------------------------------------------------------------------------ server


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Limits of one `BlobServer`. Rates in bytes per second, sizes in bytes."""

    max_put: int = MAX_BLOCK_MESSAGE
    """Our own cap on a BLOCK_PUT (the smaller of this and the requester's `max_put` is used)."""
    rate: float = 16_000_000.0
    """Per-peer send rate: the token bucket's refill."""
    burst: int = 1_000_000
    """Per-peer bucket size: bytes a peer may get at once after a quiet spell."""
    max_queued_blocks: int = 64
    """Blocks queued for one peer; wants beyond it get NACK BUSY."""
    max_peers: int = 256
    """Peers with queued work; a new peer beyond it gets NACK BUSY."""
    max_messages_per_call: int = 1024
    """Messages one `messages_to_send` call returns at most (the rest wait for the next)."""

    def __post_init__(self) -> None:
        if not MIN_PUT_SIZE <= self.max_put <= MAX_BLOCK_MESSAGE:
            raise ValueError(f"max_put must be in [{MIN_PUT_SIZE}, {MAX_BLOCK_MESSAGE}]")
        if not self.rate > 0 or self.burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if self.max_queued_blocks < 1 or self.max_peers < 1 or self.max_messages_per_call < 1:
            raise ValueError("queue, peer and message limits must be at least 1")


@dataclass(frozen=True, slots=True)
class ServeStats:
    """A snapshot of a `BlobServer`'s counters."""

    peers: int
    queued_blocks: int
    wants: int
    blocks_served: int
    pieces_sent: int
    bytes_sent: int
    not_found: int
    busy: int
    cancelled: int
    malformed: int
    unexpected: int


@dataclass(slots=True, eq=False)
class _Sending:
    request_id: int
    block_id: bytes
    data: bytes
    piece: int
    offset: int = 0


@dataclass(slots=True, eq=False)
class _ServePeer:
    tokens: float
    refilled_at: float
    queue: deque[tuple[int, bytes, int]] = field(default_factory=deque)  # (request, id, max_put)
    current: _Sending | None = None
    control: list[bytes] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or self.current is not None or bool(self.control)


class BlobServer:
    """Answer BLOCK_WANT from `store` (see the module docstring)."""

    def __init__(self, store: ChunkStore, settings: ServeSettings | None = None) -> None:
        self.settings = settings if settings is not None else ServeSettings()
        self._store = store
        self._peers: dict[PeerId, _ServePeer] = {}
        self._now = 0.0
        self._wants = 0
        self._blocks_served = 0
        self._pieces = 0
        self._bytes = 0
        self._not_found = 0
        self._busy = 0
        self._cancelled = 0
        self._malformed = 0
        self._unexpected = 0

    def receive(self, peer: PeerId, data: bytes, now: float) -> None:
        """Feed one block-exchange message from `peer`. Never raises on bad input."""
        self._now = now
        try:
            msg = pull_block_message(data)
        except DecodeError:
            self._malformed += 1
            return
        if isinstance(msg, BlockWant):
            self._on_want(peer, msg)
        elif isinstance(msg, BlockCancel):
            self._on_cancel(peer, msg)
        else:
            self._unexpected += 1

    def _peer(self, peer: PeerId) -> _ServePeer | None:
        p = self._peers.get(peer)
        if p is not None:
            return p
        if len(self._peers) >= self.settings.max_peers:
            # Forget idle peers first: their only state is a token bucket, and a fresh bucket
            # starts full, so forgetting one can at most grant it one more burst.
            idle = [k for k, v in self._peers.items() if not v.busy]
            if not idle:
                return None
            for k in idle:
                del self._peers[k]
        p = _ServePeer(tokens=float(self.settings.burst), refilled_at=self._now)
        self._peers[peer] = p
        return p

    def _on_want(self, peer: PeerId, m: BlockWant) -> None:
        self._wants += 1
        p = self._peer(peer)
        if p is None:
            self._busy += len(m.ids)
            return  # no room to even queue a NACK: the fetcher's timeout handles it
        missing: list[bytes] = []
        busy: list[bytes] = []
        for bid in m.ids:
            if not self._store.has(bid):
                missing.append(bid)
            elif len(p.queue) >= self.settings.max_queued_blocks:
                busy.append(bid)
            else:
                p.queue.append((m.request_id, bid, m.max_put))
        if len(p.control) >= self.settings.max_queued_blocks:
            # A peer flooding us with wants we answer with NACKs: stop queueing answers (its
            # requests time out on its side). Bounds memory whatever it sends.
            self._busy += len(missing) + len(busy)
            return
        if missing:
            self._not_found += len(missing)
            nack = BlockNack(m.request_id, NackReason.NOT_FOUND, tuple(missing))
            p.control.append(push_block_message(nack))
        if busy:
            self._busy += len(busy)
            p.control.append(
                push_block_message(BlockNack(m.request_id, NackReason.BUSY, tuple(busy)))
            )

    def _on_cancel(self, peer: PeerId, m: BlockCancel) -> None:
        p = self._peers.get(peer)
        if p is None:
            return
        ids = set(m.ids)
        before = len(p.queue)
        p.queue = deque(q for q in p.queue if not (q[0] == m.request_id and q[1] in ids))
        self._cancelled += before - len(p.queue)
        cur = p.current
        if cur is not None and cur.request_id == m.request_id and cur.block_id in ids:
            p.current = None
            self._cancelled += 1

    def forget_peer(self, peer: PeerId) -> None:
        """Drop everything queued for `peer` (its session closed)."""
        self._peers.pop(peer, None)

    def get_timer(self) -> float | None:
        """When a rate-limited peer will have tokens again (None if no peer waits on tokens)."""
        t: float | None = None
        rate = self.settings.rate
        for p in self._peers.values():
            if (p.queue or p.current is not None) and p.tokens <= 0:
                d = p.refilled_at + (-p.tokens + 1) / rate
                if t is None or d < t:
                    t = d
        return t

    def handle_timer(self, now: float) -> None:
        """Nothing is due by itself: refills happen in `messages_to_send`; this records `now`."""
        self._now = now

    def messages_to_send(self, now: float) -> list[tuple[PeerId, bytes]]:
        """Take what may be sent now: NACKs, then pieces round-robin within each peer's bucket."""
        self._now = now
        s = self.settings
        out: list[tuple[PeerId, bytes]] = []
        active: list[tuple[PeerId, _ServePeer]] = []
        for pid, p in self._peers.items():
            for c in p.control:
                out.append((pid, c))
            p.control.clear()
            p.tokens = min(float(s.burst), p.tokens + (now - p.refilled_at) * s.rate)
            p.refilled_at = now
            if p.queue or p.current is not None:
                active.append((pid, p))
        # Round-robin one piece per peer per pass, so one greedy peer cannot starve the rest.
        # A peer may overdraw its bucket by one piece (tokens go negative and are paid back).
        while active and len(out) < s.max_messages_per_call:
            still: list[tuple[PeerId, _ServePeer]] = []
            for pid, p in active:
                if len(out) >= s.max_messages_per_call:
                    break
                if p.tokens <= 0:
                    continue
                msg = self._next_piece(pid, p)
                if msg is not None:
                    out.append((pid, msg))
                    p.tokens -= len(msg)
                    if p.queue or p.current is not None:
                        still.append((pid, p))
                for c in p.control:  # NACKs for blocks that vanished since they were queued
                    out.append((pid, c))
                p.control.clear()
            active = still
        return out

    def _next_piece(self, pid: PeerId, p: _ServePeer) -> bytes | None:
        while p.current is None:
            if not p.queue:
                return None
            rid, bid, max_put = p.queue.popleft()
            data = self._store.get(bid)
            if data is None:  # gone (evicted, or corrupt on disk) since the want was queued
                self._not_found += 1
                p.control.append(push_block_message(BlockNack(rid, NackReason.NOT_FOUND, (bid,))))
                continue
            piece = min(max_put, self.settings.max_put) - PUT_HEADER_LEN
            p.current = _Sending(rid, bid, data, piece)
        cur = p.current
        chunk = cur.data[cur.offset : cur.offset + cur.piece]
        msg = push_block_message(
            BlockPut(cur.request_id, cur.block_id, len(cur.data), cur.offset, chunk)
        )
        cur.offset += len(chunk)
        self._pieces += 1
        self._bytes += len(msg)
        if cur.offset >= len(cur.data):
            p.current = None
            self._blocks_served += 1
        return msg

    def statistics(self) -> ServeStats:
        """A frozen snapshot of the counters."""
        return ServeStats(
            peers=len(self._peers),
            queued_blocks=sum(len(p.queue) + (p.current is not None) for p in self._peers.values()),
            wants=self._wants,
            blocks_served=self._blocks_served,
            pieces_sent=self._pieces,
            bytes_sent=self._bytes,
            not_found=self._not_found,
            busy=self._busy,
            cancelled=self._cancelled,
            malformed=self._malformed,
            unexpected=self._unexpected,
        )
