"""Anti-entropy sync (DAG_SYNC): range-based set reconciliation of a channel's events.

Theory of operation
-------------------
Two replicas hold sets of events, each event an item (key, 32-byte id) in one ordered key space
(`cellmesh.state.sync_store`). They find the symmetric difference by comparing *fingerprints* of
ranges (Meyer, "Range-Based Set Reconciliation", 2023; the Negentropy protocol), so the bytes
exchanged grow with the difference, not with the set:

1. The initiator sends one range covering everything, with its fingerprint (or, if it holds at
   most `idlist_threshold` items, with the list of their ids).
2. A side receiving FINGERPRINT for a range compares it with its own. Equal: the range is done
   (SKIP). Different: if it holds at most `idlist_threshold` items there it answers IDLIST, its
   ids; otherwise it splits the range into `branching` sub-ranges of equal item counts and
   answers a FINGERPRINT for each.
3. A side receiving IDLIST for a range knows both sides' contents of it: the ids it lacks go on
   its *want* list (the peer will send those events), and the events it has that the peer's list
   lacks are queued to be pushed. The range is done.
4. Each message also carries wanted ids and events, within `max_message_size`. A side with more
   queued than fits sets MORE, and the exchange goes on until neither side has anything left.

With n items and d differences the exchange takes about log_branching(n / threshold) + 2 round
trips and O(d * branching * log n) bytes of fingerprints and ids, plus the d events themselves.
Two replicas of 100,000 events differing by 10 exchange a few tens of kilobytes.

The exchange is strictly alternating: each side sends only in answer to a message (the
initiator's `start()` aside), so at most one message is in flight per direction and memory is
bounded by the message size. A side answers when the message needs an answer (open ranges or
wants), when the peer set MORE (it needs the turn back to go on), or when it has something of its
own to send. Otherwise it stays silent, and it is `done`. A side that sends a message that needs
no answer, with nothing queued, after a message without MORE, is done too.

Bounds against a hostile or broken peer (each breach raises `RemoteProtocolError` from `receive`
and fails the session; decoding faults are counted in `malformed` first):
* every message at most `max_message_size` bytes, every count checked before allocation;
* per message, work O(items in the ranges it names + its size): ranges partition the key space;
* `max_turns` messages, `max_reconcile_rounds` messages that open ranges, `max_idle_turns`
  consecutive messages that carry nothing but MORE, `max_rejected_events` events the store
  refuses;
* at most `max_pending_wants` ids wanted or to be pushed, and `max_push_ranges` ranges queued
  for pushing; beyond that they are dropped and counted and the session ends not `complete`
  (the next anti-entropy round picks up the rest).
Sessions carry no timer of their own beyond `idle_timeout`: the transport below is reliable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum, IntEnum

from cellmesh.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from cellmesh.state.sync_messages import (
    MAX_SYNC_MESSAGE,
    MIN_SYNC_MESSAGE,
    Mode,
    RangeRecord,
    SyncMessage,
    SyncMessageWriter,
    pull_sync_message,
)
from cellmesh.state.sync_store import (
    ID_LEN,
    INFINITY,
    LOWEST,
    Added,
    MemorySyncStore,
    RangeSummary,
    SortedSyncIndex,
    SyncItem,
    SyncStoreView,
    fingerprint,
)

__all__ = [
    "Added",
    "MemorySyncStore",
    "RangeSummary",
    "SortedSyncIndex",
    "SyncError",
    "SyncItem",
    "SyncRole",
    "SyncSession",
    "SyncSettings",
    "SyncState",
    "SyncStats",
    "SyncStoreView",
]

_REMAINDER_RESERVE = 64
"""Room always kept for the closing records: a SKIP flush (<= 45 bytes) and FINGERPRINT to
infinity (18 bytes), so a message that runs out of space can still hand the rest back."""


class SyncError(IntEnum):
    """`RemoteProtocolError` codes a sync session fails with."""

    MALFORMED = 1
    TOO_MANY_TURNS = 2
    TOO_MANY_ROUNDS = 3
    IDLE = 4
    REJECTED_EVENTS = 5


class SyncRole(Enum):
    """Which side of a session this is."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


