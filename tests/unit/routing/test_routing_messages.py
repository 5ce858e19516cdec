"""Routing message codecs: layouts byte by byte, round trips, and decoders that are total."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.routing.messages import (
    DUMP_REQUEST,
    HEADER_LEN,
    MAX_RECORDS,
    REQUEST_RECORD_LEN,
    ROUTE_RECORD_LEN,
    MessageType,
    RouteRecord,
    SeqnoRequest,
    SeqnoRequestRecord,
    Update,
    decode_message,
    encode_message,
    pack_route_record,
    push_update,
)

D1 = bytes(range(1, 17))
D2 = b"\xaa" * 16


def test_update_layout_byte_by_byte() -> None:
    msg = encode_message(
        Update(300, (RouteRecord(D1, 0x1234, 0x0056, 3), RouteRecord(D2, 0xFFFF, 0xFFFF, 0)), True)
    )
    assert len(msg) == HEADER_LEN + 2 * ROUTE_RECORD_LEN == 50
    assert msg[:6] == bytes([1, MessageType.UPDATE, DUMP_REQUEST, 2]) + struct.pack("!H", 300)
    assert msg[6:22] == D1
    assert msg[22:24] == b"\x12\x34"  # seqno
    assert msg[24:26] == b"\x00\x56"  # metric
    assert msg[26] == 3  # hops
    assert msg[27] == 0  # reserved
    assert msg[28:44] == D2
    assert msg[44:48] == b"\xff\xff\xff\xff"  # a retraction


def test_request_layout_byte_by_byte() -> None:
    msg = encode_message(SeqnoRequest((SeqnoRequestRecord(D1, 0xBEEF, 64),)))
    assert len(msg) == HEADER_LEN + REQUEST_RECORD_LEN == 26
    assert msg == bytes([1, 2, 0, 1, 0, 0]) + D1 + b"\xbe\xef" + bytes([64, 0])


cells = st.binary(min_size=16, max_size=16).filter(lambda b: b != bytes(16))
u16 = st.integers(0, 0xFFFF)
route_records = st.builds(RouteRecord, cells, u16, u16, st.integers(0, 255))
updates = st.builds(
    Update,
    st.integers(1, 0xFFFF),
    st.lists(route_records, min_size=1, max_size=MAX_RECORDS).map(tuple),
    st.booleans(),
)
requests = st.builds(
    SeqnoRequest,
    st.lists(
        st.builds(SeqnoRequestRecord, cells, u16, st.integers(1, 255)),
        min_size=1,
        max_size=MAX_RECORDS,
    ).map(tuple),
)


@given(st.one_of(updates, requests))
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
def test_decode_inverts_encode(msg: Update | SeqnoRequest) -> None:
    assert decode_message(encode_message(msg)) == msg


@given(st.binary(max_size=300))
@settings(max_examples=2000)
def test_decoder_is_total_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_message(data)  # a value or a DecodeError: nothing else may escape


@given(st.one_of(updates, requests), st.data())
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
def test_decoder_is_total_on_mutated_messages(
    msg: Update | SeqnoRequest, data: st.DataObject
) -> None:
    raw = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "junk", "insert"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "cut" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
        elif kind == "junk":
            raw += data.draw(st.binary(min_size=1, max_size=30))
        else:
            i = data.draw(st.integers(0, len(raw)))
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=3))
    try:
        out = decode_message(bytes(raw))
    except DecodeError:
        return
    assert encode_message(out) == bytes(raw)  # whatever decodes re-encodes to the same bytes


def test_every_prefix_and_trailing_junk_is_refused() -> None:
    raw = encode_message(Update(100, (RouteRecord(D1, 1, 2, 3), RouteRecord(D2, 4, 5, 6))))
    for n in range(len(raw)):
        with pytest.raises(TruncatedError):
            decode_message(raw[:n])
    with pytest.raises(OversizeError):
        decode_message(raw + b"\x00")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (bytes([2, 1, 0, 1, 0, 100]) + D1 + bytes(6), VersionError),
        (bytes([1, 9, 0, 1, 0, 100]) + D1 + bytes(6), MalformedError),  # unknown type
        (bytes([1, 1, 0x02, 1, 0, 100]) + D1 + bytes(6), MalformedError),  # unknown flag
        (bytes([1, 1, 0, 0, 0, 100]), MalformedError),  # no records
        (bytes([1, 1, 0, 1, 0, 0]) + D1 + bytes(6), MalformedError),  # zero interval
        (bytes([1, 1, 0, 1, 0, 100]) + D1 + bytes([0, 1, 0, 1, 1, 7]), MalformedError),  # rsvd
        (bytes([1, 1, 0, 1, 0, 100]) + bytes(16) + bytes(6), MalformedError),  # zero CellID
        (bytes([1, 2, 0, 1, 0, 1]) + D1 + bytes([0, 1, 1, 0]), MalformedError),  # rsvd header
        (bytes([1, 2, 0, 1, 0, 0]) + D1 + bytes([0, 1, 0, 0]), MalformedError),  # zero hops
        (bytes([1, 2, 1, 1, 0, 0]) + D1 + bytes([0, 1, 1, 0]), MalformedError),  # flags
        (bytes([1, 2, 0, 1, 0, 0]) + D1 + bytes([0, 1, 1, 9]), MalformedError),  # rsvd byte
    ],
)
def test_structural_faults_are_decode_errors(raw: bytes, error: type[DecodeError]) -> None:
    with pytest.raises(error):
        decode_message(raw)


def test_encoder_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(MalformedError):
        encode_message(Update(100, ()))
    with pytest.raises(MalformedError):
        encode_message(Update(0, (RouteRecord(D1, 1, 1, 1),)))
    with pytest.raises(MalformedError):
        encode_message(Update(100, (RouteRecord(bytes(16), 1, 1, 1),)))
    with pytest.raises(MalformedError):
        encode_message(Update(100, (RouteRecord(D1, 70000, 1, 1),)))
    with pytest.raises(MalformedError):
        encode_message(SeqnoRequest((SeqnoRequestRecord(D1, 1, 0),)))
    with pytest.raises(MalformedError):
        push_update(100, [pack_route_record(D1, 1, 1, 1)] * (MAX_RECORDS + 1))


def test_size_bounds() -> None:
    biggest = encode_message(Update(1, tuple(RouteRecord(D1, 1, 1, 1) for _ in range(255))))
    assert len(biggest) == 5616
