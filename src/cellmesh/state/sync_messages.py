"""The sync message: range records for reconciliation, wanted ids, and events.

One message type carries everything a sync turn says (layout also in docs/blobs_sync.md)::

    version u8 (=1) | flags u8 (bit 0: MORE; others reserved, zero)
    n_ranges varint | n_ranges x range
    n_wants  varint | n_wants  x id[32]
    n_events varint | n_events x (length varint (>= 1) | event bytes)

    range = upper bound | mode u8 | payload
      bound: key varint: 0 = infinity (nothing follows), else 1 + (key - previous bound's key),
             then prefix_len u8 (0..32) | id prefix (the id's remaining bytes are zero)
      mode 0 SKIP         no payload: nothing to do in this range
      mode 1 FINGERPRINT  16 bytes: the sender's fingerprint of the range
      mode 2 IDLIST       count varint | count x id[32]: every id the sender has in the range

Ranges are consecutive: the first starts at the lowest point of the key space and each starts
where the previous ended, so a message carries only upper bounds, and those must strictly
increase (nothing may follow infinity). Space after the last range is implicitly SKIP. Bounds are
written with the shortest id prefix that separates the items on either side (Negentropy's
encoding), usually 0 or 1 byte, and keys as deltas, usually 1 to 3 bytes.

Varints are unsigned LEB128, at most 10 bytes, minimal (no redundant zero groups), at most 2**64 - 1
(a bound's key field at most 2**64). Every count is
checked against the bytes left before anything is allocated, so a hostile count costs nothing;
every fault raises a `cellmesh.errors.DecodeError` subclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from cellmesh.errors import MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.state.sync_store import FINGERPRINT_LEN, ID_LEN, INFINITY, LOWEST, MAX_KEY, SyncItem

__all__ = [
    "MAX_SYNC_MESSAGE",
    "MIN_SYNC_MESSAGE",
    "SYNC_VERSION",
    "Mode",
    "RangeRecord",
    "SyncMessage",
    "SyncMessageWriter",
    "encode_bound",
    "pull_sync_message",
    "pull_varint",
    "push_sync_message",
    "push_varint",
]

SYNC_VERSION = 1
MIN_SYNC_MESSAGE = 1024
"""The smallest message size a session may be configured with."""
MAX_SYNC_MESSAGE = 1 << 20
"""The largest message size a session may be configured with (1 MiB)."""
_FLAG_MORE = 0x01
_BOUND_LIMIT = MAX_KEY + 1
_COUNT_RESERVE = 3
"""Bytes reserved per count while a message is built (counts stay below 2**21 at 1 MiB)."""


class Mode(IntEnum):
    """What a range record asks of the receiver."""

    SKIP = 0
    FINGERPRINT = 1
    IDLIST = 2


@dataclass(frozen=True, slots=True)
class RangeRecord:
    """One range [previous upper bound, `upper`) and what the sender says about it."""

    upper: SyncItem
    mode: Mode
    fingerprint: bytes = b""
    ids: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class SyncMessage:
    """A decoded sync message."""

    more: bool
    ranges: tuple[RangeRecord, ...] = ()
    wants: tuple[bytes, ...] = ()
    events: tuple[bytes, ...] = ()

    @property
    def needs_response(self) -> bool:
        """True if the receiver must answer: open ranges (FINGERPRINT, IDLIST) or wants."""
        return bool(self.wants) or any(r.mode is not Mode.SKIP for r in self.ranges)


def push_varint(n: int, limit: int = MAX_KEY) -> bytes:
    """Unsigned LEB128 of 0 <= n <= `limit`."""
    if n < 0 or n > limit:
        raise MalformedError("varint out of range")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pull_varint(data: bytes | memoryview, off: int, limit: int = MAX_KEY) -> tuple[int, int]:
    """Decode a minimal LEB128 integer <= `limit` (a u64 by default) at `off`; return (value,
    next offset)."""
    n = 0
    shift = 0
    for i in range(10):
        if off + i >= len(data):
            raise TruncatedError("varint cut short")
        b = data[off + i]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            if i and b == 0:
                raise MalformedError("non-minimal varint")
            if n > limit:
                raise MalformedError(f"varint larger than {limit}")
            return n, off + i + 1
        shift += 7
    raise MalformedError("varint longer than 10 bytes")


def encode_bound(prev_key: int, bound: SyncItem) -> bytes:
    """A bound, its key as a delta from `prev_key` and its id as a prefix (trailing zero bytes
    are implied, so an id ending in zeros is written shorter: the same point)."""
    if bound == INFINITY:
        return b"\x00"
    if not prev_key <= bound.key <= MAX_KEY or len(bound.id) != ID_LEN:
        raise MalformedError("bound out of order or not a valid point")
    prefix = bound.id.rstrip(b"\x00")
    # 1 + delta reaches 2**64 for a bound at MAX_KEY after one at 0: one more than a u64.
    return push_varint(1 + bound.key - prev_key, _BOUND_LIMIT) + bytes([len(prefix)]) + prefix


def _encode_range(prev_key: int, rec: RangeRecord) -> bytes:
    parts = [encode_bound(prev_key, rec.upper), bytes([rec.mode])]
    if rec.mode is Mode.FINGERPRINT:
        if len(rec.fingerprint) != FINGERPRINT_LEN:
            raise MalformedError("fingerprints are 16 bytes")
        parts.append(rec.fingerprint)
    elif rec.mode is Mode.IDLIST:
        if any(len(i) != ID_LEN for i in rec.ids):
            raise MalformedError("ids are 32 bytes")
        parts.append(push_varint(len(rec.ids)))
        parts.extend(rec.ids)
    return b"".join(parts)


class SyncMessageWriter:
    """Builds one message within `max_size` bytes, section by section, refusing what would not
    fit (the caller keeps it for the next turn). Ranges must be added in ascending order."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._ranges = bytearray()
        self._n_ranges = 0
        self._prev = LOWEST
        self._wants = bytearray()
        self._n_wants = 0
        self._events = bytearray()
        self._n_events = 0
        self.needs_response = False
        """True once a FINGERPRINT or IDLIST range or a want was added."""

    @property
    def size(self) -> int:
        """Bytes the message will have at most (counts reserved at their largest)."""
        return 2 + 3 * _COUNT_RESERVE + len(self._ranges) + len(self._wants) + len(self._events)

    @property
    def room(self) -> int:
        """Bytes still free."""
        return self.max_size - self.size

    @property
    def has_content(self) -> bool:
        """True if any range, want or event was added."""
        return bool(self._n_ranges or self._n_wants or self._n_events)

    @property
    def last_bound(self) -> SyncItem:
        """The upper bound of the last range added (LOWEST if none)."""
        return self._prev

    def add_ranges(self, records: list[RangeRecord], reserve: int = 0) -> bool:
        """Add consecutive range records, all or none; False if they would leave less than
        `reserve` bytes free."""
        prev = self._prev
        encoded = bytearray()
        for rec in records:
            if not prev < rec.upper or prev == INFINITY:
                raise MalformedError("range bounds must strictly increase")
            encoded += _encode_range(prev.key, rec)
            prev = rec.upper
        if len(encoded) > self.room - reserve:
            return False
        self._ranges += encoded
        self._n_ranges += len(records)
        self._prev = prev
        if any(r.mode is not Mode.SKIP for r in records):
            self.needs_response = True
        return True

    def add_want(self, event_id: bytes) -> bool:
        """Add one wanted id; False if it does not fit."""
        if len(event_id) != ID_LEN:
            raise MalformedError("ids are 32 bytes")
        if self.room < ID_LEN:
            return False
        self._wants += event_id
        self._n_wants += 1
        self.needs_response = True
        return True

    @staticmethod
    def event_cost(data: bytes) -> int:
        """Bytes an event takes in a message."""
        return len(push_varint(len(data))) + len(data)

    def add_event(self, data: bytes) -> bool:
        """Add one encoded event; False if it does not fit."""
        if not data:
            raise MalformedError("events are at least one byte")
        cost = self.event_cost(data)
        if cost > self.room:
            return False
        self._events += push_varint(len(data))
        self._events += data
        self._n_events += 1
        return True

    def finish(self, more: bool) -> bytes:
        """The encoded message."""
        return b"".join(
            (
                bytes([SYNC_VERSION, _FLAG_MORE if more else 0]),
                push_varint(self._n_ranges),
                self._ranges,
                push_varint(self._n_wants),
                self._wants,
                push_varint(self._n_events),
                self._events,
            )
        )


