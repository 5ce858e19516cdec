"""`StateSync`: anti-entropy between the channel logs of running nodes (DAG_SYNC over streams).

Theory of operation
-------------------
The reconciliation itself is the sans-IO `cellmesh.state.sync.SyncSession` (range-based set
reconciliation: the bytes exchanged grow with the difference, not with the log). This module
gives it a store, a transport and a schedule:

* **Store.** `LogSyncView` shows one channel of the node's `SqliteLogStore` to a session: an
  in-memory `SortedSyncIndex` of the channel's events (pending ones too), keyed by each event's
  Lamport clock (signed, checked by the log, the same on every replica; recent events cluster at
  the top of the key space, so a recent difference sits in few ranges). One index per channel is
  kept while the node runs (40 bytes of key material per event) and updated on every append, so
  a session costs O(difference), not a scan. Events received from the peer are checked for
  shape and channel, staged, and appended in one durable transaction per message
  (`append_many`: one fsync per message, not per event); the log verifies signatures, hash
  chains and clocks and refuses what fails, and refused events leave the index again.
* **Transport.** A stream of kind ``sync`` (node/services.py) whose header names the channel:
  ``{"v":1,"kind":"sync","channel":"<name>"}``, then sync messages, each framed as a u32
  big-endian length and at most `SYNC_MESSAGE_SIZE` bytes (docs/wire.md 13). The initiator
  sends first; each side writes what `SyncSession.receive` returns and closes its half once the
  session is done. A frame over the limit, a truncated frame or a session error resets the
  stream (counted), and nothing is kept but the events already verified and stored.
* **Who may sync.** The responder serves a peer only if that peer may read the channel here
  (it is subscribed to it at this node, or this node is subscribed to it at the peer); it takes
  the peer's events only if the peer may write them (a publish grant here, or it is the host
  this node subscribed at); otherwise the session is send-only (`accept_events=False`).
  Everything else is refused with a reason line before any sync message.
* **Schedule.** A node starts a session, as initiator, for every (host, channel) it holds a
  subscription or a publish grant at: at once when the grant is obtained (a late subscriber
  catches up), when a live event arrives whose predecessors are missing (a gap), and every
  `sync_interval` seconds (partitions heal). At most one session per (peer, channel) runs at a
  time, at most `MAX_SESSIONS` in all, and a pair is not started again within `MIN_GAP` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cellmesh.errors import (
    AccessDeniedError,
    CellmeshError,
    DecodeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from cellmesh.filter.channels import channel_hash
from cellmesh.identity.cellid import format_cell_id
from cellmesh.node.services import header_line
from cellmesh.node.streams import Stream, StreamError
from cellmesh.state.events import decode_event, event_id_of_encoding
from cellmesh.state.log import AppendStatus, LogStoreBase
from cellmesh.state.sync import SyncRole, SyncSession, SyncSettings, SyncStats
from cellmesh.state.sync_store import (
    MAX_KEY,
    Added,
    RangeSummary,
    SortedSyncIndex,
    SyncItem,
)

if TYPE_CHECKING:
    from cellmesh.node.node import Node
    from cellmesh.node.state import StateDriver

__all__ = [
    "MAX_INDEXES",
    "MAX_SESSIONS",
    "SYNC_KIND",
    "SYNC_MESSAGE_SIZE",
    "LogSyncView",
    "StateSync",
    "SyncReport",
]

log = logging.getLogger("cellmesh.sync")

SYNC_KIND: Final = "sync"
SYNC_MESSAGE_SIZE: Final = 256 * 1024
"""Largest sync message on a stream: any event (at most ~66 KiB) fits, and a turn carries many."""
SYNC_SETTINGS: Final = SyncSettings(max_message_size=SYNC_MESSAGE_SIZE, idlist_threshold=64)
MAX_SESSIONS: Final = 32
"""Sessions running at once on one node (initiated and served together)."""
MAX_INDEXES: Final = 256
"""Channels whose sync index stays in memory (least recently used ones are rebuilt on demand)."""
MIN_GAP: Final = 1.0
"""Seconds before the same (peer, channel) pair is synced again."""
ANSWER_TIMEOUT: Final = 30.0
"""Seconds a side waits for the peer's next frame (or for room to write one) before giving up."""
SESSION_DEADLINE: Final = 900.0
"""Seconds one session may last in all (a fill of 100,000 events takes about 20 s here); a
session cut short keeps what it stored, and the next round goes on from there."""
MAX_PEER_SESSIONS: Final = 2
"""Sessions one peer may have served here at once (never two for one channel)."""
MAX_REASON: Final = 512
_LEN: Final = struct.Struct("!I")
_OK: Final = b"ok\n"


