"""Live event delivery between two node processes on 127.0.0.1: events/s delivered into the
subscriber's durable log and per-event latency, against raw sealed UDP datagrams (with and
without fsynced SQLite inserts on both sides) in the same run.

Processes (spawned by this one, which only coordinates through pipes): a publisher pinned to one
CPU and a subscriber pinned to the other (when there are two), each a fresh interpreter, so the
two sides never share an event loop.

* ours: node A hosts channel "bench" (`channels = ["bench open"]`), node B connects to A and
  subscribes (`channels.subscribe`). A calls `node.state.publish("bench", payload)` per event:
  sign, append to its `SqliteLogStore` (WAL, synchronous=FULL: returns after the fsync), send on
  the reliable channel stream. B's channel driver hands the message to its state driver, which
  verifies the event (signature, chain, clock) and appends it to B's log (fsynced again); B's
  `node.state.subscribe("bench")` then yields it. Delivery = the moment that loop sees it.
* baseline "UDP+AEAD": the same payloads, each sealed with ChaCha20-Poly1305 (`cryptography`,
  a 12-byte nonce from the sequence number, which also travels in clear as associated data)
  and sent as one UDP datagram; the receiver opens it. No durability, no reliability.
* baseline "durable UDP+AEAD": the same, plus what the state layer's durability costs at its
  rawest: the sender inserts (id, payload) into SQLite (WAL, synchronous=FULL, one COMMIT per
  row) before sealing and sending, the receiver inserts the same after opening, before counting
  the delivery. This is the floor for "durable on both sides"; the ratio to it is what
  signatures, hash chains, the log rules and the reliable channel stream add.

Latency of an event = delivery time at the receiver - the time the publisher started the
publish call, both from CLOCK_MONOTONIC (`time.monotonic_ns`, one clock for every process on a
machine). The three kinds run side by side (six processes, the idle ones asleep), taking turns
in `--rounds` rounds (default 3) so that the disk's fsync phases hit them alike; each round runs,
per kind, a share of:

* paced: `--paced-events` events at `--rate` per second (default 500 at 100/s): latency of an
  event on an idle path, dominated by the two fsyncs;
* burst: `--events` events as fast as the publisher can (default 2000): events/s delivered =
  events / (last delivery - first publish start); latency then includes queueing.

A raw datagram lost by the kernel (receiver socket full) is counted and left out; the node path
is reliable, so none is missing there (the run fails if one is).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import selectors
import socket
import sqlite3
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from _common import (
    LOOPBACK,
    Child,
    Connection,
    Metric,
    Result,
    bench_main,
    can_pin,
    child_process,
    cpus,
    expect,
    percentile,
    pin,
    print_header,
    report,
    run_child,
)
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node

BENCH = "bench_state_live"
CHANNEL = "bench"
PAYLOAD = 200
SOCK_BUF = 4 << 20
KINDS = ("node", "udp", "udp_durable")
KEY = bytes(range(32))
"""The baseline's fixed AEAD key: both processes know it (no handshake in the baseline)."""
_SEQ = struct.Struct(">Q")
COLLECT_GRACE_S = 10.0
"""How long the receiver keeps waiting for missing events after the publisher finished."""


