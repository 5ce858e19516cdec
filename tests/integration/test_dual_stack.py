"""A node on the default dual-stack wildcard is reachable over IPv6 and IPv4 alike."""

from __future__ import annotations

import asyncio

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from conftest import free_udp_port


def test_dual_stack_listener_serves_ipv6_and_ipv4_peers() -> None:
    async def go() -> None:
        port = free_udp_port()
        # No discovery: the wildcard listener here is in the machine's own namespace.
        server_cfg = NodeConfig(listen=(f"[::]:{port}",), discovery=False)
        async with (
            Node(Identity.generate(), server_cfg) as server,
            Node(Identity.generate(), NodeConfig(listen=("[::1]:0",))) as v6,
            Node(Identity.generate(), NodeConfig(listen=("127.0.0.1:0",))) as v4,
        ):
            assert await v6.connect(f"[::1]:{port}") == server.cell_id
            assert await v4.connect(f"127.0.0.1:{port}") == server.cell_id
            assert await v6.ping(server.cell_id) > 0
            assert await v4.ping(server.cell_id) > 0
            # The server sees the IPv4 peer as plain IPv4, not as an IPv4-mapped IPv6 address.
            addrs = {p.cell_id: p.addr for p in server.peers()}
            assert addrs[v4.cell_id][0] == "127.0.0.1"
            assert addrs[v6.cell_id][0] == "::1"
            # And it can reach both back by CellID.
            assert await server.ping(v4.cell_id) > 0
            assert await server.ping(v6.cell_id) > 0

    asyncio.run(go())
