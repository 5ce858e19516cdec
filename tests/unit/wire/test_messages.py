"""Unit tests for `cellmesh.wire.messages`: DATA records, handshake bodies and payloads."""

from __future__ import annotations

import struct

import pytest

from cellmesh.errors import MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.wire.messages import (
    BINDING_SIG_LEN,
    COOKIE_LEN,
    ECHO_LEN,
    ED25519_PUB_LEN,
    HANDSHAKE_PAYLOAD_VERSION,
    MAX_HANDSHAKE_EXT,
    MAX_REASON,
    MAX_RECORD_BODY,
    U64_MAX,
    AppData,
    Close,
    CloseCode,
    CookieReply,
    HandshakePattern,
    HandshakePayload,
    InitBody,
    Keepalive,
    Message,
    MsgType,
    Ping,
    Pong,
    pull_cookie_reply,
    pull_handshake_payload,
    pull_init_body,
    pull_messages,
    push_cookie_reply,
    push_handshake_payload,
    push_init_body,
    push_message,
    push_messages,
)

IDENTITY = bytes(range(32))
BINDING = bytes(range(100, 164))


def rec(t: int, body: bytes) -> bytes:
    """A raw record: type u8, length u16 big-endian, body."""
    return struct.pack("!BH", t, len(body)) + body


def test_constants() -> None:
    assert (COOKIE_LEN, ECHO_LEN, MAX_REASON, MAX_RECORD_BODY) == (16, 16, 200, 65535)
    assert (ED25519_PUB_LEN, BINDING_SIG_LEN, MAX_HANDSHAKE_EXT) == (32, 64, 512)
    assert HANDSHAKE_PAYLOAD_VERSION == 1
    assert {t.name: int(t) for t in MsgType} == {
        "PADDING": 0,
        "PING": 1,
        "PONG": 2,
        "CLOSE": 3,
        "KEEPALIVE": 4,
        "APP": 5,
        "ACK": 6,
        "STREAM": 7,
        "RESET_STREAM": 8,
        "MAX_DATA": 9,
        "MAX_STREAM_DATA": 10,
        "MSG": 11,
        "STOP_SENDING": 12,
        "CHANNEL_MSG": 13,
        "CHANNEL_DATAGRAM": 14,
        "RELAY": 15,
        "ROUTE": 16,
        "PATH_CHALLENGE": 17,
        "PATH_RESPONSE": 18,
        "OBSERVED": 19,
        "CANDIDATES": 20,
        "TRACE": 21,
        "MAX_MESSAGES": 22,
    }
    assert [int(p) for p in HandshakePattern] == [1, 2]
    assert [int(c) for c in CloseCode] == [0, 1, 2, 3, 4]


# --- records -----------------------------------------------------------------------------------

ROUND_TRIP: list[Message] = [
    Ping(0),
    Ping(U64_MAX, b"echo me"),
    Pong(1),
    Pong(0x0102030405060708, b"\x00" * 100),
    Close(CloseCode.NORMAL),
    Close(CloseCode.SHUTDOWN, "node shutting down"),
    Close(0xFFFF, "caf\u00e9 \u2713 \U0001f600"),
    Close(CloseCode.IDLE, "x" * MAX_REASON),
    Keepalive(),
    AppData(b""),
    AppData(b"hello"),
    AppData(bytes(range(256)) * 4),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=repr)
def test_record_round_trip(msg: Message) -> None:
    assert pull_messages(push_message(msg)) == [msg]
    assert pull_messages(push_messages([msg])) == [msg]


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        (Ping(1, b"ab"), b"\x01\x00\x0a" + (1).to_bytes(8, "big") + b"ab"),
        (Pong(0x0102030405060708), b"\x02\x00\x08\x01\x02\x03\x04\x05\x06\x07\x08"),
        (Close(CloseCode.REPLACED, "hi"), b"\x03\x00\x04\x00\x04hi"),
        (Close(0x1234), b"\x03\x00\x02\x12\x34"),
        (Keepalive(), b"\x04\x00\x00"),
        (AppData(b"xyz"), b"\x05\x00\x03xyz"),
    ],
    ids=repr,
)
def test_record_exact_encoding(msg: Message, wire: bytes) -> None:
    assert push_message(msg) == wire
    assert pull_messages(wire) == [msg]


