"""One-way encrypted datagram rate between two processes on 127.0.0.1, 1200-byte UDP datagrams.

Layout: a sender process pinned to one CPU and a receiver process pinned to the other (this
process only coordinates, through pipes, and sleeps while they run).

* ours: the receiver is a `Node`; it counts what `await node.recv_datagram()` returns (datagrams
  that were parsed, replay-checked and authenticated), or with `--recv batch` what
  `await node.recv_datagrams()` returns. Both Nodes run with `max_datagram=1200`, so every
  application datagram is its own 1200-byte UDP datagram (the default would let path MTU
  discovery reach 65507 bytes on loopback and a burst coalesce into few large packets), and with
  `peer_packet_rate=0` (the default per-peer budget of 100,000 packets/s is a flood guard, not
  the code's limit). The sender is a `Node` calling
  `send_datagram` (`--sender node`, the default) or, to take the Node API out of the picture, a
  sans-IO `Endpoint` driven by a plain non-blocking socket (`--sender endpoint`). The sender's own
  ceiling is always measured too (one full-blast trial of each sender kind), so the output says
  which side limits.
* baseline: raw UDP + ChaCha20-Poly1305 in the same layout: `cryptography`'s `ChaCha20Poly1305`
  built once, counter nonce, the 64-byte header as associated data; the receiver drains a
  non-blocking socket per readiness event and authenticates every datagram.

Method, the same for both: (1) one full-blast trial (the sender sends as fast as it can for a fixed
time; the receiver's rate is what it authenticated divided by the time between its first and
last datagram), then (2) a bisection over paced send rates for the highest rate the receiver keeps
up with at under 1% loss (loss = 1 - received / sent). The headline is (2); (1) is shown next to
it. Every datagram is 1200 bytes on the wire: ours carries 1117 bytes of application data (64
header + 3 record header + 16 tag), the baseline 1120 (64 header + 16 tag). MB/s is application
payload, 10**6 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import select
import selectors
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

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
    parse_args,
    pin,
    print_header,
    report,
    run_child,
)
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node, stats_dict
from cellmesh.transport.endpoint import Endpoint
from cellmesh.wire.header import HEADER_LEN

BENCH = "bench_datagram_rate"
WIRE = 1200
TAG = 16
OURS_PAYLOAD = WIRE - HEADER_LEN - 3 - TAG  # 1117
RAW_PAYLOAD = WIRE - HEADER_LEN - TAG  # 1120
SOCK_BUF = 4 * 1024 * 1024
BURST = 64
MAX_LOSS = 0.01
TARGET_RATIO = 0.80
RECV_ENV = "CELLMESH_BENCH_RECV"
PROFILE_ENV = "CELLMESH_BENCH_PROFILE"
Addr = tuple[str, int]

_RAW_HEADER = struct.Struct("!BBBBHH16s16sQQII")  # the cellmesh header layout, for parity
_NONCE = struct.Struct("<4xQ")
_PN = struct.Struct("!Q")


def node_config() -> NodeConfig:
    # max_datagram = WIRE: every application datagram leaves as its own 1200-byte UDP datagram,
    # as the baseline's do. (With the default, path MTU discovery reaches 65507 bytes on loopback
    # and a burst of datagrams would coalesce into a few large packets: not the same claim.)
    # peer_packet_rate = 0: no per-peer packet budget (default 100,000/s, a flood guard that a
    # node sets to what it expects of its peers): this measures what the code can carry.
    return NodeConfig(
        listen=(f"{LOOPBACK}:0",), recv_buffer=SOCK_BUF, max_datagram=WIRE, peer_packet_rate=0
    )


# ------------------------------------------------------------------------------ receivers


@dataclass(slots=True)
class Counter:
    count: int = 0
    nbytes: int = 0
    first: float = 0.0
    last: float = 0.0
    bad: int = 0

    def note(self, n: int, nbytes: int, t: float) -> None:
        """`n` datagrams of `nbytes` in all reached the application at `t` (both sides alike)."""
        if self.count == 0:
            self.first = t
        self.count += n
        self.nbytes += nbytes
        self.last = t

    def reset(self) -> None:
        self.count = self.nbytes = self.bad = 0
        self.first = self.last = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "bytes": self.nbytes,
            "first": self.first,
            "last": self.last,
            "bad": self.bad,
        }


def node_receiver_child(conn: Connection) -> None:
    """Receiver, ours: a Node; count what recv_datagram hands the application."""
    run_child(conn, lambda: asyncio.run(_node_receiver(conn)))


async def _node_receiver(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    c = Counter()
    clock = time.perf_counter
    profiler = cProfile.Profile() if os.environ.get(PROFILE_ENV) == "1" else None
    async with Node(Identity.generate(), node_config()) as node:

        def on_command() -> None:
            try:
                cmd = conn.recv()
            except EOFError:
                stop.set()
                return
            if cmd == "reset":
                c.reset()
                conn.send("ok")
                if profiler is not None:
                    profiler.enable()
            elif cmd == "report":
                hot = ""
                if profiler is not None:
                    profiler.disable()
                    hot = hot_spots(profiler)
                conn.send(
                    {
                        **c.as_dict(),
                        "inbox_dropped": node.inbox_dropped,
                        "stats": stats_dict(node.statistics()),
                        "profile": hot,
                    }
                )
            else:
                stop.set()

        async def consume() -> None:
            if os.environ.get(RECV_ENV, "each") == "each":
                recv = node.recv_datagram
                while True:
                    _, data = await recv()
                    c.note(1, len(data), clock())
            recv_batch = node.recv_datagrams
            while True:
                batch = await recv_batch()
                c.note(len(batch), sum([len(data) for _, data in batch]), clock())

        loop.add_reader(conn.fileno(), on_command)
        conn.send((node.local_addresses()[0], node.cell_id))
        consumer = asyncio.create_task(consume())
        await stop.wait()
        loop.remove_reader(conn.fileno())
        consumer.cancel()


def hot_spots(profiler: cProfile.Profile, top: int = 22) -> str:
    """The profile's top functions by own time, as text."""
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    return out.getvalue()


