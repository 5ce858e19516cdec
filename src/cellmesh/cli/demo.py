"""`cellmesh demo`: a throwaway mesh on loopback that shows what cellmesh does, end to end.

Every node is a real `Node` with its own fresh identity and real UDP sockets on 127.0.0.1; they
handshake with Noise, ping each other by CellID, reach a node they have no path to through a
relay, grant channel access with a signed token, and shrug off a burst of hostile datagrams.
Two more nodes show the state layer: signed events in durable logs, and a late subscriber that
catches up by anti-entropy sync. Their databases live in a temporary directory, deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import blake3
from rich.console import Console
from rich.table import Table

from cellmesh.config import NodeConfig
from cellmesh.errors import AccessDeniedError, PeerUnreachableError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.identity.keys import Identity
from cellmesh.identity.tokens import Rights, issue_token
from cellmesh.node.chaos import Impairment, UdpChaosRelay
from cellmesh.node.node import Node
from cellmesh.node.streams import Stream
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


async def _transfer(sender: Node, receiver: Node, data: bytes) -> tuple[float, bytes]:
    """Send `data` over a fresh stream; returns (seconds, BLAKE3 of what arrived)."""

    async def read_all() -> bytes:
        st: Stream = await receiver.accept_stream()
        h = blake3.blake3()
        while chunk := await st.read(1 << 20):
            h.update(chunk)
        await st.close()
        return h.digest()

    reader = asyncio.create_task(read_all())
    t0 = time.perf_counter()
    st = await sender.open_stream(receiver.cell_id)
    for i in range(0, len(data), 1 << 20):
        await st.write(data[i : i + (1 << 20)])
    await st.close()
    digest = await asyncio.wait_for(reader, 120)
    return time.perf_counter() - t0, digest


async def _multihop(console: Console, nodes: list[Node], config: NodeConfig) -> bool:
    """A node that knows only the last node of the mesh reaches node 0 through it."""
    gateway = nodes[-1]
    far = Node(Identity.generate(), config)
    await far.start()
    try:
        await far.connect(gateway.local_addresses()[0])
        routing = far.routing
        if routing is None:
            console.print("  [red]routing is off[/]")
            return False
        for _ in range(100):
            if routing.core.next_hop(nodes[0].cell_id) is not None:
                break
            await asyncio.sleep(0.02)
        rtt = await far.ping(nodes[0].cell_id, timeout=3.0) * 1000
        hops = await routing.trace(nodes[0].cell_id, max_hops=4, timeout=1.0)
        path = " -> ".join(_short(bytes.fromhex(h["cell_id"])) for h in hops if h["cell_id"])
        relayed, _ = gateway.endpoint.relay_statistics()
        console.print(
            f"  a new node that knows only node {len(nodes) - 1} pings node 0 in {rtt:.3f} ms "
            f"through it (path {path}); node {len(nodes) - 1} relayed {relayed} frames "
            "without holding their keys"
        )
        return gateway.endpoint.session_for(far.cell_id) is not None and relayed > 0
    except PeerUnreachableError as exc:
        console.print(f"  [red]{exc}[/]")
        return False
    finally:
        await far.stop()


async def _channels(console: Console, nodes: list[Node]) -> bool:
    """Node 0 hosts a token channel; node 1 holds a token, node 2 does not."""
    host, holder, stranger = nodes[0], nodes[1], nodes[2]
    host.channels.declare("telemetry/**", access="token")
    now = int(time.time())
    token = issue_token(
        host.identity, holder.identity.cell_id, "telemetry/**", Rights.SUBSCRIBE, now, now + 600,
        os.urandom(16),
    )  # fmt: skip
    try:
        await stranger.channels.subscribe(host.cell_id, "telemetry/engine-3")
        console.print("  [red]a node without a token was let in[/]")
        return False
    except AccessDeniedError as exc:
        refused = exc.reason
    await holder.channels.subscribe(host.cell_id, "telemetry/engine-3", (token,))
    sent = host.channels.publish("telemetry/engine-3", b"rpm=3000")
    msg = await asyncio.wait_for(holder.channels.recv("telemetry/engine-3"), 2.0)
    console.print(
        f"  node 2 without a token: refused ({refused}); node 1 with a token node 0 signed: "
        f"subscribed, received {msg.data!r} (published to {sent} peer)"
    )
    return msg.data == b"rpm=3000" and refused == "token_required"


async def _state(console: Console) -> bool:
    """A host writes 500 signed events; a node that subscribes afterwards catches up by sync."""
    channel = "logbook/site-7"
    with tempfile.TemporaryDirectory(prefix="cellmesh-demo-") as tmp:

        def cfg(name: str, *channels: str) -> NodeConfig:
            return NodeConfig(
                listen=("127.0.0.1:0",), channels=channels, database=str(Path(tmp) / name)
            )

        async with (
            Node(Identity.generate(), cfg("host.db", "logbook/** open")) as host,
            Node(Identity.generate(), cfg("late.db")) as late,
        ):
            t = time.perf_counter()
            batch = [f"reading {i}".encode() for i in range(500)]
            for data in batch:
                host.state.publish(channel, data)
            wrote = time.perf_counter() - t
            h, p = host.local_addresses()[0]
            await late.connect(f"{h}:{p}")
            t = time.perf_counter()
            await late.channels.subscribe(host.cell_id, channel)
            key = (host.cell_id, channel)
            while key not in late.state.sync.last_reports:
                await asyncio.sleep(0.01)
                if time.perf_counter() - t > 30:
                    console.print("  [red]the late subscriber did not catch up[/]")
                    return False
            took = time.perf_counter() - t
            report = late.state.sync.last_reports[key]
            before = late.state.last_position(channel)
            live = host.state.publish(channel, b"reading 500 (live)")
            got = await asyncio.wait_for(late.state.next_event(channel, before), 5.0)
            held = late.state.log(channel)
            sound = late.state.verify(channel) == []
            console.print(
                f"  node A wrote 500 signed, hash-chained events ({wrote * 1000 / 500:.2f} ms "
                f"each, fsynced); node B subscribed afterwards and caught up by sync in "
                f"{took * 1000:.0f} ms ({report.events_new} events, "
                f"{report.bytes_received / 1000:.0f} kB); the next event arrived live; "
                f"B's log: {len(held)} events, signatures and chains "
                + ("verified" if sound else "[red]NOT verified[/]")
            )
            return len(held) == 501 and sound and got is not None and held[-1].id == live


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

        console.print("\nReliable stream (flow and congestion control, path MTU discovery):")
        data = os.urandom(32 * 1024 * 1024)
        want = blake3.blake3(data).digest()
        secs, got = await _transfer(nodes[1], nodes[0], data)
        conn = nodes[1].endpoint.connection(nodes[0].cell_id)
        mtu = conn.mtu if conn is not None else 0
        same = got == want
        ok = ok and same
        console.print(
            f"  32 MiB node 1 -> node 0 in {secs * 1000:.0f} ms ({len(data) / secs / 1e6:.0f} MB/s), "
            f"path MTU {mtu} bytes, BLAKE3 {'verified' if same else '[red]MISMATCH[/]'}"
        )

        impairment = Impairment(loss=0.05, delay=0.005, duplicate=0.01, reorder=0.02)
        console.print(
            "\nThrough a hostile link (a relay dropping 5%, duplicating 1%, reordering 2%, "
            "+10 ms RTT):"
        )
        target = format_addr(nodes[0].local_addresses()[0])
        async with UdpChaosRelay("127.0.0.1:0", target, impairment, seed=1) as relay:
            far = Node(Identity.generate(), config)
            await far.start()
            try:
                await far.connect(relay.address)
                lossy = os.urandom(4 * 1024 * 1024)
                secs, got = await _transfer(far, nodes[0], lossy)
                st = far.endpoint.connection_stats(nodes[0].cell_id)
                same = got == blake3.blake3(lossy).digest()
                ok = ok and same
                rs = relay.stats()
                relay_drops = rs.up.dropped_loss + rs.down.dropped_loss
                console.print(
                    f"  4 MiB in {secs:.2f} s ({len(lossy) / secs / 1e6:.1f} MB/s); the relay dropped "
                    f"{relay_drops} datagrams, {st.packets_lost if st else 0} packets were declared lost "
                    f"and {st.bytes_retransmitted if st else 0} bytes resent; "
                    f"BLAKE3 {'verified' if same else '[red]MISMATCH[/]'}"
                )
            finally:
                await far.stop()

        victim, friend = nodes[0], nodes[1]
        hostile = _hostile_datagrams(victim, friend.cell_id, 3000)
        console.print(
            f"\nAttack: {len(hostile)} hostile datagrams at node 0 (junk, truncated, wrong version, "
            "unknown session, forged tags, reflections)."
        )
        before = victim.statistics().drops
        victim_addr = victim.local_addresses()[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for k, d in enumerate(hostile):
                s.sendto(d, victim_addr)
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

        console.print("\nMulti-hop (distance-vector routes, relays that never decrypt):")
        ok = await _multihop(console, nodes, config) and ok
        if n_nodes >= 3:
            console.print(
                "\nChannels with permission tokens (Ed25519-signed, checked once, cached):"
            )
            ok = await _channels(console, nodes) and ok
        console.print("\nState layer (signed events, durable logs, anti-entropy sync):")
        ok = await _state(console) and ok

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