def test_multi_record_plaintext() -> None:
    wire = push_messages(ROUND_TRIP)
    assert wire == b"".join(push_message(m) for m in ROUND_TRIP)
    assert pull_messages(wire) == ROUND_TRIP


def test_empty_plaintext_is_no_records() -> None:
    assert push_messages([]) == b""
    assert pull_messages(b"") == []


def test_largest_record_body() -> None:
    msg = AppData(b"\x01" * MAX_RECORD_BODY)
    wire = push_message(msg)
    assert wire[:3] == b"\x05\xff\xff"
    assert pull_messages(wire) == [msg]


@pytest.mark.parametrize(
    "msg",
    [
        AppData(b"\x00" * (MAX_RECORD_BODY + 1)),
        Ping(1, b"\x00" * (MAX_RECORD_BODY - 7)),
        Pong(1, b"\x00" * (MAX_RECORD_BODY - 7)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_oversize_record_body_rejected_on_encode(msg: Message) -> None:
    with pytest.raises(OversizeError):
        push_message(msg)


def test_close_reason_truncated_to_200_bytes_on_encode() -> None:
    wire = push_message(Close(1, "r" * 500))
    assert len(wire) == 3 + 2 + MAX_REASON
    assert pull_messages(wire) == [Close(1, "r" * MAX_REASON)]


def test_close_reason_truncation_keeps_valid_utf8() -> None:
    # The cut at 200 bytes must not split a multi-byte character: receivers reject bad UTF-8.
    reason = "a" + "\u00e9" * 100  # 201 bytes of UTF-8; byte 200 is inside the last character
    decoded = pull_messages(push_message(Close(1, reason)))
    assert decoded == [Close(1, "a" + "\u00e9" * 99)]


@pytest.mark.parametrize("body", [b"", b"\x00" * 5, b"\xff" * 300])
def test_padding_is_skipped(body: bytes) -> None:
    wire = rec(MsgType.PADDING, body) + push_message(Keepalive()) + rec(0, body)
    assert pull_messages(wire) == [Keepalive()]
    assert pull_messages(rec(0, body)) == []


@pytest.mark.parametrize("t", [0x80, 0x81, 0xAB, 0xFF])
def test_unknown_optional_types_are_skipped(t: int) -> None:
    wire = (
        push_message(Ping(7))
        + rec(t, b"future extension")
        + rec(t, b"")
        + push_message(AppData(b"after"))
    )
    assert pull_messages(wire) == [Ping(7), AppData(b"after")]


@pytest.mark.parametrize("t", [0x17, 0x40, 0x7F])
def test_unknown_mandatory_type_is_malformed(t: int) -> None:
    with pytest.raises(MalformedError, match="mandatory"):
        pull_messages(rec(t, b""))
    with pytest.raises(MalformedError):
        pull_messages(push_message(Keepalive()) + rec(t, b"abc"))


@pytest.mark.parametrize("tail", [b"\x05", b"\x05\x00"])
def test_truncated_record_header(tail: bytes) -> None:
    with pytest.raises(TruncatedError, match="record header"):
        pull_messages(tail)
    with pytest.raises(TruncatedError):
        pull_messages(push_message(AppData(b"ok")) + tail)


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_truncated_record_body(cut: int) -> None:
    wire = push_message(AppData(b"12345"))
    with pytest.raises(TruncatedError, match="announces"):
        pull_messages(wire[:-cut])
    with pytest.raises(TruncatedError):
        pull_messages(push_message(Keepalive()) + wire[:-cut])


def test_any_bad_record_rejects_the_whole_plaintext() -> None:
    good = push_messages([Ping(1), AppData(b"x")])
    with pytest.raises(MalformedError):
        pull_messages(good + rec(MsgType.KEEPALIVE, b"!") + good)


@pytest.mark.parametrize("t", [MsgType.PING, MsgType.PONG])
@pytest.mark.parametrize("n", range(8))
def test_ping_pong_shorter_than_8_bytes(t: MsgType, n: int) -> None:
    with pytest.raises(TruncatedError):
        pull_messages(rec(t, b"\x00" * n))


def test_ping_pong_of_exactly_8_bytes() -> None:
    assert pull_messages(rec(MsgType.PING, b"\x00" * 8)) == [Ping(0)]
    assert pull_messages(rec(MsgType.PONG, b"\xff" * 8)) == [Pong(U64_MAX)]


@pytest.mark.parametrize("body", [b"", b"\x00"])
def test_close_shorter_than_code(body: bytes) -> None:
    with pytest.raises(TruncatedError):
        pull_messages(rec(MsgType.CLOSE, body))


def test_close_reason_too_long() -> None:
    assert pull_messages(rec(MsgType.CLOSE, b"\x00\x01" + b"a" * MAX_REASON)) == [
        Close(1, "a" * MAX_REASON)
    ]
    with pytest.raises(OversizeError):
        pull_messages(rec(MsgType.CLOSE, b"\x00\x01" + b"a" * (MAX_REASON + 1)))


@pytest.mark.parametrize("reason", [b"\xff", b"\xc3", b"ok\xed\xa0\x80", b"\xe2\x9c"])
def test_close_reason_not_utf8(reason: bytes) -> None:
    with pytest.raises(MalformedError, match="UTF-8"):
        pull_messages(rec(MsgType.CLOSE, b"\x00\x00" + reason))


@pytest.mark.parametrize("body", [b"\x00", b"abc"])
def test_keepalive_with_body(body: bytes) -> None:
    with pytest.raises(MalformedError, match="KEEPALIVE"):
        pull_messages(rec(MsgType.KEEPALIVE, body))


# --- HANDSHAKE_INIT body -----------------------------------------------------------------------

NOISE_XX1 = bytes(range(32)) + b"\x01" + bytes(11)


@pytest.mark.parametrize("pattern", list(HandshakePattern))
@pytest.mark.parametrize("cookie", [bytes(16), bytes(range(16))])
@pytest.mark.parametrize("noise", [bytes(32), NOISE_XX1, b"\x77" * 204])
def test_init_body_round_trip(pattern: HandshakePattern, cookie: bytes, noise: bytes) -> None:
    b = InitBody(pattern, cookie, noise)
    wire = push_init_body(b)
    assert wire == bytes([pattern]) + cookie + noise
    got = pull_init_body(wire)
    assert got == b
    assert got.pattern is pattern


@pytest.mark.parametrize("n", [0, 15, 17, 32])
def test_init_body_cookie_must_be_16_bytes(n: int) -> None:
    with pytest.raises(MalformedError, match="cookie"):
        push_init_body(InitBody(HandshakePattern.XX, bytes(n), NOISE_XX1))


@pytest.mark.parametrize("n", [0, 1, 17, 48])
def test_init_body_too_short(n: int) -> None:
    wire = push_init_body(InitBody(HandshakePattern.IK, bytes(16), bytes(32)))
    assert len(wire) == 49
    with pytest.raises(TruncatedError):
        pull_init_body(wire[:n])


def test_init_body_length_is_checked_before_pattern() -> None:
    with pytest.raises(TruncatedError):
        pull_init_body(b"\x09" * 48)


@pytest.mark.parametrize("pattern", [0, 3, 0x80, 255])
def test_init_body_unknown_pattern(pattern: int) -> None:
    with pytest.raises(MalformedError, match="pattern"):
        pull_init_body(bytes([pattern]) + bytes(16) + bytes(32))


# --- COOKIE_REPLY body -------------------------------------------------------------------------


def test_cookie_reply_round_trip() -> None:
    c = CookieReply(bytes(range(16)), bytes(range(16, 32)))
    wire = push_cookie_reply(c)
    assert wire == bytes(range(32))
    assert pull_cookie_reply(wire) == c


@pytest.mark.parametrize("n", [0, 16, 31])
def test_cookie_reply_too_short(n: int) -> None:
    with pytest.raises(TruncatedError):
        pull_cookie_reply(bytes(n))


@pytest.mark.parametrize("n", [33, 64])
def test_cookie_reply_too_long(n: int) -> None:
    with pytest.raises(OversizeError):
        pull_cookie_reply(bytes(n))


# --- handshake payload -------------------------------------------------------------------------

PAYLOADS = [
    HandshakePayload(0),
    HandshakePayload(U64_MAX),
    HandshakePayload(0x0102030405060708, ext=b"name=alice"),
    HandshakePayload(5, IDENTITY, BINDING),
    HandshakePayload(6, IDENTITY, BINDING, b"\xee" * MAX_HANDSHAKE_EXT),
]


@pytest.mark.parametrize("p", PAYLOADS, ids=repr)
def test_handshake_payload_round_trip(p: HandshakePayload) -> None:
    assert pull_handshake_payload(push_handshake_payload(p)) == p


def test_handshake_payload_exact_encoding() -> None:
    # version 1 | sender_index u64 BE | has_identity 0 | ext_len 0
    assert push_handshake_payload(HandshakePayload(0x0102030405060708)) == (
        b"\x01" + bytes.fromhex("0102030405060708") + b"\x00" + b"\x00\x00"
    )
    assert (
        push_handshake_payload(HandshakePayload(1, IDENTITY, BINDING, b"xy"))
        == b"\x01" + (1).to_bytes(8, "big") + b"\x01" + IDENTITY + BINDING + b"\x00\x02xy"
    )


@pytest.mark.parametrize(
    ("identity", "binding"), [(IDENTITY, None), (None, BINDING)], ids=["no-binding", "no-identity"]
)
def test_handshake_payload_identity_and_binding_go_together(
    identity: bytes | None, binding: bytes | None
) -> None:
    with pytest.raises(MalformedError):
        push_handshake_payload(HandshakePayload(1, identity, binding))


@pytest.mark.parametrize(
    ("identity", "binding"),
    [(IDENTITY[:31], BINDING), (IDENTITY + b"\x00", BINDING), (IDENTITY, BINDING[:63])],
)
def test_handshake_payload_identity_lengths(identity: bytes, binding: bytes) -> None:
    with pytest.raises(MalformedError):
        push_handshake_payload(HandshakePayload(1, identity, binding))


def test_handshake_payload_ext_too_large_on_encode() -> None:
    with pytest.raises(OversizeError):
        push_handshake_payload(HandshakePayload(1, ext=b"\x00" * (MAX_HANDSHAKE_EXT + 1)))


@pytest.mark.parametrize("n", [0, 1, 10, 11])
def test_handshake_payload_too_short(n: int) -> None:
    with pytest.raises(TruncatedError):
        pull_handshake_payload(push_handshake_payload(HandshakePayload(1))[:n])


@pytest.mark.parametrize("version", [0, 2, 255])
def test_handshake_payload_wrong_version(version: int) -> None:
    wire = bytearray(push_handshake_payload(HandshakePayload(1)))
    wire[0] = version
    with pytest.raises(VersionError):
        pull_handshake_payload(bytes(wire))


@pytest.mark.parametrize("flag", [2, 0x80, 255])
def test_handshake_payload_bad_identity_flag(flag: int) -> None:
    wire = bytearray(push_handshake_payload(HandshakePayload(1)))
    wire[9] = flag
    with pytest.raises(MalformedError, match="0 or 1"):
        pull_handshake_payload(bytes(wire))


@pytest.mark.parametrize("n", [12, 50, 106, 107])
def test_handshake_payload_identity_cut_short(n: int) -> None:
    wire = push_handshake_payload(HandshakePayload(1, IDENTITY, BINDING))
    assert len(wire) == 108
    with pytest.raises(TruncatedError, match="identity"):
        pull_handshake_payload(wire[:n])


def test_handshake_payload_ext_len_over_limit() -> None:
    wire = (
        push_handshake_payload(HandshakePayload(1))[:-2]
        + struct.pack("!H", MAX_HANDSHAKE_EXT + 1)
        + b"\x00" * (MAX_HANDSHAKE_EXT + 1)
    )
    with pytest.raises(OversizeError):
        pull_handshake_payload(wire)


@pytest.mark.parametrize("p", PAYLOADS, ids=repr)
def test_handshake_payload_length_mismatch(p: HandshakePayload) -> None:
    wire = push_handshake_payload(p)
    with pytest.raises(MalformedError, match="mismatch"):
        pull_handshake_payload(wire + b"\x00")
    if p.ext:
        with pytest.raises(MalformedError, match="mismatch"):
            pull_handshake_payload(wire[:-1])
