"""Stream routing by intent header (node/services.py): the node's own kinds go to their
handlers, every other stream reaches `accept_stream` byte for byte, and broken headers or
failing handlers cost one stream, never the node."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.node.services import MAX_ROUTING_PER_PEER, RESET_SERVICE_ERROR, header_line
from cellmesh.node.streams import Stream, StreamError

LOCAL = ("127.0.0.1:0",)


def _addr(node: Node) -> str:
    host, port = node.local_addresses()[0]
    return f"{host}:{port}"


async def _pair() -> tuple[Node, Node]:
    a = Node(Identity.generate(), NodeConfig(listen=LOCAL))
    b = Node(Identity.generate(), NodeConfig(listen=LOCAL))
    await a.start()
    await b.start()
    await a.connect(_addr(b))
    return a, b


async def _read_all(st: Stream) -> bytes:
    async with asyncio.timeout(5):
        return await st.read_all()


def test_registered_kinds_reach_their_handler_and_others_reach_the_application() -> None:
    async def go() -> None:
        a, b = await _pair()
        try:
            seen: list[tuple[dict[str, Any], bytes]] = []

            async def echo(st: Stream, header: dict[str, Any]) -> None:
                body = await st.read_all()
                seen.append((header, body))
                await st.write(b"echo:" + body)
                await st.close()

            b.services.register("echo", echo)
            st = await a.services.open(b.cell_id, "echo", note="x")
            await st.write(b"payload")
            await st.close()
            assert await _read_all(st) == b"echo:payload"
            assert seen == [({"v": 1, "kind": "echo", "note": "x"}, b"payload")]

            # Streams of other kinds, raw bytes, and JSON without a newline reach
            # accept_stream unchanged, header included.
            for first in (
                header_line("file", name="x", size=1) + b"Z",
                b"raw bytes, no header",
                b'{"not": "a header, and no newline"}',
            ):
                out = await a.open_stream(b.cell_id)
                await out.write(first)
                await out.close()
                async with asyncio.timeout(15):
                    got = await b.accept_stream()
                assert await _read_all(got) == first
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(go())


def test_a_failing_handler_resets_its_stream_and_the_node_keeps_serving() -> None:
    async def go() -> None:
        a, b = await _pair()
        try:
            calls = 0

            async def broken(st: Stream, header: dict[str, Any]) -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("a bug in a service")
                await st.write(b"fine")
                await st.close()

            b.services.register("svc", broken)
            st = await a.services.open(b.cell_id, "svc")
            await st.close()
            with pytest.raises(StreamError) as info:
                await _read_all(st)
            assert info.value.code == RESET_SERVICE_ERROR
            assert b.services.counters["handler_error"] == 1
            st = await a.services.open(b.cell_id, "svc")
            await st.close()
            assert await _read_all(st) == b"fine"
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(go())


def test_one_peer_cannot_take_every_routing_slot() -> None:
    async def go() -> None:
        a, b = await _pair()
        c = Node(Identity.generate(), NodeConfig(listen=LOCAL))
        await c.start()
        try:
            await c.connect(_addr(b))

            async def echo(st: Stream, header: dict[str, Any]) -> None:
                await st.write(await st.read_all())
                await st.close()

            b.services.register("echo", echo)
            # `a` opens streams that never finish their header: they wait in routing.
            held = []
            for _ in range(MAX_ROUTING_PER_PEER + 4):
                st = await a.open_stream(b.cell_id)
                await st.write(b"{")
                held.append(st)
            async with asyncio.timeout(10):
                while b.services.counters.get("refused_routing", 0) < 4:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert b.services.counters["refused_routing"] == 4
            # Another peer is served meanwhile.
            st = await c.services.open(b.cell_id, "echo")
            await st.write(b"hi")
            await st.close()
            assert await _read_all(st) == b"hi"
        finally:
            await c.stop()
            await a.stop()
            await b.stop()

    asyncio.run(go())


def test_no_service_task_outlives_the_node() -> None:
    async def go() -> None:
        a, b = await _pair()
        started = asyncio.Event()

        async def forever(st: Stream, header: dict[str, Any]) -> None:
            started.set()
            await asyncio.sleep(3600)

        b.services.register("slow", forever)
        try:
            await a.services.open(b.cell_id, "slow")
            await asyncio.wait_for(started.wait(), 10)
            await b.stop()
            assert not b.services._tasks
            assert not b.services.route(Stream(b, a.cell_id, 99))  # refused once stopping
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(go())