class SyncRefused(AccessDeniedError):
    """The peer refused to sync the channel with us: `reason` is its reason word
    (not_subscribed, busy, bad_request), the message has its sentence."""


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one finished session did, from this side."""

    peer: bytes
    channel: str
    role: str
    complete: bool
    seconds: float
    events_received: int
    events_new: int
    events_refused: int
    events_sent: int
    bytes_sent: int
    bytes_received: int
    messages: int

    def as_json(self) -> dict[str, Any]:
        return {
            "peer": format_cell_id(self.peer),
            "channel": self.channel,
            "role": self.role,
            "complete": self.complete,
            "seconds": round(self.seconds, 6),
            "events_received": self.events_received,
            "events_new": self.events_new,
            "events_refused": self.events_refused,
            "events_sent": self.events_sent,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages": self.messages,
        }


class LogSyncView:
    """One channel of a durable log store, as a `SyncSession` sees it (see the module doc)."""

    def __init__(self, store: LogStoreBase, channel: str, index: SortedSyncIndex) -> None:
        self.store = store
        self.channel = channel
        self.index = index
        self._staged: dict[bytes, tuple[SyncItem, bytes]] = {}
        self.refused: Counter[str] = Counter()
        self.new = 0
        self.delivered = 0

    def summarize(self, lo: SyncItem, hi: SyncItem) -> RangeSummary:
        return self.index.summarize(lo, hi)

    def items_in_range(
        self, lo: SyncItem, hi: SyncItem, limit: int | None = None
    ) -> Sequence[SyncItem]:
        return self.index.items_in_range(lo, hi, limit)

    def has(self, event_id: bytes) -> bool:
        return self.index.has(event_id)

    def get_encoded(self, event_id: bytes) -> bytes | None:
        # Only ids of this channel's index: a peer naming an id of another channel (one it is
        # not entitled to read) gets nothing, as for an id we never had.
        if not self.index.has(event_id):
            return None
        staged = self._staged.get(event_id)
        if staged is not None:
            return staged[1]
        return self.store.get_encoded(event_id)

    def add_encoded(self, data: bytes) -> Added | None:
        try:
            event = decode_event(data)
        except (DecodeError, ValueError):
            self.refused["malformed"] += 1
            return None
        if event.channel != self.channel:
            self.refused["wrong_channel"] += 1
            return None
        eid = event_id_of_encoding(data)
        item = SyncItem(min(event.clock, MAX_KEY), eid)
        if self.index.has(eid):
            return Added(item, False)
        self._staged[eid] = (item, bytes(data))
        self.index.add(item)
        return Added(item, True)

    def flush(self) -> int:
        """Append the staged events durably (one transaction); returns how many were delivered
        to the log. Refused ones are counted by reason and leave the index."""
        if not self._staged:
            return 0
        staged = list(self._staged.values())
        self._staged.clear()
        results = self.store.append_many([data for _, data in staged])
        delivered = 0
        for (item, _), result in zip(staged, results, strict=True):
            if result.status is AppendStatus.REFUSED:
                self.refused[result.reason or "refused"] += 1
                self.index.discard(item)
            elif result.status is AppendStatus.NEW:
                self.new += 1
                if result.delivered:
                    delivered += 1
        self.delivered += delivered
        return delivered


@dataclass(slots=True)
class _PeerSlots:
    """Turns for our sessions with one peer: MAX_PEER_SESSIONS at once, the rest wait."""

    sem: asyncio.Semaphore
    users: int = 0


class StateSync:
    """Anti-entropy sync of a node's channel logs with its peers. Reach it as `node.state.sync`."""

    def __init__(self, node: Node, state: StateDriver, interval: float) -> None:
        self._node = node
        self._state = state
        self.interval = interval
        self._indexes: OrderedDict[str, SortedSyncIndex] = OrderedDict()
        self._running: dict[tuple[bytes, str], asyncio.Task[SyncReport]] = {}
        self._last: dict[tuple[bytes, str], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._rng = random.Random()
        self.counters: Counter[str] = Counter()
        self.last_reports: OrderedDict[tuple[bytes, str], SyncReport] = OrderedDict()
        self._served: set[tuple[bytes, str]] = set()
        self._served_by_peer: Counter[bytes] = Counter()
        self._peer_slots: dict[bytes, _PeerSlots] = {}
        """Per peer, our initiated sessions running or waiting for a turn (see _initiate)."""
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._node.services.register(SYNC_KIND, self._serve)
        self._node.channels.grant_listeners.append(self._on_granted)
        self._schedule_tick()

    def close(self) -> None:
        self._closed = True
        self._node.services.unregister(SYNC_KIND)
        channels = self._node._channels
        if channels is not None and self._on_granted in channels.grant_listeners:
            channels.grant_listeners.remove(self._on_granted)
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._indexes.clear()

    def _schedule_tick(self) -> None:
        if self._closed or self.interval <= 0:
            return
        loop = asyncio.get_running_loop()
        # Jittered so that a mesh of nodes started together does not sync in lockstep.
        delay = self.interval * (0.75 + 0.5 * self._rng.random())
        self._ticker = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        if self._closed:
            return
        for peer, channel in self._pairs():
            self.request(peer, channel)
        self._schedule_tick()

    def _pairs(self) -> list[tuple[bytes, str]]:
        """(host, channel) for every subscription we hold: a host syncs only with peers that
        may read the channel, so a publish grant alone is not enough."""
        return sorted(set(self._node.channels.service.subscriptions()))

    def holds_subscription(self, peer: bytes, channel: str) -> bool:
        """True if we read `channel` at `peer` (we subscribed to it there)."""
        return self._node.channels.service.subscribed_at(peer, channel)

    def _may_read(self, peer: bytes, channel: str) -> bool:
        """`peer` may read our copy of `channel`: it subscribed to it here, or it is the host
        we read it from. Name-checked: a grant on a channel whose hash collides is no grant."""
        service = self._node.channels.service
        return service.peer_granted(peer, "subscribe", channel, time.time()) or (
            service.subscribed_at(peer, channel)
        )

    def _may_write(self, peer: bytes, channel: str) -> bool:
        """`peer` may add events to our copy: a publish grant here, or it is our host."""
        service = self._node.channels.service
        return service.peer_granted(peer, "publish", channel, time.time()) or (
            service.subscribed_at(peer, channel)
        )

    def _touch(self, key: tuple[bytes, str]) -> None:
        self._last[key] = time.monotonic()
        if len(self._last) > 4 * MAX_INDEXES:
            for k in list(self._last)[: len(self._last) // 2]:
                del self._last[k]

    # ------------------------------------------------------------------ the index

    def index(self, channel: str) -> SortedSyncIndex:
        """The sync index of `channel`, built from the log on first use."""
        idx = self._indexes.get(channel)
        if idx is not None:
            self._indexes.move_to_end(channel)
            return idx
        idx = SortedSyncIndex(
            SyncItem(min(clock, MAX_KEY), eid)
            for eid, clock in self._state.store.id_clocks(channel)
        )
        # An empty channel costs nothing to rebuild: keeping it would let a peer that syncs
        # many empty names evict the indexes of real channels (which cost a scan to rebuild).
        if len(idx):
            self._indexes[channel] = idx
            while len(self._indexes) > MAX_INDEXES:
                self._indexes.popitem(last=False)
        return idx

    def note_appended(self, channel: str, event_id: bytes, clock: int) -> None:
        """The log stored a new event (live, or our own): keep the index in step."""
        idx = self._indexes.get(channel)
        if idx is not None:
            idx.add(SyncItem(min(clock, MAX_KEY), event_id))

    def forget_index(self, channel: str) -> None:
        """Drop the index (retention removed events): it is rebuilt on next use."""
        self._indexes.pop(channel, None)

    # ------------------------------------------------------------------ scheduling

    def _on_granted(self, peer: bytes, channel: str) -> None:
        # A new subscription catches up at once; a publish grant pushes what we wrote while
        # we could not (when we also read the channel there).
        if self.holds_subscription(peer, channel):
            self.request(peer, channel, force=True)

    def request(self, peer: bytes, channel: str, force: bool = False) -> bool:
        """Start a session with `peer` on `channel` soon, unless one runs or ran just now.
        Returns True if one was started."""
        if self._closed:
            return False
        key = (peer, channel)
        if key in self._running or len(self._running) >= MAX_SESSIONS:
            return False
        if not force and time.monotonic() - self._last.get(key, -MIN_GAP) < MIN_GAP:
            return False
        self._start(key)
        return True

    def _start(self, key: tuple[bytes, str]) -> asyncio.Task[SyncReport]:
        """Run one initiated session as a task registered for `key` (one per pair)."""
        self._touch(key)
        task = asyncio.ensure_future(self._initiate(*key))
        self._running[key] = task
        self._tasks.add(task)

        def done(t: asyncio.Task[SyncReport]) -> None:
            self._tasks.discard(t)
            if self._running.get(key) is t:
                del self._running[key]
            if t.cancelled():
                return
            exc = t.exception()  # retrieved here, so a scheduled session never warns
            peer, channel = format_cell_id(key[0]), key[1]
            if isinstance(exc, SyncRefused):
                self.counters["refused_by_peer"] += 1
                log.info("sync of %s with %s refused: %s", channel, peer, exc)
            elif isinstance(exc, CellmeshError | TimeoutError):
                self.counters["failed"] += 1
                log.info("sync of %s with %s failed: %s", channel, peer, exc or "timed out")
            elif exc is not None:
                self.counters["failed"] += 1
                log.error("sync of %s with %s: internal error", channel, peer, exc_info=exc)

        task.add_done_callback(done)
        return task

    async def sync_with(
        self,
        peer: bytes,
        channel: str,
        timeout: float = 60.0,  # noqa: ASYNC109 - a deadline for the whole session
    ) -> SyncReport:
        """Reconcile `channel` with `peer` now (we initiate) and return what it did; a session
        already running for the pair is waited for first. Raises `SyncRefused` if the peer
        refuses, `CellmeshError` if the session fails, `TimeoutError` after `timeout`."""
        if self._closed:
            raise LocalProtocolError("the state layer is closed")
        key = (peer, channel)
        async with asyncio.timeout(timeout):
            while (running := self._running.get(key)) is not None:
                await asyncio.wait([running])  # its outcome is its own; ours follows
            if len(self._running) >= MAX_SESSIONS:
                raise LocalProtocolError(f"{MAX_SESSIONS} sync sessions already run")
            return await asyncio.shield(self._start(key))

    # ------------------------------------------------------------------ the exchange

    async def _initiate(self, peer: bytes, channel: str) -> SyncReport:
        channel_hash(channel)  # validates the name
        # A peer serves at most MAX_PEER_SESSIONS of ours at once and refuses the rest as
        # busy: several channels granted together (a node subscribing to three at start) take
        # turns here instead.
        slots = self._peer_slots.get(peer)
        if slots is None:
            slots = self._peer_slots[peer] = _PeerSlots(asyncio.Semaphore(MAX_PEER_SESSIONS))
        slots.users += 1
        try:
            async with slots.sem:
                return await self._initiate_now(peer, channel)
        finally:
            slots.users -= 1
            if slots.users == 0 and self._peer_slots.get(peer) is slots:
                del self._peer_slots[peer]

    async def _initiate_now(self, peer: bytes, channel: str) -> SyncReport:
        async with asyncio.timeout(SESSION_DEADLINE):
            st = await self._node.open_stream(peer)
            try:
                await _write(st, header_line(SYNC_KIND, channel=channel))
                reader = _FrameReader(st)
                try:
                    async with asyncio.timeout(ANSWER_TIMEOUT):
                        answer = await reader.line(MAX_REASON)
                except TimeoutError:
                    raise RemoteProtocolError(
                        f"no answer to a sync request within {ANSWER_TIMEOUT:g} s"
                    ) from None
                if answer != _OK:
                    text = answer.decode("utf-8", "replace").strip()
                    raise SyncRefused(
                        f"{format_cell_id(peer)} refused to sync {channel}: {text}",
                        text.split(":", 1)[0][:40],
                    )
                # We take the peer's events only if it is the host we read the channel from.
                accept = self.holds_subscription(peer, channel)
                return await self._run(st, reader, peer, channel, SyncRole.INITIATOR, accept)
            except BaseException:
                with contextlib.suppress(CellmeshError):
                    st.reset()
                raise

    async def _serve(self, st: Stream, header: dict[str, Any]) -> None:
        peer = st.cell_id
        channel = header.get("channel")
        reason = self._refusal(peer, channel)
        if reason is not None:
            self.counters[f"refused_{reason.split(':')[0]}"] += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    await st.write(reason.encode()[: MAX_REASON - 1] + b"\n")
                    await st.close()
                    await st.wait_acknowledged()
            return
        assert isinstance(channel, str)
        key = (peer, channel)
        accept = self._may_write(peer, channel)
        self._served.add(key)
        self._served_by_peer[peer] += 1
        try:
            async with asyncio.timeout(SESSION_DEADLINE):
                await _write(st, _OK)
                self._touch(key)
                await self._run(st, _FrameReader(st), peer, channel, SyncRole.RESPONDER, accept)
        except TimeoutError:
            self.counters["session_deadline"] += 1
            with contextlib.suppress(CellmeshError):
                st.reset()
        finally:
            self._served.discard(key)
            self._served_by_peer[peer] -= 1
            if self._served_by_peer[peer] <= 0:
                del self._served_by_peer[peer]

    def _refusal(self, peer: bytes, channel: object) -> str | None:
        """Why `peer` may not sync `channel` here (a reason word and detail), or None."""
        if not isinstance(channel, str):
            return "bad_request: the header names no channel"
        try:
            channel_hash(channel)
        except ValueError as exc:
            return f"bad_request: {exc}"
        if not self._may_read(peer, channel):
            return f"not_subscribed: subscribe to {channel} here before syncing it"
        if (peer, channel) in self._served:
            return f"busy: a sync of {channel} with you is already running"
        if self._served_by_peer.get(peer, 0) >= MAX_PEER_SESSIONS:
            return f"busy: {MAX_PEER_SESSIONS} sync sessions with you already run"
        if len(self._running) + len(self._served) >= MAX_SESSIONS:
            return "busy: too many sync sessions; try again later"
        return None

    async def _run(
        self,
        st: Stream,
        reader: _FrameReader,
        peer: bytes,
        channel: str,
        role: SyncRole,
        accept: bool,
    ) -> SyncReport:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        view = LogSyncView(self._state.store, channel, self.index(channel))
        session = SyncSession(view, role, loop.time(), SYNC_SETTINGS, accept_events=accept)
        try:
            if role is SyncRole.INITIATOR:
                await _write(st, _frame(session.start()))
            while not session.done:
                try:
                    async with asyncio.timeout(ANSWER_TIMEOUT):
                        frame = await reader.frame(SYNC_MESSAGE_SIZE)
                except TimeoutError:
                    raise RemoteProtocolError(f"no sync message for {ANSWER_TIMEOUT:g} s") from None
                if frame is None:
                    if session.done:
                        break
                    raise RemoteProtocolError("the peer ended the sync stream early")
                replies = session.receive(frame, loop.time())
                self._apply(view, channel)
                for out in replies:
                    await _write(st, _frame(out))
            await st.close()
            # Read to the peer's end so both halves finish. An honest peer sends nothing more
            # once we are done; anything it does send is counted and ignored.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    while await reader.frame(SYNC_MESSAGE_SIZE) is not None:
                        self.counters["late_frames"] += 1
        except RemoteProtocolError as exc:
            self._apply(view, channel)
            self.counters["session_failed"] += 1
            log.info("sync of %s with %s failed: %s", channel, format_cell_id(peer), exc)
            with contextlib.suppress(CellmeshError):
                st.reset()
            raise
        stats = session.statistics()
        report = _report(
            peer, channel, role, session.complete, time.monotonic() - started, stats, view
        )
        self.counters["sessions"] += 1
        self.counters["events_new"] += view.new
        self.counters["bytes_sent"] += stats.bytes_sent
        self.counters["bytes_received"] += stats.bytes_received
        self.last_reports[(peer, channel)] = report
        self.last_reports.move_to_end((peer, channel))
        while len(self.last_reports) > 64:
            self.last_reports.popitem(last=False)
        if view.new:
            log.info(
                "synced %s with %s: %d new events (%d B sent, %d B received)",
                channel,
                format_cell_id(peer),
                view.new,
                stats.bytes_sent,
                stats.bytes_received,
            )
        return report

    def _apply(self, view: LogSyncView, channel: str) -> None:
        """Store what the last message brought, and wake the channel's readers."""
        before = sum(view.refused.values())
        delivered = view.flush()
        refused = sum(view.refused.values()) - before
        if refused:
            self.counters["events_refused"] += refused
        if delivered:
            self._state._notify(channel)
        self._state.counters["synced"] += delivered

    def status(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "running": [{"peer": format_cell_id(p), "channel": c} for p, c in self._running],
            "counters": dict(self.counters),
            "recent": [r.as_json() for r in self.last_reports.values()],
        }


def _report(
    peer: bytes,
    channel: str,
    role: SyncRole,
    complete: bool,
    seconds: float,
    stats: SyncStats,
    view: LogSyncView,
) -> SyncReport:
    return SyncReport(
        peer=peer,
        channel=channel,
        role=role.value,
        complete=complete,
        seconds=seconds,
        events_received=stats.events_received,
        events_new=view.new,
        events_refused=sum(view.refused.values()),
        events_sent=stats.events_sent,
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        messages=stats.messages_sent + stats.messages_received,
    )


def _frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


async def _write(st: Stream, data: bytes) -> None:
    """Write, giving up when the peer leaves no room for `ANSWER_TIMEOUT` seconds (a peer that
    stops reading must not hold a session slot)."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            await st.write(data)
    except TimeoutError:
        raise RemoteProtocolError(
            f"the peer read nothing of the sync stream for {ANSWER_TIMEOUT:g} s"
        ) from None


class _FrameReader:
    """Reads reason lines and length-prefixed frames from a stream, bounded."""

    def __init__(self, st: Stream) -> None:
        self._st = st
        self._buf = bytearray()

    async def _fill(self) -> bool:
        chunk = await self._st.read(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    async def line(self, limit: int) -> bytes:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                out = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                return out
            if len(self._buf) >= limit:
                raise RemoteProtocolError(f"answer line longer than {limit} bytes")
            if not await self._fill():
                raise StreamError("the peer closed the sync stream before answering")

    async def frame(self, limit: int) -> bytes | None:
        """The next frame, or None at a clean end of the stream."""
        while len(self._buf) < _LEN.size:
            if not await self._fill():
                if self._buf:
                    raise RemoteProtocolError("sync stream ended inside a frame length")
                return None
        (n,) = _LEN.unpack_from(self._buf, 0)
        if n > limit:
            raise RemoteProtocolError(f"sync frame of {n} bytes exceeds {limit}")
        while len(self._buf) < _LEN.size + n:
            if not await self._fill():
                raise RemoteProtocolError("sync stream ended inside a frame")
        out = bytes(self._buf[_LEN.size : _LEN.size + n])
        del self._buf[: _LEN.size + n]
        return out
