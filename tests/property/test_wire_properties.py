"""Property tests for `cellmesh.wire`: encoders and decoders agree, and decoders are total.

Every decoder, fed any bytes at all, either returns a value or raises a `DecodeError` subclass;
nothing else escapes (no `struct.error`, `IndexError`, `UnicodeDecodeError`, `ValueError`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError
from cellmesh.wire.header import (
    HEADER_LEN,
    FrameHeader,
    FrameType,
    associated_data,
    pack_header,
    pull_header,
    push_header,
)
from cellmesh.wire.messages import (
    BINDING_SIG_LEN,
    COOKIE_LEN,
    ECHO_LEN,
    ED25519_PUB_LEN,
    MAX_HANDSHAKE_EXT,
    MAX_REASON,
    U64_MAX,
    AppData,
    Close,
    CookieReply,
    HandshakePattern,
    HandshakePayload,
    InitBody,
    Keepalive,
    Message,
    Ping,
    Pong,
    pull_cookie_reply,
    pull_extensions,
    pull_handshake_payload,
    pull_init_body,
    pull_messages,
    pull_timestamp_ext,
    push_cookie_reply,
    push_extensions,
    push_handshake_payload,
    push_init_body,
    push_message,
    push_messages,
    push_timestamp_ext,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies --------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, U64_MAX)
cells = st.binary(min_size=16, max_size=16)
small_bytes = st.binary(max_size=64)


@st.composite
def frames(draw: st.DrawFn) -> tuple[FrameHeader, bytes]:
    """A valid header and the payload it announces."""
    payload = draw(st.binary(max_size=256))
    h = FrameHeader(
        type=draw(st.sampled_from(FrameType)),
        src=draw(cells),
        dst=draw(cells),
        session_id=draw(u64),
        packet_number=draw(u64),
        payload_len=len(payload),
        hop_ttl=draw(u8),
        flags=0,  # v1 defines no flags: any set bit is rejected
        channel=draw(u32),
    )
    return h, payload


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, u64, small_bytes),
    st.builds(Pong, u64, small_bytes),
    # 50 code points are at most 200 bytes of UTF-8, so the reason is never truncated.
    st.builds(Close, u16, st.text(max_size=50)),
    st.just(Keepalive()),
    st.builds(AppData, st.binary(max_size=300)),
)
message_lists = st.lists(messages, max_size=8)

init_bodies = st.builds(
    InitBody,
    st.sampled_from(HandshakePattern),
    st.binary(min_size=COOKIE_LEN, max_size=COOKIE_LEN),
    st.binary(min_size=32, max_size=256),
)

cookie_replies = st.builds(
    CookieReply,
    st.binary(min_size=COOKIE_LEN, max_size=COOKIE_LEN),
    st.binary(min_size=ECHO_LEN, max_size=ECHO_LEN),
)


@st.composite
def handshake_payloads(draw: st.DrawFn) -> HandshakePayload:
    identity: bytes | None = None
    binding: bytes | None = None
    if draw(st.booleans()):
        identity = draw(st.binary(min_size=ED25519_PUB_LEN, max_size=ED25519_PUB_LEN))
        binding = draw(st.binary(min_size=BINDING_SIG_LEN, max_size=BINDING_SIG_LEN))
    ext = draw(st.binary(max_size=MAX_HANDSHAKE_EXT))
    return HandshakePayload(draw(u64), identity, binding, ext)


def _frame_bytes(f: tuple[FrameHeader, bytes]) -> bytes:
    return push_header(f[0]) + f[1]


def _message_bytes(msgs: list[Message]) -> bytes:
    return push_messages(msgs)


# Valid encodings, per decoder, used as seeds for mutation.
VALID_ENCODINGS: dict[str, st.SearchStrategy[bytes]] = {
    "header": frames().map(_frame_bytes),
    "messages": message_lists.map(_message_bytes),
    "init_body": init_bodies.map(push_init_body),
    "cookie_reply": cookie_replies.map(push_cookie_reply),
    "handshake_payload": handshake_payloads().map(push_handshake_payload),
    "handshake_extensions": st.lists(
        st.tuples(u8, st.binary(max_size=40)), max_size=6, unique_by=lambda kv: kv[0]
    ).map(push_extensions),
    "timestamp_extension": st.integers(0, 2**64 - 1).map(push_timestamp_ext),
}


def _pull_header(b: bytes) -> object:
    return pull_header(b)


DECODERS: dict[str, Callable[[bytes], object]] = {
    "header": _pull_header,
    "messages": pull_messages,
    "init_body": pull_init_body,
    "cookie_reply": pull_cookie_reply,
    "handshake_payload": pull_handshake_payload,
    "handshake_extensions": pull_extensions,
    "timestamp_extension": pull_timestamp_ext,
}


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with a few bytes overwritten, then maybe cut short or extended."""
    data = bytearray(draw(valid))
    if data:
        for _ in range(draw(st.integers(0, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(u8)
    action = draw(st.sampled_from(["keep", "cut", "extend"]))
    if action == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif action == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _decode_or_decode_error(decoder: Callable[[bytes], object], data: bytes) -> object | None:
    """Run `decoder`; a DecodeError is fine, any other exception fails the test."""
    try:
        return decoder(data)
    except DecodeError:
        return None


# --- round trips -------------------------------------------------------------------------------


@PROPS
@given(frames())
def test_header_round_trip(f: tuple[FrameHeader, bytes]) -> None:
    h, payload = f
    raw = push_header(h)
    assert len(raw) == HEADER_LEN
    assert pull_header(raw + payload) == h
    assert (
        pack_header(
            h.type,
            h.src,
            h.dst,
            h.session_id,
            h.packet_number,
            h.payload_len,
            h.hop_ttl,
            h.channel,
        )
        == raw
    )
    assert associated_data(raw + payload) == push_header(dataclasses.replace(h, hop_ttl=0))


@PROPS
@given(messages)
def test_message_round_trip(m: Message) -> None:
    assert pull_messages(push_message(m)) == [m]


@PROPS
@given(u16, st.text(max_size=300))
def test_close_reason_is_cut_on_a_character_boundary(code: int, reason: str) -> None:
    # Any reason encodes to a decodable CLOSE: the longest prefix of whole characters that fits
    # in MAX_REASON bytes of UTF-8.
    kept = reason
    while len(kept.encode("utf-8")) > MAX_REASON:
        kept = kept[:-1]
    assert pull_messages(push_message(Close(code, reason))) == [Close(code, kept)]


@PROPS
@given(message_lists)
def test_message_list_round_trip(msgs: list[Message]) -> None:
    assert pull_messages(push_messages(msgs)) == msgs


@PROPS
@given(init_bodies)
def test_init_body_round_trip(b: InitBody) -> None:
    assert pull_init_body(push_init_body(b)) == b


@PROPS
@given(cookie_replies)
def test_cookie_reply_round_trip(c: CookieReply) -> None:
    assert pull_cookie_reply(push_cookie_reply(c)) == c


@PROPS
@given(handshake_payloads())
def test_handshake_payload_round_trip(p: HandshakePayload) -> None:
    assert pull_handshake_payload(push_handshake_payload(p)) == p


# --- decoders are total ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DECODERS))
@PROPS
@given(data=st.data())
def test_decoder_on_arbitrary_bytes(name: str, data: st.DataObject) -> None:
    raw = data.draw(st.binary(max_size=400), label="raw")
    _decode_or_decode_error(DECODERS[name], raw)


@pytest.mark.parametrize("name", sorted(DECODERS))
@PROPS
@given(data=st.data())
def test_decoder_on_mutated_encodings(name: str, data: st.DataObject) -> None:
    raw = data.draw(mutated(VALID_ENCODINGS[name]), label="raw")
    _decode_or_decode_error(DECODERS[name], raw)


@PROPS
@given(st.binary(max_size=400))
def test_decoded_records_reencode_to_the_same_records(raw: bytes) -> None:
    msgs = _decode_or_decode_error(pull_messages, raw)
    if isinstance(msgs, list):
        assert pull_messages(push_messages(msgs)) == msgs


@PROPS
@given(mutated(VALID_ENCODINGS["header"]))
def test_decoded_header_reencodes_to_the_same_bytes(raw: bytes) -> None:
    h = _decode_or_decode_error(_pull_header, raw)
    if isinstance(h, FrameHeader):
        assert push_header(h) == raw[:HEADER_LEN]
        assert len(raw) == HEADER_LEN + h.payload_len


# --- truncation and trailing junk --------------------------------------------------------------


@PROPS
@given(frames(), st.binary(min_size=1, max_size=32))
def test_header_truncated_or_extended(f: tuple[FrameHeader, bytes], junk: bytes) -> None:
    raw = _frame_bytes(f)
    for k in range(len(raw)):
        with pytest.raises(TruncatedError):
            pull_header(raw[:k])
    with pytest.raises(OversizeError):
        pull_header(raw + junk)


@PROPS
@given(message_lists)
def test_messages_truncated_at_every_length(msgs: list[Message]) -> None:
    records = [push_message(m) for m in msgs]
    raw = b"".join(records)
    # A cut exactly between two records leaves a valid, shorter plaintext; any other cut lands
    # inside a record and is a TruncatedError (the decoder never returns a partial list).
    boundaries = {0: 0}
    pos = 0
    for i, r in enumerate(records, start=1):
        pos += len(r)
        boundaries[pos] = i
    for k in range(len(raw)):
        if k in boundaries:
            assert pull_messages(raw[:k]) == msgs[: boundaries[k]]
        else:
            with pytest.raises(TruncatedError):
                pull_messages(raw[:k])


@PROPS
@given(message_lists, st.binary(min_size=1, max_size=32))
def test_messages_with_trailing_junk(msgs: list[Message], junk: bytes) -> None:
    # Junk after the last record is parsed as more records: the result is exactly what the junk
    # decodes to on its own, appended, or the same error.
    raw = push_messages(msgs)
    try:
        tail = pull_messages(junk)
    except DecodeError as exc:
        with pytest.raises(type(exc)):
            pull_messages(raw + junk)
    else:
        assert pull_messages(raw + junk) == msgs + tail


@PROPS
@given(init_bodies, st.binary(min_size=1, max_size=32))
def test_init_body_truncated_or_extended(b: InitBody, junk: bytes) -> None:
    # The Noise message is the rest of the body (its length is the handshake's business), so a
    # cut that leaves at least 32 Noise bytes, or extra bytes, change the Noise message only.
    raw = push_init_body(b)
    for k in range(len(raw)):
        if k < 1 + COOKIE_LEN + 32:
            with pytest.raises(TruncatedError):
                pull_init_body(raw[:k])
        else:
            assert pull_init_body(raw[:k]) == dataclasses.replace(b, noise=b.noise[: k - 17])
    assert pull_init_body(raw + junk) == dataclasses.replace(b, noise=b.noise + junk)


@PROPS
@given(cookie_replies, st.binary(min_size=1, max_size=32))
def test_cookie_reply_truncated_or_extended(c: CookieReply, junk: bytes) -> None:
    raw = push_cookie_reply(c)
    for k in range(len(raw)):
        with pytest.raises(TruncatedError):
            pull_cookie_reply(raw[:k])
    with pytest.raises(OversizeError):
        pull_cookie_reply(raw + junk)


@PROPS
@given(handshake_payloads(), st.binary(min_size=1, max_size=32))
def test_handshake_payload_truncated_or_extended(p: HandshakePayload, junk: bytes) -> None:
    # Cut before the ext_len field is complete: TruncatedError. Cut inside the extension, or
    # bytes after it: the ext_len field disagrees with the length, MalformedError.
    raw = push_handshake_payload(p)
    ext_len_end = 10 + (ED25519_PUB_LEN + BINDING_SIG_LEN if p.identity is not None else 0) + 2
    for k in range(len(raw)):
        expected = TruncatedError if k < ext_len_end else MalformedError
        with pytest.raises(expected):
            pull_handshake_payload(raw[:k])
    with pytest.raises(MalformedError):
        pull_handshake_payload(raw + junk)
