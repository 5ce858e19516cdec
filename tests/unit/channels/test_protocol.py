"""Unit and property tests for `cellmesh.channels.protocol`: the channel control messages."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmesh.channels.protocol import (
    MAX_BLOB,
    MAX_CHAIN,
    MAX_NAME,
    MAX_TEXT,
    Caps,
    Control,
    Ended,
    Kind,
    Op,
    Reply,
    Request,
    Revoke,
    decode_control,
    encode_control,
)
from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
ops = st.sampled_from(list(Op))
names = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=127), min_size=1, max_size=MAX_NAME
)
blobs = st.binary(max_size=300)


@st.composite
def texts(draw: st.DrawFn) -> str:
    """UTF-8 text of at most MAX_TEXT bytes (multi-byte characters included)."""
    s = draw(st.text(max_size=MAX_TEXT))
    while len(s.encode("utf-8")) > MAX_TEXT:
        s = s[:-1]
    return s


requests = st.builds(Request, u32, ops, names, st.lists(blobs, max_size=MAX_CHAIN).map(tuple))
replies = st.builds(Reply, u32, st.booleans(), u32, u64, texts(), texts())
endeds = st.builds(Ended, ops, u32, names, texts())
capses = st.builds(Caps, st.binary(max_size=MAX_BLOB))
revokes = st.builds(Revoke, st.binary(max_size=MAX_BLOB))
controls: st.SearchStrategy[Control] = st.one_of(requests, replies, endeds, capses, revokes)

EXAMPLES: list[Control] = [
    Request(7, Op.SUBSCRIBE, "telemetry/engine-3", (b"tok1", b"tok2")),
    Request(0, Op.PUBLISH, "c", ()),
    Request(2**32 - 1, Op.UNSUBSCRIBE, "x" * MAX_NAME, tuple(bytes([i]) for i in range(8))),
    Reply(7, True, 0xDEADBEEF, 2**64 - 1, "ok", ""),
    Reply(8, False, 0, 0, "token_required", "telemetry/** requires a subscribe token"),
    Reply(9, False, 0, 0, "r\u00e9sum\u00e9", "\u2603" * 85),  # multi-byte, 255 bytes
    Ended(Op.SUBSCRIBE, 12345, "chat", "unsubscribed"),
    Ended(Op.PUBLISH, 1, "a/b", ""),
    Caps(b""),
    Caps(b"\x00" * MAX_BLOB),
    Revoke(b"rev"),
    Revoke(b""),
]


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("m", EXAMPLES)
def test_examples_round_trip(m: Control) -> None:
    raw = encode_control(m)
    assert (
        raw[0]
        == {
            Request: Kind.REQUEST,
            Reply: Kind.REPLY,
            Ended: Kind.ENDED,
            Caps: Kind.CAPS,
            Revoke: Kind.REVOKE,
        }[type(m)]
    )
    assert decode_control(raw) == m


@PROPS
@given(controls)
def test_every_kind_round_trips(m: Control) -> None:
    raw = encode_control(m)
    back = decode_control(raw)
    assert back == m
    assert type(back) is type(m)
    assert encode_control(back) == raw


@PROPS
@given(requests)
def test_request_round_trip(m: Request) -> None:
    back = decode_control(encode_control(m))
    assert isinstance(back, Request)
    assert back == m
    assert isinstance(back.op, Op)


@PROPS
@given(replies)
def test_reply_round_trip(m: Reply) -> None:
    assert decode_control(encode_control(m)) == m


@PROPS
@given(endeds)
def test_ended_round_trip(m: Ended) -> None:
    assert decode_control(encode_control(m)) == m


def test_request_layout_is_documented_byte_for_byte() -> None:
    raw = encode_control(Request(0x01020304, Op.PUBLISH, "ab", (b"T",)))
    assert raw == bytes([1, 1, 2, 3, 4, 3, 2]) + b"ab" + bytes([1, 0, 1]) + b"T"


def test_reply_layout_is_documented_byte_for_byte() -> None:
    raw = encode_control(Reply(5, False, 0xAABBCCDD, 9, "no", "d"))
    assert raw == struct.pack("!BIBIQ", 2, 5, 1, 0xAABBCCDD, 9) + b"\x02no" + b"\x01d"


# --- decoding is total: DecodeError or a value ---------------------------------------------------


@PROPS
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_decode_errors(data: bytes) -> None:
    try:
        m = decode_control(data)
    except DecodeError:
        return
    assert encode_control(m) == data  # whatever decodes is canonical


@PROPS
@given(st.sampled_from(list(Kind)), st.binary(max_size=200))
def test_random_bodies_of_each_kind_only_raise_decode_errors(kind: Kind, body: bytes) -> None:
    data = bytes([kind]) + body
    try:
        m = decode_control(data)
    except DecodeError:
        return
    assert encode_control(m) == data


@PROPS
@given(controls, st.data())
def test_every_truncation_is_refused(m: Control, data: st.DataObject) -> None:
    raw = encode_control(m)
    cut = data.draw(st.integers(0, len(raw) - 1))
    if isinstance(m, Caps | Revoke) and cut >= 1:
        # Opaque blobs have no length of their own: a shorter one is still a valid message,
        # and the layers that own them (capabilities, tokens) refuse it.
        assert decode_control(raw[:cut]) == type(m)(raw[1:cut])
        return
    with pytest.raises(DecodeError):
        decode_control(raw[:cut])


@pytest.mark.parametrize("m", [m for m in EXAMPLES if not isinstance(m, Caps | Revoke)])
def test_every_prefix_is_refused(m: Control) -> None:
    raw = encode_control(m)
    for cut in range(len(raw)):
        with pytest.raises(DecodeError):
            decode_control(raw[:cut])


@PROPS
@given(st.one_of(requests, replies, endeds), st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_refused(m: Control, junk: bytes) -> None:
    with pytest.raises(MalformedError, match="trailing"):
        decode_control(encode_control(m) + junk)


@PROPS
@given(controls, st.integers(0, 10_000), st.integers(0, 255))
def test_mutated_messages_only_raise_decode_errors(m: Control, pos: int, val: int) -> None:
    raw = bytearray(encode_control(m))
    raw[pos % len(raw)] = val
    try:
        back = decode_control(bytes(raw))
    except DecodeError:
        return
    assert encode_control(back) == bytes(raw)


# --- specific decode refusals ------------------------------------------------------------------


def test_empty_message_is_truncated() -> None:
    with pytest.raises(TruncatedError):
        decode_control(b"")


@pytest.mark.parametrize("kind", [0, 6, 0x80, 0xFF])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(MalformedError, match="unknown control kind"):
        decode_control(bytes([kind]) + b"\x00" * 20)


def _request(op: int = 1, name: bytes = b"chat", chain: list[bytes] | None = None) -> bytes:
    chain = chain or []
    out = struct.pack("!BIBB", Kind.REQUEST, 1, op, len(name)) + name + bytes([len(chain)])
    for tok in chain:
        out += struct.pack("!H", len(tok)) + tok
    return out


def test_request_decoder_checks() -> None:
    assert decode_control(_request()) == Request(1, Op.SUBSCRIBE, "chat")
    with pytest.raises(MalformedError, match="empty channel name"):
        decode_control(_request(name=b""))
    with pytest.raises(MalformedError, match="not ASCII"):
        decode_control(_request(name=b"caf\xc3\xa9"))
    for op in (0, 4, 255):
        with pytest.raises(MalformedError, match="unknown channel op"):
            decode_control(_request(op=op))


def test_request_chain_limits_on_decode() -> None:
    ok = _request(chain=[b"t"] * MAX_CHAIN)
    back = decode_control(ok)
    assert isinstance(back, Request)
    assert len(back.chain) == MAX_CHAIN
    with pytest.raises(OversizeError, match="token chain"):
        decode_control(_request(chain=[b"t"] * (MAX_CHAIN + 1)))
    # A count byte announcing more tokens than are present is truncated, not an IndexError.
    raw = _request(chain=[b"t"])
    with pytest.raises(TruncatedError):
        decode_control(raw[:-3] + bytes([2]) + raw[-3:])
    # A token longer than MAX_BLOB is refused from its length alone.
    big = _request()[:-1] + bytes([1]) + struct.pack("!H", MAX_BLOB + 1)
    with pytest.raises(OversizeError, match="token too long"):
        decode_control(big)
    exact = _request(chain=[bytes(MAX_BLOB)])
    assert decode_control(exact) == Request(1, Op.SUBSCRIBE, "chat", (bytes(MAX_BLOB),))


def test_reply_decoder_checks() -> None:
    good = encode_control(Reply(1, True, 2, 3, "ok", ""))
    bad_status = bytearray(good)
    bad_status[5] = 2
    with pytest.raises(MalformedError, match="reply status"):
        decode_control(bytes(bad_status))
    bad_utf8 = good[:-3] + b"\x02\xff\xfe" + b"\x00"
    with pytest.raises(MalformedError, match="UTF-8"):
        decode_control(bad_utf8)


def test_ended_decoder_checks() -> None:
    good = encode_control(Ended(Op.SUBSCRIBE, 1, "chat", "bye"))
    empty_name = struct.pack("!BBIB", Kind.ENDED, 1, 1, 0) + b"\x00"
    with pytest.raises(MalformedError, match="empty channel name"):
        decode_control(empty_name)
    bad_op = bytearray(good)
    bad_op[1] = 9
    with pytest.raises(MalformedError, match="unknown channel op"):
        decode_control(bytes(bad_op))
    non_ascii = bytearray(good)
    non_ascii[7] = 0xC3
    with pytest.raises(MalformedError, match="not ASCII"):
        decode_control(bytes(non_ascii))


@pytest.mark.parametrize("kind", [Kind.CAPS, Kind.REVOKE])
def test_blob_limits_on_decode(kind: Kind) -> None:
    assert len(encode_control(Caps(bytes(MAX_BLOB)))) == MAX_BLOB + 1
    assert decode_control(bytes([kind]) + bytes(MAX_BLOB)) in (
        Caps(bytes(MAX_BLOB)),
        Revoke(bytes(MAX_BLOB)),
    )
    with pytest.raises(OversizeError):
        decode_control(bytes([kind]) + bytes(MAX_BLOB + 1))


# --- encoder limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "match"),
    [
        (Request(1, Op.SUBSCRIBE, "", ()), "channel name"),
        (Request(1, Op.SUBSCRIBE, "x" * (MAX_NAME + 1), ()), "channel name"),
        (Request(1, Op.SUBSCRIBE, "c", (b"t",) * (MAX_CHAIN + 1)), "token chain"),
        (Request(1, Op.SUBSCRIBE, "c", (bytes(MAX_BLOB + 1),)), "token too long"),
        (Reply(1, False, 0, 0, "r" * (MAX_TEXT + 1), ""), "reason"),
        (Reply(1, False, 0, 0, "r", "\u00e9" * 128), "detail"),  # 256 bytes of UTF-8
        (Ended(Op.SUBSCRIBE, 1, "", "x"), "channel name"),
        (Ended(Op.SUBSCRIBE, 1, "x" * (MAX_NAME + 1), "x"), "channel name"),
        (Ended(Op.SUBSCRIBE, 1, "c", "x" * (MAX_TEXT + 1)), "reason"),
        (Caps(bytes(MAX_BLOB + 1)), "capability advert"),
        (Revoke(bytes(MAX_BLOB + 1)), "revocation"),
    ],
)
def test_encoder_refuses_values_that_cannot_fit(m: Control, match: str) -> None:
    with pytest.raises(OversizeError, match=match):
        encode_control(m)


def test_encoder_limits_are_inclusive() -> None:
    for m in (
        Request(1, Op.SUBSCRIBE, "x" * MAX_NAME, (bytes(MAX_BLOB),) * MAX_CHAIN),
        Reply(1, False, 0, 0, "r" * MAX_TEXT, "d" * MAX_TEXT),
        Ended(Op.PUBLISH, 1, "x" * MAX_NAME, "r" * MAX_TEXT),
    ):
        assert decode_control(encode_control(m)) == m


@pytest.mark.parametrize(
    "m",
    [
        Request(1, Op.SUBSCRIBE, "caf\u00e9", ()),
        Ended(Op.SUBSCRIBE, 1, "caf\u00e9", "x"),
    ],
)
def test_encoder_refuses_non_ascii_names_with_a_decode_error(m: Control) -> None:
    """The encoder documents "a DecodeError subclass for values that cannot fit"."""
    with pytest.raises(DecodeError):
        encode_control(m)


@pytest.mark.parametrize(
    "m",
    [
        Request(2**32, Op.SUBSCRIBE, "c", ()),
        Request(-1, Op.SUBSCRIBE, "c", ()),
        Reply(1, True, 2**32, 0, "ok", ""),
        Reply(1, True, 1, 2**64, "ok", ""),
        Reply(1, True, 1, -1, "ok", ""),
        Ended(Op.SUBSCRIBE, 2**32, "c", "x"),
    ],
)
def test_encoder_refuses_out_of_range_integers_with_a_decode_error(m: Control) -> None:
    with pytest.raises(DecodeError):
        encode_control(m)


def test_encoder_refuses_unencodable_text_with_a_decode_error() -> None:
    with pytest.raises(MalformedError):
        encode_control(Reply(1, False, 0, 0, "bad \ud800 surrogate", ""))
