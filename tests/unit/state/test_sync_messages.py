"""The sync message codec: layout, varints, bounds, strict decoding, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.state.sync_messages import (
    MAX_SYNC_MESSAGE,
    Mode,
    RangeRecord,
    SyncMessage,
    SyncMessageWriter,
    encode_bound,
    pull_sync_message,
    pull_varint,
    push_sync_message,
    push_varint,
)
from cellmesh.state.sync_store import INFINITY, MAX_KEY, SyncItem

ID = bytes(range(32))
FP = bytes(range(16))


def test_varints() -> None:
    for n in [0, 1, 127, 128, 300, 2**21, 2**63, MAX_KEY]:
        enc = push_varint(n)
        assert pull_varint(enc, 0) == (n, len(enc))
    assert push_varint(300) == b"\xac\x02"
    with pytest.raises(MalformedError, match="non-minimal"):
        pull_varint(b"\x80\x00", 0)
    with pytest.raises(TruncatedError):
        pull_varint(b"\x80", 0)
    with pytest.raises(MalformedError, match="longer"):
        pull_varint(b"\xff" * 11, 0)
    with pytest.raises(MalformedError, match="larger than"):
        pull_varint(b"\xff" * 9 + b"\x7f", 0)
    assert pull_varint(push_varint(2**64, 2**64), 0, 2**64) == (2**64, 10)
    with pytest.raises(MalformedError):
        push_varint(-1)


def test_bound_encoding() -> None:
    assert encode_bound(0, INFINITY) == b"\x00"
    assert encode_bound(10, SyncItem(10, bytes(32))) == b"\x01\x00"
    assert encode_bound(10, SyncItem(12, b"\xab" + bytes(31))) == b"\x03\x01\xab"
    assert encode_bound(0, SyncItem(0, b"\x00\x07" + bytes(30))) == b"\x01\x02\x00\x07"
    with pytest.raises(MalformedError):
        encode_bound(10, SyncItem(9, bytes(32)))
    top = encode_bound(0, SyncItem(MAX_KEY, bytes(32)))
    assert top == push_varint(2**64, 2**64) + b"\x00"
    m = SyncMessage(False, (RangeRecord(SyncItem(MAX_KEY, bytes(32)), Mode.SKIP),))
    assert pull_sync_message(push_sync_message(m)) == m


def test_layout() -> None:
    m = SyncMessage(
        more=True,
        ranges=(
            RangeRecord(SyncItem(5, bytes(32)), Mode.SKIP),
            RangeRecord(SyncItem(7, b"\x01" + bytes(31)), Mode.FINGERPRINT, FP),
            RangeRecord(INFINITY, Mode.IDLIST, ids=(ID,)),
        ),
        wants=(ID,),
        events=(b"ev",),
    )
    enc = push_sync_message(m)
    expected = (
        b"\x01\x01"  # version, MORE
        + b"\x03"  # three ranges
        + b"\x06\x00"  # key 5 (delta 5 + 1), empty prefix
        + b"\x00"  # SKIP
        + b"\x03\x01\x01"  # key 7 (delta 2 + 1), prefix 01
        + b"\x01"
        + FP
        + b"\x00\x02\x01"  # infinity, IDLIST, one id
        + ID
        + b"\x01"
        + ID  # one want
        + b"\x01\x02ev"  # one event of 2 bytes
    )
    assert enc == expected
    assert pull_sync_message(enc) == m
    assert m.needs_response


def test_empty_message() -> None:
    enc = push_sync_message(SyncMessage(more=False))
    assert enc == b"\x01\x00\x00\x00\x00"
    m = pull_sync_message(enc)
    assert not m.needs_response
    assert not m.more


def test_decode_faults() -> None:
    with pytest.raises(VersionError):
        pull_sync_message(b"\x02\x00\x00\x00\x00")
    with pytest.raises(MalformedError, match="flags"):
        pull_sync_message(b"\x01\x02\x00\x00\x00")
    with pytest.raises(MalformedError, match="junk"):
        pull_sync_message(b"\x01\x00\x00\x00\x00\x00")
    with pytest.raises(TruncatedError):
        pull_sync_message(b"\x01")
    # Hostile counts are refused before any allocation.
    huge = push_varint(2**60)
    with pytest.raises(TruncatedError):
        pull_sync_message(b"\x01\x00" + huge)
    with pytest.raises(TruncatedError):
        pull_sync_message(b"\x01\x00\x00" + huge)
    with pytest.raises(TruncatedError):
        pull_sync_message(b"\x01\x00\x00\x00" + huge)
    with pytest.raises(TruncatedError):  # IDLIST claiming 2**60 ids
        pull_sync_message(b"\x01\x00\x01\x00\x02" + huge)
    with pytest.raises(MalformedError, match="mode"):
        pull_sync_message(b"\x01\x00\x01\x00\x07\x00\x00")
    with pytest.raises(MalformedError, match="strictly increase"):
        pull_sync_message(b"\x01\x00\x02\x02\x00\x00\x01\x00\x00\x00\x00")  # same bound twice
    with pytest.raises(MalformedError, match="after the infinity"):
        pull_sync_message(b"\x01\x00\x02\x00\x00\x00\x00\x00\x00")
    with pytest.raises(MalformedError, match="prefix of 33"):
        pull_sync_message(b"\x01\x00\x01\x02\x21" + bytes(33) + b"\x00\x00\x00")
    with pytest.raises(MalformedError, match="beyond"):
        pull_sync_message(
            b"\x01\x00\x02"
            + push_varint(MAX_KEY)  # key MAX_KEY - 1
            + b"\x00\x00"
            + push_varint(3)  # key MAX_KEY + 1
            + b"\x00\x00\x00\x00"
        )
    with pytest.raises(MalformedError, match="empty event"):
        pull_sync_message(b"\x01\x00\x00\x00\x01\x00\x00")
    with pytest.raises(OversizeError):
        pull_sync_message(bytes(2000), max_size=1024)
    with pytest.raises(OversizeError):
        pull_sync_message(bytes(MAX_SYNC_MESSAGE + 1), max_size=MAX_SYNC_MESSAGE * 2)


def test_every_truncation_fails() -> None:
    m = SyncMessage(
        more=False,
        ranges=(
            RangeRecord(SyncItem(1000, b"\x05" + bytes(31)), Mode.FINGERPRINT, FP),
            RangeRecord(INFINITY, Mode.IDLIST, ids=(ID, ID)),
        ),
        wants=(ID,),
        events=(b"x" * 40,),
    )
    enc = push_sync_message(m)
    for n in range(len(enc)):
        with pytest.raises(DecodeError):
            pull_sync_message(enc[:n])


def test_writer_budget_and_all_or_nothing() -> None:
    w = SyncMessageWriter(1024)
    assert not w.has_content
    assert w.add_event(b"e" * 500)
    assert not w.add_event(b"e" * 600)
    ids = tuple(bytes([i]) * 32 for i in range(20))
    assert not w.add_ranges([RangeRecord(INFINITY, Mode.IDLIST, ids=ids)])
    assert w.last_bound.key == 0  # nothing was added
    assert w.add_ranges([RangeRecord(SyncItem(3, bytes(32)), Mode.FINGERPRINT, FP)])
    assert w.needs_response
    with pytest.raises(MalformedError, match="increase"):
        w.add_ranges([RangeRecord(SyncItem(2, bytes(32)), Mode.SKIP)])
    out = w.finish(more=False)
    assert len(out) <= 1024
    assert pull_sync_message(out).events == (b"e" * 500,)
    with pytest.raises(OversizeError):
        push_sync_message(SyncMessage(False, events=(bytes(5000),)), max_size=1024)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        m = pull_sync_message(data)
    except DecodeError:
        return
    # Decoding is total and stable: what decoded re-encodes to something that decodes the same.
    assert pull_sync_message(push_sync_message(m)) == m


_ids = st.binary(min_size=32, max_size=32)


@st.composite
def messages(draw: st.DrawFn) -> SyncMessage:
    keys = sorted(draw(st.sets(st.integers(0, MAX_KEY), max_size=6)))
    ranges = []
    for k in keys:
        raw = draw(st.binary(max_size=32)).rstrip(b"\x00")
        if not raw and k == 0:
            raw = b"\x01"  # (0, zeros) is the lowest point: no range can end there
        ident = raw + bytes(32 - len(raw))
        mode = draw(st.sampled_from(list(Mode)))
        fp = draw(st.binary(min_size=16, max_size=16)) if mode is Mode.FINGERPRINT else b""
        ids = tuple(draw(st.lists(_ids, max_size=3))) if mode is Mode.IDLIST else ()
        ranges.append(RangeRecord(SyncItem(k, ident), mode, fp, ids))
    if draw(st.booleans()):
        ranges.append(RangeRecord(INFINITY, Mode.SKIP))
    return SyncMessage(
        more=draw(st.booleans()),
        ranges=tuple(ranges),
        wants=tuple(draw(st.lists(_ids, max_size=3))),
        events=tuple(draw(st.lists(st.binary(min_size=1, max_size=50), max_size=3))),
    )


@settings(max_examples=300, deadline=None)
@given(messages())
def test_fuzz_round_trip(m: SyncMessage) -> None:
    assert pull_sync_message(push_sync_message(m)) == m
