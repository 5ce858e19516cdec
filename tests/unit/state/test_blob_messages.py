"""BLOCK_WANT / BLOCK_PUT / BLOCK_NACK / BLOCK_CANCEL codecs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.state.blob_messages import (
    MAX_BLOCK_MESSAGE,
    MAX_BLOCK_SIZE,
    MAX_IDS_PER_MESSAGE,
    MIN_PUT_SIZE,
    PUT_HEADER_LEN,
    BlockCancel,
    BlockMessage,
    BlockNack,
    BlockPut,
    BlockWant,
    NackReason,
    pull_block_message,
    push_block_message,
)

ID = bytes(range(32))
ID2 = bytes(range(1, 33))

SAMPLES: list[BlockMessage] = [
    BlockWant(7, 60_000, (ID, ID2)),
    BlockWant(0, MIN_PUT_SIZE, (ID,)),
    BlockPut(2**32 - 1, ID, 100_000, 40_000, b"x" * 1000),
    BlockPut(1, ID, 1, 0, b"y"),
    BlockNack(3, NackReason.NOT_FOUND, (ID,)),
    BlockNack(3, NackReason.BUSY, (ID, ID2)),
    BlockCancel(9, (ID2,)),
]


@pytest.mark.parametrize("m", SAMPLES)
def test_round_trip(m: BlockMessage) -> None:
    enc = push_block_message(m)
    assert pull_block_message(enc) == m
    assert pull_block_message(memoryview(enc)) == m
    for n in range(len(enc)):
        if isinstance(m, BlockPut) and n > PUT_HEADER_LEN:
            continue  # a shorter PUT is a shorter, valid piece
        with pytest.raises(DecodeError):
            pull_block_message(enc[:n])


def test_layouts() -> None:
    assert (
        push_block_message(BlockWant(7, 60_000, (ID,)))
        == struct.pack("!BBIIH", 1, 1, 7, 60_000, 1) + ID
    )
    assert (
        push_block_message(BlockPut(5, ID, 10, 2, b"ab"))
        == struct.pack("!BBI32sII", 1, 2, 5, ID, 10, 2) + b"ab"
    )
    assert (
        push_block_message(BlockNack(5, NackReason.BUSY, (ID,)))
        == struct.pack("!BBIBH", 1, 3, 5, 2, 1) + ID
    )
    assert push_block_message(BlockCancel(5, (ID,))) == struct.pack("!BBIH", 1, 4, 5, 1) + ID
    assert PUT_HEADER_LEN == 46


def test_decode_faults() -> None:
    want = push_block_message(BlockWant(1, 60_000, (ID,)))
    with pytest.raises(VersionError):
        pull_block_message(b"\x02" + want[1:])
    with pytest.raises(MalformedError, match="type"):
        pull_block_message(b"\x01\x09" + want[2:])
    with pytest.raises(MalformedError, match="junk"):
        pull_block_message(want + b"\x00")
    with pytest.raises(MalformedError, match="max_put"):
        pull_block_message(struct.pack("!BBIIH", 1, 1, 1, 100, 1) + ID)
    with pytest.raises(MalformedError, match="1 to"):
        pull_block_message(struct.pack("!BBIIH", 1, 1, 1, 60_000, 0))
    with pytest.raises(MalformedError, match="1 to"):
        pull_block_message(struct.pack("!BBIIH", 1, 1, 1, 60_000, 65535) + ID)
    with pytest.raises(MalformedError, match="reason"):
        pull_block_message(struct.pack("!BBIBH", 1, 3, 1, 9, 1) + ID)
    with pytest.raises(MalformedError, match="outside"):
        pull_block_message(struct.pack("!BBI32sII", 1, 2, 1, ID, 10, 8) + b"abc")
    with pytest.raises(MalformedError, match="block size"):
        pull_block_message(struct.pack("!BBI32sII", 1, 2, 1, ID, MAX_BLOCK_SIZE + 1, 0) + b"a")
    with pytest.raises(MalformedError, match="at least one byte"):
        pull_block_message(struct.pack("!BBI32sII", 1, 2, 1, ID, 10, 0))
    with pytest.raises(OversizeError):
        pull_block_message(bytes(MAX_BLOCK_MESSAGE + 1))
    with pytest.raises(TruncatedError):
        pull_block_message(b"")


def test_encoder_limits() -> None:
    with pytest.raises(MalformedError):
        push_block_message(BlockWant(1, 60_000, ()))
    with pytest.raises(MalformedError):
        push_block_message(BlockWant(1, 60_000, (ID,) * (MAX_IDS_PER_MESSAGE + 1)))
    with pytest.raises(MalformedError):
        push_block_message(BlockWant(1, 100, (ID,)))
    with pytest.raises(MalformedError):
        push_block_message(BlockWant(2**32, 60_000, (ID,)))
    with pytest.raises(MalformedError):
        push_block_message(BlockCancel(1, (b"short",)))
    with pytest.raises(OversizeError):
        push_block_message(BlockPut(1, ID, 100_000, 0, bytes(MAX_BLOCK_MESSAGE)))
    with pytest.raises(MalformedError):
        push_block_message(BlockPut(1, ID, 10, 5, b"toolong"))
    # The largest legal PUT fits one reliable message.
    big = BlockPut(1, ID, 100_000, 0, bytes(MAX_BLOCK_MESSAGE - PUT_HEADER_LEN))
    assert len(push_block_message(big)) == MAX_BLOCK_MESSAGE


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        m = pull_block_message(data)
    except DecodeError:
        return
    assert push_block_message(m) == data


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=120))
def test_fuzz_typed_bodies(t: int, body: bytes) -> None:
    try:
        m = pull_block_message(bytes([1, t]) + body)
    except DecodeError:
        return
    assert push_block_message(m) == bytes([1, t]) + body