def payload(seq: int) -> bytes:
    """The same bytes for event `seq` on every path (incompressible-looking, fixed size)."""
    seed = _SEQ.pack(seq)
    return (seed * (PAYLOAD // len(seed) + 1))[:PAYLOAD]


def nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + _SEQ.pack(seq)


def node_config(db: Path, host: bool) -> NodeConfig:
    # Discovery and the anchor election would only add beacon traffic on loopback.
    return NodeConfig(
        listen=(f"{LOOPBACK}:0",),
        database=str(db),
        channels=(f"{CHANNEL} open",) if host else (),
        discovery=False,
        anchor=False,
        recv_buffer=SOCK_BUF,
    )


class RawDb:
    """One SQLite file with the same durability settings as the node's log."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        if self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise RuntimeError("SQLite refused WAL mode")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")

    def insert(self, seq: int, data: bytes) -> None:
        """One fsynced transaction (WAL + FULL: COMMIT returns after the fsync)."""
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO events (id, payload) VALUES (?, ?)", (seq, data))
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


# ------------------------------------------------------------------------------ subscriber


def _setup(conn: Connection) -> tuple[str, Path]:
    """The first message of every child: which kind it runs, and where its files go."""
    msg = expect(conn, 30, "the kind")
    assert isinstance(msg, tuple)
    return str(msg[0]), Path(msg[1])


def subscriber_child(conn: Connection) -> None:
    """("kind", dir) -> ready message; then ("collect", first_seq, n) -> {seq: delivery ns}."""
    run_child(conn, lambda: _subscriber(conn))


def _subscriber(conn: Connection) -> None:
    kind, directory = _setup(conn)
    if kind == "node":
        asyncio.run(_node_subscriber(conn, directory))
    else:
        _udp_subscriber(conn, directory, durable=kind == "udp_durable")


async def _node_subscriber(conn: Connection, directory: Path) -> None:
    loop = asyncio.get_running_loop()
    async with Node(Identity.generate(), node_config(directory / "b.db", False)) as node:
        conn.send("ready")
        host = expect(conn, 30, "the host")
        assert isinstance(host, tuple)
        (host_ip, host_port), host_cell = host
        await node.connect((str(host_ip), int(host_port)))
        await node.channels.subscribe(bytes(host_cell), CHANNEL)
        delivered: dict[int, int] = {}
        arrived = asyncio.Event()

        async def follow() -> None:
            async for stored in node.state.subscribe(CHANNEL):
                delivered[stored.event.seq] = time.monotonic_ns()
                arrived.set()

        task = asyncio.create_task(follow())
        conn.send("subscribed")
        try:
            while True:
                # The pipe is read in a thread so that the node keeps running meanwhile.
                cmd = await loop.run_in_executor(None, conn.recv)
                if cmd is None:
                    return
                _, first, n = cmd
                wanted = range(first, first + n)
                if await loop.run_in_executor(None, conn.recv) is None:  # publisher done
                    return
                deadline = time.monotonic() + COLLECT_GRACE_S
                while not all(s in delivered for s in wanted) and time.monotonic() < deadline:
                    arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), 0.1)
                conn.send({s: delivered[s] for s in wanted if s in delivered})
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _udp_subscriber(conn: Connection, directory: Path, durable: bool) -> None:
    aead = ChaCha20Poly1305(KEY)
    db = RawDb(directory / "raw-b.db") if durable else None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(conn.fileno(), selectors.EVENT_READ)
    delivered: dict[int, int] = {}
    failed = 0
    conn.send(sock.getsockname())
    expect(conn, 30, "go")
    conn.send("subscribed")
    wanted: range | None = None
    deadline: float | None = None
    try:
        while True:
            for key, _ in sel.select(0.1):
                if key.fileobj is sock:
                    while True:
                        try:
                            data = sock.recv(65536)
                        except BlockingIOError:
                            break
                        seq = _SEQ.unpack_from(data)[0]
                        try:
                            plain = aead.decrypt(nonce(seq), data[8:], data[:8])
                        except InvalidTag:
                            failed += 1
                            continue
                        if db is not None:
                            db.insert(seq, plain)
                        delivered[seq] = time.monotonic_ns()
                    continue
                cmd = conn.recv()
                if cmd is None:
                    return
                if cmd == "done":  # the publisher finished: stragglers get a deadline
                    deadline = time.monotonic() + COLLECT_GRACE_S
                else:
                    _, first, n = cmd
                    wanted = range(first, first + n)
            if (
                wanted is not None
                and deadline is not None
                and (all(s in delivered for s in wanted) or time.monotonic() > deadline)
            ):
                conn.send({s: delivered[s] for s in wanted if s in delivered})
                wanted, deadline = None, None
    finally:
        sel.close()
        sock.close()
        if db is not None:
            db.close()
        if failed:
            print(f"{BENCH}: {failed} datagrams failed authentication", file=sys.stderr)


# ------------------------------------------------------------------------------ publisher


def publisher_child(conn: Connection) -> None:
    """("kind", dir) -> its address; then ("publish", first_seq, n, rate) -> {seq: start ns}."""
    run_child(conn, lambda: _publisher(conn))


def _pace(start: int, i: int, rate: float) -> float:
    """Seconds to wait before event `i` of a run paced at `rate`/s (0: none)."""
    if rate <= 0:
        return 0.0
    return max(0.0, (start + int(i * 1e9 / rate) - time.monotonic_ns()) / 1e9)


def _publisher(conn: Connection) -> None:
    kind, directory = _setup(conn)
    if kind == "node":
        asyncio.run(_node_publisher(conn, directory))
    else:
        _udp_publisher(conn, directory, durable=kind == "udp_durable")


async def _node_publisher(conn: Connection, directory: Path) -> None:
    loop = asyncio.get_running_loop()
    async with Node(Identity.generate(), node_config(directory / "a.db", True)) as node:
        conn.send((node.local_addresses()[0], node.cell_id))
        publish = node.state.publish
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd is None:
                return
            _, first, n, rate = cmd
            started: dict[int, int] = {}
            calls: list[int] = []
            t0 = time.monotonic_ns()
            for i in range(n):
                wait = _pace(t0, i, rate)
                # Always yield between events: the node must take ACKs and send while the
                # application keeps publishing, as any asyncio application would let it.
                await asyncio.sleep(wait)
                t = started[first + i] = time.monotonic_ns()
                publish(CHANNEL, payload(first + i))
                calls.append(time.monotonic_ns() - t)
            conn.send((started, calls))


def _udp_publisher(conn: Connection, directory: Path, durable: bool) -> None:
    aead = ChaCha20Poly1305(KEY)
    db = RawDb(directory / "raw-a.db") if durable else None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = expect(conn, 30, "the subscriber's address")
    assert isinstance(addr, tuple)
    sock.connect(addr)
    conn.send("ready")
    try:
        while True:
            cmd = conn.recv()
            if cmd is None:
                return
            _, first, n, rate = cmd
            started: dict[int, int] = {}
            calls: list[int] = []
            t0 = time.monotonic_ns()
            for i in range(n):
                wait = _pace(t0, i, rate)
                if wait > 0:
                    time.sleep(wait)
                seq = first + i
                t = started[seq] = time.monotonic_ns()
                data = payload(seq)
                if db is not None:
                    db.insert(seq, data)
                header = _SEQ.pack(seq)
                sock.send(header + aead.encrypt(nonce(seq), data, header))
                calls.append(time.monotonic_ns() - t)
            conn.send((started, calls))
    finally:
        sock.close()
        if db is not None:
            db.close()


# ------------------------------------------------------------------------------ coordination


@dataclass(frozen=True, slots=True)
class Run:
    """One run of one kind: when each event was published and when it was delivered."""

    kind: str
    n: int
    started: dict[int, int]
    delivered: dict[int, int]
    calls: list[int]
    """Nanoseconds each publish call (or the baseline's insert + seal + send) took."""

    @property
    def latencies(self) -> list[float]:
        return [
            (self.delivered[s] - t) * 1e-9 for s, t in self.started.items() if s in self.delivered
        ]

    @property
    def span(self) -> float:
        """Seconds from the first publish start to the last delivery."""
        if not self.delivered:
            return 0.0
        return (max(self.delivered.values()) - min(self.started.values())) * 1e-9


@dataclass(frozen=True, slots=True)
class Totals:
    """The runs of one kind and mode over every round, taken together."""

    runs: list[Run]

    @property
    def n(self) -> int:
        return sum(r.n for r in self.runs)

    @property
    def delivered(self) -> int:
        return sum(len(r.delivered) for r in self.runs)

    @property
    def lost(self) -> int:
        return self.n - self.delivered

    @property
    def latencies(self) -> list[float]:
        return [x for r in self.runs for x in r.latencies]

    @property
    def rate(self) -> float:
        """Events delivered per second: all deliveries / all the runs' spans."""
        span = sum(r.span for r in self.runs)
        return self.delivered / span if span > 0 else 0.0

    @property
    def call_median(self) -> float:
        return percentile([c * 1e-9 for r in self.runs for c in r.calls], 50)


class Pair:
    """A publisher and a subscriber child of one kind, connected and subscribed."""

    def __init__(self, kind: str, pub: Child, sub: Child) -> None:
        self.kind = kind
        self.pub = pub
        self.sub = sub
        self.next_seq = 1

    def run(self, n: int, rate: float) -> Run:
        first = self.next_seq
        self.next_seq += n
        timeout = 60.0 + (n / rate if rate > 0 else 0.0)
        self.sub.conn.send(("collect", first, n))
        self.pub.conn.send(("publish", first, n, rate))
        published = expect(self.pub.conn, timeout, "its publish times")
        self.sub.conn.send("done")
        delivered = expect(self.sub.conn, timeout + COLLECT_GRACE_S, "its delivery times")
        assert isinstance(published, tuple)
        assert isinstance(delivered, dict)
        started, calls = published
        return Run(self.kind, n, started, delivered, calls)


@contextlib.contextmanager
def running_pair(kind: str, directory: Path) -> Iterator[Pair]:
    with (
        child_process(subscriber_child, f"bench-live-{kind}-sub") as sub,
        child_process(publisher_child, f"bench-live-{kind}-pub") as pub,
    ):
        if can_pin():
            cpu = cpus()
            pin(pub.pid, cpu[0])
            pin(sub.pid, cpu[1])
        sub.conn.send((kind, str(directory)))
        pub.conn.send((kind, str(directory)))
        if kind == "node":
            expect(sub.conn, 30, "ready")
            host = expect(pub.conn, 30, "its address")
            sub.conn.send(host)
        else:
            addr = expect(sub.conn, 30, "its address")
            pub.conn.send(addr)
            expect(pub.conn, 30, "ready")
            sub.conn.send("go")
        expect(sub.conn, 30, "subscribed")
        yield Pair(kind, pub, sub)
        for c in (pub, sub):
            with contextlib.suppress(OSError):
                c.conn.send(None)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=2000, help="events in the burst run")
    p.add_argument("--paced-events", type=int, default=500, help="events in the paced run")
    p.add_argument("--rate", type=float, default=100.0, help="events/s of the paced run")
    p.add_argument("--rounds", type=int, default=3, help="rounds the events are split over")
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for the database files (default: a temporary directory)",
    )


LABELS = {
    "node": "cellmesh: node.state.publish on A -> B's log -> node.state.subscribe on B",
    "udp": "raw UDP + ChaCha20-Poly1305, one datagram per event, no durability",
    "udp_durable": "raw UDP + ChaCha20-Poly1305 + fsynced SQLite insert on both sides",
}


def run(args: argparse.Namespace) -> int:
    burst_n, paced_n = (200, 60) if args.quick else (args.events, args.paced_events)
    rate = args.rate
    print_header(
        BENCH,
        f"{PAYLOAD} B payloads; paced {paced_n} events at {rate:g}/s, burst {burst_n} events",
    )
    t_start = time.monotonic()
    rounds = args.rounds
    runs: dict[tuple[str, str], list[Run]] = {(k, m): [] for k in KINDS for m in ("paced", "burst")}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-live-") as tmp:
        root = Path(tmp)
        for kind in KINDS:
            (root / kind).mkdir()
        with contextlib.ExitStack() as stack:
            pairs = [stack.enter_context(running_pair(k, root / k)) for k in KINDS]
            for pair in pairs:
                pair.run(min(20, paced_n), rate)  # warm-up: sessions, caches, first fsyncs
            # Rounds, each kind in turn: fsync latency on a shared disk moves in phases, and
            # taking turns spreads every kind over the same phases.
            for i in range(rounds):
                share = paced_n // rounds + (1 if i < paced_n % rounds else 0)
                burst = burst_n // rounds + (1 if i < burst_n % rounds else 0)
                for pair in pairs:
                    runs[pair.kind, "paced"].append(pair.run(share, rate))
                    runs[pair.kind, "burst"].append(pair.run(burst, 0.0))
    totals = {key: Totals(rs) for key, rs in runs.items()}
    for (kind, mode), t in totals.items():
        if kind == "node" and t.lost:
            raise RuntimeError(f"{t.lost} of {t.n} events never reached B's log ({mode} runs)")

    def lat(kind: str, mode: str, q: float) -> float:
        return percentile(totals[kind, mode].latencies, q)

    for mode in ("paced", "burst"):
        for base in ("udp_durable", "udp"):
            ours, raw = totals["node", mode], totals[base, mode]
            metrics = [
                Metric("latency median", lat("node", mode, 50), lat(base, mode, 50), "ms", "lower"),
                Metric("latency p99", lat("node", mode, 99), lat(base, mode, 99), "ms", "lower"),
            ]
            if mode == "burst":
                metrics.insert(0, Metric("events/s delivered", ours.rate, raw.rate, "/s", "higher"))
            notes = [
                f"{ours.n} events of {PAYLOAD} B in {rounds} rounds; baseline delivered "
                f"{raw.delivered}",
                f"publisher's call, median: publish {ours.call_median * 1e3:.3f} ms, "
                f"baseline {raw.call_median * 1e3:.3f} ms",
            ]
            if raw.lost:
                notes.append(f"baseline: {raw.lost} datagrams lost (left out of its figures)")
            report(
                Result(
                    bench=BENCH,
                    case=f"{mode}" + (f" at {rate:g}/s" if mode == "paced" else "") + f" vs {base}",
                    ours=LABELS["node"],
                    baseline=LABELS[base],
                    metrics=metrics,
                    notes=notes,
                    extra={"events": ours.n, "baseline_lost": raw.lost},
                ),
                args.json,
                args.quick,
            )
    node_b, dur_b, udp_b = (totals[k, "burst"] for k in ("node", "udp_durable", "udp"))
    print(
        f"\n{BENCH} summary: burst {node_b.rate:,.0f} events/s delivered = "
        f"{node_b.rate / dur_b.rate:.2f}x durable UDP+AEAD ({dur_b.rate:,.0f}/s), "
        f"{node_b.rate / udp_b.rate:.3f}x UDP+AEAD ({udp_b.rate:,.0f}/s); paced median latency "
        f"{lat('node', 'paced', 50) * 1e3:.2f} ms vs {lat('udp_durable', 'paced', 50) * 1e3:.2f} ms "
        f"durable, {lat('udp', 'paced', 50) * 1e3:.3f} ms raw"
    )
    print(f"({time.monotonic() - t_start:.1f} s)")
    return 0


def main() -> int:
    return bench_main(BENCH, __doc__.splitlines()[0] if __doc__ else BENCH, options, run)


if __name__ == "__main__":
    sys.exit(main())
