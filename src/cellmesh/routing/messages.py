"""Routing messages: UPDATE and SEQNO_REQUEST, bytes <-> typed records.

Theory of operation
-------------------
Routing messages travel between direct neighbours only, each inside one record of an encrypted
session (the node chooses the record type), so they need no MAC, no signature and no sender
field of their own: the session authenticates the neighbour, and the driver passes its CellID to
`RoutingCore.receive`. Every message has a 6-byte header and then `count` fixed-size records;
all integers are big-endian.

```
header (6 bytes), every type
  0   u8    version (1)
  1   u8    type: 1 UPDATE, 2 SEQNO_REQUEST
  2   u8    flags. UPDATE: bit 0 DUMP_REQUEST ("send me your full table"); other bits and every
            bit of a SEQNO_REQUEST must be 0
  3   u8    count: number of records, 1..255
  4   u16   UPDATE: the sender's update interval in deciseconds, 1..65535 (receivers expire
            the routes after hold_factor of these); SEQNO_REQUEST: reserved, must be 0
UPDATE route record (22 bytes), `count` of them from offset 6
  0   16    destination CellID (never all zero)
  16  u16   seqno: the destination's sequence number this route carries
  18  u16   metric: the sender's metric to the destination; 0xFFFF = retraction
  20  u8    hops: the sender's hop count to the destination (0 for its own CellID)
  21  u8    reserved, must be 0
SEQNO_REQUEST record (20 bytes), `count` of them from offset 6
  0   16    destination CellID (never all zero)
  16  u16   seqno: the sequence number asked for (the requester's feasibility seqno + 1)
  18  u8    hop count: how many more times the request may be forwarded, 1..255
  19  u8    reserved, must be 0
```

The length must be exactly ``6 + count * record size``: an UPDATE is at most 5,616 bytes and a
SEQNO_REQUEST 5,106, whatever the sender claims. `decode_message` checks structure only and
raises a `DecodeError` subclass (never anything else) for any input that breaks it; whether a
record makes sense (a route to ourselves, a metric that overflows) is the core's decision. The
same layout, with the reasoning, is in docs/routing.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from cellmesh.errors import MalformedError, OversizeError, TruncatedError, VersionError

__all__ = [
    "CELL_LEN",
    "DUMP_REQUEST",
    "HEADER_LEN",
    "MAX_RECORDS",
    "REQUEST_RECORD_LEN",
    "ROUTE_RECORD_LEN",
    "VERSION",
    "MessageType",
    "RouteRecord",
    "RoutingMessage",
    "SeqnoRequest",
    "SeqnoRequestRecord",
    "Update",
    "decode_message",
    "encode_message",
    "message_type",
    "pack_route_record",
    "pull_request_records",
    "pull_update_records",
    "push_request",
    "push_update",
]

VERSION = 1
CELL_LEN = 16
HEADER_LEN = 6
ROUTE_RECORD_LEN = 22
REQUEST_RECORD_LEN = 20
MAX_RECORDS = 255
DUMP_REQUEST = 0x01
"""UPDATE flag: the sender wants our full table (it has just brought us up as a neighbour)."""

_HEADER = struct.Struct("!BBBBH")
_ROUTE = struct.Struct("!16sHHBB")
_REQUEST = struct.Struct("!16sHBB")
_ZERO_CELL = bytes(CELL_LEN)
assert _HEADER.size == HEADER_LEN
assert _ROUTE.size == ROUTE_RECORD_LEN
assert _REQUEST.size == REQUEST_RECORD_LEN


class MessageType(IntEnum):
    """Byte 1 of every routing message."""

    UPDATE = 1
    SEQNO_REQUEST = 2


class RouteRecord(NamedTuple):
    """One advertised route: the sender reaches `destination` with `metric` over `hops` hops
    under the destination's sequence number `seqno`. `metric` 0xFFFF is a retraction."""

    destination: bytes
    seqno: int
    metric: int
    hops: int


