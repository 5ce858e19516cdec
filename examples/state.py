"""Publish on a channel, follow it live, read and verify its durable log and fold it to a state
with `cellmesh.connect`.

Run: .venv/bin/python examples/state.py [--home DIR]

With --home it uses the node of DIR: the `cellmesh node` daemon serving it, or (none running) a
node started in this process from DIR's identity and config.toml. Without --home it makes a
throwaway home with a new identity. See docs/state.md, "Python API: cellmesh.connect".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import cellmesh

CHANNEL = "demo/groceries"
PANTRY = "demo/pantry"


async def main(home: Path) -> None:
    async with cellmesh.connect(home) as node:
        print(f"{node.mode} node {node.cell_id}")
        # Entering the block fixes where the subscription starts: the end of the log now.
        async with node.subscribe(CHANNEL) as live:
            for item in ("milk", "eggs"):
                sent = await node.publish(CHANNEL, item)  # returns once stored durably
                print(f"published #{sent.seq} at position {sent.position}: {item}")
            async for ev in live:  # ours and, on a shared channel, our peers' events
                print(f"live: {ev.text!r} by {ev.author[:8]}… seq {ev.seq} clock {ev.clock}")
                if ev.text == "eggs":
                    break
        history = await node.log(CHANNEL)  # everything held, in causal order
        print(f"log: {[ev.text for ev in history]}")
        report = await node.verify(CHANNEL)  # signatures, hash chains, clocks
        print(f"verified {report.events} events: {'sound' if report.ok else report.problems}")

        # Folds reduce a channel to a state; "lww" is a last-writer-wins map.
        for change in ({"set": {"milk": 2, "eggs": 12}}, {"set": {"milk": 1}, "del": ["eggs"]}):
            await node.publish(PANTRY, json.dumps(change))
        pantry = await node.fold(PANTRY, "lww")
        print(f"pantry: {pantry.value} after {pantry.events} events")
        # A query merges the fold of every replica of the channel this node can reach.
        merged = await node.query(PANTRY, "lww", key="milk")
        print(f"milk: {merged.value} ({merged.replicas} replica(s) merged)")


def throwaway_home(root: Path) -> Path:
    """A new home: an identity (unencrypted keystore) and a loopback-only config."""
    home = cellmesh.NodeHome(root / "home")
    home.create_identity(passphrase=None, force=False)
    home.config_path.write_text('listen = ["127.0.0.1:0"]\ndiscovery = false\n')
    return home.path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--home", type=Path, help="a node home (default: a throwaway one)")
    args = ap.parse_args()
    if args.home is not None:
        asyncio.run(main(args.home))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(throwaway_home(Path(tmp))))
