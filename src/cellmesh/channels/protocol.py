"""The channel control protocol: requests, replies, grant endings, capability adverts, revocations.

Theory of operation: control messages travel as reliable CHANNEL_MSG records on the reserved
control channel (hash 0xFFFFFFFF) of an established session, so they are encrypted,
authenticated, retransmitted and deduplicated by the transport. Each starts with a kind byte;
layouts are in docs/wire.md ("Channel control"). Token chains, capability adverts and
revocations ride as opaque byte strings here; the layers that own them decode and verify them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from cellmesh.errors import MalformedError, OversizeError, TruncatedError


class Kind(IntEnum):
    """Control message kinds (byte 0)."""

    REQUEST = 1
    REPLY = 2
    ENDED = 3
    CAPS = 4
    REVOKE = 5


class Op(IntEnum):
    """What a REQUEST asks for."""

    SUBSCRIBE = 1
    UNSUBSCRIBE = 2
    PUBLISH = 3


MAX_NAME = 255
MAX_CHAIN = 8
MAX_TEXT = 255
MAX_BLOB = 4096

_REQ_HEAD = struct.Struct("!BIBB")  # kind, request id, op, name length
_REPLY_HEAD = struct.Struct("!BIBIQ")  # kind, request id, status, channel hash, expires
_ENDED_HEAD = struct.Struct("!BBIB")  # kind, op, channel hash, name length
_U16 = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Request:
    """Ask the peer for `op` on channel `name`, proving rights with `chain` (encoded tokens)."""

    request_id: int
    op: Op
    name: str
    chain: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to request `request_id`: `reason` is "ok" or why not."""

    request_id: int
    allowed: bool
    channel: int
    expires: int
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Ended:
    """The sender withdrew a grant it had given (or the subscriber left): `op` on `name`."""

    op: Op
    channel: int
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Caps:
    """The sender's signed capability advert (identity.capabilities encoding)."""

    advert: bytes


@dataclass(frozen=True, slots=True)
class Revoke:
    """A token revocation record (identity.tokens encoding), passed on to every peer once."""

    revocation: bytes


Control = Request | Reply | Ended | Caps | Revoke


def _text(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_TEXT:
        raise OversizeError(f"{what} longer than {MAX_TEXT} bytes")
    return bytes([len(raw)]) + raw


def encode_control(m: Control) -> bytes:
    """Encode one control message. Raises a `DecodeError` subclass for values that cannot fit."""
    try:
        return _encode(m)
    except struct.error as exc:  # an integer field out of its range
        raise OversizeError(f"{type(m).__name__}: {exc}") from None
    except UnicodeEncodeError as exc:  # a non-ASCII channel name, or a lone surrogate in text
        raise MalformedError(f"{type(m).__name__}: {exc}") from None


def _encode(m: Control) -> bytes:
    if isinstance(m, Request):
        name = m.name.encode("ascii")
        if not 0 < len(name) <= MAX_NAME:
            raise OversizeError(f"channel name must be 1..{MAX_NAME} bytes")
        if len(m.chain) > MAX_CHAIN:
            raise OversizeError(f"token chain longer than {MAX_CHAIN}")
        parts = [_REQ_HEAD.pack(Kind.REQUEST, m.request_id, m.op, len(name)), name]
        parts.append(bytes([len(m.chain)]))
        for tok in m.chain:
            if len(tok) > MAX_BLOB:
                raise OversizeError("token too long")
            parts += [_U16.pack(len(tok)), tok]
        return b"".join(parts)
    if isinstance(m, Reply):
        head = _REPLY_HEAD.pack(
            Kind.REPLY, m.request_id, 0 if m.allowed else 1, m.channel, m.expires
        )
        return head + _text(m.reason, "reason") + _text(m.detail, "detail")
    if isinstance(m, Ended):
        name = m.name.encode("ascii")
        if not 0 < len(name) <= MAX_NAME:
            raise OversizeError(f"channel name must be 1..{MAX_NAME} bytes")
        return (
            _ENDED_HEAD.pack(Kind.ENDED, m.op, m.channel, len(name))
            + name
            + _text(m.reason, "reason")
        )
    if isinstance(m, Caps):
        if len(m.advert) > MAX_BLOB:
            raise OversizeError("capability advert too long")
        return bytes([Kind.CAPS]) + m.advert
    if len(m.revocation) > MAX_BLOB:
        raise OversizeError("revocation too long")
    return bytes([Kind.REVOKE]) + m.revocation


class _Reader:
    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def take(self, n: int, what: str) -> bytes:
        if len(self.buf) - self.pos < n:
            raise TruncatedError(f"{what} cut short")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self, what: str) -> str:
        n = self.take(1, what)[0]
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedError(f"{what} is not UTF-8") from exc

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise MalformedError(f"{len(self.buf) - self.pos} trailing bytes")


def _op(value: int) -> Op:
    try:
        return Op(value)
    except ValueError:
        raise MalformedError(f"unknown channel op {value}") from None


def _name(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError("channel name is not ASCII") from None


def decode_control(buf: bytes) -> Control:
    """Decode one control message; any fault raises a `DecodeError` subclass."""
    if not buf:
        raise TruncatedError("empty control message")
    kind = buf[0]
    if kind == Kind.REQUEST:
        r = _Reader(buf, 0)
        _, rid, op, name_len = _REQ_HEAD.unpack(r.take(_REQ_HEAD.size, "REQUEST header"))
        if name_len == 0:
            raise MalformedError("empty channel name")
        name = _name(r.take(name_len, "channel name"))
        count = r.take(1, "chain length")[0]
        if count > MAX_CHAIN:
            raise OversizeError(f"token chain of {count}, at most {MAX_CHAIN}")
        chain = []
        for _ in range(count):
            (n,) = _U16.unpack(r.take(2, "token length"))
            if n > MAX_BLOB:
                raise OversizeError("token too long")
            chain.append(r.take(n, "token"))
        r.done()
        return Request(rid, _op(op), name, tuple(chain))
    if kind == Kind.REPLY:
        r = _Reader(buf, 0)
        _, rid, status, channel, expires = _REPLY_HEAD.unpack(r.take(_REPLY_HEAD.size, "REPLY"))
        if status > 1:
            raise MalformedError(f"unknown reply status {status}")
        reason = r.text("reason")
        detail = r.text("detail")
        r.done()
        return Reply(rid, status == 0, channel, expires, reason, detail)
    if kind == Kind.ENDED:
        r = _Reader(buf, 0)
        _, op, channel, name_len = _ENDED_HEAD.unpack(r.take(_ENDED_HEAD.size, "ENDED"))
        if name_len == 0:
            raise MalformedError("empty channel name")
        name = _name(r.take(name_len, "channel name"))
        reason = r.text("reason")
        r.done()
        return Ended(_op(op), channel, name, reason)
    if kind == Kind.CAPS:
        if len(buf) - 1 > MAX_BLOB:
            raise OversizeError("capability advert too long")
        return Caps(buf[1:])
    if kind == Kind.REVOKE:
        if len(buf) - 1 > MAX_BLOB:
            raise OversizeError("revocation too long")
        return Revoke(buf[1:])
    raise MalformedError(f"unknown control kind {kind}")