def push_sync_message(m: SyncMessage, max_size: int = MAX_SYNC_MESSAGE) -> bytes:
    """Encode a whole message (raises `OversizeError` if it exceeds `max_size`)."""
    w = SyncMessageWriter(max_size + 3 * _COUNT_RESERVE)
    if not w.add_ranges(list(m.ranges)):
        raise OversizeError("ranges exceed the message size")
    for i in m.wants:
        if not w.add_want(i):
            raise OversizeError("wants exceed the message size")
    for e in m.events:
        if not w.add_event(e):
            raise OversizeError("events exceed the message size")
    out = w.finish(m.more)
    if len(out) > max_size:
        raise OversizeError(f"sync message of {len(out)} bytes exceeds {max_size}")
    return out


def _pull_bound(data: bytes | memoryview, off: int, prev: SyncItem) -> tuple[SyncItem, int]:
    v, off = pull_varint(data, off, _BOUND_LIMIT)
    if v == 0:
        return INFINITY, off
    key = prev.key + v - 1
    if key > MAX_KEY:
        raise MalformedError("bound key beyond 2**64 - 1")
    if off >= len(data):
        raise TruncatedError("bound prefix length cut short")
    plen = data[off]
    off += 1
    if plen > ID_LEN:
        raise MalformedError(f"bound prefix of {plen} bytes")
    if off + plen > len(data):
        raise TruncatedError("bound prefix cut short")
    ident = bytes(data[off : off + plen]) + bytes(ID_LEN - plen)
    return SyncItem(key, ident), off + plen


