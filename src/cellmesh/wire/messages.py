"""Records carried inside frames: handshake bodies, handshake payloads and encrypted messages.

Theory of operation: a DATA frame's plaintext is a sequence of records, each `type (u8) | length
(u16, big-endian) | body`, so many small messages share one datagram (one AEAD operation, one syscall).
Record types below 0x80 are mandatory: an unknown one is a protocol violation. Types from 0x80 up are
optional and skipped by nodes that do not know them, which is how later versions add records without
breaking older peers. Layouts are in docs/wire.md.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from cellmesh.errors import MalformedError, OversizeError, TruncatedError, VersionError

U64_MAX = 2**64 - 1
COOKIE_LEN = 16
ECHO_LEN = 16
MAX_REASON = 200


class MsgType(IntEnum):
    """Record types inside an encrypted DATA frame."""

    PADDING = 0
    PING = 1
    PONG = 2
    CLOSE = 3
    KEEPALIVE = 4
    APP = 5
    ACK = 6
    STREAM = 7
    RESET_STREAM = 8
    MAX_DATA = 9
    MAX_STREAM_DATA = 10
    MSG = 11
    STOP_SENDING = 12
    CHANNEL_MSG = 13
    CHANNEL_DATAGRAM = 14
    RELAY = 15
    ROUTE = 16
    PATH_CHALLENGE = 17
    PATH_RESPONSE = 18
    OBSERVED = 19
    CANDIDATES = 20
    TRACE = 21
    MAX_MESSAGES = 22


class HandshakePattern(IntEnum):
    """Which Noise pattern a HANDSHAKE_INIT starts (byte 0 of its body)."""

    XX = 1
    IK = 2


class CloseCode(IntEnum):
    """Why a session was closed (carried in CLOSE)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    IDLE = 2
    SHUTDOWN = 3
    REPLACED = 4


@dataclass(frozen=True, slots=True)
class Ping:
    """Echo request. `ping_id` is chosen by the sender; `data` is echoed back unchanged."""

    ping_id: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Pong:
    """Echo reply to a `Ping` with the same id and data."""

    ping_id: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Close:
    """The sender is closing the session."""

    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Proof of life on an idle session; carries nothing."""


@dataclass(frozen=True, slots=True)
class AppData:
    """An unreliable application datagram."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """Packet numbers received, as half-open ranges [start, end), highest first.

    `delay_us` is how long the receiver held the acknowledgement (RFC 9002 ack delay).
    """

    ranges: tuple[tuple[int, int], ...]
    delay_us: int = 0


@dataclass(frozen=True, slots=True)
class StreamFrame:
    """Bytes of stream `stream_id` at `offset`; `fin` marks the last byte of the stream."""

    stream_id: int
    offset: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True, slots=True)
class ResetStream:
    """The sender abandons stream `stream_id`; `final_size` is how much it had sent."""

    stream_id: int
    code: int
    final_size: int


@dataclass(frozen=True, slots=True)
class StopSending:
    """The receiver no longer wants stream `stream_id`; the sender should reset it."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class MaxData:
    """Connection-level flow control: the peer may send up to `maximum` stream bytes in total."""

    maximum: int


@dataclass(frozen=True, slots=True)
class MaxMessages:
    """Message credit: the peer may send reliable messages (MSG and CHANNEL_MSG) with ids below
    `limit`. Raised as the application takes messages, so unread ones never pile up."""

    limit: int


@dataclass(frozen=True, slots=True)
class MaxStreamData:
    """Stream-level flow control: the peer may send stream bytes below offset `maximum`."""

    stream_id: int
    maximum: int


@dataclass(frozen=True, slots=True)
class Msg:
    """A reliable, unordered message; `msg_id` lets the receiver drop duplicates.

    `channel` 0 is a plain application message (record MSG); any other value is the 32-bit hash
    of the channel it belongs to (record CHANNEL_MSG), with CHANNEL_CONTROL reserved for the
    channel protocol's own requests and replies.
    """

    msg_id: int
    data: bytes
    channel: int = 0


@dataclass(frozen=True, slots=True)
class ChannelDatagram:
    """An unreliable publication on a channel. It travels alone in a DATA frame whose header
    carries the same channel hash, so the ring 0 gate can drop it before decrypting."""

    channel: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Relay:
    """A whole cellmesh frame carried one hop towards `dst` (a CellID).

    The hop is an ordinary session between neighbours, so the relay knows which authenticated
    neighbour handed it the frame; the frame itself stays sealed end to end.
    """

    dst: bytes
    frame: bytes


