"""Durable channel logs (RedEX): the storage interface, the rules every engine shares, and an
in-memory engine for the simulator and tests.

Theory of operation
-------------------
A log store holds signed events (`cellmesh.state.events`) for any number of channels. `append`
takes an event (or its encoding) and answers with an `AppendResult`:

* ``REFUSED`` with a one-word reason, nothing stored: "malformed", "bad_signature",
  "author_mismatch", "broken_chain" (the author's event at seq - 1 is held, and ``prev`` names none
  of the held ones), "bad_clock" (the Lamport clock is not exactly what the events it follows give,
  see below), "below_retention_floor" (retention already dropped that part of the author's chain)
  or "too_many_pending".
* ``DUPLICATE``: an event with that id is already held. Nothing changes.
* ``NEW``, ``PENDING`` or ``FORK``: stored durably before `append` returns.

**Causal delivery.** A stored event is *delivered* (it gets a log position, shows in
`iter_channel`, `heads` and folds) only once everything it depends on is delivered: the author's
previous event (the one whose id is ``prev``) and, for each horizon pair (X, n), X's events up to
seq n. Until then it is *pending*: stored, acknowledged, not delivered. Events may therefore arrive
in any order (sync, gossip, reordering) and still be delivered in an order that respects causality,
and a gap in an author's sequence is a pending event, not an error. Pending events are bounded per
channel (`max_pending`); appending a delivered event re-checks exactly the pending events that
waited for it (a ``waiting`` index), delivering them in a cascade.

**Clock check.** At delivery the event's Lamport clock must equal 1 + max(clock of prev, clocks of
the events its horizon names); the check is exact when those events are held and falls back to
bounds when retention dropped them. An author can therefore not inflate its clock to win
last-writer-wins folds against writers it did not see.

**Forks.** Two different events by one author with the same channel and seq are a fork. Both are
kept (the second is stored and, if its own chain is sound, delivered like any other event), and a
`Fork` record with both ids and both encodings is stored as evidence; retention never deletes it.

**Retention.** Per channel: keep all (the default), drop delivered events older than an age
(measured by the local delivery time from the store's injected clock, never the author's
timestamp), and/or drop the oldest delivered events while the channel is over a byte budget. Each
author's latest event (its head) is always kept, so authors can continue their chains and peers
can still learn the heads. What was dropped is summarised per author as a *floor* (seq and ids of
the last dropped events), so chains that continue above the floor still verify. Retention runs only
when `apply_retention` is called.

**Verification.** `verify_chain` re-reads every stored row of a channel, re-decodes it, recomputes
its id and signature, compares the indexed columns with the bytes and checks every hash link and
clock step; it returns `Problem` records and never raises on corrupt data.

Engines implement the primitive methods of `LogStoreBase` (a handful of small reads and writes);
every rule above lives here, once. Positions are global per store and increase in delivery order.
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import dataclasses
import enum
import hmac
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from cellmesh.errors import CellmeshError, DecodeError, LocalProtocolError
from cellmesh.identity.cellid import CellId
from cellmesh.state.events import (
    Event,
    EventError,
    EventLookup,
    decode_event,
    encode_event,
    event_id_of_encoding,
    verify_event,
)

__all__ = [
    "DEFAULT_MAX_PENDING",
    "KEEP_ALL",
    "MAX_PROBLEMS",
    "AppendResult",
    "AppendStatus",
    "ChannelStats",
    "Fork",
    "Head",
    "InMemoryLogStore",
    "LogStore",
    "LogStoreBase",
    "Problem",
    "Retention",
    "RetentionReport",
    "StoreError",
    "StoredEvent",
]

DEFAULT_MAX_PENDING = 10_000
"""Most pending (not yet deliverable) events a channel may hold."""
MAX_PROBLEMS = 1000
"""`verify_chain` stops listing problems after this many (and says so in the last one)."""
PAGE = 256
_ID_PAGE = 4096
"""Rows read per query when streaming: bounds memory whatever the log size."""

# Kinds of dependency a pending event waits on (the `waiting` index).
WAIT_PREV = 0
"""Waits for the author's event at exactly seq - 1 (the one whose id is prev) to be delivered."""
WAIT_HORIZON = 1
"""Waits for another author's events up to a seq to be delivered."""


class StoreError(CellmeshError):
    """The storage itself failed: the database cannot be opened, has an unknown schema, or an
    I/O error happened. Bad *events* never raise this; they are refused."""


class AppendStatus(enum.Enum):
    """What `append` did with an event."""

    NEW = "new"
    """Stored and delivered."""
    PENDING = "pending"
    """Stored durably; delivered once the events it depends on are."""
    DUPLICATE = "duplicate"
    """Already held; nothing changed."""
    FORK = "fork"
    """Stored, and it forks its author's chain (see `AppendResult.fork`); may be pending."""
    REFUSED = "refused"
    """Not stored; `AppendResult.reason` says why."""


@dataclass(frozen=True, slots=True)
class Fork:
    """Evidence that `author` signed two different events at the same seq on `channel`."""

    channel: str
    author: CellId
    seq: int
    first_id: bytes
    """The event that was held first."""
    second_id: bytes
    """The event whose arrival revealed the fork."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The answer of `append`."""

    status: AppendStatus
    event_id: bytes | None
    """None only when the input could not be decoded."""
    reason: str | None = None
    """For REFUSED: "malformed", "bad_signature", "author_mismatch", "broken_chain",
    "bad_clock", "below_retention_floor" or "too_many_pending"."""
    detail: str = ""
    position: int | None = None
    """The event's log position when it was delivered by this append."""
    fork: Fork | None = None
    delivered: tuple[bytes, ...] = ()
    """Ids delivered by this append, in delivery order: the event itself and any pending events
    it unblocked."""
    dropped: tuple[tuple[bytes, str], ...] = ()
    """Pending events discarded by this append (id, reason): their clock failed the check once
    the events they name arrived."""

    @property
    def accepted(self) -> bool:
        """True when the event is held after this call (new, pending, fork or duplicate)."""
        return self.status is not AppendStatus.REFUSED


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as a store holds it."""

    id: bytes
    event: Event
    encoded: bytes
    position: int | None
    """Log position (global per store, increasing in delivery order); None while pending."""
    received: int
    """Order of arrival at this store (global, increasing)."""

    @property
    def pending(self) -> bool:
        """True while the event waits for the events it depends on."""
        return self.position is None


@dataclass(frozen=True, slots=True)
class Head:
    """An author's latest delivered event on a channel. Usable as a horizon entry."""

    channel: str
    author: CellId
    seq: int
    clock: int
    id: bytes
    position: int