class SyncState(Enum):
    """Where a session is."""

    OPEN = "open"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Limits of one sync session (both sides should use the same `max_message_size`)."""

    max_message_size: int = 60_000
    """Largest message sent or accepted: fits one reliable cellmesh message."""
    branching: int = 16
    """Sub-ranges a mismatching range is split into."""
    idlist_threshold: int = 32
    """A side holding at most this many items in a mismatching range lists them instead."""
    max_turns: int = 100_000
    """Messages received per session."""
    max_reconcile_rounds: int = 1_000
    """Messages received that open ranges (honest peers need ~log(n) plus overflow rounds)."""
    max_idle_turns: int = 16
    """Consecutive messages received with nothing in them but MORE."""
    max_pending_wants: int = 200_000
    """Ids wanted from the peer per session; and ids queued for pushing at once (the peer's
    wants plus the ids of its lists that ranges queued for pushing must skip)."""
    max_push_ranges: int = 65_536
    """Ranges whose events are queued to be pushed."""
    max_tracked_ids: int = 100_000
    """Ids remembered in `missing_here` / `missing_there` (counts go on beyond)."""
    max_rejected_events: int = 1_000
    """Events the store refuses before the session fails."""
    push_scan: int = 256
    """Items read from the store per call while pushing a range."""
    idle_timeout: float = 30.0
    """Seconds without a message before `handle_timer` fails the session."""

    def __post_init__(self) -> None:
        if not MIN_SYNC_MESSAGE <= self.max_message_size <= MAX_SYNC_MESSAGE:
            raise ValueError(
                f"max_message_size must be in [{MIN_SYNC_MESSAGE}, {MAX_SYNC_MESSAGE}]"
            )
        if not 2 <= self.branching <= 64:
            raise ValueError("branching must be in [2, 64]")
        if self.idlist_threshold < 1:
            raise ValueError("idlist_threshold must be at least 1")
        # An IDLIST answer must fit in an otherwise empty message beside a SKIP and the remainder
        # reserve, so every turn answers at least one open range (the session makes progress).
        if self.idlist_threshold * ID_LEN + 4 * _REMAINDER_RESERVE > self.max_message_size:
            raise ValueError("idlist_threshold too large for max_message_size")
        for name in (
            "max_turns",
            "max_reconcile_rounds",
            "max_idle_turns",
            "max_pending_wants",
            "max_push_ranges",
            "max_tracked_ids",
            "max_rejected_events",
            "push_scan",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.idle_timeout > 0:
            raise ValueError("idle_timeout must be > 0")


@dataclass(frozen=True, slots=True)
class SyncStats:
    """A snapshot of a session's counters. Byte counts are whole sync messages."""

    role: SyncRole
    state: SyncState
    turns: int
    reconcile_rounds: int
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    events_sent: int
    events_received: int
    events_new: int
    events_duplicate: int
    events_rejected: int
    wants_sent: int
    wants_received: int
    missing_here: int
    missing_there: int
    unavailable: int
    oversize_events: int
    wants_dropped: int
    push_ranges_dropped: int
    malformed: int
    events_ignored: int = 0
    """Events a send-only side received and ignored."""
    wants_skipped: int = 0
    """Ids a send-only side saw it lacked and did not ask for."""


@dataclass(slots=True, eq=False)
class _RangePush:
    """Push our events in [cursor, hi) except those the peer listed."""

    cursor: SyncItem
    hi: SyncItem
    exclude: frozenset[bytes]


class _Tracked:
    """A set of ids remembered up to a limit, and a count that goes on past it."""

    __slots__ = ("count", "ids", "limit")

    def __init__(self, limit: int) -> None:
        self.ids: set[bytes] = set()
        self.limit = limit
        self.count = 0

    def add(self, i: bytes) -> None:
        if i in self.ids:
            return
        self.count += 1
        if len(self.ids) < self.limit:
            self.ids.add(i)


