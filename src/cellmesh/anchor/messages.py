"""Anchor messages: PULSE, EPOCH and REQ_EPOCH, bytes <-> typed records.

Theory of operation
-------------------
Every message is a fixed-size record, all integers big-endian, beginning with the same 28-byte
prefix and ending with a 64-byte Ed25519 signature by the sender over
``SIGNING_CONTEXT || every byte before the signature``. The context string is never sent; it puts
anchor signatures in their own domain, so no other cellmesh signature can be replayed as one.

```
prefix (28 bytes), every type
  0   u8    magic 0xCA ("cellmesh anchor"; never a cellmesh frame, whose byte 0 is version 1)
  1   u8    version (1)
  2   u8    type: 1 PULSE, 2 EPOCH, 3 REQ_EPOCH
  3   u8    flags (none defined in v1: must be 0)
  4   16    sender CellID
  20  u64   timestamp_ms: the sender's wall clock, Unix milliseconds
PULSE (132 bytes), broadcast by an anchor every pulse interval
  28  u64   term: the epoch number that opened the sender's tenure as anchor
  36  u64   epoch: the epoch whose key MACs this pulse
  44  u64   seq: strictly increasing per sender (starts at wall-clock ms << 8)
  52  16    mac: keyed BLAKE3 of bytes 0..52 under the epoch key's pulse subkey
  68  64    signature
EPOCH (228 bytes), unicast from an anchor to one member
  28  u64   term
  36  u64   epoch
  44  u64   issued_ms: when the anchor created this epoch's key (its wall clock)
  52  16    recipient CellID
  68  16    nonce: the REQ_EPOCH nonce this answers; all zero for an unrequested delivery
  84  80    sealed key: libsodium sealed box of the 32-byte epoch key to the recipient's X25519 key
  164 64    signature
REQ_EPOCH (124 bytes), from a member to an anchor (or broadcast)
  28  16    target anchor CellID (all zero: whichever anchor hears it)
  44  16    nonce: random, echoed by the answer
  60  64    signature
```

`decode_message` checks structure only (lengths, magic, version, type, flags, zero CellIDs,
term <= epoch) and raises a `DecodeError` subclass for anything else; it never raises anything
but a `DecodeError` for any input. Authentication (MAC, signature, sealed box) is the core's job,
done cheapest first. The layout is repeated, with the reasoning, in docs/anchor.md.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from cellmesh.anchor.keys import MAC_LEN, SEALED_KEY_LEN, compute_mac
from cellmesh.errors import MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.identity.cellid import CELL_ID_LEN, CellId
from cellmesh.identity.keys import SIGNATURE_LEN, Identity

__all__ = [
    "GRANT_LEN",
    "MAGIC",
    "NONCE_LEN",
    "PULSE_LEN",
    "PULSE_MAC_OFFSET",
    "REQUEST_LEN",
    "SIGNING_CONTEXT",
    "VERSION",
    "AnchorMessage",
    "AnchorMsgType",
    "EpochGrant",
    "EpochRequest",
    "Pulse",
    "decode_message",
    "encode_message",
    "is_anchor_message",
    "make_grant",
    "make_pulse",
    "make_request",
    "message_length",
    "signed_bytes",
]

MAGIC = 0xCA
VERSION = 1
NONCE_LEN = 16
SIGNING_CONTEXT = b"cellmesh/v1 anchor\x00"
"""Domain-separation prefix of every anchor signature (never sent)."""
U64_MAX = 2**64 - 1
_ZERO_CELL = bytes(CELL_ID_LEN)
_ZERO_NONCE = bytes(NONCE_LEN)


class AnchorMsgType(IntEnum):
    """Byte 2 of every anchor message."""

    PULSE = 1
    EPOCH = 2
    REQ_EPOCH = 3


@dataclass(frozen=True, slots=True)
class Pulse:
    """An anchor's proof of life, MACed under the epoch key and signed."""

    sender: CellId
    timestamp_ms: int
    term: int
    epoch: int
    seq: int
    mac: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class EpochGrant:
    """An EPOCH message: one epoch key, sealed to one member, signed by the anchor.

    `nonce` echoes the REQ_EPOCH it answers, or is all zero for an unrequested delivery.
    """

    sender: CellId
    timestamp_ms: int
    term: int
    epoch: int
    issued_ms: int
    recipient: CellId
    nonce: bytes
    sealed_key: bytes
    signature: bytes

    @property
    def requested(self) -> bool:
        """True when this grant answers a REQ_EPOCH."""
        return self.nonce != _ZERO_NONCE


