"""Ring 0 drop rate: how many hostile datagrams per second a Node's gate sheds, against the raw
receive rate of the same socket drain loop, 127.0.0.1, separate processes.

Layout: a flooder process pinned to one CPU, the receivers pinned to the other (this process only
coordinates through pipes and sleeps while they run). Two receivers run side by side and the
flooder aims at one at a time:

* ours: a `Node` (NodeConfig with a one-CellID `denylist`), its asyncio loop draining the socket
  with `UdpSockets.drain` and feeding every datagram to `Endpoint.receive_datagram`, where the
  ring 0 gate drops it and counts the reason. Its processed rate is the growth of
  `node.statistics().datagrams_in` per second, and the drop reasons are the growth of
  `statistics().drops`.
* baseline: the same `UdpSockets` drain on the same asyncio loop (same socket options, same
  batching, the same recvmsg per datagram), whose callback only counts the datagram.

The flooder sends a pool of 2048 pre-built datagrams round and round at full speed with
sendmmsg(2) (256 per system call; every datagram is still a separate UDP datagram) so that it
outpaces even the baseline receiver: the receivers, not the flooder, are the limit, and what they
cannot take the kernel drops at the socket (shown as "kernel drops"). Cases, one pool each:

* junk: random bytes, random lengths 1-400 (mean ~200 B): mostly a bad version byte, else a
  truncated header or a malformed one.
* unknown_session: well-formed 200-byte DATA frames to the node's CellID from random (unknown)
  CellIDs, with random session ids.
* unknown_dst: well-formed 200-byte DATA frames from random CellIDs to random CellIDs.
* denied: well-formed 200-byte DATA frames from the denylisted CellID to the node.
* init_garbage: 200-byte HANDSHAKE_INIT frames from random CellIDs, pattern XX, no cookie, a
  random Noise message: they reach the handshake budget; over it the node answers with cookie
  replies (at most its reply budget) and drops the rest.

Each receiver is measured over a fixed window (2 s; `--quick`: 0.5 s) after a short warm-up, by
two snapshots the receiver takes of its own counters and clock; the rate is processed datagrams
per second of the receiver's time, not what the flooder sent. Both receivers' CPU time over the
window is shown too (a receiver near 100% is saturated, and then 1/rate is its cost per datagram).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from _common import (
    LOOPBACK,
    Blaster,
    Child,
    Connection,
    Metric,
    OtherLoad,
    Result,
    bench_main,
    can_pin,
    child_process,
    cpus,
    expect,
    pin,
    print_header,
    report,
    run_child,
    udp_socket_drops,
)
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.node.udp import Addr, UdpSockets
from cellmesh.wire.header import HEADER_LEN, FrameType, pack_header
from cellmesh.wire.messages import COOKIE_LEN, HandshakePattern

BENCH = "bench_ring0"
SOCK_BUF = 4 * 1024 * 1024
POOL = 2048
FRAME = 200
WARMUP_S = 0.4
TAIL_S = 0.3
CHILD_LIFETIME = 600.0
BUSY_OTHERS = 0.10
"""Children exit by themselves after this long (the run itself stays far below it)."""
CASES: dict[str, tuple[str, str]] = {
    # name: (description, the drop reason(s) expected to dominate)
    "junk": ("random bytes, 1-400 B", "bad_version"),
    "unknown_session": ("DATA to us, unknown CellID + session id", "unknown_session"),
    "unknown_dst": ("DATA to an unknown destination CellID", "not_for_us"),
    "denied": ("DATA from the denylisted CellID", "denied"),
    "init_garbage": ("HANDSHAKE_INIT, random Noise message", "cookie_required"),
}
KINDS = ("raw", "node")


# ------------------------------------------------------------------------------ datagrams


def build_pool(case: str, node_cell: bytes, denied: bytes, rng: random.Random) -> list[bytes]:
    """`POOL` datagrams of one case (see the module docstring)."""
    body = FRAME - HEADER_LEN
    out: list[bytes] = []
    for i in range(POOL):
        if case == "junk":
            out.append(rng.randbytes(rng.randrange(1, 401)))
        elif case == "unknown_session":
            sid = rng.getrandbits(64) | 1
            h = pack_header(FrameType.DATA, rng.randbytes(16), node_cell, sid, i, body)
            out.append(h + rng.randbytes(body))
        elif case == "unknown_dst":
            sid = rng.getrandbits(64) | 1
            h = pack_header(FrameType.DATA, rng.randbytes(16), rng.randbytes(16), sid, i, body)
            out.append(h + rng.randbytes(body))
        elif case == "denied":
            sid = rng.getrandbits(64) | 1
            h = pack_header(FrameType.DATA, denied, node_cell, sid, i, body)
            out.append(h + rng.randbytes(body))
        elif case == "init_garbage":
            b = bytes([HandshakePattern.XX]) + bytes(COOKIE_LEN)
            b += rng.randbytes(body - len(b))
            h = pack_header(FrameType.HANDSHAKE_INIT, rng.randbytes(16), bytes(16), 0, 0, len(b))
            out.append(h + b)
        else:
            raise ValueError(f"unknown case {case!r}")
    return out


# ------------------------------------------------------------------------------ children


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def receiver_child(conn: Connection) -> None:
    """A receiver (setup: ("raw" | "node", denylisted CellID hex)); answers "mark" with a
    snapshot of its counters and clock, stops on "stop"."""
    run_child(conn, lambda: asyncio.run(_receiver(conn)))


async def _receiver(conn: Connection) -> None:
    kind, deny = conn.recv()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    snapshot: Callable[[], dict[str, object]]
    node: Node | None = None
    udp: UdpSockets | None = None
    if kind == "node":
        config = NodeConfig(listen=(f"{LOOPBACK}:0",), denylist=(deny,), recv_buffer=SOCK_BUF)
        node = Node(Identity.generate(), config)
        await node.start()
        addr, cell = node.local_addresses()[0], node.cell_id
        ours = node

        def snapshot() -> dict[str, object]:
            s = ours.statistics()
            return {"count": s.datagrams_in, "drops": dict(s.drops), "cookies": s.cookies_sent}

    else:
        udp = UdpSockets((f"{LOOPBACK}:0",), SOCK_BUF)
        addr, cell = udp.local_addresses()[0], b""
        sock = udp.sockets[0]
        count = 0

        def deliver(data: bytes, src: Addr) -> None:
            nonlocal count
            count += 1

        loop.add_reader(sock.fileno(), udp.drain, sock, deliver)

        def snapshot() -> dict[str, object]:
            return {"count": count, "drops": {}, "cookies": 0}

    port = addr[1]

    def on_command() -> None:
        try:
            cmd = conn.recv()
        except EOFError:
            stop.set()
            return
        if cmd == "mark":
            snap = snapshot()
            snap.update(t=time.perf_counter(), cpu=cpu_seconds(), kernel=udp_socket_drops(port))
            conn.send(snap)
        else:
            stop.set()

    loop.add_reader(conn.fileno(), on_command)
    conn.send((addr, cell))
    try:
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        if node is not None:
            await node.stop()
        if udp is not None:
            loop.remove_reader(udp.sockets[0].fileno())
            udp.close()


def flooder_child(conn: Connection) -> None:
    """The flooder: gets {kind: address} and {case: pool}, then ("blast", kind, case, seconds)."""
    run_child(conn, lambda: _flooder(conn))


def _flooder(conn: Connection) -> None:
    targets, pools = conn.recv()
    blasters: dict[tuple[str, str], Blaster] = {}
    socks: list[socket.socket] = []
    for kind, addr in targets.items():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
        s.bind((LOOPBACK, 0))
        s.connect(tuple(addr))
        socks.append(s)
        for case, pool in pools.items():
            blasters[(kind, case)] = Blaster(s, pool)
    conn.send(next(iter(blasters.values())).method)
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if not (isinstance(cmd, tuple) and cmd[0] == "blast"):
                return
            _, kind, case, seconds = cmd
            t0 = time.perf_counter()
            sent = blasters[(kind, case)].blast(float(seconds))
            conn.send({"sent": sent, "elapsed": time.perf_counter() - t0})
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------ coordinator


@dataclass(frozen=True, slots=True)
class Window:
    """What one receiver did during one measurement window of one case."""

    kind: str
    case: str
    received: int
    seconds: float
    cpu: float
    sent: int
    send_seconds: float
    kernel_drops: int | None
    drops: dict[str, int]
    cookies: int
    other: float | None

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def send_rate(self) -> float:
        return self.sent / self.send_seconds if self.send_seconds > 0 else 0.0

    @property
    def per_dgram(self) -> float:
        """The receiver's CPU seconds per processed datagram."""
        return self.cpu / self.received if self.received else 0.0

    @property
    def cpu_share(self) -> float:
        return self.cpu / self.seconds if self.seconds > 0 else 0.0


