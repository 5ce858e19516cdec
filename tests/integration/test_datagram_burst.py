"""Datagram bursts between two nodes over loopback: corked sends leave in GSO batches, GRO reads
are taken together, and nothing is shed on either side while the receiver keeps up."""

from __future__ import annotations

import asyncio

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import CORK_LIMIT, Node

CONFIG = NodeConfig(listen=("127.0.0.1:0",), max_datagram=1200, recv_buffer=8 << 20)


def test_a_burst_sent_without_yielding_arrives_whole_and_in_order() -> None:
    async def go() -> None:
        async with Node(Identity.generate(), CONFIG) as a, Node(Identity.generate(), CONFIG) as b:
            cell = await a.connect(b.local_addresses()[0])
            count = 3000  # far more than CORK_LIMIT: the corked output must stream out
            assert count > 10 * CORK_LIMIT
            for i in range(count):
                a.send_datagram(cell, i.to_bytes(4, "big") + bytes(1000))
            got: list[int] = []
            async with asyncio.timeout(10):
                while len(got) < count:
                    for sender, data in await b.recv_datagrams():
                        assert sender == a.cell_id
                        got.append(int.from_bytes(data[:4], "big"))
            assert got == list(range(count))
            assert b.inbox_dropped == 0
            conn = a.endpoint.connection_stats(b.cell_id)
            assert conn is not None
            assert conn.control_dropped == 0
            sock = a.status()["socket"]
            assert sock["send_dropped"] == 0
            if sock.get("gso"):
                assert sock["gso_batches"] > 0

    asyncio.run(go())


def test_datagrams_sent_in_one_turn_share_the_flush() -> None:
    async def go() -> None:
        async with Node(Identity.generate(), CONFIG) as a, Node(Identity.generate(), CONFIG) as b:
            cell = await a.connect(b.local_addresses()[0])
            before = a.statistics().datagrams_out
            for i in range(5):
                a.send_datagram(cell, bytes([i]) * 10)
            # Nothing left yet: the output goes at the end of this turn of the loop...
            assert a.statistics().datagrams_out == before
            got = [await asyncio.wait_for(b.recv_datagram(), 5) for _ in range(5)]
            assert [d for _, d in got] == [bytes([i]) * 10 for i in range(5)]
            # ...and the five small datagrams shared one packet.
            assert a.statistics().datagrams_out - before == 1

    asyncio.run(go())
