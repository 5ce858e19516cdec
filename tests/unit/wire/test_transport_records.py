"""Unit and property tests for the reliability records of `cellmesh.wire.messages`: ACK, STREAM,
RESET_STREAM, MAX_DATA, MAX_STREAM_DATA, MSG, STOP_SENDING and PADDING (layouts: docs/wire.md 5)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.errors import DecodeError, MalformedError, TruncatedError
from cellmesh.wire.messages import (
    MAX_ACK_RANGES,
    U32_MAX,
    U64_MAX,
    Ack,
    MaxData,
    MaxMessages,
    MaxStreamData,
    Message,
    Msg,
    MsgType,
    Padding,
    ResetStream,
    StopSending,
    StreamFrame,
    pull_messages,
    push_message,
    push_messages,
)

U16_MAX = 0xFFFF


def rec(t: int, body: bytes) -> bytes:
    """A raw record: type u8, length u16 big-endian, body."""
    return struct.pack("!BH", t, len(body)) + body


def ack_body(delay: int, ranges: list[tuple[int, int]], count: int | None = None) -> bytes:
    """An ACK body from (first, length) pairs, with an optionally lying count."""
    n = len(ranges) if count is None else count
    return struct.pack("!IB", delay, n) + b"".join(struct.pack("!QI", a, ln) for a, ln in ranges)


# --------------------------------------------------------------------------------- round trips

SIXTY_FOUR = tuple((1000 - 10 * i, 1000 - 10 * i + 5) for i in range(MAX_ACK_RANGES))

ROUND_TRIP: list[Message] = [
    Ack(((0, 1),)),
    Ack(((10, 20),), 25_000),
    Ack(((100, 101), (50, 60), (0, 1)), U32_MAX),
    Ack(((U64_MAX - U32_MAX, U64_MAX),)),  # the highest range that fits
    Ack(SIXTY_FOUR, 7),
    StreamFrame(0, 0, b""),
    StreamFrame(0, 0, b"", True),
    StreamFrame(3, 1_000_000, b"hello"),
    StreamFrame(U32_MAX, U64_MAX - 5, b"abcde", True),  # ends exactly at 2**64 - 1
    StreamFrame(7, 12, bytes(range(256)) * 10, False),
    ResetStream(0, 0, 0),
    ResetStream(U32_MAX, U16_MAX, U64_MAX),
    StopSending(0, 0),
    StopSending(U32_MAX, U16_MAX),
    MaxData(0),
    MaxData(U64_MAX),
    MaxMessages(0),
    MaxMessages(U64_MAX),
    MaxStreamData(0, 0),
    MaxStreamData(U32_MAX, U64_MAX),
    Msg(0, b""),
    Msg(U64_MAX, b"payload"),
    Msg(12, bytes(60_000)),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert pull_messages(push_message(msg)) == [msg]


def test_all_new_records_in_one_plaintext() -> None:
    small = [m for m in ROUND_TRIP if not (isinstance(m, Msg) and len(m.data) > 1000)]
    assert pull_messages(push_messages(small)) == small


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        (
            Ack(((10, 20), (0, 5)), 0x01020304),
            rec(
                MsgType.ACK,
                b"\x01\x02\x03\x04\x02"
                + (10).to_bytes(8, "big")
                + (10).to_bytes(4, "big")
                + (0).to_bytes(8, "big")
                + (5).to_bytes(4, "big"),
            ),
        ),
        (
            StreamFrame(5, 0x0102, b"xy", True),
            rec(MsgType.STREAM, (5).to_bytes(4, "big") + (0x0102).to_bytes(8, "big") + b"\x01xy"),
        ),
        (
            ResetStream(1, 2, 3),
            rec(MsgType.RESET_STREAM, b"\x00\x00\x00\x01\x00\x02" + (3).to_bytes(8, "big")),
        ),
        (StopSending(9, 0x0A0B), rec(MsgType.STOP_SENDING, b"\x00\x00\x00\x09\x0a\x0b")),
        (MaxData(0x0102), rec(MsgType.MAX_DATA, (0x0102).to_bytes(8, "big"))),
        (MaxMessages(0x0400), rec(MsgType.MAX_MESSAGES, (0x0400).to_bytes(8, "big"))),
        (
            MaxStreamData(4, 99),
            rec(MsgType.MAX_STREAM_DATA, b"\x00\x00\x00\x04" + (99).to_bytes(8, "big")),
        ),
        (Msg(1, b"hi"), rec(MsgType.MSG, (1).to_bytes(8, "big") + b"hi")),
        (Padding(4), b"\x00\x00\x04\x00\x00\x00\x00"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_exact_encoding(msg: Message, wire: bytes) -> None:
    assert push_message(msg) == wire


@pytest.mark.parametrize("n", [0, 1, 100, 65_535])
def test_padding_encodes_zeros_and_decodes_to_nothing(n: int) -> None:
    wire = push_message(Padding(n))
    assert len(wire) == 3 + n
    assert wire[3:] == bytes(n)
    assert pull_messages(wire) == []
    assert pull_messages(wire + push_message(MaxData(5))) == [MaxData(5)]


def test_padding_with_nonzero_bytes_is_still_padding() -> None:
    assert pull_messages(rec(MsgType.PADDING, b"\xff" * 10)) == []


def test_ack_delay_is_clamped_to_u32_on_encode() -> None:
    wire = push_message(Ack(((0, 1),), U32_MAX + 12345))
    assert pull_messages(wire) == [Ack(((0, 1),), U32_MAX)]


@pytest.mark.parametrize("n", [0, MAX_ACK_RANGES + 1])
def test_ack_encoder_rejects_a_bad_range_count(n: int) -> None:
    ranges = tuple((10 * (n - i), 10 * (n - i) + 1) for i in range(n))
    with pytest.raises(MalformedError):
        push_message(Ack(ranges))


# --------------------------------------------------------------------------------- ACK errors


@pytest.mark.parametrize("n", [0, 1, 4])
def test_ack_truncated_head(n: int) -> None:
    with pytest.raises(TruncatedError):
        pull_messages(rec(MsgType.ACK, b"\x00" * n))


@pytest.mark.parametrize("count", [0, MAX_ACK_RANGES + 1, 255])
def test_ack_count_out_of_range(count: int) -> None:
    ranges = [(10_000 - 10 * i, 1) for i in range(count)]
    with pytest.raises(MalformedError):
        pull_messages(rec(MsgType.ACK, ack_body(0, ranges)))


def test_ack_count_64_is_accepted() -> None:
    ranges = [(10_000 - 10 * i, 1) for i in range(MAX_ACK_RANGES)]
    (ack,) = pull_messages(rec(MsgType.ACK, ack_body(0, ranges)))
    assert isinstance(ack, Ack)
    assert len(ack.ranges) == MAX_ACK_RANGES


@pytest.mark.parametrize(
    "body",
    [
        ack_body(0, [(10, 1)], count=2),  # count says 2, one range present
        ack_body(0, [(10, 1), (0, 1)], count=1),  # count says 1, two present
        ack_body(0, [(10, 1)]) + b"\x00",  # a stray byte
        ack_body(0, [(10, 1)])[:-1],  # a range cut short
    ],
)
def test_ack_length_mismatch(body: bytes) -> None:
    with pytest.raises(MalformedError):
        pull_messages(rec(MsgType.ACK, body))


@pytest.mark.parametrize(
    "ranges",
    [
        [(10, 0)],  # empty range
        [(20, 5), (10, 0)],  # an empty one after a good one
        [(0, 5), (10, 5)],  # ascending
        [(10, 5), (12, 5)],  # overlapping
        [(10, 5), (5, 5)],  # adjacent: [10,15) and [5,10) must have been one range
        [(10, 5), (10, 5)],  # duplicate
        [(30, 5), (10, 5), (20, 5)],  # out of order later on
        [(U64_MAX, 1)],  # the range would end at 2**64
    ],
)
def test_ack_ranges_must_be_non_empty_descending_and_disjoint(
    ranges: list[tuple[int, int]],
) -> None:
    with pytest.raises(MalformedError):
        pull_messages(rec(MsgType.ACK, ack_body(0, ranges)))


def test_ack_with_a_gap_of_one_between_ranges_is_fine() -> None:
    (ack,) = pull_messages(rec(MsgType.ACK, ack_body(3, [(11, 5), (5, 5)])))
    assert ack == Ack(((11, 16), (5, 10)), 3)


# ------------------------------------------------------------------------------- other errors


@pytest.mark.parametrize("n", [0, 1, 12])
def test_stream_truncated_head(n: int) -> None:
    with pytest.raises(TruncatedError):
        pull_messages(rec(MsgType.STREAM, b"\x00" * n))


@pytest.mark.parametrize("flags", [0x02, 0x03, 0x80, 0xFF])
def test_stream_unknown_flags(flags: int) -> None:
    with pytest.raises(MalformedError):
        pull_messages(rec(MsgType.STREAM, struct.pack("!IQB", 1, 0, flags) + b"data"))


def test_stream_beyond_2_64() -> None:
    body = struct.pack("!IQB", 1, U64_MAX - 2, 0) + b"abcd"
    with pytest.raises(MalformedError):
        pull_messages(rec(MsgType.STREAM, body))


@pytest.mark.parametrize(
    ("t", "size"),
    [
        (MsgType.RESET_STREAM, 14),
        (MsgType.STOP_SENDING, 6),
        (MsgType.MAX_DATA, 8),
        (MsgType.MAX_MESSAGES, 8),
        (MsgType.MAX_STREAM_DATA, 12),
    ],
)
@pytest.mark.parametrize("delta", [-1, 1, None])
def test_fixed_size_records_reject_other_sizes(t: MsgType, size: int, delta: int | None) -> None:
    n = 0 if delta is None else size + delta
    with pytest.raises(MalformedError):
        pull_messages(rec(t, b"\x00" * n))
    assert pull_messages(rec(t, b"\x00" * size))  # the exact size decodes


@pytest.mark.parametrize("n", [0, 1, 7])
def test_msg_shorter_than_its_id(n: int) -> None:
    with pytest.raises(TruncatedError):
        pull_messages(rec(MsgType.MSG, b"\x00" * n))


def test_one_bad_record_rejects_the_plaintext() -> None:
    good = push_messages([MaxData(1), Msg(0, b"x")])
    bad = rec(MsgType.STOP_SENDING, b"\x00" * 5)
    with pytest.raises(MalformedError):
        pull_messages(good + bad + good)


# --------------------------------------------------------------------------------- properties

u16 = st.integers(0, U16_MAX)
u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    n = draw(st.integers(1, MAX_ACK_RANGES))
    top = draw(st.integers(0, U64_MAX - 1))  # ranges end below 2**64
    ranges: list[tuple[int, int]] = []
    end = top + 1
    for _ in range(n):
        if end <= 0:
            break
        length = draw(st.integers(1, min(end, 1000)))
        start = end - length
        ranges.append((start, end))
        end = start - 1 - draw(st.integers(0, 1000))
    return Ack(tuple(ranges), draw(u32))


@st.composite
def stream_frames(draw: st.DrawFn) -> StreamFrame:
    data = draw(st.binary(max_size=300))
    offset = draw(st.integers(0, U64_MAX - len(data)))
    return StreamFrame(draw(u32), offset, data, draw(st.booleans()))


transport_records: st.SearchStrategy[Message] = st.one_of(
    acks(),
    stream_frames(),
    st.builds(ResetStream, u32, u16, u64),
    st.builds(StopSending, u32, u16),
    st.builds(MaxData, u64),
    st.builds(MaxStreamData, u32, u64),
    st.builds(Msg, u64, st.binary(max_size=300)),
)


@given(st.lists(transport_records, max_size=12))
@settings(max_examples=300, deadline=None)
def test_random_record_lists_round_trip(msgs: list[Message]) -> None:
    assert pull_messages(push_messages(msgs)) == msgs


@given(st.lists(transport_records, max_size=6), st.lists(st.integers(0, 65_535), max_size=3))
@settings(max_examples=100, deadline=None)
def test_padding_anywhere_is_transparent(msgs: list[Message], pads: list[int]) -> None:
    mixed: list[Message] = [*msgs]
    for i, n in enumerate(pads):
        mixed.insert(min(i * 2, len(mixed)), Padding(n))
    assert pull_messages(push_messages(mixed)) == msgs


def decode_or_error(data: bytes) -> list[Message] | None:
    try:
        out = pull_messages(data)
    except DecodeError:
        return None
    assert isinstance(out, list)
    return out


@given(st.binary(max_size=600))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_give_a_list_or_a_decode_error(data: bytes) -> None:
    decode_or_error(data)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([int(t) for t in MsgType] + [13, 0x7F, 0x80, 0xFF]),
            st.binary(max_size=80),
        ),
        max_size=8,
    ),
    st.binary(max_size=4),
)
@settings(max_examples=500, deadline=None)
def test_well_framed_records_with_arbitrary_bodies_give_a_list_or_a_decode_error(
    records: list[tuple[int, bytes]], tail: bytes
) -> None:
    """Arbitrary bodies inside correct record framing reach every body decoder's checks."""
    got = decode_or_error(b"".join(rec(t, body) for t, body in records) + tail)
    if got is not None:
        # Whatever decodes re-encodes to records that decode to the same thing.
        assert pull_messages(push_messages(got)) == got


@given(st.lists(transport_records, min_size=1, max_size=4), st.data())
@settings(max_examples=300, deadline=None)
def test_truncated_or_mutated_encodings_never_escape_decode_error(
    msgs: list[Message], data: st.DataObject
) -> None:
    wire = bytearray(push_messages(msgs))
    cut = data.draw(st.integers(0, len(wire)))
    decode_or_error(bytes(wire[:cut]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    decode_or_error(bytes(wire))