def _pull_ids(data: bytes | memoryview, off: int, what: str) -> tuple[tuple[bytes, ...], int]:
    count, off = pull_varint(data, off)
    end = off + count * ID_LEN
    if end > len(data):
        raise TruncatedError(f"{what} of {count} ids cut short")
    return tuple(bytes(data[i : i + ID_LEN]) for i in range(off, end, ID_LEN)), end


def pull_sync_message(data: bytes | memoryview, max_size: int = MAX_SYNC_MESSAGE) -> SyncMessage:
    """Decode a sync message no larger than `max_size`; faults raise `DecodeError` subclasses."""
    n = len(data)
    if n > max_size or n > MAX_SYNC_MESSAGE:
        raise OversizeError(f"sync message of {n} bytes exceeds {min(max_size, MAX_SYNC_MESSAGE)}")
    if n < 1:
        raise TruncatedError("empty sync message")
    if data[0] != SYNC_VERSION:
        raise VersionError(f"sync version {data[0]} (this build speaks {SYNC_VERSION})")
    if n < 2:
        raise TruncatedError("sync message header cut short")
    flags = data[1]
    if flags & ~_FLAG_MORE:
        raise MalformedError("reserved sync flags set")
    off = 2
    n_ranges, off = pull_varint(data, off)
    if n_ranges * 2 > n - off:  # a range takes at least 2 bytes (infinity + SKIP)
        raise TruncatedError(f"{n_ranges} ranges cannot fit in {n - off} bytes")
    ranges: list[RangeRecord] = []
    prev = LOWEST
    for _ in range(n_ranges):
        if prev == INFINITY:
            raise MalformedError("a range after the infinity bound")
        upper, off = _pull_bound(data, off, prev)
        if not prev < upper:
            raise MalformedError("range bounds must strictly increase")
        if off >= n:
            raise TruncatedError("range mode cut short")
        mode_byte = data[off]
        off += 1
        if mode_byte == Mode.SKIP:
            ranges.append(RangeRecord(upper, Mode.SKIP))
        elif mode_byte == Mode.FINGERPRINT:
            if off + FINGERPRINT_LEN > n:
                raise TruncatedError("fingerprint cut short")
            ranges.append(
                RangeRecord(upper, Mode.FINGERPRINT, bytes(data[off : off + FINGERPRINT_LEN]))
            )
            off += FINGERPRINT_LEN
        elif mode_byte == Mode.IDLIST:
            ids, off = _pull_ids(data, off, "IDLIST")
            ranges.append(RangeRecord(upper, Mode.IDLIST, ids=ids))
        else:
            raise MalformedError(f"unknown range mode {mode_byte}")
        prev = upper
    wants, off = _pull_ids(data, off, "want list")
    n_events, off = pull_varint(data, off)
    if n_events * 2 > n - off:  # an event takes at least 2 bytes (length + one byte)
        raise TruncatedError(f"{n_events} events cannot fit in {n - off} bytes")
    events: list[bytes] = []
    for _ in range(n_events):
        length, off = pull_varint(data, off)
        if length < 1:
            raise MalformedError("empty event")
        if off + length > n:
            raise TruncatedError("event cut short")
        events.append(bytes(data[off : off + length]))
        off += length
    if off != n:
        raise MalformedError("junk after the sync message")
    return SyncMessage(bool(flags & _FLAG_MORE), tuple(ranges), wants, tuple(events))