def _snap(child: Child, what: str) -> dict[str, object]:
    msg = expect(child.conn, 10.0, what)
    if not isinstance(msg, dict):
        raise TypeError(f"{what}: expected a dict, got {msg!r}")
    return msg


def _num(d: dict[str, object], key: str) -> float:
    v = d.get(key)
    if not isinstance(v, int | float):
        raise TypeError(f"snapshot field {key!r} is {v!r}")
    return float(v)


def _drops(d: dict[str, object]) -> dict[str, int]:
    v = d.get("drops")
    return {str(k): int(n) for k, n in v.items()} if isinstance(v, dict) else {}


def measure(
    flooder: Child, receivers: dict[str, Child], kind: str, case: str, window: float, quick: bool
) -> Window:
    """Flood receiver `kind` with pool `case`; snapshot it after the warm-up and `window` later."""
    rx = receivers[kind]
    warmup, tail = (WARMUP_S / 2, TAIL_S / 2) if quick else (WARMUP_S, TAIL_S)
    flooder.conn.send(("blast", kind, case, warmup + window + tail))
    time.sleep(warmup)
    others = OtherLoad([flooder.pid, *(c.pid for c in receivers.values())])
    others.start()
    rx.conn.send("mark")
    a = _snap(rx, f"a snapshot ({kind}, {case})")
    time.sleep(window)
    rx.conn.send("mark")
    b = _snap(rx, f"a snapshot ({kind}, {case})")
    other = others.stop()
    s = expect(flooder.conn, window + 30.0, "its send report")
    if not isinstance(s, dict):
        raise TypeError(f"flooder report: {s!r}")
    time.sleep(tail + 0.1)  # let the receiver drain its socket before the next case
    ka, kb = a.get("kernel"), b.get("kernel")
    da, db = _drops(a), _drops(b)
    return Window(
        kind=kind,
        case=case,
        received=int(_num(b, "count") - _num(a, "count")),
        seconds=_num(b, "t") - _num(a, "t"),
        cpu=_num(b, "cpu") - _num(a, "cpu"),
        sent=int(s["sent"]),
        send_seconds=float(s["elapsed"]),
        kernel_drops=kb - ka if isinstance(ka, int) and isinstance(kb, int) else None,
        drops={k: db[k] - da.get(k, 0) for k in db if db[k] - da.get(k, 0)},
        cookies=int(_num(b, "cookies") - _num(a, "cookies")),
        other=other,
    )