class SeqnoRequestRecord(NamedTuple):
    """A request that the origin of `destination` advertise a sequence number of at least
    `seqno`; `hops` is how many more times it may be forwarded."""

    destination: bytes
    seqno: int
    hops: int


@dataclass(frozen=True, slots=True)
class Update:
    """Routes the sender advertises, with its update interval (deciseconds)."""

    interval_ds: int
    routes: tuple[RouteRecord, ...]
    dump_request: bool = False


@dataclass(frozen=True, slots=True)
class SeqnoRequest:
    """Seqno requests, forwarded hop by hop towards each destination's origin."""

    requests: tuple[SeqnoRequestRecord, ...]


RoutingMessage = Update | SeqnoRequest


def _check_cell(cell: bytes) -> None:
    if len(cell) != CELL_LEN:
        raise MalformedError(f"a CellID is {CELL_LEN} bytes, got {len(cell)}")
    if cell == _ZERO_CELL:
        raise MalformedError("the all-zero CellID names no node")


def pack_route_record(destination: bytes, seqno: int, metric: int, hops: int) -> bytes:
    """Encode one 22-byte UPDATE route record (the core caches these per destination)."""
    return _ROUTE.pack(destination, seqno, metric, min(hops, 255), 0)


def push_update(
    interval_ds: int, records: list[bytes] | tuple[bytes, ...], dump_request: bool = False
) -> bytes:
    """Encode an UPDATE from already packed route records (see `pack_route_record`)."""
    if not 1 <= len(records) <= MAX_RECORDS:
        raise MalformedError(f"an UPDATE carries 1 to {MAX_RECORDS} records, not {len(records)}")
    if not 1 <= interval_ds <= 0xFFFF:
        raise MalformedError(f"update interval {interval_ds} ds is outside 1..65535")
    head = _HEADER.pack(
        VERSION, MessageType.UPDATE, DUMP_REQUEST if dump_request else 0, len(records), interval_ds
    )
    return head + b"".join(records)


def push_request(records: list[tuple[bytes, int, int]]) -> bytes:
    """Encode a SEQNO_REQUEST from (destination, seqno, hops) triples."""
    if not 1 <= len(records) <= MAX_RECORDS:
        raise MalformedError(
            f"a SEQNO_REQUEST carries 1 to {MAX_RECORDS} records, not {len(records)}"
        )
    parts = [_HEADER.pack(VERSION, MessageType.SEQNO_REQUEST, 0, len(records), 0)]
    for dst, seqno, hops in records:
        if not 1 <= hops <= 255:
            raise MalformedError(f"request hop count {hops} is outside 1..255")
        parts.append(_REQUEST.pack(dst, seqno, hops, 0))
    return b"".join(parts)


def encode_message(msg: RoutingMessage) -> bytes:
    """Encode a typed message. Raises `MalformedError` for values the format cannot carry."""
    if isinstance(msg, Update):
        recs: list[bytes] = []
        for r in msg.routes:
            _check_cell(r.destination)
            if not (0 <= r.seqno <= 0xFFFF and 0 <= r.metric <= 0xFFFF and 0 <= r.hops <= 255):
                raise MalformedError(f"route record field out of range: {r!r}")
            recs.append(_ROUTE.pack(r.destination, r.seqno, r.metric, r.hops, 0))
        return push_update(msg.interval_ds, recs, msg.dump_request)
    triples: list[tuple[bytes, int, int]] = []
    for q in msg.requests:
        _check_cell(q.destination)
        if not 0 <= q.seqno <= 0xFFFF:
            raise MalformedError(f"request seqno {q.seqno} is outside 0..65535")
        triples.append((q.destination, q.seqno, q.hops))
    return push_request(triples)