@dataclass(frozen=True, slots=True)
class Problem:
    """Something `verify_chain` found wrong with the stored data.

    `kind` is one of "storage" (the engine failed reading), "undecodable", "id_mismatch",
    "column_mismatch", "malformed", "author_mismatch", "bad_signature", "broken_chain",
    "bad_clock", "position_order", "fork_evidence", "truncated" (too many problems to list).
    """

    kind: str
    detail: str
    event_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class Retention:
    """A channel's retention policy. Both limits None (the default) keeps everything."""

    max_age_ms: int | None = None
    """Drop delivered events delivered more than this many ms before `apply_retention`'s now."""
    max_bytes: int | None = None
    """Drop the oldest delivered events while the channel's events exceed this many bytes."""

    def __post_init__(self) -> None:
        for name in ("max_age_ms", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ValueError(f"{name} must be None or a non-negative int")

    @property
    def keeps_all(self) -> bool:
        """True when this policy never drops anything."""
        return self.max_age_ms is None and self.max_bytes is None


KEEP_ALL = Retention()


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What one `apply_retention` call dropped."""

    channel: str
    events: int
    bytes: int
    pending: int
    """Pending events dropped because they fell at or below their author's new floor."""


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """A frozen snapshot of one channel in a store."""

    channel: str
    events: int
    """Delivered events held."""
    bytes: int
    """Total encoded size of the delivered events held."""
    pending: int
    forks: int
    retention: Retention


class LogStore(Protocol):
    """The storage interface of channel logs. `InMemoryLogStore` and
    `cellmesh.node.store_sqlite.SqliteLogStore` implement it."""

    def append(self, event: Event | bytes) -> AppendResult:
        """Store one event (see the module docstring); durable when it returns."""
        ...

    def append_many(self, events: Iterable[Event | bytes]) -> list[AppendResult]:
        """Store several events with one durable commit (group commit)."""
        ...

    def get(self, event_id: bytes) -> StoredEvent | None:
        """The event with that id, pending or delivered, or None."""
        ...

    def heads(self, channel: str) -> list[Head]:
        """Each author's latest delivered event on `channel`, sorted by author."""
        ...

    def range(self, channel: str, author: CellId, from_seq: int = 1) -> Iterator[StoredEvent]:
        """`author`'s events on `channel` with seq >= `from_seq`, by seq then id, pending too."""
        ...

    def iter_channel(self, channel: str, after_position: int = 0) -> Iterator[StoredEvent]:
        """Delivered events of `channel` with position > `after_position`, in position order."""
        ...

    def lookup(self, channel: str) -> EventLookup:
        """A function (author, seq) -> delivered event, for `happened_before`."""
        ...

    def forks(self, channel: str) -> list[Fork]:
        """Every fork detected on `channel`, oldest first."""
        ...

    def fork_evidence(self, fork: Fork) -> tuple[bytes, bytes] | None:
        """The two signed encodings behind `fork`, or None if unknown."""
        ...

    def channels(self) -> list[str]:
        """Every channel the store holds anything for, sorted."""
        ...

    def stats(self, channel: str) -> ChannelStats:
        """Counts and sizes of one channel."""
        ...

    def set_retention(self, channel: str, retention: Retention) -> None:
        """Set (durably) the retention policy of `channel`."""
        ...

    def retention(self, channel: str) -> Retention:
        """The retention policy of `channel` (`KEEP_ALL` unless set)."""
        ...

    def apply_retention(self, channel: str, now_ms: int) -> RetentionReport:
        """Drop what `channel`'s policy no longer keeps, as of `now_ms`."""
        ...

    def verify_chain(self, channel: str) -> list[Problem]:
        """Re-check every stored row of `channel`; an empty list means all is sound."""
        ...

    def close(self) -> None:
        """Release the storage. Further calls raise `LocalProtocolError`."""
        ...


# ---------------------------------------------------------------------------------------------
# What engines store, and the shared rules


@dataclass(frozen=True, slots=True)
class Row:
    """An engine's index entry for one stored event (everything but the bytes)."""

    id: bytes
    channel: str
    author: bytes
    seq: int
    prev: bytes
    clock: int
    size: int
    received: int
    position: int | None
    delivered_ms: int | None


@dataclass(frozen=True, slots=True)
class AuthorState:
    """Per (channel, author) bookkeeping."""

    delivered_upto: int = 0
    """Highest seq delivered. Retention keeps each author's head, so engines can derive it from
    the rows they hold; it never decreases."""
    floor_seq: int = 0
    """Highest seq retention dropped (0: nothing dropped)."""
    floor_max_clock: int = 0
    """Highest clock among the dropped events (an upper bound for any of them)."""
    floor: tuple[tuple[bytes, int], ...] = ()
    """(id, clock) of the dropped events at `floor_seq`."""


@dataclass(frozen=True, slots=True)
class RawRow:
    """A stored row exactly as the engine returns it, for `verify_chain` (types unchecked:
    a tampered database may hold anything)."""

    id: object
    channel: object
    author: object
    seq: object
    prev: object
    clock: object
    position: object
    encoded: object


@dataclass(slots=True)
class ProblemList:
    """A bounded list of `Problem`s that `verify_chain` fills (engines add their own)."""

    limit: int
    items: list[Problem] = field(default_factory=list)

    def add(self, kind: str, detail: str, event_id: object = None) -> None:
        """Record a problem; past the limit, one "truncated" problem stands for the rest."""
        if len(self.items) < self.limit - 1:
            eid = event_id if isinstance(event_id, bytes) else None
            self.items.append(Problem(kind, detail, eid))
        elif len(self.items) == self.limit - 1:
            self.items.append(Problem("truncated", f"more than {self.limit - 1} problems"))


def _refused(eid: bytes | None, reason: str, detail: str) -> AppendResult:
    return AppendResult(AppendStatus.REFUSED, eid, reason=reason, detail=detail)


class _Refusal(Exception):
    """Internal: an append check failed (never escapes `LogStoreBase`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Deps:
    unmet: tuple[tuple[bytes, int, int], ...]
    """(author, WAIT_*, seq) not yet delivered."""
    prev_clock: int | None
    """Clock of the event prev names, when known."""


class LogStoreBase(abc.ABC):
    """Every log rule, written once over a few primitive reads and writes an engine provides.

    Engines implement the abstract methods; all public `LogStore` methods are here. Writes happen
    only inside `_transaction()`, which an engine makes atomic and durable.
    """

    storage_errors: tuple[type[BaseException], ...] = ()
    """Exceptions of the engine that mean "the stored data is unreadable"; `verify_chain`
    reports them as problems instead of raising."""

    def __init__(self, *, clock_ms: Callable[[], int], max_pending: int) -> None:
        if max_pending < 0:
            raise ValueError("max_pending must be >= 0")
        self._clock_ms = clock_ms
        self.max_pending = max_pending
        self._closed = False
        self.writes = 0
        """Transactions that may have changed events (appends, retention) through this object:
        a caller caching what it read (heads) knows the cache is current while this holds."""

    # -- primitives an engine implements -------------------------------------------------

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        """Atomic and durable: when the block exits normally, its writes are on stable storage."""

    @abc.abstractmethod
    def _row(self, event_id: bytes) -> Row | None: ...

    @abc.abstractmethod
    def _rows_at(self, channel: str, author: bytes, seq: int) -> list[Row]: ...

    @abc.abstractmethod
    def _encoded(self, event_id: bytes) -> bytes | None: ...

    @abc.abstractmethod
    def _author(self, channel: str, author: bytes) -> AuthorState:
        """The author's highest delivered seq and its retention floor."""

    @abc.abstractmethod
    def _put_floor(self, channel: str, author: bytes, state: AuthorState) -> None:
        """Persist the floor fields of `state` (written by retention only)."""

    @abc.abstractmethod
    def _pending_count(self, channel: str) -> int: ...

    @abc.abstractmethod
    def _insert(self, row: Row, encoded: bytes) -> None:
        """Store a new row: delivered if it has a position, pending if not."""

    @abc.abstractmethod
    def _deliver_row(self, row: Row, position: int, delivered_ms: int) -> None:
        """Give the pending `row` its position."""

    @abc.abstractmethod
    def _delete(self, event_id: bytes) -> None:
        """Remove a row (pending or delivered), its bytes and its waiting entries."""

    @abc.abstractmethod
    def _next_position(self) -> int: ...

    @abc.abstractmethod
    def _next_received(self) -> int: ...

    @abc.abstractmethod
    def _add_fork(self, fork: Fork, first: bytes, second: bytes) -> None: ...

    @abc.abstractmethod
    def _fork_rows(self, channel: str) -> list[tuple[Fork, object, object]]:
        """Fork records with their two stored encodings (raw, as in `RawRow`)."""

    @abc.abstractmethod
    def _add_waiting(
        self, channel: str, event_id: bytes, deps: Iterable[tuple[bytes, int, int]]
    ) -> None: ...

    @abc.abstractmethod
    def _clear_waiting(self, event_id: bytes) -> None: ...

    @abc.abstractmethod
    def _waiters(self, channel: str, author: bytes, seq: int) -> list[bytes]:
        """Ids waiting on (author, WAIT_PREV, seq) or (author, WAIT_HORIZON, <= seq)."""

    @abc.abstractmethod
    def _pending_below(self, channel: str, author: bytes, seq: int) -> list[bytes]:
        """Ids of pending events of `author` with seq <= `seq`."""

    @abc.abstractmethod
    def _page_channel(self, channel: str, after: int, limit: int) -> list[tuple[Row, bytes]]:
        """Delivered rows with position > after, by position, at most `limit`."""

    @abc.abstractmethod
    def _page_author(
        self, channel: str, author: bytes, after: tuple[int, bytes], limit: int
    ) -> list[tuple[Row, bytes]]:
        """Rows of `author` with (seq, id) > after, by (seq, id), at most `limit`."""

    @abc.abstractmethod
    def _page_raw(self, channel: str, after: tuple[object, ...] | None, limit: int) -> list[RawRow]:
        """Raw rows of `channel` ordered by (author, seq, id), after that key, at most `limit`."""

    @abc.abstractmethod
    def _head_rows(self, channel: str) -> list[Row]:
        """Delivered rows at each author's `delivered_upto`."""

    @abc.abstractmethod
    def _channel_names(self) -> list[str]: ...

    @abc.abstractmethod
    def _totals(self, channel: str) -> tuple[int, int, int, int]:
        """(delivered events, delivered bytes, pending events, forks) of `channel`."""

    @abc.abstractmethod
    def _get_retention(self, channel: str) -> Retention: ...

    @abc.abstractmethod
    def _put_retention(self, channel: str, retention: Retention) -> None: ...

    def _verify_engine(self, channel: str, problems: ProblemList) -> None:  # noqa: B027
        """Engine-specific checks for `verify_chain` (e.g. SQLite's own page checks)."""

    def _close_engine(self) -> None:  # noqa: B027
        """Release engine resources."""

    # -- appending ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("log store is closed")

    def append(self, event: Event | bytes) -> AppendResult:
        """Store one event; durable when it returns (see the module docstring)."""
        self._check_open()
        self.writes += 1
        with self._transaction():
            return self._append_one(event)

    def append_many(self, events: Iterable[Event | bytes]) -> list[AppendResult]:
        """Store several events in one transaction: one durable commit for all of them.

        Each event gets its own `AppendResult`, as from `append`; a refused one does not stop the
        others. Raises `TypeError` before writing anything if an item is not an Event or bytes.
        """
        self._check_open()
        items = list(events)
        for item in items:
            if not isinstance(item, Event | bytes | bytearray | memoryview):
                raise TypeError(f"append takes an Event or bytes, not {type(item).__name__}")
        self.writes += 1
        with self._transaction():
            return [self._append_one(e) for e in items]

    def _append_one(self, item: Event | bytes) -> AppendResult:
        if isinstance(item, Event):
            event = item
            try:
                encoded = encode_event(event)
            except ValueError as exc:
                return _refused(None, "malformed", str(exc))
        elif isinstance(item, bytes | bytearray | memoryview):
            encoded = bytes(item)
            try:
                event = decode_event(encoded)
            except DecodeError as exc:
                return _refused(None, "malformed", str(exc))
        else:
            raise TypeError(f"append takes an Event or bytes, not {type(item).__name__}")
        eid = event_id_of_encoding(encoded)
        existing = self._row(eid)
        if existing is not None:
            return AppendResult(AppendStatus.DUPLICATE, eid, position=existing.position)
        try:
            verify_event(event)
        except EventError as exc:
            return _refused(eid, exc.reason, str(exc))
        try:
            deps = self._dependencies(event, arriving=True)
            if deps.unmet:
                if self._pending_count(event.channel) >= self.max_pending:
                    raise _Refusal(
                        "too_many_pending",
                        f"channel already holds {self.max_pending} pending events",
                    )
            else:
                assert deps.prev_clock is not None
                self._check_clock(event, deps.prev_clock)
        except _Refusal as r:
            return _refused(eid, r.reason, r.detail)

        twins = self._rows_at(event.channel, event.author, event.seq)
        position = None if deps.unmet else self._next_position()
        row = Row(
            id=eid,
            channel=event.channel,
            author=bytes(event.author),
            seq=event.seq,
            prev=event.prev,
            clock=event.clock,
            size=len(encoded),
            received=self._next_received(),
            position=position,
            delivered_ms=None if position is None else self._clock_ms(),
        )
        self._insert(row, encoded)
        fork = None
        if twins:
            first = twins[0]
            fork = Fork(event.channel, event.author, event.seq, first.id, eid)
            first_bytes = self._encoded(first.id)
            assert first_bytes is not None
            self._add_fork(fork, first_bytes, encoded)
        status = AppendStatus.FORK if fork is not None else AppendStatus.NEW
        if deps.unmet:
            self._add_waiting(event.channel, eid, deps.unmet)
            if fork is None:
                status = AppendStatus.PENDING
            return AppendResult(status, eid, fork=fork)
        delivered, dropped = self._cascade(row)
        return AppendResult(
            status,
            eid,
            position=position,
            fork=fork,
            delivered=tuple(delivered),
            dropped=tuple(dropped),
        )

    def _dependencies(self, event: Event, *, arriving: bool) -> _Deps:
        """What `event` still waits for. Raises `_Refusal` for a chain that cannot be right.

        `arriving` is False when re-checking a pending event: a prev that matches none of the held
        predecessors then keeps it waiting (a fork branch it continues may still arrive) instead of
        refusing it, so the outcome does not depend on which of the two arrived first.
        """
        channel, author, seq = event.channel, bytes(event.author), event.seq
        state = self._author(channel, author)
        if seq <= state.floor_seq:
            raise _Refusal(
                "below_retention_floor",
                f"retention dropped this author's events up to seq {state.floor_seq}",
            )
        unmet: list[tuple[bytes, int, int]] = []
        prev_clock: int | None = None
        if seq == 1:
            prev_clock = 0
        else:
            preds = self._rows_at(channel, author, seq - 1)
            match = next((p for p in preds if hmac.compare_digest(p.id, event.prev)), None)
            floor_match = None
            if match is None and seq - 1 == state.floor_seq:
                floor_match = next((c for i, c in state.floor if i == event.prev), None)
            if match is not None:
                if event.clock <= match.clock:
                    raise _Refusal("bad_clock", "clock does not exceed the previous event's")
                if match.position is None:
                    unmet.append((author, WAIT_PREV, seq - 1))
                else:
                    prev_clock = match.clock
            elif floor_match is not None:
                prev_clock = floor_match
            elif (preds or seq - 1 == state.floor_seq) and arriving:
                raise _Refusal(
                    "broken_chain", f"prev matches none of the author's events at seq {seq - 1}"
                )
            else:
                unmet.append((author, WAIT_PREV, seq - 1))
        for h in event.horizon:
            if self._author(channel, h.author).delivered_upto < h.seq:
                unmet.append((bytes(h.author), WAIT_HORIZON, h.seq))
        return _Deps(tuple(unmet), prev_clock if not unmet else None)

    def _check_clock(self, event: Event, prev_clock: int) -> None:
        """Raise `_Refusal("bad_clock")` unless clock = 1 + max(prev, horizon events' clocks).

        Every dependency is delivered when this runs. A horizon position whose events retention
        dropped is known only by its author's floor, an upper bound; one position held by several
        fork branches gives a range (lowest to highest clock).
        """
        lower = prev_clock
        upper = prev_clock
        exact = True
        for h in event.horizon:
            rows = [
                r for r in self._rows_at(event.channel, h.author, h.seq) if r.position is not None
            ]
            if rows:
                lower = max(lower, min(r.clock for r in rows))
                upper = max(upper, max(r.clock for r in rows))
                continue
            state = self._author(event.channel, h.author)
            if h.seq <= state.floor_seq:
                upper = max(upper, state.floor_max_clock)
            else:
                exact = False  # delivered, yet no row at that seq: no bound to check against
        if event.clock <= lower:
            raise _Refusal("bad_clock", f"clock {event.clock} does not exceed {lower}")
        if exact and event.clock > upper + 1:
            raise _Refusal("bad_clock", f"clock {event.clock} exceeds {upper + 1}")

    def _cascade(self, first: Row) -> tuple[list[bytes], list[tuple[bytes, str]]]:
        """`first` was just delivered: deliver every pending event that this makes deliverable,
        breadth first, and the ones those make deliverable, and so on."""
        delivered: list[bytes] = [first.id]
        dropped: list[tuple[bytes, str]] = []
        queue = [first]
        while queue:
            row = queue.pop(0)
            if not self._pending_count(row.channel):
                break  # nobody waits (the common case): skip the index lookup
            for cand in self._waiters(row.channel, row.author, row.seq):
                crow = self._row(cand)
                if crow is None or crow.position is not None:
                    continue
                self._clear_waiting(cand)
                cbytes = self._encoded(cand)
                try:
                    if cbytes is None:
                        raise _Refusal("undecodable", "stored bytes are missing")
                    cev = decode_event(cbytes)
                except DecodeError as exc:
                    raise _Refusal("undecodable", str(exc)) from exc
                except _Refusal as r:  # a damaged row: drop it rather than fail every append
                    self._delete(cand)
                    dropped.append((cand, r.reason))
                    continue
                try:
                    deps = self._dependencies(cev, arriving=False)
                    if not deps.unmet:
                        assert deps.prev_clock is not None
                        self._check_clock(cev, deps.prev_clock)
                except _Refusal as r:
                    self._delete(cand)
                    dropped.append((cand, r.reason))
                    continue
                if deps.unmet:
                    self._add_waiting(row.channel, cand, deps.unmet)
                    continue
                position = self._next_position()
                self._deliver_row(crow, position, self._clock_ms())
                delivered.append(cand)
                queue.append(dataclasses.replace(crow, position=position))
        return delivered, dropped

    # -- reading --------------------------------------------------------------------------

    def get_encoded(self, event_id: bytes) -> bytes | None:
        """The stored encoding of the event with that id (pending or delivered), or None.
        Cheaper than `get`: nothing is decoded (sync serves events this way)."""
        self._check_open()
        return self._encoded(bytes(event_id))

    def id_clocks(self, channel: str) -> Iterator[tuple[bytes, int]]:
        """(id, clock) of every event stored on `channel`, pending ones too, in no useful
        order: what a sync index needs, read page by page without decoding events."""
        self._check_open()
        after: tuple[object, ...] | None = None
        while True:
            page = self._page_raw(channel, after, _ID_PAGE)
            for raw in page:
                after = (raw.author, raw.seq, raw.id)
                if isinstance(raw.id, bytes) and isinstance(raw.clock, int):
                    yield raw.id, raw.clock
            if len(page) < _ID_PAGE:
                return

    def get(self, event_id: bytes) -> StoredEvent | None:
        """The event with that id, pending or delivered, or None."""
        self._check_open()
        row = self._row(bytes(event_id))
        if row is None:
            return None
        encoded = self._encoded(row.id)
        assert encoded is not None
        return self._stored(row, encoded)

    @staticmethod
    def _stored(row: Row, encoded: bytes) -> StoredEvent:
        try:
            event = decode_event(encoded)
        except DecodeError as exc:
            raise StoreError(f"stored event does not decode (storage damaged?): {exc}") from exc
        return StoredEvent(row.id, event, encoded, row.position, row.received)

    def heads(self, channel: str) -> list[Head]:
        """Each author's latest delivered event on `channel` (at a fork: the lowest id)."""
        self._check_open()
        best: dict[bytes, Row] = {}
        for row in self._head_rows(channel):
            old = best.get(row.author)
            if old is None or (row.seq, old.id) > (old.seq, row.id):
                best[row.author] = row
        return [
            Head(channel, CellId(r.author), r.seq, r.clock, r.id, r.position or 0)
            for _, r in sorted(best.items())
        ]

    def range(self, channel: str, author: CellId, from_seq: int = 1) -> Iterator[StoredEvent]:
        """`author`'s events on `channel` with seq >= `from_seq`, by (seq, id), pending included.

        Streams in pages: memory stays bounded however long the chain.
        """
        self._check_open()
        after: tuple[int, bytes] = (from_seq, b"")
        while True:
            page = self._page_author(channel, bytes(author), after, PAGE)
            for row, encoded in page:
                yield self._stored(row, encoded)
            if len(page) < PAGE:
                return
            after = (page[-1][0].seq, page[-1][0].id)

    def iter_channel(self, channel: str, after_position: int = 0) -> Iterator[StoredEvent]:
        """Delivered events of `channel` with position > `after_position`, in position order.

        The order respects causality (an event comes after everything it depends on). Streams
        in pages; events delivered while iterating are included when their position is later.
        """
        self._check_open()
        after = after_position
        while True:
            page = self._page_channel(channel, after, PAGE)
            for row, encoded in page:
                yield self._stored(row, encoded)
            if len(page) < PAGE:
                return
            last = page[-1][0].position
            assert last is not None
            after = last

    def lookup(self, channel: str) -> EventLookup:
        """A function (author, seq) -> a delivered event of `channel` at that position, or None."""

        def find(author: CellId, seq: int) -> Event | None:
            for row in self._rows_at(channel, bytes(author), seq):
                if row.position is not None:
                    encoded = self._encoded(row.id)
                    if encoded is not None:
                        return self._stored(row, encoded).event
            return None

        return find

    def forks(self, channel: str) -> list[Fork]:
        """Every fork detected on `channel`, oldest first."""
        self._check_open()
        return [f for f, _, _ in self._fork_rows(channel)]

    def fork_evidence(self, fork: Fork) -> tuple[bytes, bytes] | None:
        """The two signed encodings behind `fork`, or None if the store has no such record."""
        self._check_open()
        for f, a, b in self._fork_rows(fork.channel):
            if f == fork and isinstance(a, bytes) and isinstance(b, bytes):
                return a, b
        return None

    def channels(self) -> list[str]:
        """Every channel the store holds anything for, sorted."""
        self._check_open()
        return sorted(self._channel_names())

    def stats(self, channel: str) -> ChannelStats:
        """A snapshot of `channel`'s counts and sizes."""
        self._check_open()
        events, size, pending, forks = self._totals(channel)
        return ChannelStats(channel, events, size, pending, forks, self._get_retention(channel))

    # -- retention ------------------------------------------------------------------------

    def set_retention(self, channel: str, retention: Retention) -> None:
        """Set the retention policy of `channel` (durably)."""
        self._check_open()
        if not isinstance(retention, Retention):
            raise TypeError("retention must be a Retention")
        with self._transaction():
            self._put_retention(channel, retention)

    def retention(self, channel: str) -> Retention:
        """The retention policy of `channel`."""
        self._check_open()
        return self._get_retention(channel)

    def apply_retention(self, channel: str, now_ms: int) -> RetentionReport:
        """Drop the delivered events `channel`'s policy no longer keeps, oldest first.

        Each author's latest delivered event is kept whatever the policy. Dropped events move
        their author's floor up; pending events at or below a new floor are dropped too (they
        could never be delivered). Fork evidence is kept. One transaction.
        """
        self._check_open()
        policy = self._get_retention(channel)
        if policy.keeps_all:
            return RetentionReport(channel, 0, 0, 0)
        cutoff = None if policy.max_age_ms is None else now_ms - policy.max_age_ms
        self.writes += 1
        with self._transaction():
            _, total, _, _ = self._totals(channel)
            states: dict[bytes, AuthorState] = {}
            dropped_events = dropped_bytes = 0
            after = 0
            done = False
            while not done:
                page = self._page_channel(channel, after, PAGE)
                for row, _ in page:
                    assert row.position is not None
                    after = row.position
                    too_old = (
                        cutoff is not None
                        and row.delivered_ms is not None
                        and row.delivered_ms < cutoff
                    )
                    too_big = policy.max_bytes is not None and total > policy.max_bytes
                    if not (too_old or too_big):
                        done = True
                        break
                    state = states.get(row.author) or self._author(channel, row.author)
                    if row.seq >= state.delivered_upto:
                        states[row.author] = state
                        continue  # an author's head is always kept
                    self._delete(row.id)
                    total -= row.size
                    dropped_events += 1
                    dropped_bytes += row.size
                    if row.seq > state.floor_seq:
                        floor: tuple[tuple[bytes, int], ...] = ((row.id, row.clock),)
                        floor_seq = row.seq
                    elif row.seq == state.floor_seq:
                        floor, floor_seq = (*state.floor, (row.id, row.clock)), row.seq
                    else:
                        floor, floor_seq = state.floor, state.floor_seq
                    states[row.author] = AuthorState(
                        state.delivered_upto,
                        floor_seq,
                        max(state.floor_max_clock, row.clock),
                        floor,
                    )
                if len(page) < PAGE:
                    break
            dropped_pending = 0
            for author, state in states.items():
                self._put_floor(channel, author, state)
                for eid in self._pending_below(channel, author, state.floor_seq):
                    self._delete(eid)
                    dropped_pending += 1
        return RetentionReport(channel, dropped_events, dropped_bytes, dropped_pending)

    # -- verification ---------------------------------------------------------------------

    def verify_chain(self, channel: str) -> list[Problem]:
        """Re-check every stored row and fork record of `channel` against its signed bytes.

        Reports (never raises for) rows that do not decode, whose id or indexed columns do not
        match their bytes, bad signatures, broken hash links, clocks that do not increase along a
        chain, delivery positions out of chain order, and fork evidence that does not hold up.
        Streams the rows in (author, seq) order: memory stays bounded.
        """
        self._check_open()
        problems = ProblemList(MAX_PROBLEMS)
        unreadable: tuple[type[BaseException], ...] = (*self.storage_errors, StoreError)
        try:
            self._verify_rows(channel, problems)
            self._verify_forks(channel, problems)
            self._verify_engine(channel, problems)
        except unreadable as exc:
            problems.add("storage", f"{type(exc).__name__}: {exc}")
        return problems.items

    def _verify_rows(self, channel: str, problems: ProblemList) -> None:
        author: bytes | None = None
        state = AuthorState()
        # (clock, position) per id at the previous and current seq of the current author.
        prev_seq, prev_level = 0, dict[bytes, tuple[int, int | None]]()
        cur_seq, cur_level = 0, dict[bytes, tuple[int, int | None]]()
        after: tuple[object, ...] | None = None
        while True:
            page = self._page_raw(channel, after, PAGE)
            for raw in page:
                after = (raw.author, raw.seq, raw.id)
                event = self._check_raw(channel, raw, problems)
                if event is None:
                    continue
                eid = raw.id
                assert isinstance(eid, bytes)
                if event.author != author:
                    author = bytes(event.author)
                    try:
                        state = self._author(channel, author)
                    except StoreError as exc:  # damaged bookkeeping: report, check the rest
                        problems.add("storage", f"author state unreadable: {exc}", eid)
                        state = AuthorState()
                    prev_seq, prev_level, cur_seq, cur_level = 0, {}, 0, {}
                if event.seq != cur_seq:
                    if event.seq == cur_seq + 1:
                        prev_seq, prev_level = cur_seq, cur_level
                    else:
                        prev_seq, prev_level = 0, {}
                    cur_seq, cur_level = event.seq, {}
                position = raw.position if isinstance(raw.position, int) else None
                cur_level[eid] = (event.clock, position)
                if event.seq == 1 or event.seq - 1 < state.floor_seq:
                    continue
                link = prev_level.get(event.prev) if prev_seq == event.seq - 1 else None
                if link is not None:
                    if event.clock <= link[0]:
                        problems.add("bad_clock", "clock does not exceed prev's", eid)
                    if position is not None and (link[1] is None or link[1] >= position):
                        problems.add("position_order", "delivered before its prev", eid)
                elif event.seq - 1 == state.floor_seq and any(
                    i == event.prev for i, _ in state.floor
                ):
                    continue
                elif position is not None:
                    problems.add(
                        "broken_chain",
                        f"prev of seq {event.seq} is not held at seq {event.seq - 1}",
                        eid,
                    )
            if len(page) < PAGE:
                return

    def _check_raw(self, channel: str, raw: RawRow, problems: ProblemList) -> Event | None:
        """Decode and check one raw row; report and return None if it cannot be trusted."""
        if not isinstance(raw.encoded, bytes):
            problems.add("undecodable", "stored bytes are missing or not a blob", raw.id)
            return None
        try:
            event = decode_event(raw.encoded)
        except DecodeError as exc:
            problems.add("undecodable", str(exc), raw.id)
            return None
        eid = event_id_of_encoding(raw.encoded)
        if not isinstance(raw.id, bytes) or raw.id != eid:
            problems.add("id_mismatch", "stored id is not the hash of the stored bytes", raw.id)
            return None
        columns = {
            "channel": (raw.channel, channel),
            "channel in bytes": (event.channel, channel),
            "author": (raw.author, bytes(event.author)),
            "seq": (raw.seq, event.seq),
            "prev": (raw.prev, event.prev),
            "clock": (raw.clock, event.clock),
        }
        for name, (stored, signed) in columns.items():
            if stored != signed:
                problems.add("column_mismatch", f"{name} column does not match the event", eid)
                return None
        if raw.position is not None and not (isinstance(raw.position, int) and raw.position > 0):
            problems.add("column_mismatch", "position is not a positive integer", eid)
            return None
        try:
            verify_event(event)
        except EventError as exc:
            problems.add(exc.reason, str(exc), eid)
            return None
        return event

    def _verify_forks(self, channel: str, problems: ProblemList) -> None:
        for fork, first, second in self._fork_rows(channel):
            a = _verified(first, fork.first_id)
            b = _verified(second, fork.second_id)
            if a is None or b is None:
                problems.add(
                    "fork_evidence", "an event of a fork record does not verify", fork.second_id
                )
            elif not (
                a.channel == b.channel == fork.channel
                and a.author == b.author == fork.author
                and a.seq == b.seq == fork.seq
                and fork.first_id != fork.second_id
            ):
                problems.add(
                    "fork_evidence", "the events of a fork record do not conflict", fork.second_id
                )

    def close(self) -> None:
        """Release the storage. Further calls raise `LocalProtocolError`."""
        if not self._closed:
            self._closed = True
            self._close_engine()

    def __enter__(self) -> LogStoreBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# In-memory engine


class InMemoryLogStore(LogStoreBase):
    """A `LogStore` held in dicts: for the simulator and tests. Not durable, same rules.

    `clock_ms` gives the local time recorded at delivery (for age-based retention); the
    simulator passes its virtual clock. Writes are applied as they go: an exception in the
    middle of an append (a bug, not bad input: bad input is refused before any write) is not
    rolled back.
    """

    def __init__(
        self, *, clock_ms: Callable[[], int] = lambda: 0, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        super().__init__(clock_ms=clock_ms, max_pending=max_pending)
        self._rows_by_id: dict[bytes, Row] = {}
        self._bytes: dict[bytes, bytes] = {}
        self._slots: dict[tuple[str, bytes, int], list[bytes]] = {}
        self._seqs: dict[tuple[str, bytes], list[int]] = {}
        self._positions: dict[str, list[int]] = {}
        self._at_position: dict[int, bytes] = {}
        self._authors: dict[tuple[str, bytes], AuthorState] = {}
        self._waiting: dict[tuple[str, bytes], dict[tuple[int, int], set[bytes]]] = {}
        self._waiting_keys: dict[bytes, list[tuple[str, bytes, int, int]]] = {}
        self._fork_list: dict[str, list[tuple[Fork, bytes, bytes]]] = {}
        self._counts: dict[str, list[int]] = {}  # channel -> [delivered, bytes, pending]
        self._retention: dict[str, Retention] = {}
        self._position = 0
        self._received = 0

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        yield

    def _row(self, event_id: bytes) -> Row | None:
        return self._rows_by_id.get(event_id)

    def _rows_at(self, channel: str, author: bytes, seq: int) -> list[Row]:
        return [self._rows_by_id[i] for i in self._slots.get((channel, author, seq), ())]

    def _encoded(self, event_id: bytes) -> bytes | None:
        return self._bytes.get(event_id)

    def _author(self, channel: str, author: bytes) -> AuthorState:
        return self._authors.get((channel, author), AuthorState())

    def _put_floor(self, channel: str, author: bytes, state: AuthorState) -> None:
        upto = self._author(channel, author).delivered_upto
        self._authors[(channel, author)] = dataclasses.replace(state, delivered_upto=upto)

    def _delivered(self, row: Row) -> None:
        key = (row.channel, row.author)
        state = self._authors.get(key, AuthorState())
        if row.seq > state.delivered_upto:
            self._authors[key] = dataclasses.replace(state, delivered_upto=row.seq)
        assert row.position is not None
        self._positions.setdefault(row.channel, []).append(row.position)  # positions only grow
        self._at_position[row.position] = row.id
        counts = self._count(row.channel)
        counts[0] += 1
        counts[1] += row.size

    def _count(self, channel: str) -> list[int]:
        return self._counts.setdefault(channel, [0, 0, 0])

    def _pending_count(self, channel: str) -> int:
        return self._count(channel)[2]

    def _insert(self, row: Row, encoded: bytes) -> None:
        self._rows_by_id[row.id] = row
        self._bytes[row.id] = encoded
        self._slots.setdefault((row.channel, row.author, row.seq), []).append(row.id)
        seqs = self._seqs.setdefault((row.channel, row.author), [])
        i = bisect.bisect_left(seqs, row.seq)
        if i == len(seqs) or seqs[i] != row.seq:
            seqs.insert(i, row.seq)
        if row.position is None:
            self._count(row.channel)[2] += 1
        else:
            self._delivered(row)

    def _deliver_row(self, row: Row, position: int, delivered_ms: int) -> None:
        row = dataclasses.replace(row, position=position, delivered_ms=delivered_ms)
        self._rows_by_id[row.id] = row
        self._count(row.channel)[2] -= 1
        self._delivered(row)

    def _delete(self, event_id: bytes) -> None:
        row = self._rows_by_id.pop(event_id)
        del self._bytes[event_id]
        slot = self._slots[(row.channel, row.author, row.seq)]
        slot.remove(event_id)
        if not slot:
            del self._slots[(row.channel, row.author, row.seq)]
            seqs = self._seqs[(row.channel, row.author)]
            seqs.pop(bisect.bisect_left(seqs, row.seq))
        counts = self._count(row.channel)
        if row.position is None:
            counts[2] -= 1
        else:
            positions = self._positions[row.channel]
            positions.pop(bisect.bisect_left(positions, row.position))
            del self._at_position[row.position]
            counts[0] -= 1
            counts[1] -= row.size
        self._clear_waiting(event_id)

    def _next_position(self) -> int:
        self._position += 1
        return self._position

    def _next_received(self) -> int:
        self._received += 1
        return self._received

    def _add_fork(self, fork: Fork, first: bytes, second: bytes) -> None:
        self._fork_list.setdefault(fork.channel, []).append((fork, first, second))

    def _fork_rows(self, channel: str) -> list[tuple[Fork, object, object]]:
        return list(self._fork_list.get(channel, ()))

    def _add_waiting(
        self, channel: str, event_id: bytes, deps: Iterable[tuple[bytes, int, int]]
    ) -> None:
        for author, kind, seq in deps:
            self._waiting.setdefault((channel, author), {}).setdefault((kind, seq), set()).add(
                event_id
            )
            self._waiting_keys.setdefault(event_id, []).append((channel, author, kind, seq))

    def _clear_waiting(self, event_id: bytes) -> None:
        for channel, author, kind, seq in self._waiting_keys.pop(event_id, ()):
            by_dep = self._waiting.get((channel, author))
            if by_dep is None:
                continue
            ids = by_dep.get((kind, seq))
            if ids is not None:
                ids.discard(event_id)
                if not ids:
                    del by_dep[(kind, seq)]
            if not by_dep:
                del self._waiting[(channel, author)]

    def _waiters(self, channel: str, author: bytes, seq: int) -> list[bytes]:
        by_dep = self._waiting.get((channel, author), {})
        found: set[bytes] = set()
        for (kind, dep_seq), ids in by_dep.items():
            if (kind == WAIT_PREV and dep_seq == seq) or (kind == WAIT_HORIZON and dep_seq <= seq):
                found |= ids
        return sorted(found, key=lambda i: self._rows_by_id[i].received)

    def _pending_below(self, channel: str, author: bytes, seq: int) -> list[bytes]:
        seqs = self._seqs.get((channel, author), [])
        out = []
        for s in seqs[: bisect.bisect_right(seqs, seq)]:
            out += [
                i for i in self._slots[(channel, author, s)] if self._rows_by_id[i].position is None
            ]
        return out

    def _page_channel(self, channel: str, after: int, limit: int) -> list[tuple[Row, bytes]]:
        positions = self._positions.get(channel, [])
        start = bisect.bisect_right(positions, after)
        ids = [self._at_position[p] for p in positions[start : start + limit]]
        return [(self._rows_by_id[i], self._bytes[i]) for i in ids]

    def _page_author(
        self, channel: str, author: bytes, after: tuple[int, bytes], limit: int
    ) -> list[tuple[Row, bytes]]:
        seqs = self._seqs.get((channel, author), [])
        out: list[tuple[Row, bytes]] = []
        for s in seqs[bisect.bisect_left(seqs, after[0]) :]:
            for i in sorted(self._slots[(channel, author, s)]):
                if (s, i) > after:
                    out.append((self._rows_by_id[i], self._bytes[i]))
                    if len(out) >= limit:
                        return out
        return out

    def _page_raw(self, channel: str, after: tuple[object, ...] | None, limit: int) -> list[RawRow]:
        keys = sorted(
            (r.author, r.seq, r.id) for r in self._rows_by_id.values() if r.channel == channel
        )
        if after is not None:
            keys = [k for k in keys if k > after]
        out = []
        for _, _, i in keys[:limit]:
            r = self._rows_by_id[i]
            out.append(
                RawRow(
                    r.id, r.channel, r.author, r.seq, r.prev, r.clock, r.position, self._bytes[i]
                )
            )
        return out

    def _head_rows(self, channel: str) -> list[Row]:
        out = []
        for (ch, author), state in self._authors.items():
            if ch == channel and state.delivered_upto:
                out += [
                    r for r in self._rows_at(channel, author, state.delivered_upto) if r.position
                ]
        return out

    def _channel_names(self) -> list[str]:
        held = {c for c, (delivered, _, pending) in self._counts.items() if delivered or pending}
        return list(held | set(self._fork_list))

    def _totals(self, channel: str) -> tuple[int, int, int, int]:
        delivered, size, pending = self._counts.get(channel, [0, 0, 0])
        return delivered, size, pending, len(self._fork_list.get(channel, ()))

    def _get_retention(self, channel: str) -> Retention:
        return self._retention.get(channel, KEEP_ALL)

    def _put_retention(self, channel: str, retention: Retention) -> None:
        self._retention[channel] = retention


def _verified(encoded: object, expected_id: bytes) -> Event | None:
    """The event in `encoded` if it decodes, verifies and has id `expected_id`; else None."""
    if not isinstance(encoded, bytes) or event_id_of_encoding(encoded) != expected_id:
        return None
    try:
        event = decode_event(encoded)
        verify_event(event)
    except (DecodeError, EventError):
        return None
    return event