@dataclass(frozen=True, slots=True)
class Route:
    """A routing protocol message between neighbours (cellmesh.routing encodes the body)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PathChallenge:
    """Sent to a peer's new address before traffic follows it there (RFC 9000 style)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PathResponse:
    """Echo of a `PathChallenge`, sent back to the address the challenge came from."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Observed:
    """The address the sender sees the receiver at: the receiver's reflexive address."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Candidates:
    """Addresses at which the sender may be reachable directly (for hole punching)."""

    addrs: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Trace:
    """A path probe forwarded hop by hop towards `dst` (`reply` False) until its TTL runs out
    or it arrives; the node where it stops answers with `reply` True towards `origin`, naming
    itself as `hop`. Hop-by-hop, like RELAY: each link is an authenticated neighbour session."""

    reply: bool
    probe_id: int
    ttl: int
    dst: bytes
    origin: bytes
    hop: bytes


@dataclass(frozen=True, slots=True)
class Padding:
    """Filler (path MTU probes); carries nothing."""

    length: int


Message = (
    Ping
    | Pong
    | Close
    | Keepalive
    | AppData
    | Ack
    | StreamFrame
    | ResetStream
    | StopSending
    | MaxData
    | MaxMessages
    | MaxStreamData
    | Msg
    | ChannelDatagram
    | Relay
    | Route
    | PathChallenge
    | PathResponse
    | Observed
    | Candidates
    | Trace
    | Padding
)
MAX_CANDIDATES = 8
RELAY_MIN_FRAME = 64
"""A relayed frame has at least a whole header."""
PATH_DATA_LEN = 8
CHANNEL_CONTROL = 0xFFFFFFFF
"""The channel hash reserved for the channel protocol (subscribe, publish grants, replies)."""
MAX_ACK_RANGES = 64
U32_MAX = 2**32 - 1

_REC = struct.Struct("!BH")
_APP = int(MsgType.APP)
_STREAM = int(MsgType.STREAM)
_U64 = struct.Struct("!Q")
_U32 = struct.Struct("!I")
_CHANNEL_MSG = struct.Struct("!QI")
_TRACE = struct.Struct("!BIB16s16s16s")
_U16 = struct.Struct("!H")
_ACK_HEAD = struct.Struct("!IB")
_ACK_RANGE = struct.Struct("!QI")
_STREAM_HEAD = struct.Struct("!IQB")
_RESET = struct.Struct("!IHQ")
_STOP = struct.Struct("!IH")
_MAX_STREAM = struct.Struct("!IQ")
_FIN = 0x01
MAX_RECORD_BODY = 0xFFFF


def _record(t: int, body: bytes) -> bytes:
    if len(body) > MAX_RECORD_BODY:
        raise OversizeError(f"record body of {len(body)} bytes exceeds {MAX_RECORD_BODY}")
    return _REC.pack(t, len(body)) + body


