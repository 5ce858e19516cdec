"""Two cellmesh nodes inside one program: handshake, ping by CellID, exchange datagrams.

Run: .venv/bin/python examples/embedded_ping.py
"""

from __future__ import annotations

import asyncio

from cellmesh import Identity, Node, NodeConfig


async def main() -> None:
    cfg = NodeConfig(listen=("127.0.0.1:0",))
    async with Node(Identity.generate(), cfg) as a, Node(Identity.generate(), cfg) as b:
        # B dials A's address once; from then on A is addressed by its CellID only.
        a_cell = await b.connect(a.local_addresses()[0])
        assert a_cell == a.cell_id
        rtt = await b.ping(a_cell)
        print(f"ping {a_cell.hex()}: {rtt * 1000:.3f} ms")

        # Unreliable, encrypted application datagrams.
        b.send_datagram(a_cell, b"hello from b")
        sender, data = await asyncio.wait_for(a.recv_datagram(), 2.0)
        print(f"a received {data!r} from {sender.hex()}")
        a.send_datagram(sender, data.upper())
        _, reply = await asyncio.wait_for(b.recv_datagram(), 2.0)
        print(f"b received {reply!r}")

        for peer in a.peers():
            print(f"a's peer {peer.cell_id.hex()} at {peer.addr[0]}:{peer.addr[1]}")


if __name__ == "__main__":
    asyncio.run(main())
