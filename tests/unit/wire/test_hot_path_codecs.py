"""The hot-path encoders and decoders produce and accept exactly what the general codecs do."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.config import NodeConfig
from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.identity.keys import Identity
from cellmesh.transport.endpoint import Endpoint
from cellmesh.wire.header import pull_header_fields
from cellmesh.wire.messages import (
    AppData,
    MsgType,
    StreamFrame,
    pull_messages,
    pull_single_app,
    pull_single_stream,
    push_app,
    push_message,
    push_messages,
    push_stream_parts,
)


@given(st.binary(max_size=2000))
def test_push_app_is_push_message_of_an_app_record(data: bytes) -> None:
    assert push_app(data) == push_message(AppData(data))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**40), st.binary(max_size=3000), st.booleans())
def test_stream_parts_join_to_the_stream_record(sid: int, off: int, data: bytes, fin: bool) -> None:
    head, body = push_stream_parts(sid, off, data, fin)
    assert head + body == push_message(StreamFrame(sid, off, data, fin))
    assert pull_messages(head + body) == [StreamFrame(sid, off, data, fin)]


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_single_app_agrees_with_the_general_decoder(buf: bytes) -> None:
    app = pull_single_app(buf)
    if app is not None:
        assert pull_messages(buf) == [AppData(app)]
    for extra in (push_messages([AppData(b"x")]), b""):
        whole = push_app(buf) + extra
        single = pull_single_app(whole)
        assert (single == buf) if not extra else (single is None)


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 5, 2**40, 2**64 - 10, 2**64 - 1]),
    st.binary(max_size=300),
    st.sampled_from([0, 1, 1, 2, 0x81]),
    st.integers(-4, 3),
)
@settings(max_examples=400)
def test_single_stream_agrees_with_the_general_decoder(
    sid: int, off: int, data: bytes, flags: int, cut: int
) -> None:
    """Well-formed, with bad flags, past 2**64, truncated, padded or followed by another record:
    the short decoder returns exactly the general decoder's one STREAM frame, or None."""
    body = struct.pack("!IQB", sid, off, flags) + data
    buf = bytes([MsgType.STREAM]) + struct.pack("!H", len(body)) + body
    if cut < 0:
        buf = buf[:cut]
    elif cut > 0:
        buf += push_messages([AppData(b"x" * cut)])
    single = pull_single_stream(buf)
    try:
        general: list[object] | None = list(pull_messages(buf))
    except DecodeError:
        general = None
    if single is None:
        assert general is None or len(general) != 1 or not isinstance(general[0], StreamFrame)
    else:
        sid_, off_, data_, fin_ = single
        assert general == [StreamFrame(sid_, off_, bytes(data_), fin_)]


@given(
    st.sampled_from([0, 1, 1, 1, 2]),
    st.integers(0, 9),
    st.sampled_from([0, 0, 0, 1, 0x80]),
    st.sampled_from([0, 0, 0, 7]),
    st.sampled_from([0, 0, 0, 3]),
    st.binary(max_size=120),
    st.integers(-2, 2),
)
@settings(max_examples=500)
def test_the_inline_header_check_matches_the_decoder(
    ver: int, ftype: int, flags: int, frag: int, rsvd: int, body: bytes, skew: int
) -> None:
    # transport/endpoint.py checks headers inline on the raw fields; it must drop exactly what
    # pull_header_fields refuses, for the decoder's reason, and let everything else through.
    plen = max(0, len(body) + skew)
    buf = (
        struct.pack(
            "!BBBBHH16s16sQQII",
            ver,
            ftype,
            flags,
            16,
            plen,
            frag,
            b"a" * 16,
            b"b" * 16,
            1,
            2,
            0,
            rsvd,
        )
        + body
    )
    ep = _ENDPOINT
    before = dict(ep.drops)
    ep.receive_datagram(buf, ("10.0.0.9", 9), 1000.0)
    grew = {k for k, v in ep.drops.items() if v != before.get(k, 0)}
    reason: str | None = None
    try:
        pull_header_fields(buf)
    except DecodeError as exc:
        reason = _REASONS[type(exc)]
    if reason is not None:
        assert grew == {reason}
    elif ftype == 5:
        assert grew == {"not_for_us"}  # a good DATA header goes on to the session checks


_ENDPOINT = Endpoint(Identity.generate(), NodeConfig(listen=("127.0.0.1:0",)), 1000.0)
_REASONS = {
    TruncatedError: "truncated",
    OversizeError: "oversize",
    VersionError: "bad_version",
    MalformedError: "malformed",
}


def test_a_large_stream_frame_is_a_view_of_its_packet() -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes: above the size where a view beats a copy
    head, body = push_stream_parts(7, 1 << 20, data, True)
    packet = head + body
    got = pull_single_stream(packet)
    assert got is not None
    assert isinstance(got[2], memoryview)
    assert got[2].obj is packet
    assert (got[0], got[1], bytes(got[2]), got[3]) == (7, 1 << 20, data, True)
    small = pull_single_stream(b"".join(push_stream_parts(7, 0, b"abc", False)))
    assert small == (7, 0, b"abc", False)
    assert small is not None
    assert type(small[2]) is bytes