def reasons_text(w: Window) -> str:
    total = sum(w.drops.values())
    if not total:
        return "none"
    parts = sorted(w.drops.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {n / total:.1%}" for k, n in parts)


def pct(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def kdrops(w: Window) -> str:
    if w.kernel_drops is None:
        return "? pps"
    return f"{kpps(w.kernel_drops / w.seconds)} pps"


def kpps(x: float) -> str:
    return f"{x / 1e3:,.1f}k"


def options(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # --help shows the docstring as is
    p.add_argument(
        "--window",
        type=float,
        default=None,
        metavar="S",
        help="seconds measured per receiver and case (default 2, --quick 0.5)",
    )
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of: {', '.join(CASES)}",
    )


def run(args: argparse.Namespace) -> int:
    window = args.window if args.window is not None else (0.5 if args.quick else 2.0)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"{BENCH}: unknown case {c!r} (known: {', '.join(CASES)})")
    print_header(
        BENCH,
        f"flooder and receivers pinned apart; {window:g} s per receiver and case, "
        f"{len(cases)} cases",
    )
    t_start = time.monotonic()
    rng = random.Random(20261122)
    denied = rng.randbytes(16)
    results: list[tuple[str, Window, Window]] = []
    with (
        child_process(receiver_child, "bench-ring0-raw", CHILD_LIFETIME) as raw,
        child_process(receiver_child, "bench-ring0-node", CHILD_LIFETIME) as node,
        child_process(flooder_child, "bench-ring0-flooder", CHILD_LIFETIME) as flooder,
    ):
        receivers = {"raw": raw, "node": node}
        if can_pin():
            c = cpus()
            pin(flooder.pid, c[0])
            pin(raw.pid, c[1])
            pin(node.pid, c[1])
        targets: dict[str, Addr] = {}
        node_cell = b""
        for kind, child in receivers.items():
            child.conn.send((kind, denied.hex()))
        for kind, child in receivers.items():
            hello = expect(child.conn, 30.0, f"its address ({kind})")
            if not (isinstance(hello, tuple) and len(hello) == 2):
                raise TypeError(f"bad hello from the {kind} receiver: {hello!r}")
            targets[kind] = (str(hello[0][0]), int(hello[0][1]))
            if kind == "node":
                node_cell = bytes(hello[1])
        pools = {c: build_pool(c, node_cell, denied, rng) for c in cases}
        flooder.conn.send((targets, pools))
        method = expect(flooder.conn, 30.0, "ready")
        print(f"  flooder: {method}, pools of {POOL} datagrams per case")
        for case in cases:
            w_raw = measure(flooder, receivers, "raw", case, window, args.quick)
            w_node = measure(flooder, receivers, "node", case, window, args.quick)
            for w in (w_raw, w_node):
                if w.received <= 0:
                    raise RuntimeError(f"the {w.kind} receiver processed nothing in case {case}")
            results.append((case, w_raw, w_node))
            print(
                f"  {case}: raw {kpps(w_raw.rate)} pps, node {kpps(w_node.rate)} pps "
                f"(flooder {kpps(w_raw.send_rate)} / {kpps(w_node.send_rate)} pps)"
            )
        for child in receivers.values():
            child.conn.send("stop")
        flooder.conn.send("stop")
    for case, w_raw, w_node in results:
        desc, expected = CASES[case]
        accounted = sum(w_node.drops.values())
        notes = [
            f"node drop reasons: {reasons_text(w_node)}",
            f"drops counted / datagrams in: {accounted / max(1, w_node.received):.1%}",
            f"receiver CPU busy over the window: raw {w_raw.cpu_share:.0%}, "
            f"node {w_node.cpu_share:.0%}",
            f"other processes used {pct(w_raw.other)} (raw window) and {pct(w_node.other)} "
            "(node window) of the CPUs",
            f"flooder sent {kpps(w_raw.send_rate)} pps at raw, {kpps(w_node.send_rate)} pps at "
            f"node; the kernel dropped at the full socket {kdrops(w_raw)} (raw), "
            f"{kdrops(w_node)} (node)",
        ]
        if w_node.cookies:
            notes.append(
                f"cookie replies sent by the node: {w_node.cookies / w_node.seconds:,.0f}/s"
            )
        if expected not in w_node.drops:
            notes.append(f"WARNING: expected drop reason {expected!r} not seen")
        report(
            Result(
                bench=BENCH,
                case=f"ring0 {case}: {desc}",
                ours="Node: UdpSockets drain -> Endpoint.receive_datagram (ring 0 gate)",
                baseline="same UdpSockets drain on an asyncio loop, callback only counts",
                metrics=[
                    Metric("datagrams processed/s", w_node.rate, w_raw.rate, "pps", "higher"),
                    Metric(
                        "receiver CPU per datagram",
                        w_node.per_dgram,
                        w_raw.per_dgram,
                        "us",
                        "lower",
                    ),
                ],
                notes=notes,
                extra={
                    "window_s": window,
                    "node": {"rate": w_node.rate, "drops": w_node.drops, "sent": w_node.sent},
                    "raw": {"rate": w_raw.rate, "sent": w_raw.sent},
                },
            ),
            args.json,
            args.quick,
        )
    busy = [
        f"{case}/{w.kind}"
        for case, *ws in results
        for w in ws
        if w.other is not None and w.other > BUSY_OTHERS
    ]
    if busy:
        print(
            f"\n  WARNING: other processes used more than {BUSY_OTHERS:.0%} of the CPUs during "
            f"{', '.join(busy)}: those figures are low and noisy; run again on a quiet machine"
        )
    print(f"\n{BENCH} summary (receiver-side processed datagrams/s, {window:g} s windows)")
    head = (
        "case",
        "raw pps",
        "node pps",
        "node/raw",
        "node us/dgram",
        "flooder pps",
        "others",
        "node drop reasons",
    )
    rows = [head]
    for case, w_raw, w_node in results:
        rows.append(
            (
                case,
                f"{w_raw.rate:,.0f}",
                f"{w_node.rate:,.0f}",
                f"{w_node.rate / w_raw.rate:.2f}",
                f"{w_node.per_dgram * 1e6:.2f}",
                f"{w_node.send_rate:,.0f}",
                f"{pct(w_raw.other)}/{pct(w_node.other)}",
                reasons_text(w_node),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    for r in rows:
        cells = [f"{r[0]:<{widths[0]}}", *(f"{r[i]:>{widths[i]}}" for i in range(1, 7)), r[7]]
        print("  " + "  ".join(cells))
    print(
        "  (node us/dgram: the node receiver's CPU time per processed datagram, socket drain, "
        "driver and gate together; flooder pps: what it sent at the node; others: CPU share of "
        "processes not in this benchmark during the raw/node windows)"
    )
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


def main() -> int:
    return bench_main(BENCH, __doc__, options, run)


if __name__ == "__main__":
    sys.exit(main())
