"""The v1 frame header: 64 bytes, 8-byte aligned, readable by relays without decrypting.

Theory of operation: every cellmesh datagram starts with this header. A relay or the ring 0 gate can
route, drop and deduplicate from it alone (destination CellID, source CellID, session id, packet number),
and it is bound to the payload as AEAD associated data, so no field of it can be changed by anyone without
the session key, except `hop_ttl`, which relays decrement and which is zeroed in the associated data.
The layout is documented byte by byte in docs/wire.md; keep the two in step.

```
 0      1      2      3      4             6             8
 +------+------+------+------+-------------+-------------+
 | ver  | type | flags| ttl* | payload_len | frag (rsvd) |
 +------+------+------+------+-------------+-------------+
 |                source CellID (16)                     |  8
 +-------------------------------------------------------+
 |             destination CellID (16)                   | 24
 +-------------------------------------------------------+
 |                session id (u64)                       | 40
 +-------------------------------------------------------+
 |              packet number (u64)                      | 48
 +---------------------------+---------------------------+
 |  channel hash (u32)       |  reserved (u32, zero)     | 56
 +---------------------------+---------------------------+ 64
```
All integers are big-endian. `*` = mutable hop field, zeroed in the associated data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from cellmesh.errors import MalformedError, OversizeError, TruncatedError, VersionError

WIRE_VERSION = 1
HEADER_LEN = 64
CELL_LEN = 16
ZERO_CELL = bytes(CELL_LEN)
DEFAULT_HOP_TTL = 16
MAX_PAYLOAD = 65507 - HEADER_LEN  # the largest UDP payload minus our header
U64_MAX = 2**64 - 1

Datagram: TypeAlias = bytes | bytearray
"""A whole datagram as an endpoint hands it out to be sent: bulk packets are sealed in place in
a bytearray (`Session.seal_parts`), everything else is bytes. Never modified once handed out."""

_HEADER = struct.Struct("!BBBBHH16s16sQQII")
assert _HEADER.size == HEADER_LEN
_TTL_OFFSET = 3


class FrameType(IntEnum):
    """What the body after the header is."""

    HANDSHAKE_INIT = 1
    HANDSHAKE_RESP = 2
    HANDSHAKE_FINISH = 3
    COOKIE_REPLY = 4
    DATA = 5
    BEACON = (
        6  # discovery announcement, signed (cellmesh.discovery.beacon; docs/wire.md section 10)
    )
    SOLICIT = 7  # discovery request for immediate announcements, signed (same place)


_FRAME_TYPES = frozenset(int(t) for t in FrameType)
FRAME_TYPES = _FRAME_TYPES
"""Every frame type v1 defines (as ints), for hot paths that check a header inline."""
# Flag bits defined by v1. None yet: every flag bit must be zero, so a future flag cannot be
# silently misread by an old node.
KNOWN_FLAGS = 0x00


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded frame header. `src`/`dst` are 16-byte CellIDs (all zero dst = "whoever is there")."""

    type: FrameType
    src: bytes
    dst: bytes
    session_id: int = 0
    packet_number: int = 0
    payload_len: int = 0
    hop_ttl: int = DEFAULT_HOP_TTL
    flags: int = 0
    channel: int = 0


def push_header(h: FrameHeader) -> bytes:
    """Encode a header to its 64 wire bytes."""
    return _HEADER.pack(
        WIRE_VERSION,
        h.type,
        h.flags,
        h.hop_ttl,
        h.payload_len,
        0,
        h.src,
        h.dst,
        h.session_id,
        h.packet_number,
        h.channel,
        0,
    )


def pack_header(
    ftype: int,
    src: bytes,
    dst: bytes,
    session_id: int,
    packet_number: int,
    payload_len: int,
    hop_ttl: int = DEFAULT_HOP_TTL,
    channel: int = 0,
) -> bytes:
    """Hot-path encoder: the same bytes as `push_header` without building a record."""
    return _HEADER.pack(
        WIRE_VERSION,
        ftype,
        0,
        hop_ttl,
        payload_len,
        0,
        src,
        dst,
        session_id,
        packet_number,
        channel,
        0,
    )


_Fields = tuple[int, int, int, int, int, int, bytes, bytes, int, int, int, int]


def _unpack_checked(buf: bytes | bytearray | memoryview) -> _Fields:
    """Unpack the header and apply every v1 check (one place for both decoders below)."""
    n = len(buf)
    if n < HEADER_LEN:
        raise TruncatedError(f"frame of {n} bytes is shorter than the {HEADER_LEN}-byte header")
    fields: _Fields = _HEADER.unpack_from(buf, 0)
    ver, ftype, flags, _ttl, plen, frag, _src, _dst, _sid, _pn, _channel, rsvd = fields
    if ver != WIRE_VERSION:
        raise VersionError(f"wire version {ver} is not supported (this node speaks {WIRE_VERSION})")
    if ftype not in _FRAME_TYPES:
        raise MalformedError(f"unknown frame type {ftype}")
    if flags & ~KNOWN_FLAGS:
        raise MalformedError(f"unknown flag bits 0x{flags:02x}")
    if frag or rsvd:
        raise MalformedError("reserved header fields must be zero")
    body = n - HEADER_LEN
    if plen > body:
        raise TruncatedError(f"header announces {plen} payload bytes, {body} present")
    if plen < body:
        raise OversizeError(f"{body - plen} bytes of trailing junk after the payload")
    return fields


def pull_header(buf: bytes | bytearray | memoryview) -> FrameHeader:
    """Decode the header at the start of `buf` and check it against the datagram length.

    Raises a `DecodeError` subclass for anything that is not a well-formed v1 header whose
    `payload_len` matches exactly the bytes that follow it.
    """
    _v, ftype, flags, ttl, plen, _f, src, dst, sid, pn, channel, _r = _unpack_checked(buf)
    return FrameHeader(FrameType(ftype), src, dst, sid, pn, plen, ttl, flags, channel)


unpack_header = _HEADER.unpack_from
"""Hot-path raw unpack of the 12 header fields, no checks: callers apply the same checks as
`_unpack_checked` inline (and fall back to `pull_header_fields` to name a fault)."""


def pull_header_fields(buf: bytes | bytearray | memoryview) -> tuple[int, bytes, bytes, int, int]:
    """Hot-path decoder: the same checks as `pull_header`, returning (type, src, dst, session id,
    packet number) as a plain tuple instead of building a `FrameHeader`."""
    f = _unpack_checked(buf)
    return f[1], f[6], f[7], f[8], f[9]


def associated_data(raw_header: bytes | bytearray | memoryview) -> bytes:
    """The AEAD associated data for a header: its 64 bytes with the mutable hop TTL zeroed."""
    ad = bytearray(raw_header[:HEADER_LEN])
    ad[_TTL_OFFSET] = 0
    return bytes(ad)


def peek_type_and_dst(buf: bytes | bytearray | memoryview) -> tuple[int, bytes] | None:
    """Cheapest possible look at a datagram for the gate: (frame type, destination) or None if short."""
    if len(buf) < HEADER_LEN:
        return None
    return buf[1], bytes(buf[24:40])
