"""The channel records of DATA frames: CHANNEL_MSG (13) and CHANNEL_DATAGRAM (14)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_messages import rec  # the raw-record helper of the other wire tests

from cellmesh.errors import DecodeError, MalformedError, TruncatedError
from cellmesh.wire.messages import (
    CHANNEL_CONTROL,
    MAX_RECORD_BODY,
    AppData,
    ChannelDatagram,
    Message,
    Msg,
    MsgType,
    Ping,
    pull_messages,
    push_message,
    push_messages,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
u64 = st.integers(0, 2**64 - 1)
channels = st.integers(1, 2**32 - 1)  # any non-zero hash; CHANNEL_CONTROL included
data_channels = st.integers(1, 2**32 - 2)  # datagrams may not use CHANNEL_CONTROL
payloads = st.binary(max_size=300)


def test_record_numbers() -> None:
    assert int(MsgType.CHANNEL_MSG) == 13
    assert int(MsgType.CHANNEL_DATAGRAM) == 14
    assert CHANNEL_CONTROL == 0xFFFFFFFF


# --- CHANNEL_MSG -------------------------------------------------------------------------------


def test_channel_msg_layout() -> None:
    raw = push_message(Msg(0x0102030405060708, b"hi", 0xA1B2C3D4))
    assert raw == rec(13, bytes(range(1, 9)) + b"\xa1\xb2\xc3\xd4" + b"hi")
    assert pull_messages(raw) == [Msg(0x0102030405060708, b"hi", 0xA1B2C3D4)]


def test_channel_zero_is_a_plain_msg_record() -> None:
    raw = push_message(Msg(5, b"plain"))
    assert raw[0] == MsgType.MSG
    assert raw == push_message(Msg(5, b"plain", 0))
    (back,) = pull_messages(raw)
    assert back == Msg(5, b"plain", 0)


@PROPS
@given(u64, payloads, channels)
def test_channel_msg_round_trip(msg_id: int, data: bytes, channel: int) -> None:
    m = Msg(msg_id, data, channel)
    raw = push_message(m)
    assert raw[0] == MsgType.CHANNEL_MSG
    assert pull_messages(raw) == [m]


def test_control_channel_is_allowed_for_reliable_messages() -> None:
    m = Msg(1, b"\x01request", CHANNEL_CONTROL)
    assert pull_messages(push_message(m)) == [m]


def test_channel_msg_on_channel_zero_is_refused() -> None:
    with pytest.raises(MalformedError, match="channel 0"):
        pull_messages(rec(13, bytes(8) + bytes(4) + b"x"))


@pytest.mark.parametrize("n", range(12))
def test_channel_msg_shorter_than_its_head_is_truncated(n: int) -> None:
    with pytest.raises(TruncatedError, match="CHANNEL_MSG"):
        pull_messages(rec(13, (b"\x01" * 12)[:n]))


def test_channel_msg_with_empty_data() -> None:
    assert pull_messages(rec(13, bytes(8) + b"\x00\x00\x00\x07")) == [Msg(0, b"", 7)]


# --- CHANNEL_DATAGRAM --------------------------------------------------------------------------


def test_channel_datagram_layout() -> None:
    raw = push_message(ChannelDatagram(0x01020304, b"pub"))
    assert raw == rec(14, b"\x01\x02\x03\x04pub")
    assert pull_messages(raw) == [ChannelDatagram(0x01020304, b"pub")]


@PROPS
@given(data_channels, payloads)
def test_channel_datagram_round_trip(channel: int, data: bytes) -> None:
    m = ChannelDatagram(channel, data)
    assert pull_messages(push_message(m)) == [m]


@pytest.mark.parametrize("channel", [0, CHANNEL_CONTROL])
def test_reserved_channels_are_refused_on_decode(channel: int) -> None:
    with pytest.raises(MalformedError, match="reserved channel"):
        pull_messages(rec(14, struct.pack("!I", channel) + b"data"))
    # Also when the encoder was asked to produce one (the decoder is the guard).
    with pytest.raises(MalformedError):
        pull_messages(push_message(ChannelDatagram(channel, b"x")))


@pytest.mark.parametrize("n", range(4))
def test_channel_datagram_shorter_than_its_channel_is_truncated(n: int) -> None:
    with pytest.raises(TruncatedError, match="CHANNEL_DATAGRAM"):
        pull_messages(rec(14, b"\x01\x02\x03"[:n]))


def test_channel_datagram_with_empty_data() -> None:
    assert pull_messages(rec(14, b"\x00\x00\x00\x09")) == [ChannelDatagram(9, b"")]


def test_channel_datagram_of_the_largest_record_body() -> None:
    m = ChannelDatagram(3, bytes(MAX_RECORD_BODY - 4))
    assert pull_messages(push_message(m)) == [m]


# --- in sequences, truncation, fuzz --------------------------------------------------------------


@PROPS
@given(
    st.lists(
        st.one_of(
            st.builds(Msg, u64, payloads, st.integers(0, 2**32 - 1)),
            st.builds(ChannelDatagram, data_channels, payloads),
            st.builds(AppData, payloads),
            st.builds(Ping, u64, payloads),
        ),
        max_size=6,
    )
)
def test_sequences_with_channel_records_round_trip(msgs: list[Message]) -> None:
    assert pull_messages(push_messages(msgs)) == msgs


@PROPS
@given(
    st.one_of(
        st.builds(Msg, u64, payloads, channels),
        st.builds(ChannelDatagram, data_channels, payloads),
    ),
    st.data(),
)
def test_every_truncation_of_a_channel_record_is_refused(m: Message, data: st.DataObject) -> None:
    raw = push_message(m)
    cut = data.draw(st.integers(1, len(raw) - 1))
    with pytest.raises(TruncatedError):
        pull_messages(raw[:cut])


@PROPS
@given(st.sampled_from([13, 14]), st.binary(max_size=40))
def test_arbitrary_channel_record_bodies_decode_or_raise_decode_error(t: int, body: bytes) -> None:
    try:
        out = pull_messages(rec(t, body))
    except DecodeError:
        return
    (m,) = out
    assert isinstance(m, Msg | ChannelDatagram)
    assert push_message(m) == rec(t, body)
