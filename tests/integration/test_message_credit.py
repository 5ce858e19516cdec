"""Reliable messages between real nodes are never lost to a slow reader: a node whose
application does not take messages holds at most MESSAGE_WINDOW of each peer's, the peer waits
for credit, and every message arrives once the application reads (MAX_MESSAGES)."""

from __future__ import annotations

import asyncio

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.transport.connection import MESSAGE_WINDOW

LOCAL = ("127.0.0.1:0",)


def test_a_reader_that_falls_behind_loses_nothing() -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), NodeConfig(listen=LOCAL)) as reader,
            Node(Identity.generate(), NodeConfig(listen=LOCAL)) as writer,
        ):
            host, port = reader.local_addresses()[0]
            await writer.connect(f"{host}:{port}")
            n = 3 * MESSAGE_WINDOW
            for i in range(n):
                await writer.send_message(reader.cell_id, i.to_bytes(4, "big"))
            # Nobody reads yet: the reader holds at most one window (less the few channel-layer
            # control messages the nodes exchanged, which share the credit), the writer keeps
            # the rest.
            conn = writer.endpoint.connection(reader.cell_id)
            assert conn is not None
            async with asyncio.timeout(10):
                while not conn.messages_blocked or reader._messages.qsize() < MESSAGE_WINDOW - 8:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert MESSAGE_WINDOW - 8 <= reader._messages.qsize() <= MESSAGE_WINDOW
            got = []
            async with asyncio.timeout(30):
                for _ in range(n):
                    cell, data = await reader.recv_message()
                    assert cell == writer.cell_id
                    got.append(int.from_bytes(data, "big"))
            assert sorted(got) == list(range(n))
            assert reader.inbox_dropped == 0

    asyncio.run(go())
