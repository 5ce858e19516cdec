"""The node's datagram inbox: order, a hard limit with a drop count, fair waiting readers."""

from __future__ import annotations

import asyncio

import pytest

from cellmesh.node.inbox import DatagramInbox

CELL = bytes(16)


def test_datagrams_come_out_in_order_and_the_excess_is_counted() -> None:
    async def go() -> None:
        box = DatagramInbox(3)
        for i in range(5):
            box.put(CELL, bytes([i]))
        assert len(box) == 3
        assert box.dropped == 2
        assert [await box.get() for _ in range(3)] == [(CELL, bytes([i])) for i in range(3)]
        assert len(box) == 0

    asyncio.run(go())


def test_a_waiting_reader_is_woken_by_the_next_datagram() -> None:
    async def go() -> None:
        box = DatagramInbox(8)
        reader = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        assert not reader.done()
        box.put(CELL, b"x")
        assert await asyncio.wait_for(reader, 1.0) == (CELL, b"x")

    asyncio.run(go())


def test_readers_are_served_in_the_order_they_came() -> None:
    async def go() -> None:
        box = DatagramInbox(8)
        readers = [asyncio.ensure_future(box.get()) for _ in range(3)]
        await asyncio.sleep(0)
        for i in range(3):
            box.put(CELL, bytes([i]))
        got = await asyncio.wait_for(asyncio.gather(*readers), 1.0)
        assert [d for _, d in got] == [b"\x00", b"\x01", b"\x02"]

    asyncio.run(go())


def test_a_reader_cancelled_after_its_wake_up_passes_its_turn_on() -> None:
    async def go() -> None:
        box = DatagramInbox(8)
        first = asyncio.ensure_future(box.get())
        second = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        box.put(CELL, b"only")  # wakes `first`...
        first.cancel()  # ...which goes away before it runs
        assert await asyncio.wait_for(second, 1.0) == (CELL, b"only")
        assert first.cancelled()

    asyncio.run(go())


def test_a_cancelled_reader_leaves_no_waiter_behind() -> None:
    async def go() -> None:
        box = DatagramInbox(8)
        reader = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        box.put(CELL, b"later")
        assert await box.get() == (CELL, b"later")

    asyncio.run(go())


def test_get_batch_returns_what_waits_up_to_the_limit() -> None:
    async def go() -> None:
        box = DatagramInbox(100)
        for i in range(10):
            box.put(CELL, bytes([i]))
        first = await box.get_batch(4)
        rest = await box.get_batch(100)
        assert [d for _, d in first + rest] == [bytes([i]) for i in range(10)]
        assert len(first) == 4
        waiting = asyncio.ensure_future(box.get_batch(5))
        await asyncio.sleep(0)
        assert not waiting.done()
        box.put(CELL, b"z")
        assert await asyncio.wait_for(waiting, 1.0) == [(CELL, b"z")]

    asyncio.run(go())


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DatagramInbox(0)
