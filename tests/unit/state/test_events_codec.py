"""Events: canonical encoding, byte layout, decode robustness, signatures, creation rules."""

from __future__ import annotations

import dataclasses
import struct

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import Identity
from cellmesh.state.events import (
    EVENT_CONTEXT,
    EVENT_ID_CONTEXT,
    MAX_EVENT_LEN,
    MAX_HORIZON,
    MAX_PAYLOAD,
    MIN_EVENT_LEN,
    ZERO_EVENT_ID,
    Event,
    EventError,
    HorizonEntry,
    create_event,
    decode_event,
    encode_event,
    event_id,
    event_signing_message,
    verify_event,
)

ALICE = Identity.from_secret(bytes(range(64)))
BOB = Identity.from_secret(bytes(range(1, 65)))


@dataclasses.dataclass(frozen=True)
class Seen:
    author: CellId
    seq: int
    clock: int


def first(payload: bytes = b"hello", channel: str = "chat/room") -> Event:
    return create_event(ALICE, channel, payload, None, (), 1_700_000_000_000)


def resign(ev: Event, signer: Identity = ALICE, **changes: object) -> Event:
    changed = dataclasses.replace(ev, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(changed, signature=signer.sign(event_signing_message(changed)))


def test_round_trip_and_canonical() -> None:
    b1 = create_event(BOB, "chat/room", b"yo", None, (), 5)
    e1 = first()
    e2 = create_event(ALICE, "chat/room", b"again", e1, [b1], 7)
    for ev in (e1, e2, b1):
        data = encode_event(ev)
        assert decode_event(data) == ev
        assert encode_event(decode_event(data)) == data
        verify_event(ev)


def test_byte_layout_matches_docs() -> None:
    """The layout documented in docs/state.md, offset by offset."""
    b1 = create_event(BOB, "chat/room", b"yo", None, (), 5)
    ev = create_event(ALICE, "chat/room", b"payload!", first(), [b1], 0x0102030405060708)
    data = encode_event(ev)
    assert data[0] == 1
    assert data[1:17] == ALICE.cell_id
    assert data[17:49] == ALICE.public_key
    assert struct.unpack("!Q", data[49:57])[0] == 2  # seq
    assert struct.unpack("!Q", data[57:65])[0] == 2  # clock = 1 + max(1, 1)
    assert data[65:97] == event_id(first())
    assert data[97:105] == bytes.fromhex("0102030405060708")
    assert data[105] == 9
    assert data[106:115] == b"chat/room"
    assert data[115] == 1
    assert data[116:132] == BOB.cell_id
    assert struct.unpack("!Q", data[132:140])[0] == 1
    assert struct.unpack("!I", data[140:144])[0] == 8
    assert data[144:152] == b"payload!"
    assert len(data) == 152 + 64
    assert data[152:] == ev.signature
    assert event_signing_message(ev) == EVENT_CONTEXT + data[:152]
    expected_id = blake3.blake3(data, derive_key_context=EVENT_ID_CONTEXT).digest(length=32)
    assert event_id(ev) == expected_id
    assert event_id(ev) != blake3.blake3(data).digest()  # domain-separated from blob addresses


def test_minimum_and_maximum_lengths() -> None:
    small = create_event(ALICE, "x", b"", None, (), 0)
    assert len(encode_event(small)) == MIN_EVENT_LEN
    others = [Identity.generate() for _ in range(MAX_HORIZON)]
    seen = [Seen(o.cell_id, 2**40, 2**41) for o in others]
    big = create_event(ALICE, "c" * 255, bytes(MAX_PAYLOAD), None, seen, 0)
    data = encode_event(big)
    assert len(data) == MAX_EVENT_LEN
    assert decode_event(data) == big


def test_truncations_and_trailing_bytes() -> None:
    data = encode_event(create_event(ALICE, "chat/room", b"abc", first(), [], 9))
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode_event(data[:n])
    for n in range(1, 5):
        with pytest.raises(TruncatedError):
            decode_event(data[:-n])
    with pytest.raises(MalformedError, match="trailing"):
        decode_event(data + b"\x00")
    with pytest.raises(OversizeError):
        decode_event(bytes(MAX_EVENT_LEN + 1))
    with pytest.raises(VersionError):
        decode_event(b"\x02" + data[1:])


def test_decode_rejects_inconsistent_fields() -> None:
    data = bytearray(encode_event(first()))
    cases: dict[str, bytearray] = {}
    wrong_author = bytearray(data)
    wrong_author[1] ^= 1
    cases["author CellID"] = wrong_author
    seq1_with_prev = bytearray(data)
    seq1_with_prev[65] = 1
    cases["prev is all zero"] = seq1_with_prev
    zero_seq = bytearray(data)
    zero_seq[49:57] = bytes(8)
    cases["seq must"] = zero_seq
    huge_clock = bytearray(data)
    huge_clock[57:65] = b"\xff" * 8
    cases["clock must"] = huge_clock
    bad_channel = bytearray(data)
    bad_channel[106] = ord("*")
    cases["bad segment"] = bad_channel
    non_ascii = bytearray(data)
    non_ascii[106] = 0xC3
    cases["not ASCII"] = non_ascii
    for match, raw in cases.items():
        with pytest.raises(MalformedError, match=match):
            decode_event(bytes(raw))


def test_decode_rejects_bad_horizons() -> None:
    b1 = create_event(BOB, "chat/room", b"", None, (), 0)
    ev = create_event(ALICE, "chat/room", b"", first(), [b1], 0)
    good = encode_event(ev)
    unsorted_ = [HorizonEntry(CellId(b"\xff" * 16), 1), HorizonEntry(CellId(b"\x00" * 16), 1)]
    self_ref = [HorizonEntry(ALICE.cell_id, 1)]
    zero_seq = [HorizonEntry(BOB.cell_id, 0)]
    for horizon in (unsorted_, self_ref, zero_seq):
        with pytest.raises(ValueError, match="horizon"):
            encode_event(dataclasses.replace(ev, horizon=tuple(horizon)))
    too_many = bytearray(good)
    too_many[115] = MAX_HORIZON + 1
    with pytest.raises(MalformedError, match="horizon"):
        decode_event(bytes(too_many))


def test_payload_bound() -> None:
    with pytest.raises(ValueError, match="payload"):
        create_event(ALICE, "c", bytes(MAX_PAYLOAD + 1), None, (), 0)
    data = bytearray(encode_event(create_event(ALICE, "c", b"", None, (), 0)))
    data[-68:-64] = struct.pack("!I", MAX_PAYLOAD + 1)
    with pytest.raises(MalformedError, match="payload"):
        decode_event(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decode_arbitrary_bytes_only_raises_decode_error(data: bytes) -> None:
    try:
        ev = decode_event(data)
    except DecodeError:
        return
    assert encode_event(ev) == data


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_encodings_never_verify_falsely(data: st.DataObject) -> None:
    """Any change to a signed encoding either fails to decode or fails to verify."""
    b1 = create_event(BOB, "chat/room", b"x", None, (), 0)
    good = encode_event(create_event(ALICE, "chat/room", b"some payload", first(), [b1], 0))
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, 3))
    mutated = bytes(raw[: len(raw) - cut]) + data.draw(st.binary(max_size=3))
    if mutated == good:
        return
    try:
        ev = decode_event(mutated)
    except DecodeError:
        return
    with pytest.raises(EventError):
        verify_event(ev)