def _min_bound(a: SyncItem, b: SyncItem) -> SyncItem:
    """The shortest bound x with a < x <= b (for a < b): b's key, and b's id cut just past the
    first byte where it differs from a's, zero-padded (Negentropy's bound)."""
    if a.key != b.key:
        return SyncItem(b.key, bytes(ID_LEN))
    n = 0
    while n < ID_LEN and a.id[n] == b.id[n]:
        n += 1
    return SyncItem(b.key, b.id[: n + 1] + bytes(ID_LEN - n - 1))


def _after(item: SyncItem) -> SyncItem:
    """The smallest point above `item` (a 33-byte id sorts right after the 32-byte one; such a
    cursor is internal and never encoded)."""
    return SyncItem(item.key, item.id + b"\x00")


class SyncSession:
    """One reconciliation between this replica (`store`) and one peer, for one channel.

    The initiator calls `start()` and sends the result; each side then feeds every message it
    receives to `receive()` and sends what it returns (zero or one message). The session is over
    when `done` (or `failed`). See the module docstring for the protocol and its bounds.
    """

    def __init__(
        self,
        store: SyncStoreView,
        role: SyncRole,
        now: float,
        settings: SyncSettings | None = None,
        accept_events: bool = True,
    ) -> None:
        self.store = store
        self.role = role
        self.accept_events = accept_events
        """False: a send-only side (the peer may read from us but not write to us). It never
        wants ids and ignores events the peer pushes (counted in `events_ignored`)."""
        self._events_ignored = 0
        self._wants_skipped = 0
        self.settings = settings if settings is not None else SyncSettings()
        self._now = now
        self._last_activity = now
        self._started = False
        self._state = SyncState.OPEN
        self._failure: str | None = None
        self._want_queue: deque[bytes] = deque()
        self._wanted: set[bytes] = set()
        self._push_queue: deque[bytes | _RangePush] = deque()
        self._push_ids = 0
        self._push_ranges = 0
        self._here = _Tracked(self.settings.max_tracked_ids)
        self._there = _Tracked(self.settings.max_tracked_ids)
        self._turns = 0
        self._rounds = 0
        self._idle_turns = 0
        self._messages_sent = 0
        self._messages_received = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._events_sent = 0
        self._events_received = 0
        self._events_new = 0
        self._events_duplicate = 0
        self._events_rejected = 0
        self._wants_sent = 0
        self._wants_received = 0
        self._unavailable = 0
        self._oversize = 0
        self._wants_dropped = 0
        self._push_ranges_dropped = 0
        self._malformed = 0

    # ------------------------------------------------------------------ public state

    @property
    def state(self) -> SyncState:
        """OPEN, DONE or FAILED."""
        return self._state

    @property
    def done(self) -> bool:
        """True when this side has nothing more to send or wait for."""
        return self._state is SyncState.DONE

    @property
    def failed(self) -> bool:
        """True after a protocol error or an idle timeout; see `failure`."""
        return self._state is SyncState.FAILED

    @property
    def failure(self) -> str | None:
        """Why the session failed."""
        return self._failure

    @property
    def complete(self) -> bool:
        """Done, and nothing was dropped at a limit: both replicas now hold the union (as far as
        the stores accepted the events)."""
        return self.done and not (self._wants_dropped or self._push_ranges_dropped)

    @property
    def missing_here(self) -> frozenset[bytes]:
        """Ids this side learned it lacked (wanted, or received new); up to `max_tracked_ids`."""
        return frozenset(self._here.ids)

    @property
    def missing_there(self) -> frozenset[bytes]:
        """Ids this side learned the peer lacked (pushed, or wanted by the peer)."""
        return frozenset(self._there.ids)

    @property
    def bytes_sent(self) -> int:
        """Bytes of sync messages sent."""
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        """Bytes of sync messages received."""
        return self._bytes_received

    def statistics(self) -> SyncStats:
        """A frozen snapshot of the counters."""
        return SyncStats(
            role=self.role,
            state=self._state,
            turns=self._turns,
            reconcile_rounds=self._rounds,
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            events_sent=self._events_sent,
            events_received=self._events_received,
            events_new=self._events_new,
            events_duplicate=self._events_duplicate,
            events_rejected=self._events_rejected,
            wants_sent=self._wants_sent,
            wants_received=self._wants_received,
            missing_here=self._here.count,
            missing_there=self._there.count,
            unavailable=self._unavailable,
            oversize_events=self._oversize,
            wants_dropped=self._wants_dropped,
            push_ranges_dropped=self._push_ranges_dropped,
            malformed=self._malformed,
            events_ignored=self._events_ignored,
            wants_skipped=self._wants_skipped,
        )

    # ------------------------------------------------------------------ timer

    def get_timer(self) -> float | None:
        """When the session gives up on a silent peer (None once it is over)."""
        if self._state is not SyncState.OPEN:
            return None
        return self._last_activity + self.settings.idle_timeout

    def handle_timer(self, now: float) -> None:
        """Fail the session if the peer has been silent for `idle_timeout`."""
        self._now = now
        if (
            self._state is SyncState.OPEN
            and now >= self._last_activity + self.settings.idle_timeout
        ):
            self._state = SyncState.FAILED
            self._failure = f"peer silent for {self.settings.idle_timeout:g} s"

    # ------------------------------------------------------------------ protocol

    def start(self) -> bytes:
        """The initiator's first message: one range over the whole key space."""
        if self.role is not SyncRole.INITIATOR:
            raise LocalProtocolError("only the initiator starts a sync session")
        if self._started:
            raise LocalProtocolError("sync session already started")
        self._started = True
        w = SyncMessageWriter(self.settings.max_message_size)
        summary = self.store.summarize(LOWEST, INFINITY)
        if summary.size <= self.settings.idlist_threshold:
            limit = self.settings.idlist_threshold
            ids = tuple(it.id for it in self.store.items_in_range(LOWEST, INFINITY, limit))
            w.add_ranges([RangeRecord(INFINITY, Mode.IDLIST, ids=ids)])
        else:
            w.add_ranges([RangeRecord(INFINITY, Mode.FINGERPRINT, fingerprint(summary))])
        return self._send(w, more=False)

    def receive(self, data: bytes, now: float | None = None) -> list[bytes]:
        """Process one message from the peer; return the messages to send back (zero or one).

        `now` is the arrival time (None keeps the last known time). Raises `RemoteProtocolError`
        (and fails the session) when the peer breaks the protocol or a limit; raises
        `LocalProtocolError` on a failed session or an initiator that has not started.
        """
        if self._state is SyncState.FAILED:
            raise LocalProtocolError(f"sync session failed: {self._failure}")
        if self.role is SyncRole.INITIATOR and not self._started:
            raise LocalProtocolError("the initiator must start() before receiving")
        if now is not None:
            self._now = now
        self._last_activity = self._now
        self._messages_received += 1
        self._bytes_received += len(data)
        try:
            msg = pull_sync_message(data, self.settings.max_message_size)
        except DecodeError as exc:
            self._malformed += 1
            raise self._protocol_error(
                f"undecodable sync message: {exc}", SyncError.MALFORMED
            ) from exc
        self._count_turn(msg)
        self._state = SyncState.OPEN  # a peer with more to say reopens a side that was done
        self._accept_events(msg.events)
        self._accept_wants(msg.wants)
        w = SyncMessageWriter(self.settings.max_message_size)
        self._answer_ranges(msg.ranges, w)
        self._fill_wants(w)
        self._fill_events(w)
        more = bool(self._want_queue or self._push_queue)
        if not (msg.needs_response or msg.more or w.has_content or more):
            self._state = SyncState.DONE
            return []
        done_after = not w.needs_response and not more and not msg.more
        out = self._send(w, more)
        if done_after:
            self._state = SyncState.DONE
        return [out]

    def _send(self, w: SyncMessageWriter, more: bool) -> bytes:
        out = w.finish(more)
        self._messages_sent += 1
        self._bytes_sent += len(out)
        return out

    def _protocol_error(self, reason: str, code: int) -> RemoteProtocolError:
        self._state = SyncState.FAILED
        self._failure = reason
        return RemoteProtocolError(reason, code)

    def _count_turn(self, msg: SyncMessage) -> None:
        s = self.settings
        self._turns += 1
        if self._turns > s.max_turns:
            raise self._protocol_error("too many sync turns", SyncError.TOO_MANY_TURNS)
        if any(r.mode is not Mode.SKIP for r in msg.ranges):
            self._rounds += 1
            if self._rounds > s.max_reconcile_rounds:
                raise self._protocol_error(
                    "too many reconciliation rounds", SyncError.TOO_MANY_ROUNDS
                )
        if msg.more and not (msg.needs_response or msg.events):
            self._idle_turns += 1
            if self._idle_turns > s.max_idle_turns:
                raise self._protocol_error("peer keeps the turn without sending", SyncError.IDLE)
        else:
            self._idle_turns = 0

    def _accept_events(self, events: tuple[bytes, ...]) -> None:
        if not self.accept_events:
            self._events_ignored += len(events)
            return
        for data in events:
            self._events_received += 1
            added: Added | None = self.store.add_encoded(data)
            if added is None:
                self._events_rejected += 1
                if self._events_rejected > self.settings.max_rejected_events:
                    raise self._protocol_error(
                        "too many events the store refused", SyncError.REJECTED_EVENTS
                    )
            elif added.new:
                self._events_new += 1
                if added.item.id not in self._wanted:  # wanted ids were counted when wanted
                    self._here.add(added.item.id)
            else:
                self._events_duplicate += 1

    def _accept_wants(self, wants: tuple[bytes, ...]) -> None:
        self._wants_received += len(wants)
        for i in wants:
            if self._push_ids >= self.settings.max_pending_wants:
                self._wants_dropped += 1
                continue
            self._push_queue.append(i)
            self._push_ids += 1

    def _want(self, event_id: bytes) -> None:
        if not self.accept_events:
            self._wants_skipped += 1
            return
        if event_id in self._wanted:
            return
        if len(self._wanted) >= self.settings.max_pending_wants:
            self._wants_dropped += 1
            return
        self._wanted.add(event_id)
        self._want_queue.append(event_id)
        self._here.add(event_id)

    # ------------------------------------------------------------------ ranges

    def _answer_ranges(self, ranges: tuple[RangeRecord, ...], w: SyncMessageWriter) -> None:
        """Answer every open range in order; when the message fills up, hand the rest of the key
        space back as one FINGERPRINT (the peer splits it again next turn)."""
        lo = LOWEST
        skip_to: SyncItem | None = None  # SKIPs are coalesced and written only when needed
        for rec in ranges:
            hi = rec.upper
            if rec.mode is Mode.FINGERPRINT:
                summary = self.store.summarize(lo, hi)
                if fingerprint(summary) != rec.fingerprint:
                    records = self._mismatch(lo, hi, summary)
                    if skip_to is not None:
                        records.insert(0, RangeRecord(skip_to, Mode.SKIP))
                    if not w.add_ranges(records, reserve=_REMAINDER_RESERVE):
                        self._hand_back(lo, skip_to, w)
                        return
                    skip_to = None
                    lo = hi
                    continue
            elif rec.mode is Mode.IDLIST:
                self._resolve_idlist(lo, hi, rec.ids)
            skip_to = hi
            lo = hi
        # A trailing SKIP is implied: nothing to write.

    def _hand_back(self, lo: SyncItem, skip_to: SyncItem | None, w: SyncMessageWriter) -> None:
        records = [] if skip_to is None else [RangeRecord(skip_to, Mode.SKIP)]
        fp = fingerprint(self.store.summarize(lo, INFINITY))
        records.append(RangeRecord(INFINITY, Mode.FINGERPRINT, fp))
        fitted = w.add_ranges(records)
        assert fitted, "the remainder reserve always holds a SKIP and one FINGERPRINT"

    def _mismatch(self, lo: SyncItem, hi: SyncItem, summary: RangeSummary) -> list[RangeRecord]:
        s = self.settings
        if summary.size <= s.idlist_threshold:
            ids = tuple(it.id for it in self.store.items_in_range(lo, hi, s.idlist_threshold))
            return [RangeRecord(hi, Mode.IDLIST, ids=ids)]
        items = self.store.items_in_range(lo, hi)
        n = len(items)
        parts = min(s.branching, n)
        records: list[RangeRecord] = []
        prev = lo
        for k in range(1, parts + 1):
            if k == parts:
                upper = hi
            else:
                e = (k * n) // parts
                upper = _min_bound(items[e - 1], items[e])
            fp = fingerprint(self.store.summarize(prev, upper))
            records.append(RangeRecord(upper, Mode.FINGERPRINT, fp))
            prev = upper
        return records

    def _resolve_idlist(self, lo: SyncItem, hi: SyncItem, their_ids: tuple[bytes, ...]) -> None:
        theirs = frozenset(their_ids)
        common = 0
        for i in theirs:
            if self.store.has(i):
                common += 1
            else:
                self._want(i)
        if self.store.summarize(lo, hi).size > common:
            # The exclusion set is held until the range is pushed: it counts against the same
            # budget as queued wants, so a peer repeating big IDLISTs cannot pile up memory.
            if (
                self._push_ranges >= self.settings.max_push_ranges
                or self._push_ids + len(theirs) > self.settings.max_pending_wants
            ):
                self._push_ranges_dropped += 1
                return
            self._push_queue.append(_RangePush(lo, hi, theirs))
            self._push_ranges += 1
            self._push_ids += len(theirs)

    # ------------------------------------------------------------------ wants and events

    def _fill_wants(self, w: SyncMessageWriter) -> None:
        q = self._want_queue
        while q:
            i = q[0]
            if self.store.has(i):  # it arrived meanwhile (pushed before we asked)
                q.popleft()
                continue
            if not w.add_want(i):
                return
            q.popleft()
            self._wants_sent += 1

    def _fill_events(self, w: SyncMessageWriter) -> None:
        q = self._push_queue
        limit = self.settings.max_message_size - 64  # an event beyond this never fits
        while q:
            job = q[0]
            if isinstance(job, bytes):
                data = self.store.get_encoded(job)
                if data is None:
                    self._unavailable += 1
                elif SyncMessageWriter.event_cost(data) > limit:
                    self._oversize += 1
                elif not w.add_event(data):
                    return
                else:
                    self._events_sent += 1
                    self._there.add(job)
                q.popleft()
                self._push_ids -= 1
                continue
            if not self._push_range(job, w, limit):
                return
            q.popleft()
            self._push_ranges -= 1
            self._push_ids -= len(job.exclude)

    def _push_range(self, job: _RangePush, w: SyncMessageWriter, limit: int) -> bool:
        """Push events of `job` until the message is full (False) or the range is done (True)."""
        while True:
            batch = self.store.items_in_range(job.cursor, job.hi, self.settings.push_scan)
            if not batch:
                return True
            for item in batch:
                if item.id not in job.exclude:
                    data = self.store.get_encoded(item.id)
                    if data is None:
                        self._unavailable += 1
                    elif SyncMessageWriter.event_cost(data) > limit:
                        self._oversize += 1
                    elif not w.add_event(data):
                        return False
                    else:
                        self._events_sent += 1
                        self._there.add(item.id)
                job.cursor = _after(item)
