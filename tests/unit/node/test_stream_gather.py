"""`Stream` buffering of what arrived but is not read yet: tiny pieces (a peer sending one- or
two-byte frames) are gathered, so an unread stream holds a few objects, not one per frame, and
every read still returns exactly the bytes that arrived, as bytes."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from cellmesh.node.node import Node
from cellmesh.node.streams import Stream


class _FakeNode:
    """What a `Stream` calls back into: consumed bytes are counted."""

    def __init__(self) -> None:
        self.consumed = 0

    def _stream_consumed(self, st: Stream, n: int) -> None:
        self.consumed += n

    def _stream_eof(self, st: Stream) -> None:
        pass


def _stream() -> tuple[Stream, _FakeNode]:
    node = _FakeNode()
    return Stream(cast(Node, node), bytes(16), 1), node


def _pieces(st: Stream) -> int:
    return len(cast(Any, st)._chunks)


def test_tiny_pieces_are_gathered_and_read_back_exactly() -> None:
    st, node = _stream()
    data = bytes(i & 0xFF for i in range(200_000))
    for i in range(0, len(data), 2):  # 100,000 two-byte frames
        st._feed(data[i : i + 2], False)
    assert _pieces(st) <= 4  # 64 KiB tails, not 100,000 objects
    st._feed(b"", True)

    async def read_all() -> bytes:
        out = bytearray()
        while chunk := await st.read(50_000):
            assert type(chunk) is bytes
            out += chunk
        return bytes(out)

    assert asyncio.run(read_all()) == data
    assert node.consumed == len(data)


def test_gathered_pieces_leave_read_chunks_as_bytes_and_large_pieces_stay_whole() -> None:
    st, _ = _stream()
    big = memoryview(bytes(range(256)) * 40)  # 10,240 bytes: kept as it arrived
    st._feed(b"ab", False)
    st._feed(b"cd", False)
    st._feed(big, False)
    st._feed(b"ef", False)
    st._feed(b"", True)

    async def take() -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        while pieces := await st.read_chunks(5000):
            out += pieces
        return out

    got = asyncio.run(take())
    assert b"".join(bytes(p) for p in got) == b"abcd" + bytes(big) + b"ef"
    assert got[0] == b"abcd"
    assert type(got[0]) is bytes
    assert not any(isinstance(p, bytearray) for p in got)
    assert all(p.readonly for p in got if isinstance(p, memoryview))