@dataclass(frozen=True, slots=True)
class EpochRequest:
    """A REQ_EPOCH: a member asks an anchor (or any, when `target` is all zero) for the key."""

    sender: CellId
    timestamp_ms: int
    target: CellId
    nonce: bytes
    signature: bytes

    @property
    def broadcast(self) -> bool:
        """True when any anchor may answer."""
        return self.target == _ZERO_CELL


AnchorMessage = Pulse | EpochGrant | EpochRequest

_PREFIX = struct.Struct("!BBBB16sQ")
_PULSE = struct.Struct(f"!BBBB16sQQQQ{MAC_LEN}s{SIGNATURE_LEN}s")
_GRANT = struct.Struct(f"!BBBB16sQQQQ16s{NONCE_LEN}s{SEALED_KEY_LEN}s{SIGNATURE_LEN}s")
_REQUEST = struct.Struct(f"!BBBB16sQ16s{NONCE_LEN}s{SIGNATURE_LEN}s")
PULSE_LEN = _PULSE.size
GRANT_LEN = _GRANT.size
REQUEST_LEN = _REQUEST.size
PULSE_MAC_OFFSET = PULSE_LEN - SIGNATURE_LEN - MAC_LEN
"""Bytes of a PULSE covered by its MAC (everything before the MAC)."""
_LENGTHS: dict[int, int] = {
    AnchorMsgType.PULSE: PULSE_LEN,
    AnchorMsgType.EPOCH: GRANT_LEN,
    AnchorMsgType.REQ_EPOCH: REQUEST_LEN,
}
assert (PULSE_LEN, GRANT_LEN, REQUEST_LEN) == (132, 228, 124)


def message_length(kind: AnchorMsgType) -> int:
    """The exact length in bytes of a message of type `kind`."""
    return _LENGTHS[int(kind)]


def signed_bytes(data: bytes) -> bytes:
    """The exact bytes an anchor signature covers: context || message minus its signature."""
    return SIGNING_CONTEXT + bytes(data[: len(data) - SIGNATURE_LEN])


def _check_u64(**values: int) -> None:
    for name, v in values.items():
        if not 0 <= v <= U64_MAX:
            raise ValueError(f"{name} must fit in 64 bits, got {v}")


