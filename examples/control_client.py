"""Ask a running `cellmesh node` daemon about itself through its control socket.

Run: .venv/bin/python examples/control_client.py --home DIR [CELLID]
"""

from __future__ import annotations

import argparse
import asyncio

from cellmesh import ControlClient, NodeHome


async def main(home_dir: str, ping: str | None) -> None:
    home = NodeHome(home_dir)
    async with ControlClient(home.control_socket_path) as node:
        status = await node.call("status")
        print(f"node {status['cell_id']} listening on {', '.join(status['listen'])}")
        for peer in await node.call("peers"):
            print(f"  peer {peer['cell_id']} at {peer['address']}, rtt {peer['rtt_ms']} ms")
        if ping:
            reply = await node.call("ping", cell_id=ping, timeout=2.0)
            print(f"  ping {ping}: {reply['rtt'] * 1000:.3f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--home", required=True)
    ap.add_argument("cell_id", nargs="?")
    args = ap.parse_args()
    asyncio.run(main(args.home, args.cell_id))