def _pull_header(data: bytes, expected: MessageType | None) -> tuple[int, int, int, int]:
    """Check the header and the total length; return (type, flags, count, field)."""
    n = len(data)
    if n < HEADER_LEN:
        raise TruncatedError(f"routing message of {n} bytes is shorter than its 6-byte header")
    version, mtype, flags, count, field = _HEADER.unpack_from(data, 0)
    if version != VERSION:
        raise VersionError(f"routing message version {version} is not supported")
    if mtype == MessageType.UPDATE:
        size = ROUTE_RECORD_LEN
        if flags & ~DUMP_REQUEST:
            raise MalformedError(f"unknown UPDATE flags {flags:#04x}")
        if field == 0:
            raise MalformedError("UPDATE with a zero update interval")
    elif mtype == MessageType.SEQNO_REQUEST:
        size = REQUEST_RECORD_LEN
        if flags or field:
            raise MalformedError("SEQNO_REQUEST with reserved header bits set")
    else:
        raise MalformedError(f"unknown routing message type {mtype}")
    if expected is not None and mtype != expected:
        raise MalformedError(f"expected message type {expected.name}, got {mtype}")
    if count == 0:
        raise MalformedError("routing message with no records")
    want = HEADER_LEN + count * size
    if n < want:
        raise TruncatedError(f"{count} records need {want} bytes, the message has {n}")
    if n > want:
        raise OversizeError(f"{count} records need {want} bytes, the message has {n}")
    return mtype, flags, count, field


def pull_update_records(data: bytes) -> tuple[bool, int, list[tuple[bytes, int, int, int, int]]]:
    """Check an UPDATE and return (dump_request, interval_ds, raw route tuples).

    Each tuple is (destination, seqno, metric, hops, reserved=0), as `struct` unpacks it: the
    core's hot path, with exactly the checks `decode_message` makes. Raises `DecodeError`.
    """
    _, flags, _, interval_ds = _pull_header(data, MessageType.UPDATE)
    body = memoryview(data)[HEADER_LEN:]
    # Every reserved byte at once (offset 21 of each record), then every destination.
    if any(body[ROUTE_RECORD_LEN - 1 :: ROUTE_RECORD_LEN]):
        raise MalformedError("route record with its reserved byte set")
    records = list(_ROUTE.iter_unpack(body))
    for rec in records:
        if rec[0] == _ZERO_CELL:
            raise MalformedError("route record for the all-zero CellID")
    return bool(flags & DUMP_REQUEST), interval_ds, records


def pull_request_records(data: bytes) -> list[tuple[bytes, int, int, int]]:
    """Check a SEQNO_REQUEST and return raw (destination, seqno, hops, reserved=0) tuples."""
    _pull_header(data, MessageType.SEQNO_REQUEST)
    body = memoryview(data)[HEADER_LEN:]
    if any(body[REQUEST_RECORD_LEN - 1 :: REQUEST_RECORD_LEN]):
        raise MalformedError("request record with its reserved byte set")
    records = list(_REQUEST.iter_unpack(body))
    for rec in records:
        if rec[0] == _ZERO_CELL:
            raise MalformedError("request record for the all-zero CellID")
        if rec[2] == 0:
            raise MalformedError("request record with a zero hop count")
    return records


def message_type(data: bytes) -> MessageType:
    """The type of a message whose header is valid (raises `DecodeError` otherwise)."""
    return MessageType(_pull_header(data, None)[0])


def decode_message(data: bytes) -> RoutingMessage:
    """Decode one routing message. Raises a `DecodeError` subclass for any invalid input."""
    if message_type(data) == MessageType.UPDATE:
        dump, interval_ds, raw = pull_update_records(data)
        routes = tuple(RouteRecord(d, s, m, h) for d, s, m, h, _ in raw)
        return Update(interval_ds, routes, dump)
    reqs = tuple(SeqnoRequestRecord(d, s, h) for d, s, h, _ in pull_request_records(data))
    return SeqnoRequest(reqs)