def _check_len(name: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise ValueError(f"{name} must be {n} bytes, got {len(value)}")


# ----------------------------------------------------------------------------- encode


def encode_message(m: AnchorMessage) -> bytes:
    """Encode a record to its wire bytes (signature and MAC included as they are).

    Raises `ValueError` for a field out of range; encoding never signs (see `make_*`).
    """
    _check_len("sender", m.sender, CELL_ID_LEN)
    _check_len("signature", m.signature, SIGNATURE_LEN)
    if isinstance(m, Pulse):
        _check_u64(timestamp_ms=m.timestamp_ms, term=m.term, epoch=m.epoch, seq=m.seq)
        _check_len("mac", m.mac, MAC_LEN)
        return _PULSE.pack(
            MAGIC,
            VERSION,
            AnchorMsgType.PULSE,
            0,
            m.sender,
            m.timestamp_ms,
            m.term,
            m.epoch,
            m.seq,
            m.mac,
            m.signature,
        )
    if isinstance(m, EpochGrant):
        _check_u64(timestamp_ms=m.timestamp_ms, term=m.term, epoch=m.epoch, issued=m.issued_ms)
        _check_len("recipient", m.recipient, CELL_ID_LEN)
        _check_len("nonce", m.nonce, NONCE_LEN)
        _check_len("sealed_key", m.sealed_key, SEALED_KEY_LEN)
        return _GRANT.pack(
            MAGIC,
            VERSION,
            AnchorMsgType.EPOCH,
            0,
            m.sender,
            m.timestamp_ms,
            m.term,
            m.epoch,
            m.issued_ms,
            m.recipient,
            m.nonce,
            m.sealed_key,
            m.signature,
        )
    _check_u64(timestamp_ms=m.timestamp_ms)
    _check_len("target", m.target, CELL_ID_LEN)
    _check_len("nonce", m.nonce, NONCE_LEN)
    return _REQUEST.pack(
        MAGIC,
        VERSION,
        AnchorMsgType.REQ_EPOCH,
        0,
        m.sender,
        m.timestamp_ms,
        m.target,
        m.nonce,
        m.signature,
    )


def _signed(unsigned: bytes, identity: Identity) -> bytes:
    """Replace the trailing all-zero signature of `unsigned` with the real one."""
    body = unsigned[: len(unsigned) - SIGNATURE_LEN]
    return body + identity.sign(SIGNING_CONTEXT + body)


_NO_SIG = bytes(SIGNATURE_LEN)
_NO_MAC = bytes(MAC_LEN)


def make_pulse(
    identity: Identity, timestamp_ms: int, term: int, epoch: int, seq: int, pulse_subkey: bytes
) -> bytes:
    """A complete PULSE: MACed under `pulse_subkey` (the epoch key's pulse subkey), then signed
    (the signature covers the MAC)."""
    draft = encode_message(
        Pulse(identity.cell_id, timestamp_ms, term, epoch, seq, _NO_MAC, _NO_SIG)
    )
    covered = draft[:PULSE_MAC_OFFSET]
    mac = compute_mac(pulse_subkey, covered)
    return _signed(covered + mac + _NO_SIG, identity)


def make_grant(
    identity: Identity,
    timestamp_ms: int,
    term: int,
    epoch: int,
    issued_ms: int,
    recipient: CellId,
    nonce: bytes,
    sealed_key: bytes,
) -> bytes:
    """A complete, signed EPOCH message carrying `sealed_key` to `recipient`."""
    grant = EpochGrant(
        identity.cell_id,
        timestamp_ms,
        term,
        epoch,
        issued_ms,
        recipient,
        nonce,
        sealed_key,
        _NO_SIG,
    )
    return _signed(encode_message(grant), identity)


def make_request(identity: Identity, timestamp_ms: int, target: CellId, nonce: bytes) -> bytes:
    """A complete, signed REQ_EPOCH to `target` (all zero: any anchor)."""
    req = EpochRequest(identity.cell_id, timestamp_ms, target, nonce, _NO_SIG)
    return _signed(encode_message(req), identity)


# ----------------------------------------------------------------------------- decode


def _check_prefix(buf: bytes) -> int:
    n = len(buf)
    if n < _PREFIX.size:
        raise TruncatedError(f"anchor message of {n} bytes is shorter than its 28-byte prefix")
    kind: int
    magic, version, kind, flags, sender, _ts = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise MalformedError(f"not an anchor message (byte 0 is 0x{magic:02x})")
    if version != VERSION:
        raise VersionError(f"anchor message version {version} is not supported")
    want = _LENGTHS.get(kind)
    if want is None:
        raise MalformedError(f"unknown anchor message type {kind}")
    if flags:
        raise MalformedError(f"unknown anchor flag bits 0x{flags:02x}")
    if sender == _ZERO_CELL:
        raise MalformedError("the sender CellID is all zero")
    if n < want:
        raise TruncatedError(f"{AnchorMsgType(kind).name} needs {want} bytes, got {n}")
    if n > want:
        raise OversizeError(f"{n - want} bytes of trailing junk after {AnchorMsgType(kind).name}")
    return kind


def _pull_pulse(buf: bytes) -> Pulse:
    _m, _v, _k, _f, sender, ts, term, epoch, seq, mac, sig = _PULSE.unpack(buf)
    if term > epoch or term == 0:
        raise MalformedError("a pulse's term must be between 1 and its epoch")
    return Pulse(CellId(sender), ts, term, epoch, seq, mac, sig)


def _pull_grant(buf: bytes) -> EpochGrant:
    fields = _GRANT.unpack(buf)
    _m, _v, _k, _f, sender, ts, term, epoch, issued, recipient, nonce, sealed, sig = fields
    if term > epoch or term == 0:
        raise MalformedError("an EPOCH's term must be between 1 and its epoch")
    if recipient == _ZERO_CELL:
        raise MalformedError("an EPOCH's recipient CellID is all zero")
    return EpochGrant(
        CellId(sender), ts, term, epoch, issued, CellId(recipient), nonce, sealed, sig
    )


def _pull_request(buf: bytes) -> EpochRequest:
    _m, _v, _k, _f, sender, ts, target, nonce, sig = _REQUEST.unpack(buf)
    return EpochRequest(CellId(sender), ts, CellId(target), nonce, sig)


_DECODERS: dict[int, Callable[[bytes], AnchorMessage]] = {
    AnchorMsgType.PULSE: _pull_pulse,
    AnchorMsgType.EPOCH: _pull_grant,
    AnchorMsgType.REQ_EPOCH: _pull_request,
}


def decode_message(data: bytes | bytearray | memoryview) -> AnchorMessage:
    """Decode one anchor message. Raises a `DecodeError` subclass for anything that is not a
    structurally valid v1 message of exactly the right length, and nothing else."""
    buf = bytes(data)
    kind = _check_prefix(buf)
    return _DECODERS[kind](buf)


def is_anchor_message(data: bytes | bytearray | memoryview) -> bool:
    """Cheap demultiplexing test for a driver: does `data` start like an anchor message?"""
    return len(data) >= 2 and data[0] == MAGIC and data[1] == VERSION
