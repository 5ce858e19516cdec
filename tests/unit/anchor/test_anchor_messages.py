"""Anchor message codec: layouts byte by byte, round trips, and a decoder that never crashes."""

from __future__ import annotations

import random
import struct

import pytest
from anchor_bus import ident
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.anchor.keys import MAC_LEN, SEALED_KEY_LEN, compute_mac, derive_subkey
from cellmesh.anchor.keys import PULSE_MAC_CONTEXT as PULSE_CTX
from cellmesh.anchor.messages import (
    GRANT_LEN,
    MAGIC,
    PULSE_LEN,
    PULSE_MAC_OFFSET,
    REQUEST_LEN,
    SIGNING_CONTEXT,
    AnchorMsgType,
    EpochGrant,
    EpochRequest,
    Pulse,
    decode_message,
    encode_message,
    is_anchor_message,
    make_grant,
    make_pulse,
    make_request,
    message_length,
    signed_bytes,
)
from cellmesh.errors import (
    DecodeError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import verify_signature

ME = ident(1)
OTHER = ident(2)
SUBKEY = derive_subkey(bytes(range(32)), PULSE_CTX)


def sample_pulse() -> bytes:
    return make_pulse(ME, 1_800_000_000_123, 7, 9, 0x0102030405060708, SUBKEY)


def sample_grant(nonce: bytes = bytes(16)) -> bytes:
    return make_grant(
        ME, 1_800_000_000_456, 7, 9, 1_800_000_000_000, OTHER.cell_id, nonce, b"S" * SEALED_KEY_LEN
    )


def sample_request(target: bytes = bytes(16)) -> bytes:
    return make_request(ME, 1_800_000_000_789, CellId(target), b"N" * 16)


SAMPLES = [sample_pulse(), sample_grant(), sample_request()]


def test_sizes_are_fixed_and_documented() -> None:
    assert (PULSE_LEN, GRANT_LEN, REQUEST_LEN) == (132, 228, 124)
    assert [len(m) for m in SAMPLES] == [132, 228, 124]
    assert message_length(AnchorMsgType.PULSE) == 132
    assert SEALED_KEY_LEN == 80


def test_pulse_layout_byte_by_byte() -> None:
    data = sample_pulse()
    assert data[0] == MAGIC == 0xCA
    assert data[1] == 1  # version
    assert data[2] == AnchorMsgType.PULSE
    assert int(AnchorMsgType.PULSE) == 1
    assert data[3] == 0  # flags
    assert data[4:20] == ME.cell_id
    assert struct.unpack("!Q", data[20:28])[0] == 1_800_000_000_123
    assert struct.unpack("!QQQ", data[28:52]) == (7, 9, 0x0102030405060708)
    assert PULSE_MAC_OFFSET == 52
    assert data[52:68] == compute_mac(SUBKEY, data[:52])
    verify_signature(ME.public_key, SIGNING_CONTEXT + data[:68], data[68:])
    assert signed_bytes(data) == SIGNING_CONTEXT + data[:68]


def test_grant_layout_byte_by_byte() -> None:
    nonce = bytes(range(16))
    data = sample_grant(nonce)
    assert data[:4] == bytes([0xCA, 1, 2, 0])
    assert data[4:20] == ME.cell_id
    assert struct.unpack("!QQQQ", data[20:52]) == (
        1_800_000_000_456,
        7,
        9,
        1_800_000_000_000,
    )
    assert data[52:68] == OTHER.cell_id
    assert data[68:84] == nonce
    assert data[84:164] == b"S" * 80
    verify_signature(ME.public_key, SIGNING_CONTEXT + data[:164], data[164:])


def test_request_layout_byte_by_byte() -> None:
    data = sample_request(OTHER.cell_id)
    assert data[:4] == bytes([0xCA, 1, 3, 0])
    assert data[4:20] == ME.cell_id
    assert struct.unpack("!Q", data[20:28])[0] == 1_800_000_000_789
    assert data[28:44] == OTHER.cell_id
    assert data[44:60] == b"N" * 16
    verify_signature(ME.public_key, SIGNING_CONTEXT + data[:60], data[60:])


def test_round_trips() -> None:
    for data in SAMPLES:
        msg = decode_message(data)
        assert encode_message(msg) == data
    p = decode_message(sample_pulse())
    assert isinstance(p, Pulse)
    assert (p.sender, p.term, p.epoch, p.seq) == (ME.cell_id, 7, 9, 0x0102030405060708)
    g = decode_message(sample_grant(b"\x01" * 16))
    assert isinstance(g, EpochGrant)
    assert g.requested
    assert not decode_message(sample_grant()).requested  # type: ignore[union-attr]
    r = decode_message(sample_request())
    assert isinstance(r, EpochRequest)
    assert r.broadcast
    assert not decode_message(sample_request(OTHER.cell_id)).broadcast  # type: ignore[union-attr]


@pytest.mark.parametrize("data", SAMPLES, ids=["pulse", "grant", "request"])
def test_every_truncation_and_any_trailing_junk_is_a_decode_error(data: bytes) -> None:
    for n in range(len(data)):
        with pytest.raises(TruncatedError):
            decode_message(data[:n])
    with pytest.raises(OversizeError):
        decode_message(data + b"\x00")


def test_structural_faults_have_their_own_errors() -> None:
    data = bytearray(sample_pulse())
    with pytest.raises(MalformedError, match="not an anchor"):
        decode_message(bytes([1]) + data[1:])
    with pytest.raises(VersionError):
        decode_message(data[:1] + bytes([2]) + data[2:])
    with pytest.raises(MalformedError, match="type"):
        decode_message(data[:2] + bytes([9]) + data[3:])
    with pytest.raises(MalformedError, match="flag"):
        decode_message(data[:3] + bytes([1]) + data[4:])
    with pytest.raises(MalformedError, match="sender"):
        decode_message(data[:4] + bytes(16) + data[20:])
    bad_term = data[:28] + struct.pack("!Q", 10) + data[36:]  # term 10 > epoch 9
    with pytest.raises(MalformedError, match="term"):
        decode_message(bad_term)
    zero_term = data[:28] + struct.pack("!Q", 0) + data[36:]
    with pytest.raises(MalformedError, match="term"):
        decode_message(zero_term)
    grant = sample_grant()
    with pytest.raises(MalformedError, match="recipient"):
        decode_message(grant[:52] + bytes(16) + grant[68:])


def test_decoder_survives_random_and_mutated_bytes() -> None:
    """Random bytes, random prefixes of real messages and real messages with bytes flipped:
    every outcome is a record or a DecodeError, never anything else."""
    rng = random.Random(7)
    inputs: list[bytes] = [b"", b"\xca", b"\xca\x01", b"\xca\x01\x01"]
    for _ in range(3000):
        inputs.append(rng.randbytes(rng.randrange(0, 300)))
    for data in SAMPLES:
        for _ in range(1000):
            mutated = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            inputs.append(bytes(mutated))
            inputs.append(data[: rng.randrange(len(data))] + rng.randbytes(rng.randrange(4)))
    decoded = 0
    for data in inputs:
        try:
            msg = decode_message(data)
        except DecodeError:
            continue
        decoded += 1
        assert encode_message(msg) == data
    assert decoded > 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_give_a_record_or_a_decode_error(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except DecodeError:
        return
    assert encode_message(msg) == data


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**64 - 1),
    st.integers(1, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=MAC_LEN, max_size=MAC_LEN),
)
def test_pulse_records_round_trip(ts: int, epoch: int, seq: int, mac: bytes) -> None:
    p = Pulse(ME.cell_id, ts, epoch, epoch, seq, mac, b"s" * 64)
    assert decode_message(encode_message(p)) == p


def test_encoding_refuses_out_of_range_fields() -> None:
    with pytest.raises(ValueError, match="64 bits"):
        encode_message(Pulse(ME.cell_id, -1, 1, 1, 0, bytes(16), bytes(64)))
    with pytest.raises(ValueError, match="mac"):
        encode_message(Pulse(ME.cell_id, 0, 1, 1, 0, bytes(15), bytes(64)))
    with pytest.raises(ValueError, match="nonce"):
        encode_message(EpochRequest(ME.cell_id, 0, CellId(bytes(16)), bytes(3), bytes(64)))


def test_demultiplexing_peek() -> None:
    assert all(is_anchor_message(m) for m in SAMPLES)
    assert not is_anchor_message(b"\x01\x06" + bytes(62))  # a cellmesh frame header
    assert not is_anchor_message(b"")
