"""Round-trip time of an encrypted cellmesh ping between two OS processes on 127.0.0.1.

Layout: this process runs a `Node` and pings, sequentially, a `Node` running in a child process
(spawned interpreter, its own event loop), so every round trip crosses two real process
boundaries and the loopback UDP path: seal, sendto, wake-up, drain, open, PONG seal, sendto,
wake-up, open, future resolution. The figure is what `await node.ping(cell)` takes as seen by the
caller (perf_counter around the await); the RTT the endpoint itself records is shown too.

Baseline in the same run: a plain UDP echo of a datagram of the same size (91 bytes = 64-byte
header + PING record + tag) between a blocking client socket here and a blocking
recvfrom/sendto server in a child process. For information, an asyncio echo (loop.add_reader on
raw non-blocking sockets at both ends, no crypto, no protocol) separates the cost of the event loop
from the cost of cellmesh itself. All three are interleaved in rounds against three children that
are started together, so noise on a shared machine hits them alike.

Placement is pinned and reported twice: every process on one CPU ("same CPU": the software cost)
and the pinger on one CPU with the echo servers on the other ("separate CPUs": each datagram also
wakes an idle vCPU, tens of microseconds per direction on a VM, paid by the baseline as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time

from _common import (
    LOOPBACK,
    Child,
    Connection,
    Metric,
    Result,
    Target,
    can_pin,
    child_process,
    cpus,
    exit_on_sigterm,
    expect,
    now_ns,
    parse_args,
    pin,
    print_header,
    report,
    run_child,
    summarize,
    unpin,
)
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node, stats_dict
from cellmesh.wire.header import HEADER_LEN

BENCH = "bench_ping"
TARGET_S = 150e-6
REWARM = 20
PING_WIRE_LEN = HEADER_LEN + 3 + 8 + 16  # header, record header, ping id, AEAD tag
Addr = tuple[str, int]


def node_config() -> NodeConfig:
    return NodeConfig(listen=(f"{LOOPBACK}:0",))


# ------------------------------------------------------------------------------ children


def node_echo_child(conn: Connection) -> None:
    """A Node that answers pings (the endpoint does) until the parent says stop."""
    run_child(conn, lambda: asyncio.run(_node_echo(conn)))


async def _node_echo(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(conn.fileno(), stop.set)
    async with Node(Identity.generate(), node_config()) as node:
        conn.send((node.local_addresses()[0], node.cell_id))
        await stop.wait()
        loop.remove_reader(conn.fileno())
        if conn.poll():
            conn.recv()
        conn.send(stats_dict(node.statistics()))


def _exit_when_parent_says(conn: Connection) -> None:
    """Helper thread for blocking children: exit on a parent message or a closed pipe."""

    def wait() -> None:
        with contextlib.suppress(EOFError, OSError):
            conn.recv()
        os._exit(0)

    threading.Thread(target=wait, daemon=True).start()


def udp_echo_child(conn: Connection) -> None:
    """Baseline: a blocking raw UDP echo server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    conn.send(sock.getsockname())
    _exit_when_parent_says(conn)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, addr = recvfrom(2048)
        sendto(data, addr)


def asyncio_echo_child(conn: Connection) -> None:
    """Information: the same echo driven by an asyncio loop (add_reader + drain), no crypto."""
    run_child(conn, lambda: asyncio.run(_asyncio_echo(conn)))