def test_every_single_byte_flip_is_caught() -> None:
    good = encode_event(create_event(ALICE, "chat/room", b"payload", first(), [], 3))
    for i in range(len(good)):
        raw = bytearray(good)
        raw[i] ^= 0x01
        try:
            ev = decode_event(bytes(raw))
        except DecodeError:
            continue
        with pytest.raises(EventError):
            verify_event(ev)


def test_verify_reasons() -> None:
    ev = first()
    with pytest.raises(EventError) as bad_sig:
        verify_event(dataclasses.replace(ev, payload=b"changed"))
    assert bad_sig.value.reason == "bad_signature"
    with pytest.raises(EventError) as wrong_signer:
        verify_event(resign(ev, BOB))
    assert wrong_signer.value.reason == "bad_signature"
    with pytest.raises(EventError) as mismatch:
        verify_event(resign(ev, author=BOB.cell_id))
    assert mismatch.value.reason == "author_mismatch"
    with pytest.raises(EventError) as malformed:
        verify_event(dataclasses.replace(ev, seq=0))
    assert malformed.value.reason == "malformed"
    # A signature made with the right key over another context does not verify.
    body = event_signing_message(ev)[len(EVENT_CONTEXT) :]
    with pytest.raises(EventError):
        verify_event(dataclasses.replace(ev, signature=ALICE.sign(body)))


def test_create_chains_and_computes_clock() -> None:
    e1 = first()
    assert (e1.seq, e1.clock, e1.prev) == (1, 1, ZERO_EVENT_ID)
    e2 = create_event(ALICE, "chat/room", b"", e1, [], 0)
    assert (e2.seq, e2.clock, e2.prev) == (2, 2, event_id(e1))
    far = Seen(BOB.cell_id, 3, 40)
    e3 = create_event(ALICE, "chat/room", b"", e2, [far, Seen(BOB.cell_id, 2, 30)], 0)
    assert e3.clock == 41
    assert e3.horizon == (HorizonEntry(BOB.cell_id, 3),)  # one entry per author, the highest


def test_create_horizon_ignores_self_and_keeps_most_recent() -> None:
    others = [Identity.generate() for _ in range(MAX_HORIZON + 5)]
    seen = [Seen(o.cell_id, 1, 10 + i) for i, o in enumerate(others)]
    seen.append(Seen(ALICE.cell_id, 99, 1000))  # our own position: carried by prev, not here
    ev = create_event(ALICE, "c", b"", None, seen, 0)
    assert len(ev.horizon) == MAX_HORIZON
    assert [h.author for h in ev.horizon] == sorted(h.author for h in ev.horizon)
    kept = {h.author for h in ev.horizon}
    assert kept == {o.cell_id for o in others[5:]}  # the 5 oldest (lowest clock) dropped
    assert ev.clock == 10 + len(others)
    assert ALICE.cell_id not in kept


def test_create_refuses_bad_arguments() -> None:
    e1 = first()
    with pytest.raises(ValueError, match="another author"):
        create_event(BOB, "chat/room", b"", e1, [], 0)
    with pytest.raises(ValueError, match="another channel"):
        create_event(ALICE, "chat/other", b"", e1, [], 0)
    with pytest.raises(ValueError, match="channel"):
        create_event(ALICE, "bad//channel", b"", None, [], 0)
    with pytest.raises(ValueError, match="timestamp"):
        create_event(ALICE, "c", b"", None, [], -1)
    with pytest.raises(ValueError, match="horizon"):
        create_event(ALICE, "c", b"", None, [Seen(BOB.cell_id, 0, 1)], 0)