def push_message(m: Message) -> bytes:
    """Encode one record."""
    if isinstance(m, Ping):
        return _record(MsgType.PING, _U64.pack(m.ping_id) + m.data)
    if isinstance(m, Pong):
        return _record(MsgType.PONG, _U64.pack(m.ping_id) + m.data)
    if isinstance(m, Close):
        # Cut at 200 bytes without splitting a multi-byte character (receivers reject bad UTF-8).
        reason = m.reason.encode("utf-8")[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
        return _record(MsgType.CLOSE, _U16.pack(m.code) + reason)
    if isinstance(m, Keepalive):
        return _record(MsgType.KEEPALIVE, b"")
    if isinstance(m, AppData):
        return _record(MsgType.APP, m.data)
    if isinstance(m, StreamFrame):
        head = _STREAM_HEAD.pack(m.stream_id, m.offset, _FIN if m.fin else 0)
        return _record(MsgType.STREAM, head + m.data)
    if isinstance(m, Ack):
        if not 1 <= len(m.ranges) <= MAX_ACK_RANGES:
            raise MalformedError(f"ACK needs 1 to {MAX_ACK_RANGES} ranges")
        parts = [_ACK_HEAD.pack(min(m.delay_us, U32_MAX), len(m.ranges))]
        parts += [_ACK_RANGE.pack(a, b - a) for a, b in m.ranges]
        return _record(MsgType.ACK, b"".join(parts))
    if isinstance(m, ResetStream):
        return _record(MsgType.RESET_STREAM, _RESET.pack(m.stream_id, m.code, m.final_size))
    if isinstance(m, StopSending):
        return _record(MsgType.STOP_SENDING, _STOP.pack(m.stream_id, m.code))
    if isinstance(m, MaxData):
        return _record(MsgType.MAX_DATA, _U64.pack(m.maximum))
    if isinstance(m, MaxMessages):
        return _record(MsgType.MAX_MESSAGES, _U64.pack(m.limit))
    if isinstance(m, MaxStreamData):
        return _record(MsgType.MAX_STREAM_DATA, _MAX_STREAM.pack(m.stream_id, m.maximum))
    if isinstance(m, Msg):
        if m.channel:
            return _record(MsgType.CHANNEL_MSG, _CHANNEL_MSG.pack(m.msg_id, m.channel) + m.data)
        return _record(MsgType.MSG, _U64.pack(m.msg_id) + m.data)
    if isinstance(m, ChannelDatagram):
        return _record(MsgType.CHANNEL_DATAGRAM, _U32.pack(m.channel) + m.data)
    if isinstance(m, Relay):
        if len(m.dst) != 16 or len(m.frame) < RELAY_MIN_FRAME:
            raise MalformedError("RELAY needs a 16-byte destination and a whole frame")
        return _record(MsgType.RELAY, m.dst + m.frame)
    if isinstance(m, Route):
        return _record(MsgType.ROUTE, m.data)
    if isinstance(m, Observed):
        return _record(MsgType.OBSERVED, _pack_addr(m.host, m.port))
    if isinstance(m, Trace):
        try:
            body = _TRACE.pack(int(m.reply), m.probe_id, m.ttl, m.dst, m.origin, m.hop)
        except struct.error as exc:
            raise MalformedError(f"bad TRACE field: {exc}") from exc
        if len(m.dst) != 16 or len(m.origin) != 16 or len(m.hop) != 16:
            raise MalformedError("TRACE CellIDs are 16 bytes")
        return _record(MsgType.TRACE, body)
    if isinstance(m, Candidates):
        if len(m.addrs) > MAX_CANDIDATES:
            raise OversizeError(f"at most {MAX_CANDIDATES} candidate addresses")
        body = bytes([len(m.addrs)]) + b"".join(_pack_addr(h, p) for h, p in m.addrs)
        return _record(MsgType.CANDIDATES, body)
    if isinstance(m, PathChallenge | PathResponse):
        if len(m.data) != PATH_DATA_LEN:
            raise MalformedError(f"path validation data must be {PATH_DATA_LEN} bytes")
        t = MsgType.PATH_CHALLENGE if isinstance(m, PathChallenge) else MsgType.PATH_RESPONSE
        return _record(t, m.data)
    return _record(MsgType.PADDING, bytes(m.length))


def push_messages(msgs: list[Message]) -> bytes:
    """Encode several records into one plaintext."""
    return b"".join(push_message(m) for m in msgs)


def _decode_one(t: int, body: bytes) -> Message | None:
    if t == MsgType.PING or t == MsgType.PONG:
        if len(body) < 8:
            raise TruncatedError("PING/PONG body shorter than its 8-byte id")
        (pid,) = _U64.unpack_from(body, 0)
        return Ping(pid, body[8:]) if t == MsgType.PING else Pong(pid, body[8:])
    if t == MsgType.CLOSE:
        if len(body) < 2:
            raise TruncatedError("CLOSE body shorter than its 2-byte code")
        if len(body) > 2 + MAX_REASON:
            raise OversizeError("CLOSE reason longer than 200 bytes")
        try:
            reason = body[2:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedError("CLOSE reason is not UTF-8") from exc
        return Close(_U16.unpack_from(body, 0)[0], reason)
    if t == MsgType.KEEPALIVE:
        if body:
            raise MalformedError("KEEPALIVE must be empty")
        return Keepalive()
    if t == MsgType.APP:
        return AppData(body)
    if t == MsgType.STREAM:
        return _stream_frame(body, 0, len(body))
    if t == MsgType.ACK:
        return _decode_ack(body)
    if t == MsgType.RESET_STREAM:
        if len(body) != _RESET.size:
            raise MalformedError("RESET_STREAM must be 14 bytes")
        return ResetStream(*_RESET.unpack(body))
    if t == MsgType.STOP_SENDING:
        if len(body) != _STOP.size:
            raise MalformedError("STOP_SENDING must be 6 bytes")
        return StopSending(*_STOP.unpack(body))
    if t == MsgType.MAX_DATA:
        if len(body) != 8:
            raise MalformedError("MAX_DATA must be 8 bytes")
        return MaxData(_U64.unpack(body)[0])
    if t == MsgType.MAX_MESSAGES:
        if len(body) != 8:
            raise MalformedError("MAX_MESSAGES must be 8 bytes")
        return MaxMessages(_U64.unpack(body)[0])
    if t == MsgType.MAX_STREAM_DATA:
        if len(body) != _MAX_STREAM.size:
            raise MalformedError("MAX_STREAM_DATA must be 12 bytes")
        return MaxStreamData(*_MAX_STREAM.unpack(body))
    if t == MsgType.MSG:
        if len(body) < 8:
            raise TruncatedError("MSG shorter than its 8-byte id")
        return Msg(_U64.unpack_from(body, 0)[0], body[8:])
    if t == MsgType.CHANNEL_MSG:
        if len(body) < _CHANNEL_MSG.size:
            raise TruncatedError("CHANNEL_MSG shorter than its 12-byte id and channel")
        msg_id, channel = _CHANNEL_MSG.unpack_from(body, 0)
        if channel == 0:
            raise MalformedError("CHANNEL_MSG with channel 0 (plain messages use MSG)")
        return Msg(msg_id, body[_CHANNEL_MSG.size :], channel)
    if t == MsgType.CHANNEL_DATAGRAM:
        if len(body) < _U32.size:
            raise TruncatedError("CHANNEL_DATAGRAM shorter than its 4-byte channel")
        (channel,) = _U32.unpack_from(body, 0)
        if channel in (0, CHANNEL_CONTROL):
            raise MalformedError(f"CHANNEL_DATAGRAM on reserved channel {channel:#x}")
        return ChannelDatagram(channel, body[_U32.size :])
    if t == MsgType.RELAY:
        if len(body) < 16 + RELAY_MIN_FRAME:
            raise TruncatedError("RELAY shorter than a destination and a frame header")
        return Relay(body[:16], body[16:])
    if t == MsgType.ROUTE:
        return Route(body)
    if t == MsgType.PATH_CHALLENGE or t == MsgType.PATH_RESPONSE:
        if len(body) != PATH_DATA_LEN:
            raise MalformedError(f"path validation data must be {PATH_DATA_LEN} bytes")
        return PathChallenge(body) if t == MsgType.PATH_CHALLENGE else PathResponse(body)
    if t == MsgType.TRACE:
        if len(body) != _TRACE.size:
            raise MalformedError(f"TRACE must be {_TRACE.size} bytes")
        kind, probe_id, ttl, dst, origin, hop = _TRACE.unpack(body)
        if kind > 1:
            raise MalformedError(f"unknown TRACE kind {kind}")
        return Trace(kind == 1, probe_id, ttl, dst, origin, hop)
    if t == MsgType.OBSERVED:
        host, port, end = _pull_addr(body, 0)
        if end != len(body):
            raise MalformedError("OBSERVED has trailing bytes")
        return Observed(host, port)
    if t == MsgType.CANDIDATES:
        if not body:
            raise TruncatedError("CANDIDATES without a count")
        count = body[0]
        if count > MAX_CANDIDATES:
            raise OversizeError(f"at most {MAX_CANDIDATES} candidate addresses")
        addrs = []
        pos = 1
        for _ in range(count):
            host, port, pos = _pull_addr(body, pos)
            addrs.append((host, port))
        if pos != len(body):
            raise MalformedError("CANDIDATES has trailing bytes")
        return Candidates(tuple(addrs))
    if t == MsgType.PADDING:
        return None
    if t >= 0x80:
        return None  # optional record from a newer version: skip
    raise MalformedError(f"unknown mandatory record type {t}")


def _decode_ack(body: bytes) -> Ack:
    if len(body) < _ACK_HEAD.size:
        raise TruncatedError("ACK header cut short")
    delay, count = _ACK_HEAD.unpack_from(body, 0)
    if not 1 <= count <= MAX_ACK_RANGES:
        raise MalformedError(f"ACK must carry 1 to {MAX_ACK_RANGES} ranges, not {count}")
    if len(body) != _ACK_HEAD.size + count * _ACK_RANGE.size:
        raise MalformedError("ACK length does not match its range count")
    ranges: list[tuple[int, int]] = []
    pos = _ACK_HEAD.size
    floor = U64_MAX + 1
    for _ in range(count):
        first, length = _ACK_RANGE.unpack_from(body, pos)
        pos += _ACK_RANGE.size
        end = first + length
        # Ranges must be non-empty, descending and disjoint, so a hostile ACK cannot make the
        # receiver loop or double count.
        if length == 0 or end >= floor:
            raise MalformedError("ACK ranges must be non-empty, descending and disjoint")
        ranges.append((first, end))
        floor = first
    return Ack(tuple(ranges), delay)


def _pack_addr(host: str, port: int) -> bytes:
    """family (4 or 6) | address (4 or 16 bytes) | port u16."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise MalformedError(f"not an IP address: {host!r}") from exc
    if not 0 <= port <= 0xFFFF:
        raise MalformedError(f"port {port} out of range")
    return bytes([ip.version]) + ip.packed + _U16.pack(port)


def _pull_addr(body: bytes, pos: int) -> tuple[str, int, int]:
    if pos >= len(body):
        raise TruncatedError("address cut short")
    family = body[pos]
    size = {4: 4, 6: 16}.get(family)
    if size is None:
        raise MalformedError(f"unknown address family {family}")
    end = pos + 1 + size + 2
    if end > len(body):
        raise TruncatedError("address cut short")
    raw = body[pos + 1 : pos + 1 + size]
    host = str(ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw))
    (port,) = _U16.unpack_from(body, pos + 1 + size)
    return host, port, end


def push_app(data: bytes) -> bytes:
    """`push_message(AppData(data))` without the record object (the unreliable send path)."""
    if len(data) > MAX_RECORD_BODY:
        raise OversizeError(f"record body of {len(data)} bytes exceeds {MAX_RECORD_BODY}")
    return _REC.pack(_APP, len(data)) + data


def _stream_frame(buf: bytes, start: int, end: int) -> StreamFrame:
    """The STREAM record whose body is buf[start:end] (the data is copied once, here)."""
    if end - start < _STREAM_HEAD.size:
        raise TruncatedError("STREAM header cut short")
    sid, off, flags = _STREAM_HEAD.unpack_from(buf, start)
    if flags & ~_FIN:
        raise MalformedError("unknown STREAM flags")
    data = buf[start + _STREAM_HEAD.size : end]
    if off + len(data) > U64_MAX:
        raise MalformedError("STREAM data beyond 2**64")
    return StreamFrame(sid, off, data, bool(flags & _FIN))


def push_stream_parts(
    stream_id: int, offset: int, data: bytes | memoryview, fin: bool
) -> tuple[bytes, bytes | memoryview]:
    """`push_message(StreamFrame(...))` as (record and stream header, data), for a packet
    builder that joins its parts once instead of copying the data into a record first."""
    if len(data) + _STREAM_HEAD.size > MAX_RECORD_BODY:
        raise OversizeError(f"STREAM data of {len(data)} bytes exceeds one record")
    head = _REC.pack(_STREAM, _STREAM_HEAD.size + len(data)) + _STREAM_HEAD.pack(
        stream_id, offset, _FIN if fin else 0
    )
    return head, data


def pull_single_app(buf: bytes) -> bytes | None:
    """The data of a plaintext that is exactly one APP record, else None (then use
    `pull_messages`): the shape of nearly every unreliable datagram, decoded without objects."""
    if len(buf) >= 3 and buf[0] == _APP and (buf[1] << 8 | buf[2]) == len(buf) - 3:
        return buf[3:]
    return None


def pull_single_stream(buf: bytes) -> tuple[int, int, bytes | memoryview, bool] | None:
    """(stream id, offset, data, fin) of a plaintext that is exactly one well-formed STREAM
    record, else None (then use `pull_messages`, which also names what is wrong): the shape of
    nearly every packet of a bulk transfer, decoded without objects. Data over `_VIEW_ABOVE`
    bytes is a view of `buf` rather than a copy."""
    n = len(buf)
    if n < _REC.size + _STREAM_HEAD.size or buf[0] != _STREAM or (buf[1] << 8 | buf[2]) != n - 3:
        return None
    sid, off, flags = _STREAM_HEAD.unpack_from(buf, _REC.size)
    start = _REC.size + _STREAM_HEAD.size
    data = buf[start:] if n <= _VIEW_ABOVE else memoryview(buf)[start:]
    if flags & ~_FIN or off + len(data) > U64_MAX:
        return None
    return sid, off, data, flags == _FIN


# A stream frame's data is sliced (copied) up to this size and viewed above it: a view costs
# more to make than a small copy saves; a 64 KB frame's copy is a tenth of its handling.
_VIEW_ABOVE = 4096


def pull_messages(buf: bytes) -> list[Message]:
    """Decode every record in a plaintext. Raises a `DecodeError` subclass on any fault."""
    out: list[Message] = []
    pos = 0
    n = len(buf)
    while pos < n:
        if n - pos < _REC.size:
            raise TruncatedError("record header cut short")
        t, ln = _REC.unpack_from(buf, pos)
        pos += _REC.size
        if ln > n - pos:
            raise TruncatedError(f"record announces {ln} bytes, {n - pos} remain")
        # STREAM, the bulk of a transfer, is decoded straight from the plaintext (one copy of
        # its data instead of two).
        m = (
            _stream_frame(buf, pos, pos + ln)
            if t == _STREAM
            else _decode_one(t, buf[pos : pos + ln])
        )
        pos += ln
        if m is not None:
            out.append(m)
    return out


# --- Handshake frame bodies -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitBody:
    """HANDSHAKE_INIT body: pattern, a cookie (all zero when none), then the Noise message."""

    pattern: HandshakePattern
    cookie: bytes
    noise: bytes


def push_init_body(b: InitBody) -> bytes:
    """Encode a HANDSHAKE_INIT body."""
    if len(b.cookie) != COOKIE_LEN:
        raise MalformedError("cookie must be 16 bytes")
    return bytes([b.pattern]) + b.cookie + b.noise


def pull_init_body(buf: bytes) -> InitBody:
    """Decode a HANDSHAKE_INIT body (Noise message length is checked by the handshake itself)."""
    if len(buf) < 1 + COOKIE_LEN + 32:
        raise TruncatedError("HANDSHAKE_INIT body too short")
    try:
        pattern = HandshakePattern(buf[0])
    except ValueError as exc:
        raise MalformedError(f"unknown handshake pattern {buf[0]}") from exc
    return InitBody(pattern, bytes(buf[1 : 1 + COOKIE_LEN]), bytes(buf[1 + COOKIE_LEN :]))


@dataclass(frozen=True, slots=True)
class CookieReply:
    """COOKIE_REPLY body: the cookie to retry with, and an echo that ties it to one initiation."""

    cookie: bytes
    echo: bytes


def push_cookie_reply(c: CookieReply) -> bytes:
    """Encode a COOKIE_REPLY body."""
    if len(c.cookie) != COOKIE_LEN or len(c.echo) != ECHO_LEN:
        raise MalformedError("cookie and echo must be 16 bytes each")
    return c.cookie + c.echo


def pull_cookie_reply(buf: bytes) -> CookieReply:
    """Decode a COOKIE_REPLY body (exactly 32 bytes)."""
    if len(buf) < COOKIE_LEN + ECHO_LEN:
        raise TruncatedError("COOKIE_REPLY body too short")
    if len(buf) > COOKIE_LEN + ECHO_LEN:
        raise OversizeError("COOKIE_REPLY body too long")
    return CookieReply(bytes(buf[:COOKIE_LEN]), bytes(buf[COOKIE_LEN:]))


# --- Handshake payloads (inside Noise messages) -------------------------------------------------

HANDSHAKE_PAYLOAD_VERSION = 1
_HS_FIXED = struct.Struct("!BQB")
ED25519_PUB_LEN = 32
BINDING_SIG_LEN = 64
MAX_HANDSHAKE_EXT = 512


EXT_TIMESTAMP = 0x01
"""Extension: u64 BE nanoseconds, strictly increasing per initiator (IK message 1 carries it so
that a responder can refuse a replayed message 1; docs/wire.md 4.2)."""
EXT_MEMBERSHIP = 0x02
"""Extension: the sender's membership certificate (docs/wire.md 10.5), sent with its identity
when it holds one; a node whose mesh trusts authorities admits sessions only with a valid one."""
_EXT_HEAD = struct.Struct("!BB")


def push_extensions(items: Sequence[tuple[int, bytes]]) -> bytes:
    """Encode handshake extensions: each one type (u8), length (u8), value."""
    out = bytearray()
    for kind, value in items:
        if not 0 <= kind <= 255 or len(value) > 255:
            raise MalformedError("an extension has a u8 type and at most 255 bytes of value")
        out += _EXT_HEAD.pack(kind, len(value)) + value
    if len(out) > MAX_HANDSHAKE_EXT:
        raise OversizeError("handshake extensions too large")
    return bytes(out)


def pull_extensions(ext: bytes) -> dict[int, bytes]:
    """Decode handshake extensions into {type: value}; a type seen twice, or an extension cut
    short, is `MalformedError` (unknown types are returned and ignored by their reader)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(ext):
        if len(ext) - pos < _EXT_HEAD.size:
            raise MalformedError("handshake extension header cut short")
        kind, n = _EXT_HEAD.unpack_from(ext, pos)
        pos += _EXT_HEAD.size
        if len(ext) - pos < n:
            raise MalformedError("handshake extension value cut short")
        if kind in out:
            raise MalformedError(f"handshake extension {kind} repeated")
        out[kind] = bytes(ext[pos : pos + n])
        pos += n
    return out


def push_timestamp_ext(ns: int) -> bytes:
    """The extensions of an IK message 1: its timestamp."""
    if not 0 <= ns < 2**64:
        raise MalformedError("timestamp out of range")
    return push_extensions([(EXT_TIMESTAMP, ns.to_bytes(8, "big"))])


def pull_timestamp_ext(ext: bytes) -> int | None:
    """The timestamp among `ext`'s extensions (None if it has none)."""
    value = pull_extensions(ext).get(EXT_TIMESTAMP)
    if value is None:
        return None
    if len(value) != 8:
        raise MalformedError("a timestamp extension is 8 bytes")
    return int.from_bytes(value, "big")


@dataclass(frozen=True, slots=True)
class HandshakePayload:
    """What a side says inside its Noise handshake message.

    `sender_index` is the session id the peer must put in the header of frames it sends us.
    `identity` is our Ed25519 public key and `binding` its signature over our Noise static key
    (absent in XX message 1, which travels before any key is agreed). `ext` is reserved for
    optional extensions (names, capabilities) and bounded.
    """

    sender_index: int
    identity: bytes | None = None
    binding: bytes | None = None
    ext: bytes = b""


def push_handshake_payload(p: HandshakePayload) -> bytes:
    """Encode a handshake payload."""
    has_id = p.identity is not None
    if has_id != (p.binding is not None):
        raise MalformedError("identity and binding go together")
    out = _HS_FIXED.pack(HANDSHAKE_PAYLOAD_VERSION, p.sender_index, 1 if has_id else 0)
    if p.identity is not None and p.binding is not None:
        if len(p.identity) != ED25519_PUB_LEN or len(p.binding) != BINDING_SIG_LEN:
            raise MalformedError("identity must be 32 bytes and binding 64 bytes")
        out += p.identity + p.binding
    if len(p.ext) > MAX_HANDSHAKE_EXT:
        raise OversizeError("handshake extension too large")
    return out + _U16.pack(len(p.ext)) + p.ext


def pull_handshake_payload(buf: bytes) -> HandshakePayload:
    """Decode a handshake payload; a `DecodeError` subclass on any fault."""
    if len(buf) < _HS_FIXED.size + 2:
        raise TruncatedError("handshake payload too short")
    ver, idx, has_id = _HS_FIXED.unpack_from(buf, 0)
    if ver != HANDSHAKE_PAYLOAD_VERSION:
        raise VersionError(f"handshake payload version {ver} not supported")
    pos = _HS_FIXED.size
    identity = binding = None
    if has_id == 1:
        if len(buf) < pos + ED25519_PUB_LEN + BINDING_SIG_LEN + 2:
            raise TruncatedError("handshake identity cut short")
        identity = bytes(buf[pos : pos + ED25519_PUB_LEN])
        pos += ED25519_PUB_LEN
        binding = bytes(buf[pos : pos + BINDING_SIG_LEN])
        pos += BINDING_SIG_LEN
    elif has_id != 0:
        raise MalformedError("identity flag must be 0 or 1")
    (ext_len,) = _U16.unpack_from(buf, pos)
    pos += 2
    if ext_len > MAX_HANDSHAKE_EXT:
        raise OversizeError("handshake extension too large")
    if len(buf) - pos != ext_len:
        raise MalformedError("handshake payload length mismatch")
    return HandshakePayload(idx, identity, binding, bytes(buf[pos:]))