def raw_receiver_child(conn: Connection) -> None:
    """Receiver, baseline: drain a non-blocking socket, authenticate each datagram."""
    run_child(conn, lambda: _raw_receiver(conn))


def _raw_receiver(conn: Connection) -> None:
    key = bytes(range(32))
    aead = ChaCha20Poly1305(key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    sock.setblocking(False)
    sock.bind((LOOPBACK, 0))
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(conn, selectors.EVENT_READ, "conn")
    conn.send((sock.getsockname(), b""))
    c = Counter()
    clock = time.perf_counter
    recv, decrypt, nonce, pn_of = sock.recv, aead.decrypt, _NONCE.pack, _PN.unpack_from
    while True:
        for k, _ in sel.select(1.0):
            if k.data == "sock":
                while True:
                    try:
                        data = recv(2048)
                    except BlockingIOError:
                        break
                    try:
                        plain = decrypt(
                            nonce(pn_of(data, 48)[0]), data[HEADER_LEN:], data[:HEADER_LEN]
                        )
                    except InvalidTag:
                        c.bad += 1
                        continue
                    c.note(1, len(plain), clock())
                continue
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd == "reset":
                c.reset()
                conn.send("ok")
            elif cmd == "report":
                conn.send(c.as_dict())
            else:
                return


# ------------------------------------------------------------------------------ senders


def pace(sent: int, elapsed: float, rate: float) -> int:
    """How many datagrams to send now (at most BURST); rate 0 means full blast."""
    if rate <= 0:
        return BURST
    return max(0, min(BURST, int(elapsed * rate) + 1 - sent))


def node_sender_child(conn: Connection) -> None:
    """Sender, ours: a Node calling send_datagram."""
    run_child(conn, lambda: asyncio.run(_node_sender(conn)))


async def _node_sender(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    target = conn.recv()
    addr, _ = target
    clock = time.perf_counter
    payload = bytes(OURS_PAYLOAD)
    async with Node(Identity.generate(), node_config()) as node:
        cell = await node.connect((str(addr[0]), int(addr[1])))
        conn.send("ready")
        send = node.send_datagram

        def dropped() -> int:
            """Datagrams the Node dropped before the wire (send backlog full, socket errors)."""
            sock = node.status()["socket"]
            return int(sock["send_dropped"]) + int(sock["send_errors"])

        while True:
            cmd = await loop.run_in_executor(None, _recv_or_stop, conn)
            if cmd is None:
                return
            rate, duration = cmd
            dropped_before = dropped()
            sent = 0
            t0 = clock()
            while True:
                el = clock() - t0
                if el >= duration:
                    break
                n = pace(sent, el, rate)
                for _ in range(n):
                    send(cell, payload)
                sent += n
                await asyncio.sleep(0)
            elapsed = clock() - t0
            lost_here = dropped() - dropped_before
            conn.send({"sent": sent - lost_here, "elapsed": elapsed, "sender_dropped": lost_here})


def _recv_or_stop(conn: Connection) -> tuple[float, float] | None:
    try:
        cmd = conn.recv()
    except EOFError:
        return None
    if isinstance(cmd, tuple) and len(cmd) == 2:
        return float(cmd[0]), float(cmd[1])
    return None


def endpoint_sender_child(conn: Connection) -> None:
    """Sender, ours without the Node API: sans-IO Endpoint + a non-blocking UDP socket."""
    run_child(conn, lambda: _endpoint_sender(conn))


def _endpoint_sender(conn: Connection) -> None:
    addr_raw, cell = conn.recv()
    addr: Addr = (str(addr_raw[0]), int(addr_raw[1]))
    clock = time.monotonic
    config = node_config()
    ep = Endpoint(Identity.generate(), config, clock())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    sock.setblocking(False)
    sock.bind((LOOPBACK, 0))
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    blocked = 0

    def flush() -> None:
        nonlocal blocked
        for data, dst in ep.datagrams_to_send():
            while True:
                try:
                    sock.sendto(data, dst)
                    break
                except BlockingIOError:
                    blocked += 1
                    select.select([], [sock], [], 0.01)

    def service(timeout: float) -> None:
        if timeout > 0:
            sel.select(timeout)
        while True:
            try:
                data, src = sock.recvfrom(2048)
            except BlockingIOError:
                break
            ep.receive_datagram(data, (str(src[0]), int(src[1])), clock())
        t = ep.get_timer()
        if t is not None and clock() >= t:
            ep.handle_timer(clock())
        flush()

    ep.connect(addr, clock(), bytes(cell))
    flush()
    deadline = clock() + 10.0
    while ep.session_for(bytes(cell)) is None:
        if clock() > deadline:
            raise TimeoutError("endpoint sender: no session")
        service(0.05)
    conn.send("ready")
    payload = bytes(OURS_PAYLOAD)
    send = ep.send_datagram
    pclock = time.perf_counter
    while True:
        cmd = _recv_or_stop(conn)
        if cmd is None:
            return
        rate, duration = cmd
        sent = 0
        blocked = 0
        t0 = pclock()
        while True:
            el = pclock() - t0
            if el >= duration:
                break
            n = pace(sent, el, rate)
            now = clock()
            for _ in range(n):
                send(cell, payload, now)
            sent += n
            service(0)
        conn.send({"sent": sent, "elapsed": pclock() - t0, "blocked": blocked})


def raw_sender_child(conn: Connection) -> None:
    """Sender, baseline: raw UDP + ChaCha20-Poly1305, counter nonce, header as AD."""
    run_child(conn, lambda: _raw_sender(conn))


def _raw_sender(conn: Connection) -> None:
    addr_raw, _ = conn.recv()
    addr: Addr = (str(addr_raw[0]), int(addr_raw[1]))
    aead = ChaCha20Poly1305(bytes(range(32)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    sock.bind((LOOPBACK, 0))  # blocking: a full send buffer simply waits
    conn.send("ready")
    src, dst = bytes(range(16)), bytes(range(16, 32))
    payload = bytes(RAW_PAYLOAD)
    plen = RAW_PAYLOAD + TAG
    hdr, nonce, encrypt, sendto = _RAW_HEADER.pack, _NONCE.pack, aead.encrypt, sock.sendto
    clock = time.perf_counter
    pn = 0
    while True:
        cmd = _recv_or_stop(conn)
        if cmd is None:
            return
        rate, duration = cmd
        sent = 0
        t0 = clock()
        while True:
            el = clock() - t0
            if el >= duration:
                break
            n = pace(sent, el, rate)
            for _ in range(n):
                h = hdr(1, 5, 0, 0, plen, 0, src, dst, 7, pn, 0, 0)
                sendto(h + encrypt(nonce(pn), payload, h), addr)
                pn += 1
            sent += n
        conn.send({"sent": sent, "elapsed": clock() - t0})


# ------------------------------------------------------------------------------ coordinator


@dataclass(frozen=True, slots=True)
class Trial:
    """One timed send: target rate (0 = full blast), what was sent and what arrived."""

    target: float
    sent: int
    elapsed: float
    received: int
    payload_bytes: int
    recv_span: float
    bad: int

    @property
    def send_rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def recv_rate(self) -> float:
        """Received datagrams per second over the receiver's own first-to-last span."""
        if self.received < 2 or self.recv_span <= 0:
            return 0.0
        return (self.received - 1) / self.recv_span

    @property
    def delivered_rate(self) -> float:
        """Received datagrams per second of sending time (what the paced search reports)."""
        return self.received / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 1.0

    @property
    def mbps(self) -> float:
        """Application payload bytes per second."""
        per = self.payload_bytes / self.received if self.received else 0.0
        return self.delivered_rate * per


def _as_dict(msg: object, what: str) -> dict[str, float]:
    if not isinstance(msg, dict):
        raise TypeError(f"{what}: expected a dict, got {msg!r}")
    return {str(k): v for k, v in msg.items() if isinstance(v, int | float)}


class Pair:
    """A running sender/receiver pair, driven trial by trial."""

    def __init__(self, sender: Child, receiver: Child) -> None:
        self.sender, self.receiver = sender, receiver
        self.last_sender: dict[str, float] = {}
        self.last_receiver: dict[str, object] = {}
        self.extra: dict[str, object] = {}

    def trial(self, rate: float, duration: float) -> Trial:
        self.receiver.conn.send("reset")
        expect(self.receiver.conn, 10.0, "reset")
        self.sender.conn.send((rate, duration))
        s = _as_dict(expect(self.sender.conn, duration + 20.0, "its send report"), "sender")
        time.sleep(0.15)  # let the receiver drain what is queued in its socket
        self.receiver.conn.send("report")
        rmsg = expect(self.receiver.conn, 10.0, "its receive report")
        r = _as_dict(rmsg, "receiver")
        self.last_sender = s
        self.last_receiver = rmsg if isinstance(rmsg, dict) else {}
        return Trial(
            target=rate,
            sent=int(s["sent"]),
            elapsed=float(s["elapsed"]),
            received=int(r["count"]),
            payload_bytes=int(r["bytes"]),
            recv_span=float(r["last"]) - float(r["first"]),
            bad=int(r["bad"]),
        )


@dataclass(frozen=True, slots=True)
class Search:
    full_blast: Trial
    best: Trial
    trials: list[Trial]
    sender_bound: bool


def find_max_rate(pair: Pair, blast_s: float, trial_s: float, steps: int) -> Search:
    """Full blast, then bisect paced rates for the highest with < 1% loss."""
    fb = pair.trial(0.0, blast_s)
    trials = [fb]
    if fb.loss < MAX_LOSS:
        # The receiver kept up with everything the sender could do: the sender is the limit.
        return Search(fb, fb, trials, sender_bound=True)
    lo, hi = 0.0, fb.send_rate
    best: Trial | None = None
    rate = 0.97 * fb.recv_rate
    for _ in range(steps):
        t = pair.trial(rate, trial_s)
        trials.append(t)
        achieved = t.send_rate >= 0.97 * rate
        if t.loss < MAX_LOSS:
            if best is None or t.delivered_rate > best.delivered_rate:
                best = t
            lo = rate
            if not achieved:  # the sender could not go faster: no point asking for more
                hi = rate
        else:
            hi = rate
        rate = (lo + hi) / 2 if lo > 0 else rate * 0.8
    if best is None:
        t = pair.trial(rate * 0.5, trial_s)
        trials.append(t)
        best = t
    return Search(fb, best, trials, sender_bound=False)


def _hello(child: Child) -> tuple[Addr, bytes]:
    msg = expect(child.conn, 30.0, "its address")
    if not (isinstance(msg, tuple) and len(msg) == 2):
        raise TypeError(f"bad hello {msg!r}")
    a, cell = msg
    return (str(a[0]), int(a[1])), bytes(cell)


@contextlib.contextmanager
def running_pair(kind: str) -> Iterator[Pair]:
    """Start a receiver and a sender of `kind`, pinned to different CPUs, connected."""
    receiver_fn = raw_receiver_child if kind == "raw" else node_receiver_child
    sender_fn = {
        "raw": raw_sender_child,
        "node": node_sender_child,
        "endpoint": endpoint_sender_child,
    }[kind]
    with (
        child_process(receiver_fn, f"bench-rate-{kind}-receiver") as receiver,
        child_process(sender_fn, f"bench-rate-{kind}-sender") as sender,
    ):
        if can_pin():
            c = cpus()
            pin(sender.pid, c[0])
            pin(receiver.pid, c[1])
        addr, cell = _hello(receiver)
        sender.conn.send((addr, cell))
        if expect(sender.conn, 30.0, "ready") != "ready":
            raise RuntimeError("sender not ready")
        yield Pair(sender, receiver)
        receiver.conn.send("stop")
        sender.conn.send("stop")


def protocol_drops(receiver_report: dict[str, object]) -> object:
    stats = receiver_report.get("stats")
    return stats.get("drops") if isinstance(stats, dict) else None


def trial_dict(t: Trial) -> dict[str, float]:
    return {
        "target_pps": t.target,
        "sent": t.sent,
        "received": t.received,
        "send_pps": t.send_rate,
        "delivered_pps": t.delivered_rate,
        "recv_pps": t.recv_rate,
        "loss": t.loss,
    }


def describe(s: Search) -> str:
    rows = [
        f"{'full blast' if t.target == 0 else f'{t.target / 1e3:7.1f} kpps'}: "
        f"sent {t.send_rate / 1e3:.1f} kpps, got {t.delivered_rate / 1e3:.1f} kpps, "
        f"loss {t.loss * 100:.2f}%"
        for t in s.trials
    ]
    return "; ".join(rows)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sender",
        choices=("node", "endpoint"),
        default="node",
        help="what sends our datagrams: a Node (default) or a sans-IO Endpoint on a raw socket",
    )
    p.add_argument(
        "--recv",
        choices=("each", "batch"),
        default="each",
        help="how the receiving application takes datagrams: one `await recv_datagram()` each "
        "(default) or `await recv_datagrams()` for every one waiting",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="only profile the Node receiver (cProfile) during one full-blast trial; print hot spots",
    )


def rate_metrics(ours: Search, base: Search) -> list[Metric]:
    o, b = ours.best, base.best
    return [
        Metric("max rate <1% loss", o.delivered_rate, b.delivered_rate, "pps", "higher"),
        Metric("payload at that rate", o.mbps, b.mbps, "MB/s", "higher"),
        Metric(
            "full-blast recv rate",
            ours.full_blast.recv_rate,
            base.full_blast.recv_rate,
            "pps",
            "higher",
        ),
        Metric(
            "full-blast send rate",
            ours.full_blast.send_rate,
            base.full_blast.send_rate,
            "pps",
            "higher",
        ),
    ]


def limit_note(name: str, s: Search) -> str:
    fb = s.full_blast
    if s.sender_bound:
        return (
            f"{name}: the SENDER limits (the receiver kept up with full blast, loss {fb.loss:.2%})"
        )
    return (
        f"{name}: the RECEIVER limits (at full blast the sender made {fb.send_rate / 1e3:.1f} kpps, "
        f"{fb.send_rate / max(fb.recv_rate, 1):.2f}x what the receiver absorbed, "
        f"{fb.recv_rate / 1e3:.1f} kpps)"
    )


def best_of(searches: list[Search]) -> Search:
    return max(searches, key=lambda x: x.best.delivered_rate)


def spread(searches: list[Search]) -> str:
    rates = sorted(x.best.delivered_rate / 1e3 for x in searches)
    return ", ".join(f"{r:.1f}" for r in rates) + " kpps"


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH, options)
    reps, blast_s, trial_s, steps = (1, 0.4, 0.3, 2) if args.quick else (3, 1.0, 0.75, 4)
    print_header(
        BENCH,
        f"{WIRE}-byte datagrams, sender and receiver pinned apart; "
        f"{reps} alternating search(es) per side",
    )
    t_start = time.monotonic()
    os.environ[RECV_ENV] = args.recv  # the receiver child reads it
    if args.profile:
        os.environ[PROFILE_ENV] = "1"
        try:
            with running_pair(args.sender) as pair:
                fb = pair.trial(0.0, max(blast_s, 1.0))
        finally:
            del os.environ[PROFILE_ENV]
        print(
            f"full blast under cProfile: sent {fb.send_rate / 1e3:.1f} kpps, receiver "
            f"{fb.recv_rate / 1e3:.1f} kpps (slowed by the profiler; rank, do not quote)"
        )
        print(pair.last_receiver.get("profile", ""))
        return 0
    runs: dict[str, list[Search]] = {"ours": [], "baseline": []}
    with running_pair(args.sender) as ours_pair, running_pair("raw") as base_pair:
        for _ in range(reps):
            for side, pair in (("ours", ours_pair), ("baseline", base_pair)):
                runs[side].append(find_max_rate(pair, blast_s, trial_s, steps))
        recv_info = ours_pair.last_receiver
    ours, base = best_of(runs["ours"]), best_of(runs["baseline"])
    print(f"ours, best search:     {describe(ours)}")
    print(f"baseline, best search: {describe(base)}")
    o, b = ours.best, base.best
    sender = "Node.send_datagram" if args.sender == "node" else "Endpoint.send_datagram + socket"
    receiver = "recv_datagram" if args.recv == "each" else "recv_datagrams (batches)"
    report(
        Result(
            bench=BENCH,
            case=f"datagram_rate (sender: {args.sender})",
            ours=f"{sender} -> Node.{receiver}, separate processes, max_datagram {WIRE}",
            baseline="raw UDP + ChaCha20Poly1305 (built once, counter nonce, header AD)",
            metrics=rate_metrics(ours, base),
            targets=[
                Target(
                    "ours >= 80% of baseline (max rate <1% loss)",
                    o.delivered_rate >= TARGET_RATIO * b.delivered_rate,
                )
            ],
            notes=[
                limit_note("ours", ours),
                limit_note("baseline", base),
                f"every search's max rate: ours {spread(runs['ours'])}; "
                f"baseline {spread(runs['baseline'])} (best one reported)",
                f"Node receiver: inbox_dropped={recv_info.get('inbox_dropped')}, "
                f"protocol drops={protocol_drops(recv_info)}",
                "method: per search, full blast once, then bisection over paced rates for <1% "
                "loss; searches alternate ours/baseline; best search per side reported",
            ],
            extra={
                "sender": args.sender,
                "recv": args.recv,
                "trials_ours": [[trial_dict(t) for t in x.trials] for x in runs["ours"]],
                "trials_baseline": [[trial_dict(t) for t in x.trials] for x in runs["baseline"]],
            },
        ),
        args.json,
        args.quick,
    )
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
