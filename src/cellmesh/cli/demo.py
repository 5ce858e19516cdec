"""`cellmesh demo`: a throwaway mesh on loopback that shows what cellmesh does, end to end.

Every node is a real `Node` with its own fresh identity and real UDP sockets on 127.0.0.1; they
handshake with Noise, ping each other by CellID, and shrug off a burst of hostile datagrams.
Nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time

from rich.console import Console
from rich.table import Table

from cellmesh.config import NodeConfig
from cellmesh.errors import PeerUnreachableError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.node.udp import format_addr
from cellmesh.wire.header import HEADER_LEN, FrameType, pack_header


def _short(cell: bytes) -> str:
    return format_cell_id(cell)[:12] + "…"


def _hostile_datagrams(victim: Node, sender_cell: bytes, n: int) -> list[bytes]:
    """A mix of what an attacker on the LAN can send: junk, truncations, forgeries, replays."""
    out: list[bytes] = []
    session = victim.endpoint
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(os.urandom(1 + i % 200))  # random junk
        elif kind == 1:
            out.append(b"\x01\x05" + os.urandom(20))  # truncated header
        elif kind == 2:  # wrong version
            out.append(b"\x09" + os.urandom(HEADER_LEN + 20))
        elif kind == 3:  # a DATA frame under an unknown session id
            body = os.urandom(48)
            out.append(
                pack_header(FrameType.DATA, sender_cell, victim.cell_id, i + 1, i, len(body)) + body
            )
        elif kind == 4:  # a forged DATA frame on a real session id (bad tag)
            s = session.session_for(sender_cell)
            sid = s.local_index if s is not None else 1
            body = os.urandom(48)
            out.append(
                pack_header(FrameType.DATA, sender_cell, victim.cell_id, sid, 10**6 + i, len(body))
                + body
            )
        else:  # a reflection: a frame claiming to come from the victim itself
            body = os.urandom(32)
            out.append(
                pack_header(FrameType.DATA, victim.cell_id, victim.cell_id, 7, i, len(body)) + body
            )
    return out


async def run_demo(console: Console, n_nodes: int, pings: int) -> bool:
    """Run the demo; True when every check passed."""
    t0 = time.perf_counter()
    config = NodeConfig(listen=("127.0.0.1:0",), peers=())
    nodes = [Node(Identity.generate(), config) for _ in range(n_nodes)]
    ok = True
    console.rule("[bold]cellmesh demo")
    console.print(f"Starting {n_nodes} nodes on loopback, each with a fresh Ed25519 identity.")
    for n in nodes:
        await n.start()
    try:
        for i, n in enumerate(nodes):
            addr = format_addr(n.local_addresses()[0])
            console.print(f"  node {i}: CellID {format_cell_id(n.cell_id)} at {addr}")

        console.print("\nHandshakes (Noise XX, identities bound by Ed25519 signatures):")
        t_hs = time.perf_counter()
        for i in range(1, n_nodes):
            for j in range(i):
                cell = await nodes[i].connect(nodes[j].local_addresses()[0])
                if cell != nodes[j].cell_id:
                    console.print(f"  [red]node {i} reached the wrong CellID[/]")
                    ok = False
        hs_ms = (time.perf_counter() - t_hs) * 1000
        pairs = n_nodes * (n_nodes - 1) // 2
        console.print(f"  {pairs} sessions up in {hs_ms:.1f} ms, every peer addressed by CellID.")

        console.print(f"\nEncrypted pings by CellID ({pings} per pair):")
        table = Table(box=None, header_style="bold")
        for col in ("from", "to", "replies", "median RTT", "max RTT"):
            table.add_column(col)
        for i in range(n_nodes):
            for j in range(n_nodes):
                if i == j:
                    continue
                rtts = []
                for _ in range(pings):
                    try:
                        rtts.append(await nodes[i].ping(nodes[j].cell_id, timeout=2.0) * 1000)
                    except PeerUnreachableError:
                        ok = False
                med = f"{statistics.median(rtts):.3f} ms" if rtts else "-"
                mx = f"{max(rtts):.3f} ms" if rtts else "-"
                table.add_row(
                    _short(nodes[i].cell_id),
                    _short(nodes[j].cell_id),
                    f"{len(rtts)}/{pings}",
                    med,
                    mx,
                )
        console.print(table)

        victim, friend = nodes[0], nodes[1]
        hostile = _hostile_datagrams(victim, friend.cell_id, 3000)
        console.print(
            f"\nAttack: {len(hostile)} hostile datagrams at node 0 (junk, truncated, wrong version, "
            "unknown session, forged tags, reflections)."
        )
        before = victim.statistics().drops
        target = victim.local_addresses()[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for k, d in enumerate(hostile):
                s.sendto(d, target)
                if k % 200 == 199:
                    await asyncio.sleep(0.005)  # let the node drain; loopback buffers are finite
        await asyncio.sleep(0.2)
        after = victim.statistics().drops
        dropped = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        dropped = {k: v for k, v in dropped.items() if v}
        total = sum(dropped.values())
        console.print(
            f"  dropped and counted: {total} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))
            + ")"
        )
        try:
            rtt = await friend.ping(victim.cell_id, timeout=2.0) * 1000
            console.print(f"  node 1 -> node 0 ping afterwards: {rtt:.3f} ms. Still serving.")
        except PeerUnreachableError as exc:
            console.print(f"  [red]ping after the attack failed: {exc}[/]")
            ok = False
        if total < len(hostile) * 0.9:
            console.print("  [yellow]fewer drops counted than sent (socket buffer overflow?)[/]")

        console.print("\nPeers of node 0 (what `cellmesh peers` shows):")
        pt = Table(box=None, header_style="bold")
        for col in ("CellID", "address", "RTT", "packets in/out"):
            pt.add_column(col)
        for p in victim.peers():
            rtt_s = "-" if p.rtt is None else f"{p.rtt * 1000:.3f} ms"
            pt.add_row(
                format_cell_id(p.cell_id),
                format_addr(p.addr),
                rtt_s,
                f"{p.packets_in}/{p.packets_out}",
            )
        console.print(pt)
    finally:
        for n in nodes:
            await n.stop()
    took = time.perf_counter() - t0
    verdict = "[bold green]all checks passed[/]" if ok else "[bold red]some checks failed[/]"
    console.rule(f"{verdict} in {took:.2f} s")
    return ok
