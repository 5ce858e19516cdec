"""Signed, causally linked events: the unit of application state on a channel.

Theory of operation
-------------------
An event is something one author (an Ed25519 key, named by its CellID) said on one channel. Every
event carries a *causal link* made of three parts:

* ``seq`` and ``prev``: the author's own chain on the channel. ``seq`` counts the author's events on
  that channel from 1; ``prev`` is the event id of the author's event ``seq - 1`` (all zero for
  ``seq == 1``). Two events of one author on one channel are therefore totally ordered by ``seq``,
  and the hash chain makes the history of an author tamper-evident: changing any old event changes
  its id, which no longer matches the next event's ``prev``.
* ``horizon``: what the author had seen from *other* authors on the same channel when it wrote the
  event, as a bounded, sorted list of ``(CellID, seq)`` pairs ("I had seen X's events up to seq N").
  A pair names a position in another author's chain, not a specific event: it is 24 bytes instead
  of 48, and the chain behind the position is fixed by that author's hash links. When that author
  forked at or below the position, the pair is ambiguous between the branches; the fork itself is
  detected and reported by the log (`cellmesh.state.log`).
* ``clock``: a Lamport clock, ``1 + max(prev.clock, clock of every event the horizon names)``. It is
  signed with the rest, so the order it induces is a property of the event bytes alone, the same on
  every replica whatever the arrival order or local retention; the log checks it against the events
  it names (and refuses an inflated or deflated clock) before it delivers the event.

Events of different authors are ordered only through horizons: ``a`` happened before ``b`` when
``a``'s position is in ``b``'s causal past, that is reachable from ``b`` through own-chain links and
horizon pairs (`happened_before`). ``a -> b`` implies ``a.clock < b.clock``, so ``(clock, id)`` is a
total order that extends the causal order; folds use it to break ties deterministically.

The timestamp is the author's wall clock in milliseconds, for display only: nothing orders by it.

The event id is BLAKE3, in key-derivation mode with context `EVENT_ID_CONTEXT`, of the canonical
encoding, signature included. The signature is Ed25519 over `EVENT_CONTEXT` followed by the
encoding without the signature. Layouts are in docs/state.md. Everything here is pure: no I/O,
no clocks (``now_ms`` is passed in), no randomness.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import blake3

from cellmesh.errors import (
    AuthenticationError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.identity.cellid import CELL_ID_LEN, CellId, cell_id_from_public_key
from cellmesh.identity.keys import (
    ED25519_PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    Identity,
    verify_signature,
)
from cellmesh.identity.tokens import MAX_PATTERN_LEN, validate_channel

__all__ = [
    "EVENT_CONTEXT",
    "EVENT_ID_CONTEXT",
    "EVENT_ID_LEN",
    "EVENT_VERSION",
    "HORIZON_ENTRY_LEN",
    "MAX_CHANNEL_LEN",
    "MAX_EVENT_LEN",
    "MAX_HORIZON",
    "MAX_PAYLOAD",
    "MAX_U63",
    "MIN_EVENT_LEN",
    "ZERO_EVENT_ID",
    "Event",
    "EventError",
    "EventLookup",
    "HorizonEntry",
    "Seen",
    "create_event",
    "decode_event",
    "encode_event",
    "event_id",
    "event_id_of_encoding",
    "event_signing_message",
    "happened_before",
    "verify_event",
]

EVENT_VERSION = 1
EVENT_CONTEXT = b"cellmesh/v1 event\x00"
"""Domain-separation prefix of the message an event's author signs."""
EVENT_ID_CONTEXT = "cellmesh 2026-11 event id v1"
"""BLAKE3 derive_key context of event ids (keeps them apart from blob addresses and CellIDs)."""
EVENT_ID_LEN = 32
ZERO_EVENT_ID = bytes(EVENT_ID_LEN)
"""The ``prev`` of an author's first event on a channel."""
MAX_PAYLOAD = 64 * 1024
"""Largest payload, in bytes. Larger data belongs in a blob, referenced from an event."""
MAX_HORIZON = 32
"""Most (author, seq) pairs a horizon may hold."""
MAX_CHANNEL_LEN = MAX_PATTERN_LEN
MAX_U63 = 2**63 - 1
"""Largest seq, clock and timestamp: they must fit SQLite's signed 64-bit INTEGER."""