async def _asyncio_echo(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((LOOPBACK, 0))

    def on_readable() -> None:
        while True:
            try:
                data, addr = sock.recvfrom(2048)
            except BlockingIOError:
                return
            sock.sendto(data, addr)

    stop = asyncio.Event()
    loop.add_reader(sock.fileno(), on_readable)
    loop.add_reader(conn.fileno(), stop.set)
    conn.send(sock.getsockname())
    await stop.wait()
    loop.remove_reader(sock.fileno())
    loop.remove_reader(conn.fileno())
    sock.close()


# ------------------------------------------------------------------------------ clients


class UdpClient:
    """Blocking client for the baseline echo."""

    def __init__(self, addr: Addr) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(addr)
        self.sock.settimeout(2.0)
        self.payload = bytes(PING_WIRE_LEN)

    def pings(self, n: int, out: list[float]) -> None:
        send, recv, payload = self.sock.send, self.sock.recv, self.payload
        for _ in range(n):
            t0 = now_ns()
            send(payload)
            data = recv(2048)
            out.append((now_ns() - t0) * 1e-9)
            if len(data) != PING_WIRE_LEN:
                raise AssertionError("bad echo")


class AsyncioClient:
    """asyncio client: send on a raw socket, await a future the reader callback resolves."""

    def __init__(self, addr: Addr, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(addr)
        self.payload = bytes(PING_WIRE_LEN)
        self.waiter: asyncio.Future[bytes] | None = None
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                return
            w = self.waiter
            if w is not None and not w.done():
                w.set_result(data)

    async def pings(self, n: int, out: list[float]) -> None:
        for _ in range(n):
            t0 = now_ns()
            self.waiter = self.loop.create_future()
            self.sock.send(self.payload)
            await asyncio.wait_for(self.waiter, 2.0)
            out.append((now_ns() - t0) * 1e-9)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def node_pings(node: Node, cell: bytes, n: int, api: list[float], core: list[float]) -> None:
    for _ in range(n):
        t0 = now_ns()
        rtt = await node.ping(cell)
        api.append((now_ns() - t0) * 1e-9)
        core.append(rtt)


Placement = tuple[str, int, int]  # (name, our CPU, the children's CPU)


def placements() -> list[Placement]:
    """Where to run: every process on one CPU, and pinger / echo servers on two CPUs.

    Pinning matters here: on this kind of VM waking a process on an idle *other* vCPU costs tens of
    microseconds per direction, while handing over on the same CPU costs a few. Left to the
    scheduler, a run measures whichever placement it happened to pick, so we pin and show both.
    """
    if not can_pin():
        return [("unpinned", -1, -1)]
    c = cpus()
    return [("same CPU", c[0], c[0]), ("separate CPUs", c[0], c[1])]


def place(where: Placement, children: list[Child]) -> None:
    _, ours, theirs = where
    if ours < 0:
        return
    pin(0, ours)
    for ch in children:
        pin(ch.pid, theirs)


async def run_rounds(
    children: list[Child],
    addrs: tuple[Addr, Addr, Addr],
    rounds: int,
    per_round: int,
    warmup: int,
) -> tuple[dict[tuple[str, str], list[float]], dict[str, object]]:
    node_addr, udp_addr, aio_addr = addrs
    loop = asyncio.get_running_loop()
    where_all = placements()
    samples: dict[tuple[str, str], list[float]] = {
        (w[0], case): [] for w in where_all for case in ("node", "node_core", "udp", "asyncio")
    }
    scratch: list[float] = []
    udp = UdpClient(udp_addr)
    aio = AsyncioClient(aio_addr, loop)
    try:
        async with Node(Identity.generate(), node_config()) as node:
            t0 = now_ns()
            cell = await node.connect(node_addr)
            connect_s = (now_ns() - t0) * 1e-9
            for i in range(rounds):
                for where in where_all:
                    place(where, children)
                    w = where[0]
                    # Warm up after every re-pinning (the first round gets the long warm-up).
                    n_warm = warmup if i == 0 else REWARM
                    await node_pings(node, cell, n_warm, scratch, scratch)
                    udp.pings(n_warm, scratch)
                    await aio.pings(n_warm, scratch)
                    await node_pings(
                        node, cell, per_round, samples[w, "node"], samples[w, "node_core"]
                    )
                    udp.pings(per_round, samples[w, "udp"])
                    await aio.pings(per_round, samples[w, "asyncio"])
            info: dict[str, object] = {
                "connect_s": connect_s,
                "pinger_stats": stats_dict(node.statistics()),
            }
    finally:
        if can_pin():
            unpin()
        aio.close()
        udp.sock.close()
    return samples, info


def addr_of(msg: object) -> Addr:
    if not (isinstance(msg, tuple | list) and len(msg) == 2):
        raise TypeError(f"expected (host, port), got {msg!r}")
    host, port = msg
    return str(host), int(port)


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH)
    rounds, per_round, warmup = (4, 100, 100) if args.quick else (10, 200, 300)
    n = rounds * per_round
    print_header(BENCH, f"{n} sequential pings per case and placement")
    t_start = time.monotonic()
    with (
        child_process(node_echo_child, "bench-ping-node") as node_child,
        child_process(udp_echo_child, "bench-ping-udp") as udp_child,
        child_process(asyncio_echo_child, "bench-ping-asyncio") as aio_child,
    ):
        hello = expect(node_child.conn, 30.0, "its node address")
        assert isinstance(hello, tuple)
        addrs = (
            addr_of(hello[0]),
            addr_of(expect(udp_child.conn, 30.0, "its echo address")),
            addr_of(expect(aio_child.conn, 30.0, "its echo address")),
        )
        samples, info = asyncio.run(
            run_rounds([node_child, udp_child, aio_child], addrs, rounds, per_round, warmup)
        )
        node_child.conn.send("stop")
        info["echo_stats"] = expect(node_child.conn, 10.0, "its statistics")
        udp_child.conn.send("stop")
        aio_child.conn.send("stop")
    connect_s = info["connect_s"]
    connect_ms = float(connect_s) * 1e3 if isinstance(connect_s, float) else float("nan")
    for where, _, _ in placements():
        node = summarize(samples[where, "node"])
        core = summarize(samples[where, "node_core"])
        base = summarize(samples[where, "udp"])
        aio = summarize(samples[where, "asyncio"])
        report(
            Result(
                bench=BENCH,
                case=f"ping_rtt ({where})",
                ours=f"await Node.ping() to a Node in another process, {PING_WIRE_LEN} B datagrams",
                baseline=f"raw UDP echo, blocking sockets, {PING_WIRE_LEN} B datagrams",
                metrics=[
                    Metric("median", node.median, base.median, "us", "lower"),
                    Metric("p99", node.p99, base.p99, "us", "lower"),
                    Metric("mean", node.mean, base.mean, "us", "lower"),
                    Metric("min", node.minimum, base.minimum, "us", "lower"),
                ],
                targets=[Target("median under 150 us", node.median < TARGET_S)],
                notes=[
                    f"RTT as recorded by the endpoint (send_ping to the PONG's readiness event): median "
                    f"{core.median * 1e6:.1f} us, p99 {core.p99 * 1e6:.1f} us",
                    f"asyncio echo, add_reader both ends, no crypto (event-loop floor): median "
                    f"{aio.median * 1e6:.1f} us, p99 {aio.p99 * 1e6:.1f} us; "
                    f"Node/that = {node.median / aio.median:.2f}x",
                    f"first connect (XX handshake over loopback): {connect_ms:.2f} ms",
                ],
                extra={
                    "n": node.n,
                    "placement": where,
                    "endpoint_rtt_median_s": core.median,
                    "asyncio_median_s": aio.median,
                    "asyncio_p99_s": aio.p99,
                    **info,
                },
            ),
            args.json,
            args.quick,
        )
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
