"""`Stream.read_chunks`: the zero-copy read for bulk consumers. Two real nodes on loopback.

It must hand over exactly the bytes `read` would (in order, none twice, none lost), never more
than asked for in one call, as read-only pieces, return flow credit for what it hands over (or a
transfer larger than the windows would stall), and end with an empty list."""

from __future__ import annotations

import asyncio
import random

import pytest

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.node.streams import Stream

LOCAL = ("127.0.0.1:0",)
# Small windows: the transfer below is 6x the stream window, so it completes only if every
# piece read_chunks hands over is credited back to the sender.
WINDOW = 256 * 1024
CONFIG = NodeConfig(
    listen=LOCAL,
    stream_window=WINDOW,
    stream_window_max=WINDOW,
    connection_window=2 * WINDOW,
    connection_window_max=2 * WINDOW,
)


def _payload(n: int) -> bytes:
    return random.Random(n).randbytes(n)


async def _pair() -> tuple[Node, Node]:
    a = Node(Identity.generate(), CONFIG)
    b = Node(Identity.generate(), CONFIG)
    await a.start()
    await b.start()
    host, port = b.local_addresses()[0]
    await a.connect(f"{host}:{port}")
    return a, b


async def _send(a: Node, b: Node, data: bytes, pieces: int) -> Stream:
    """Open a stream to `b` and write `data` in `pieces` writes, then finish it."""
    st = await a.open_stream(b.cell_id)
    step = -(-len(data) // pieces)
    for off in range(0, len(data), step):
        await st.write(data[off : off + step])
    await st.close()
    return st


@pytest.mark.parametrize("limit", [1, 1000, 70_000, 1 << 20])
def test_read_chunks_delivers_the_stream_exactly_within_the_limit(limit: int) -> None:
    data = _payload(6 * WINDOW + 12345)

    async def main() -> None:
        a, b = await _pair()
        try:
            sender = asyncio.create_task(_send(a, b, data, 37))
            async with asyncio.timeout(30):
                st = await b.accept_stream()
                got = bytearray()
                while pieces := await st.read_chunks(limit):
                    assert 0 < sum(len(p) for p in pieces) <= limit
                    for p in pieces:
                        assert len(p) > 0
                        if isinstance(p, memoryview):
                            assert p.readonly  # a view of a packet nobody may change
                        got += p
                assert bytes(got) == data
                assert st.bytes_read == len(data)
                assert await st.read_chunks(limit) == []  # the end stays the end
                assert await st.read() == b""
                await sender
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_read_chunks_and_read_interleave_and_pushed_back_bytes_come_first() -> None:
    data = _payload(3 * WINDOW)

    async def main() -> None:
        a, b = await _pair()
        try:
            sender = asyncio.create_task(_send(a, b, data, 5))
            async with asyncio.timeout(30):
                st = await b.accept_stream()
                head = await st.read(10)
                st.unread(head[4:])  # pushed back: the next read of any kind returns it first
                got = bytearray(head[:4])
                first = await st.read_chunks(1 << 20)
                assert bytes(first[0]) == head[4:]
                for p in first:
                    got += p
                use_chunks = False
                while True:
                    if use_chunks:
                        pieces = await st.read_chunks(50_000)
                        if not pieces:
                            break
                        for p in pieces:
                            got += p
                    else:
                        chunk = await st.read(30_000)
                        if not chunk:
                            break
                        got += chunk
                    use_chunks = not use_chunks
                assert bytes(got) == data
                await sender
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_read_chunks_refuses_a_limit_below_one() -> None:
    async def main() -> None:
        a, b = await _pair()
        try:
            sender = asyncio.create_task(_send(a, b, b"abc", 1))
            async with asyncio.timeout(10):
                st = await b.accept_stream()
                with pytest.raises(ValueError, match="n >= 1"):
                    await st.read_chunks(0)
                assert b"".join(bytes(p) for p in await st.read_chunks(10)) == b"abc"
                await sender
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())
