"""Unit tests for `cellmesh.wire.header`: the 64-byte v1 frame header."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cellmesh.errors import MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.identity.keys import Identity
from cellmesh.transport.handshake import InitiatorHandshake
from cellmesh.wire.header import (
    CELL_LEN,
    DEFAULT_HOP_TTL,
    HEADER_LEN,
    MAX_PAYLOAD,
    U64_MAX,
    WIRE_VERSION,
    ZERO_CELL,
    FrameHeader,
    FrameType,
    associated_data,
    pack_header,
    peek_type_and_dst,
    pull_header,
    push_header,
)
from cellmesh.wire.messages import InitBody, push_init_body

SRC = bytes(range(0x01, 0x11))
DST = bytes(range(0x21, 0x31))


def _header(ftype: FrameType = FrameType.DATA, payload_len: int = 0, **kw: int) -> FrameHeader:
    return FrameHeader(
        ftype,
        SRC,
        DST,
        session_id=kw.get("session_id", 0x1122334455667788),
        packet_number=kw.get("packet_number", 0x99AABBCCDDEEFF01),
        payload_len=payload_len,
        hop_ttl=kw.get("hop_ttl", 7),
        flags=kw.get("flags", 0),
        channel=kw.get("channel", 0xCAFEBABE),
    )


def _frame(h: FrameHeader) -> bytearray:
    """A complete, valid datagram for `h` (header plus a payload of the announced length)."""
    return bytearray(push_header(h) + b"\xab" * h.payload_len)


def test_constants() -> None:
    assert HEADER_LEN == 64
    assert CELL_LEN == 16
    assert bytes(16) == ZERO_CELL
    assert WIRE_VERSION == 1
    assert DEFAULT_HOP_TTL == 16
    assert MAX_PAYLOAD == 65507 - 64


@pytest.mark.parametrize("ftype", list(FrameType))
@pytest.mark.parametrize("payload_len", [0, 1, 48, 1000])
def test_round_trip_every_frame_type(ftype: FrameType, payload_len: int) -> None:
    h = _header(ftype, payload_len)
    raw = push_header(h)
    assert len(raw) == HEADER_LEN
    got = pull_header(raw + b"\x5a" * payload_len)
    assert got == h
    assert got.type is ftype
    assert type(got.src) is bytes
    assert type(got.dst) is bytes


def test_frame_types_are_the_documented_values() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HANDSHAKE_INIT": 1,
        "HANDSHAKE_RESP": 2,
        "HANDSHAKE_FINISH": 3,
        "COOKIE_REPLY": 4,
        "DATA": 5,
        "BEACON": 6,
        "SOLICIT": 7,
    }


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_pull_accepts_any_buffer(kind: type) -> None:
    h = _header(FrameType.HANDSHAKE_RESP, 3)
    frame = push_header(h) + b"abc"
    assert pull_header(kind(frame)) == h


def test_round_trip_extreme_values() -> None:
    lo = FrameHeader(FrameType.HANDSHAKE_INIT, ZERO_CELL, ZERO_CELL, 0, 0, 0, 0, 0, 0)
    hi = FrameHeader(
        FrameType.DATA, b"\xff" * 16, b"\xff" * 16, U64_MAX, U64_MAX, 0, 255, 0, 2**32 - 1
    )
    for h in (lo, hi):
        assert pull_header(push_header(h)) == h


def test_defaults() -> None:
    h = FrameHeader(FrameType.DATA, SRC, DST)
    assert (h.session_id, h.packet_number, h.payload_len) == (0, 0, 0)
    assert (h.hop_ttl, h.flags, h.channel) == (DEFAULT_HOP_TTL, 0, 0)
    assert push_header(h)[3] == DEFAULT_HOP_TTL


@pytest.mark.parametrize("ftype", list(FrameType))
def test_pack_header_matches_push_header(ftype: FrameType) -> None:
    h = _header(ftype, 1234)
    assert pack_header(
        ftype, SRC, DST, h.session_id, h.packet_number, h.payload_len, h.hop_ttl, h.channel
    ) == push_header(h)


def test_pack_header_defaults_match_push_header_defaults() -> None:
    assert pack_header(FrameType.HANDSHAKE_INIT, SRC, ZERO_CELL, 0, 0, 61) == push_header(
        FrameHeader(FrameType.HANDSHAKE_INIT, SRC, ZERO_CELL, payload_len=61)
    )


# --- exact layout ------------------------------------------------------------------------------


def test_exact_byte_offsets() -> None:
    h = FrameHeader(
        FrameType.COOKIE_REPLY,
        SRC,
        DST,
        session_id=0x1122334455667788,
        packet_number=0x99AABBCCDDEEFF01,
        payload_len=0x1234,
        hop_ttl=0x7E,
        flags=0xA5,  # push_header does not validate flags, which lets us see where they go
        channel=0xCAFEBABE,
    )
    raw = push_header(h)
    assert len(raw) == 64
    assert raw[0] == WIRE_VERSION
    assert raw[1] == 4  # FrameType.COOKIE_REPLY
    assert raw[2] == 0xA5
    assert raw[3] == 0x7E
    assert raw[4:6] == b"\x12\x34"  # payload_len, big-endian
    assert raw[6:8] == b"\x00\x00"  # frag, reserved
    assert raw[8:24] == SRC
    assert raw[24:40] == DST
    assert raw[40:48] == bytes.fromhex("1122334455667788")
    assert raw[48:56] == bytes.fromhex("99aabbccddeeff01")
    assert raw[56:60] == bytes.fromhex("cafebabe")
    assert raw[60:64] == b"\x00\x00\x00\x00"  # reserved
    assert raw == (
        bytes([1, 4, 0xA5, 0x7E, 0x12, 0x34, 0, 0])
        + SRC
        + DST
        + (0x1122334455667788).to_bytes(8, "big")
        + (0x99AABBCCDDEEFF01).to_bytes(8, "big")
        + (0xCAFEBABE).to_bytes(4, "big")
        + bytes(4)
    )


def test_peek_type_and_dst() -> None:
    raw = push_header(_header(FrameType.HANDSHAKE_FINISH, 0))
    assert peek_type_and_dst(raw) == (3, DST)
    assert peek_type_and_dst(raw[:63]) is None
    assert peek_type_and_dst(memoryview(raw + b"xyz")) == (3, DST)


# --- decode errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 8, 40, 63])
def test_shorter_than_header_is_truncated(n: int) -> None:
    with pytest.raises(TruncatedError):
        pull_header(push_header(_header())[:n])


def test_short_check_comes_first() -> None:
    # 63 bytes of garbage (bad version, type, reserved...) is reported as truncated.
    with pytest.raises(TruncatedError):
        pull_header(b"\xff" * 63)


@pytest.mark.parametrize("version", [0, 2, 0x81, 255])
def test_wrong_version(version: int) -> None:
    frame = _frame(_header())
    frame[0] = version
    with pytest.raises(VersionError):
        pull_header(frame)


def test_version_is_checked_before_the_rest() -> None:
    frame = bytearray(b"\xff" * 64)
    frame[0] = 2
    with pytest.raises(VersionError):
        pull_header(frame)


@pytest.mark.parametrize("ftype", [0, 8, 9, 0x80, 255])
def test_unknown_frame_type(ftype: int) -> None:
    frame = _frame(_header())
    frame[1] = ftype
    with pytest.raises(MalformedError, match="frame type"):
        pull_header(frame)


@pytest.mark.parametrize("flags", [1 << i for i in range(8)] + [0xFF])
def test_unknown_flags(flags: int) -> None:
    frame = _frame(_header())
    frame[2] = flags
    with pytest.raises(MalformedError, match="flag"):
        pull_header(frame)


@pytest.mark.parametrize("offset", [6, 7, 60, 61, 62, 63])
def test_nonzero_reserved_fields(offset: int) -> None:
    frame = _frame(_header(payload_len=5))
    frame[offset] = 0x01
    with pytest.raises(MalformedError, match="reserved"):
        pull_header(frame)


@pytest.mark.parametrize(("announced", "present"), [(1, 0), (10, 9), (1000, 0), (0xFFFF, 100)])
def test_payload_len_larger_than_body(announced: int, present: int) -> None:
    frame = push_header(_header(payload_len=announced)) + b"\x00" * present
    with pytest.raises(TruncatedError):
        pull_header(frame)


@pytest.mark.parametrize(("announced", "present"), [(0, 1), (9, 10), (0, 1000)])
def test_trailing_junk(announced: int, present: int) -> None:
    frame = push_header(_header(payload_len=announced)) + b"\x00" * present
    with pytest.raises(OversizeError):
        pull_header(frame)


def test_fields_not_checked_on_decode() -> None:
    # Any TTL, channel, session id and packet number is structurally valid.
    for h in (_header(hop_ttl=0), _header(hop_ttl=255, channel=0, session_id=0, packet_number=0)):
        assert pull_header(push_header(h)) == h


# --- associated data ---------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, 1, DEFAULT_HOP_TTL, 255])
def test_associated_data_zeroes_only_the_ttl(ttl: int) -> None:
    raw = push_header(_header(hop_ttl=ttl, payload_len=4))
    ad = associated_data(raw)
    assert type(ad) is bytes
    assert len(ad) == HEADER_LEN
    assert ad[3] == 0
    assert ad[:3] == raw[:3]
    assert ad[4:] == raw[4:]
    assert ad == push_header(dataclasses.replace(_header(payload_len=4), hop_ttl=0))


def test_associated_data_is_independent_of_ttl_and_uses_only_the_header() -> None:
    h = _header(FrameType.DATA, 3)
    frames = [push_header(dataclasses.replace(h, hop_ttl=t)) + b"xyz" for t in (0, 1, 16, 255)]
    ads = {associated_data(f) for f in frames}
    assert len(ads) == 1
    assert associated_data(memoryview(frames[0])) == ads.pop()


@pytest.mark.parametrize("offset", [i for i in range(HEADER_LEN) if i != 3])
def test_associated_data_covers_every_other_byte(offset: int) -> None:
    raw = bytearray(push_header(_header()))
    before = associated_data(raw)
    raw[offset] ^= 0x01
    assert associated_data(raw) != before


def test_associated_data_does_not_mutate_input() -> None:
    raw = bytearray(push_header(_header(hop_ttl=9)))
    associated_data(raw)
    assert raw[3] == 9


# --- docs/wire.md ------------------------------------------------------------------------------

WIRE_MD = Path(__file__).resolve().parents[3] / "docs" / "wire.md"


def test_worked_example_in_docs_matches_the_code() -> None:
    """docs/wire.md section 7 pastes this frame; keep the two in step."""
    alice = Identity.from_secret(bytes(range(64)))
    eph = X25519PrivateKey.from_private_bytes(b"\x42" * 32)
    hs = InitiatorHandshake(alice, sender_index=0x0102030405060708, ephemeral=eph)
    body = push_init_body(InitBody(hs.pattern, bytes(16), hs.first_message()))
    frame = pack_header(FrameType.HANDSHAKE_INIT, alice.cell_id, ZERO_CELL, 0, 0, len(body)) + body
    assert len(frame) == 125
    h = pull_header(frame)
    assert (h.type, h.src, h.dst, h.payload_len) == (
        FrameType.HANDSHAKE_INIT,
        alice.cell_id,
        ZERO_CELL,
        61,
    )

    text = WIRE_MD.read_text(encoding="utf-8")
    dump = text.split("Output (125 bytes):", 1)[1].split("```", 2)[1]
    lines = re.findall(r"^([0-9a-f]{4})  ((?:[0-9a-f]{2} ?)+)$", dump, flags=re.MULTILINE)
    assert [int(off, 16) for off, _ in lines] == list(range(0, 125, 16))
    assert bytes.fromhex("".join(hexbytes for _, hexbytes in lines)) == frame