# version u8 | author 16 | author_key 32 | seq u64 | clock u64 | prev 32 | timestamp_ms u64
# | channel_len u8 | channel | horizon_count u8 | horizon (cellid 16, seq u64)* | payload_len u32
# | payload | signature 64
_HEAD = struct.Struct(f"!B{CELL_ID_LEN}s{ED25519_PUBLIC_KEY_LEN}sQQ{EVENT_ID_LEN}sQB")
_ENTRY = struct.Struct(f"!{CELL_ID_LEN}sQ")
_U8 = struct.Struct("!B")
_U32 = struct.Struct("!I")
HORIZON_ENTRY_LEN = _ENTRY.size
MIN_EVENT_LEN = _HEAD.size + 1 + 1 + 4 + SIGNATURE_LEN
"""Shortest possible encoding: one-byte channel, empty horizon, empty payload."""
MAX_EVENT_LEN = (
    _HEAD.size + MAX_CHANNEL_LEN + 1 + MAX_HORIZON * _ENTRY.size + 4 + MAX_PAYLOAD + SIGNATURE_LEN
)


class EventError(AuthenticationError):
    """An event was refused. `reason` says why, in one word.

    Reasons from `verify_event`: "malformed" (a field is out of range), "author_mismatch" (the
    CellID is not derived from the public key), "bad_signature".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True, slots=True, order=True)
class HorizonEntry:
    """One horizon pair: the author had seen `author`'s events on the channel up to `seq`."""

    author: CellId
    seq: int


@dataclass(frozen=True, slots=True)
class Event:
    """A signed event. Build one with `create_event` or `decode_event`."""

    author: CellId
    """CellID (16 bytes) of the author; must be derived from `author_key`."""
    author_key: bytes
    """The author's 32-byte Ed25519 public key (so an event verifies on its own)."""
    channel: str
    seq: int
    """The author's sequence number on `channel`, from 1."""
    clock: int
    """Lamport clock: 1 + max(prev's clock, clocks of the events the horizon names)."""
    prev: bytes
    """Event id of the author's previous event on `channel`; `ZERO_EVENT_ID` when seq is 1."""
    horizon: tuple[HorizonEntry, ...]
    """Other authors' positions seen, sorted by author, at most `MAX_HORIZON`."""
    timestamp_ms: int
    """Author's wall clock (Unix ms). Display only: nothing is ordered by it."""
    payload: bytes
    signature: bytes
    version: int = EVENT_VERSION


class Seen(Protocol):
    """What `create_event` needs to know about an event it puts in a horizon.

    `Event` and `cellmesh.state.log.Head` both fit.
    """

    @property
    def author(self) -> CellId: ...

    @property
    def seq(self) -> int: ...

    @property
    def clock(self) -> int: ...


EventLookup = Callable[[CellId, int], Event | None]
"""(author, seq) -> that author's event at that seq on one channel, or None if not held."""


def _u63(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_U63


def _event_problem(e: Event) -> str | None:
    """Describe what is structurally wrong with `e` (not its signature), or None."""
    checks: list[tuple[bool, str]] = [
        (e.version == EVENT_VERSION, f"unsupported version {e.version}"),
        (isinstance(e.author, bytes) and len(e.author) == CELL_ID_LEN, "bad author CellID"),
        (
            isinstance(e.author_key, bytes) and len(e.author_key) == ED25519_PUBLIC_KEY_LEN,
            "bad author key",
        ),
        (_u63(e.seq) and e.seq >= 1, "seq must be in 1..2**63-1"),
        (_u63(e.clock) and e.clock >= e.seq, "clock must be in seq..2**63-1"),
        (isinstance(e.prev, bytes) and len(e.prev) == EVENT_ID_LEN, "bad prev id"),
        (_u63(e.timestamp_ms), "timestamp_ms must be in 0..2**63-1"),
        (isinstance(e.payload, bytes) and len(e.payload) <= MAX_PAYLOAD, "bad payload"),
        (isinstance(e.signature, bytes) and len(e.signature) == SIGNATURE_LEN, "bad signature"),
        (isinstance(e.horizon, tuple) and len(e.horizon) <= MAX_HORIZON, "bad horizon"),
    ]
    for ok, message in checks:
        if not ok:
            return message
    if (e.seq == 1) != (e.prev == ZERO_EVENT_ID):
        return "prev is all zero exactly when seq is 1"
    if not isinstance(e.channel, str):
        return "channel must be str"
    try:
        validate_channel(e.channel)
    except ValueError as exc:
        return str(exc)
    last = b""
    for entry in e.horizon:
        if not isinstance(entry, HorizonEntry):
            return "horizon entries must be HorizonEntry"
        if not (isinstance(entry.author, bytes) and len(entry.author) == CELL_ID_LEN):
            return "bad horizon author"
        if not (_u63(entry.seq) and entry.seq >= 1):
            return "horizon seq must be in 1..2**63-1"
        if entry.author <= last:
            return "horizon must be sorted by author without repeats"
        if entry.author == e.author:
            return "horizon must not name the event's own author"
        last = entry.author
    return None


def _body(e: Event) -> bytes:
    channel = e.channel.encode("ascii")
    parts = [
        _HEAD.pack(
            e.version,
            e.author,
            e.author_key,
            e.seq,
            e.clock,
            e.prev,
            e.timestamp_ms,
            len(channel),
        ),
        channel,
        _U8.pack(len(e.horizon)),
    ]
    parts.extend(_ENTRY.pack(h.author, h.seq) for h in e.horizon)
    parts.append(_U32.pack(len(e.payload)))
    parts.append(e.payload)
    return b"".join(parts)


def event_signing_message(event: Event) -> bytes:
    """Return the exact message the author signs: `EVENT_CONTEXT` + encoding minus signature.

    Raises `ValueError` if the event is structurally invalid.
    """
    problem = _event_problem(event)
    if problem is not None:
        raise ValueError(f"invalid event: {problem}")
    return EVENT_CONTEXT + _body(event)


def encode_event(event: Event) -> bytes:
    """Return the canonical encoding of `event`. Raises `ValueError` if it is invalid."""
    problem = _event_problem(event)
    if problem is not None:
        raise ValueError(f"invalid event: {problem}")
    return _body(event) + event.signature


def event_id_of_encoding(encoded: bytes) -> bytes:
    """Return the event id of an already encoded event (no parsing, just the hash)."""
    return bytes(
        blake3.blake3(bytes(encoded), derive_key_context=EVENT_ID_CONTEXT).digest(
            length=EVENT_ID_LEN
        )
    )


def event_id(event: Event) -> bytes:
    """Return the 32-byte id of `event`: BLAKE3 (derive_key mode) of its canonical encoding."""
    return event_id_of_encoding(encode_event(event))


def decode_event(data: bytes) -> Event:
    """Parse an event from exactly `data`. The signature is not checked here (`verify_event`).

    Raises `TruncatedError`, `OversizeError`, `VersionError` or `MalformedError`, and nothing else.
    """
    data = bytes(data)
    if len(data) > MAX_EVENT_LEN:
        raise OversizeError(f"event of {len(data)} bytes exceeds {MAX_EVENT_LEN}")
    if len(data) >= 1 and data[0] != EVENT_VERSION:
        raise VersionError(f"event version {data[0]} is not supported")
    if len(data) < MIN_EVENT_LEN:
        raise TruncatedError(f"event needs at least {MIN_EVENT_LEN} bytes, got {len(data)}")
    (version, author, key, seq, clock, prev, ts, clen) = _HEAD.unpack_from(data)
    pos = _HEAD.size
    # The smallest remainder after the channel: horizon count, payload length, signature.
    if len(data) < pos + clen + 1 + 4 + SIGNATURE_LEN:
        raise TruncatedError("event ends inside its channel")
    raw_channel = data[pos : pos + clen]
    pos += clen
    (count,) = _U8.unpack_from(data, pos)
    pos += 1
    if count > MAX_HORIZON:
        raise MalformedError(f"horizon of {count} entries exceeds {MAX_HORIZON}")
    if len(data) < pos + count * _ENTRY.size + 4 + SIGNATURE_LEN:
        raise TruncatedError("event ends inside its horizon")
    horizon = []
    for _ in range(count):
        h_author, h_seq = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        horizon.append(HorizonEntry(CellId(h_author), h_seq))
    (plen,) = _U32.unpack_from(data, pos)
    pos += 4
    if plen > MAX_PAYLOAD:
        raise MalformedError(f"payload of {plen} bytes exceeds {MAX_PAYLOAD}")
    expected = pos + plen + SIGNATURE_LEN
    if len(data) < expected:
        raise TruncatedError(f"event needs {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise MalformedError(f"{len(data) - expected} trailing bytes after event")
    if not raw_channel.isascii():
        raise MalformedError("event channel is not ASCII")
    event = Event(
        author=CellId(author),
        author_key=key,
        channel=raw_channel.decode("ascii"),
        seq=seq,
        clock=clock,
        prev=prev,
        horizon=tuple(horizon),
        timestamp_ms=ts,
        payload=data[pos : pos + plen],
        signature=data[expected - SIGNATURE_LEN :],
        version=version,
    )
    problem = _event_problem(event)
    if problem is not None:
        raise MalformedError(f"invalid event: {problem}")
    if not hmac.compare_digest(cell_id_from_public_key(key), author):
        raise MalformedError("author CellID is not derived from the author key")
    return event


def verify_event(event: Event) -> None:
    """Check that `event` is well formed and signed by its author; return None if so.

    Raises `EventError` with reason "malformed", "author_mismatch" or "bad_signature".
    """
    problem = _event_problem(event)
    if problem is not None:
        raise EventError(problem, "malformed")
    if not hmac.compare_digest(cell_id_from_public_key(event.author_key), event.author):
        raise EventError("author CellID is not derived from the author key", "author_mismatch")
    try:
        verify_signature(event.author_key, EVENT_CONTEXT + _body(event), event.signature)
    except AuthenticationError as exc:
        raise EventError("event signature did not verify", "bad_signature") from exc


def _pick_horizon(author: CellId, horizon: Iterable[Seen]) -> list[tuple[CellId, int, int]]:
    """Latest (seq, clock) per other author, at most `MAX_HORIZON`, highest clocks kept."""
    best: dict[bytes, tuple[int, int]] = {}
    for seen in horizon:
        other = bytes(seen.author)
        if len(other) != CELL_ID_LEN:
            raise ValueError("horizon author must be a 16-byte CellID")
        if other == author:
            continue  # our own chain is carried by seq/prev, not by the horizon
        if not (_u63(seen.seq) and seen.seq >= 1 and _u63(seen.clock) and seen.clock >= 1):
            raise ValueError("horizon seq and clock must be in 1..2**63-1")
        if other not in best or (seen.seq, seen.clock) > best[other]:
            best[other] = (seen.seq, seen.clock)
    # Over the bound, keep the most recent positions (highest clocks): they are the likeliest to
    # matter for what comes next, and each one already covers its author's whole past.
    chosen = sorted(best.items(), key=lambda kv: (kv[1][1], kv[0]), reverse=True)[:MAX_HORIZON]
    return sorted((CellId(a), s, c) for a, (s, c) in chosen)


def create_event(
    identity: Identity,
    channel: str,
    payload: bytes,
    prev: Event | None,
    horizon: Iterable[Seen],
    now_ms: int,
) -> Event:
    """Sign a new event by `identity` on `channel`.

    `prev` is the author's latest event on `channel` (None for the first one). `horizon` lists
    events (or log heads) of other authors on the channel that the author has seen; entries of
    the author itself are ignored, each other author is kept once (its highest seq), and beyond
    `MAX_HORIZON` authors the most recent (highest clock) are kept. The clock is computed from
    `prev` and the kept entries. Raises `ValueError` for invalid arguments (bad channel, payload
    too large, `prev` by another author or on another channel).
    """
    validate_channel(channel)
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if prev is not None:
        if prev.author != identity.cell_id:
            raise ValueError("prev was written by another author")
        if prev.channel != channel:
            raise ValueError("prev is on another channel")
    entries = _pick_horizon(identity.cell_id, horizon)
    prev_clock = 0 if prev is None else prev.clock
    clock = 1 + max([prev_clock, *(c for _, _, c in entries)])
    if clock > MAX_U63:
        raise ValueError("clock would exceed 2**63-1")
    unsigned = Event(
        author=identity.cell_id,
        author_key=identity.public_key,
        channel=channel,
        seq=1 if prev is None else prev.seq + 1,
        clock=clock,
        prev=ZERO_EVENT_ID if prev is None else event_id(prev),
        horizon=tuple(HorizonEntry(a, s) for a, s, _ in entries),
        timestamp_ms=now_ms,
        payload=payload,
        signature=bytes(SIGNATURE_LEN),
    )
    message = event_signing_message(unsigned)  # validates every field
    return Event(
        author=unsigned.author,
        author_key=unsigned.author_key,
        channel=unsigned.channel,
        seq=unsigned.seq,
        clock=unsigned.clock,
        prev=unsigned.prev,
        horizon=unsigned.horizon,
        timestamp_ms=unsigned.timestamp_ms,
        payload=unsigned.payload,
        signature=identity.sign(message),
    )


def happened_before(a: Event, b: Event, lookup: EventLookup) -> bool:
    """Return whether `a` is in the causal past of `b` (a -> b) on their channel.

    Events of one author are ordered by seq. Otherwise `a -> b` when some event of b's author at
    or below b's seq, or transitively some event those name, has a horizon pair covering a's
    position. `lookup(author, seq)` returns an event of the same channel (a log store's
    `lookup(channel)` gives one). The walk only visits events whose clock lies between a's and
    b's, since a -> x implies a.clock < x.clock; the answer is exact when the store holds b's
    causal past, and a missing event can only turn a True into False. Clocks are trusted as a log
    store checked them. With a forked author, a position stands for whichever branch `lookup`
    returns.
    """
    if a.channel != b.channel:
        return False
    if a.author == b.author:
        return a.seq < b.seq
    if a.clock >= b.clock:
        return False
    target, need = a.author, a.seq
    reach: dict[bytes, int] = {b.author: b.seq}  # highest seq per author known in b's past
    scanned: dict[bytes, int] = {}  # per author, seqs above this were already read
    work = [bytes(b.author)]
    while work:
        x = work.pop()
        top = reach[x]
        low = scanned.get(x, 0)
        if top <= low:
            continue
        scanned[x] = top
        for s in range(top, low, -1):
            ev = b if (x == b.author and s == b.seq) else lookup(CellId(x), s)
            if ev is None:
                continue  # not held (retention or not yet synced): look further down
            if ev.clock <= a.clock:
                break  # everything below is older still: it cannot have seen `a`
            for h in ev.horizon:
                if h.author == target and h.seq >= need:
                    return True
                if h.seq > reach.get(h.author, 0):
                    reach[h.author] = h.seq
                    work.append(bytes(h.author))
    return False
