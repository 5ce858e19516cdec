"""Reliable 1 KiB messages per second between two processes on 127.0.0.1, and their round trip.

Layout: a sender process pinned to one CPU, a receiver process pinned to the other; this process
only coordinates through pipes. Every message is 1024 bytes of application data: a type byte, an
8-byte sequence number and a fixed body. The receiver checks the length and the body of every
message and counts distinct sequence numbers (duplicates are counted separately), and this process
checks that it got exactly what the sender sent. Rate = messages delivered / (time from the
sender's first send to the receiver holding the last message); both clocks are CLOCK_MONOTONIC.

* ours: `await Node.send_message(cell, data)` in a loop / `await Node.recv_message()` (reliable,
  unordered). The Node API has no send-side back-pressure (`send_message` never waits; the
  connection refuses beyond 100,000 queued messages) and a receiving Node keeps at most 4,096
  undelivered messages (beyond that it drops them, *after* the transport acknowledged them:
  `inbox_dropped`). So the sender keeps an application window: at most 2,048 messages beyond what
  the receiving application has taken out of `recv_message`, which grants credit with a small
  message back every 256 messages. Without it, messages would be lost (see the note printed).
* baseline: TCP + TLS 1.3 with asyncio streams, a self-signed Ed25519 certificate made with
  `cryptography`; each message a 4-byte length + 1024 bytes, written with `writer.write` +
  `await writer.drain()` per message, read with `readexactly` per message (TCP's own flow control
  is the back-pressure). One connection per pair, set up outside the timing.

Round trip: the sender sends one message that asks for an echo and waits for the echo (a message
back from the receiving application), one at a time; the same over the TLS connection.

Each side runs once for up to 1,000,000 messages or 10 s, whichever comes first (`--quick`:
200,000 or 2 s), ours first, then the baseline, then the round trips, interleaved in rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

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
    send_error,
    summarize,
)
from bench_bulk import (
    TLS_NAME,
    PipeCommands,
    cpu_seconds,
    hot_spots,
    self_signed_pem,
    tls_client_context,
    tls_server_context,
)
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.allocator import tune_malloc
from cellmesh.node.node import Node

BENCH = "bench_messages"
SIZE = 1024
WINDOW = 2048
CREDIT_EVERY = 256
TARGET_RATE = 100_000.0
DATA, ECHO, CREDIT = b"D", b"E", b"C"
_SEQ = struct.Struct("!Q")
_FRAME = struct.Struct("!I")
BODY = bytes((i * 7) & 0xFF for i in range(SIZE - 1 - _SEQ.size))
Kind = Literal["cellmesh", "tls"]
Addr = tuple[str, int]


def message(kind: bytes, seq: int) -> bytes:
    return kind + _SEQ.pack(seq) + BODY


# ------------------------------------------------------------------------------ receiver


class Tally:
    """Distinct sequence numbers seen in one run, and what was wrong."""

    def __init__(self, profile: bool = False) -> None:
        self.profiler = cProfile.Profile() if profile else None
        if self.profiler is not None:
            self.profiler.enable()
        self.seen = bytearray()
        self.count = 0
        self.duplicates = 0
        self.corrupt = 0
        self.t_last = 0.0
        self.expect: int | None = None
        self.cpu0 = cpu_seconds()

    def add(self, data: bytes) -> None:
        if len(data) != SIZE or data[1 + _SEQ.size :] != BODY:
            self.corrupt += 1
            return
        seq = _SEQ.unpack_from(data, 1)[0]
        seen = self.seen
        if seq >= len(seen):
            seen.extend(bytes(max(seq + 1 - len(seen), 65536)))
        if seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        self.count += 1
        self.t_last = time.perf_counter()

    @property
    def complete(self) -> bool:
        return self.expect is not None and self.count >= self.expect

    def result(self, **extra: object) -> dict[str, object]:
        profile = ""
        if self.profiler is not None:
            self.profiler.disable()
            profile = hot_spots(self.profiler)
            self.profiler = None
        return {
            "profile": profile,
            "count": self.count,
            "duplicates": self.duplicates,
            "corrupt": self.corrupt,
            "t_last": self.t_last,
            "cpu": cpu_seconds() - self.cpu0,
            **extra,
        }


def receiver_child(conn: Connection) -> None:
    """Counts DATA messages, echoes ECHO messages; ("expect", n) -> report once n arrived."""
    try:
        kind = conn.recv()
        tune_malloc()  # the allocator settings a Node applies, for ours and the baseline
        asyncio.run(_receiver(conn, str(kind)))
    except BaseException as exc:
        send_error(conn, exc)
        raise


async def _receiver(conn: Connection, kind: str) -> None:
    commands = PipeCommands(conn)
    tally = Tally()
    state: dict[str, object] = {}

    def maybe_report() -> None:
        if tally.complete:
            conn.send(tally.result(**state))
            tally.expect = None

    async def on_commands() -> None:
        nonlocal tally
        while True:
            cmd = await commands.queue.get()
            if isinstance(cmd, tuple) and cmd[0] == "expect":
                tally.expect = int(cmd[1])
                maybe_report()
            elif isinstance(cmd, tuple) and cmd[0] == "reset":
                tally = Tally(profile=bool(cmd[1]))
                conn.send("ok")
            else:
                return

    if kind == "cellmesh":
        async with Node(Identity.generate(), NodeConfig(listen=(f"{LOOPBACK}:0",))) as node:

            async def serve() -> None:
                recv, send = node.recv_message, node.send_message
                granted = 0
                while True:
                    cell, data = await recv()
                    t = data[:1]
                    if t == DATA:
                        tally.add(data)
                        if tally.count - granted >= CREDIT_EVERY:
                            granted = tally.count
                            await send(cell, CREDIT + _SEQ.pack(granted))
                        state["inbox_dropped"] = node.inbox_dropped
                        if tally.expect is not None:
                            maybe_report()
                    elif t == ECHO:
                        await send(cell, data)
                    elif t == b"R":  # a new run: credit starts again from zero
                        granted = 0
                        await send(cell, b"R")

            conn.send((node.local_addresses()[0], node.cell_id))
            task = asyncio.create_task(serve())
            try:
                await on_commands()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return

    pem = conn.recv()
    assert isinstance(pem, tuple)
    handlers: list[asyncio.Task[None]] = []

    async def serve_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        readexactly = reader.readexactly
        try:
            while True:
                n = _FRAME.unpack(await readexactly(4))[0]
                data = await readexactly(n)
                t = data[:1]
                if t == DATA:
                    tally.add(data)
                    if tally.expect is not None:
                        maybe_report()
                elif t == ECHO:
                    writer.write(_FRAME.pack(len(data)) + data)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.create_task(serve_tls(r, w)))

    server = await asyncio.start_server(accept, LOOPBACK, 0, ssl=tls_server_context(pem))
    async with server:
        name = server.sockets[0].getsockname()
        conn.send(((str(name[0]), int(name[1])), b""))
        await on_commands()
        for h in handlers:
            h.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


# ------------------------------------------------------------------------------ sender


def sender_child(conn: Connection) -> None:
    """On ("run", max_msgs, max_s) sends; on ("rtt", n) measures round trips; reports each."""
    try:
        kind = conn.recv()
        tune_malloc()  # the allocator settings a Node applies, for ours and the baseline
        asyncio.run(_sender(conn, str(kind)))
    except BaseException as exc:
        send_error(conn, exc)
        raise


async def _sender(conn: Connection, kind: str) -> None:
    hello = conn.recv()
    assert isinstance(hello, tuple)
    addr: Addr = (str(hello[0][0]), int(hello[0][1]))
    cell = bytes(hello[1])
    commands = PipeCommands(conn)
    clock = time.perf_counter
    if kind == "cellmesh":
        async with Node(Identity.generate(), NodeConfig(listen=(f"{LOOPBACK}:0",))) as node:
            await node.connect(addr)
            credit = 0
            credited = asyncio.Event()
            echoes: asyncio.Queue[bytes] = asyncio.Queue()

            async def incoming() -> None:
                nonlocal credit
                while True:
                    _, data = await node.recv_message()
                    t = data[:1]
                    if t == CREDIT:
                        credit = max(credit, _SEQ.unpack_from(data, 1)[0])
                        credited.set()
                    else:
                        echoes.put_nowait(data)

            reader = asyncio.create_task(incoming())
            conn.send("ready")
            send = node.send_message
            try:
                while True:
                    cmd = await commands.queue.get()
                    if not isinstance(cmd, tuple):
                        return
                    if cmd[0] == "rtt":
                        rtts: list[float] = []
                        for i in range(int(cmd[1])):
                            t0 = clock()
                            await send(cell, message(ECHO, i))
                            await asyncio.wait_for(echoes.get(), 5.0)
                            rtts.append(clock() - t0)
                        conn.send({"rtts": rtts})
                        continue
                    # a run: reset the credit on both sides first
                    await send(cell, b"R")
                    await asyncio.wait_for(echoes.get(), 5.0)
                    credit = 0
                    max_n, max_s, window = int(cmd[1]), float(cmd[2]), int(cmd[3])
                    profiler = cProfile.Profile() if cmd[4] else None
                    if profiler is not None:
                        profiler.enable()
                    waits = 0
                    cpu0 = cpu_seconds()
                    t0 = clock()
                    seq = 0
                    while seq < max_n:
                        if not seq & 255 and clock() - t0 >= max_s:
                            break
                        if seq - credit >= window:
                            waits += 1
                            credited.clear()
                            await asyncio.wait_for(credited.wait(), 10.0)
                            continue
                        await send(cell, message(DATA, seq))
                        seq += 1
                    c = node.endpoint.connection(cell)
                    if profiler is not None:
                        profiler.disable()
                    conn.send(
                        {
                            "profile": hot_spots(profiler) if profiler is not None else "",
                            "sent": seq,
                            "t0": t0,
                            "t_sent": clock(),
                            "cpu": cpu_seconds() - cpu0,
                            "window_waits": waits,
                            "packets_sent": c.stats.packets_sent if c else 0,
                            "packets_lost": c.stats.packets_lost if c else 0,
                            "mtu": c.mtu if c else 0,
                        }
                    )
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
    pem = conn.recv()
    assert isinstance(pem, tuple)
    reader_, writer = await asyncio.open_connection(
        addr[0], addr[1], ssl=tls_client_context(pem[0]), server_hostname=TLS_NAME
    )
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.send("ready")
    write, drain = writer.write, writer.drain
    try:
        while True:
            cmd = await commands.queue.get()
            if not isinstance(cmd, tuple):
                return
            if cmd[0] == "rtt":
                rtts = []
                for i in range(int(cmd[1])):
                    t0 = clock()
                    write(_FRAME.pack(SIZE) + message(ECHO, i))
                    await drain()
                    n = _FRAME.unpack(await reader_.readexactly(4))[0]
                    await reader_.readexactly(n)
                    rtts.append(clock() - t0)
                conn.send({"rtts": rtts})
                continue
            max_n, max_s = int(cmd[1]), float(cmd[2])
            cpu0 = cpu_seconds()
            t0 = clock()
            seq = 0
            while seq < max_n:
                if not seq & 255 and clock() - t0 >= max_s:
                    break
                write(_FRAME.pack(SIZE) + message(DATA, seq))
                await drain()
                seq += 1
            conn.send({"sent": seq, "t0": t0, "t_sent": clock(), "cpu": cpu_seconds() - cpu0})
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2.0)


# ------------------------------------------------------------------------------ coordinator


@dataclass(slots=True)
class Run:
    kind: str
    sent: int
    delivered: int
    seconds: float
    sender: dict[str, object]
    receiver: dict[str, object]

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.delivered == self.sent
            and self.receiver.get("duplicates") == 0
            and self.receiver.get("corrupt") == 0
        )


@dataclass(slots=True)
class Pair:
    kind: Kind
    sender: Child
    receiver: Child

    def run(self, max_n: int, max_s: float, window: int = WINDOW, profile: bool = False) -> Run:
        self.receiver.conn.send(("reset", profile))
        expect(self.receiver.conn, 10.0, "reset")
        self.sender.conn.send(("run", max_n, max_s, window, profile))
        s = expect(self.sender.conn, max_s + 60.0, "its send report")
        assert isinstance(s, dict)
        sent = int(s["sent"])
        self.receiver.conn.send(("expect", sent))
        if self.receiver.conn.poll(30.0):
            r = expect(self.receiver.conn, 1.0, "its receive report")
            assert isinstance(r, dict)
            return Run(self.kind, sent, int(r["count"]), float(r["t_last"]) - float(s["t0"]), s, r)
        self.receiver.conn.send("stop")
        raise RuntimeError(f"{self.kind}: the receiver never got all {sent} messages")

    def rtts(self, n: int) -> list[float]:
        self.sender.conn.send(("rtt", n))
        r = expect(self.sender.conn, 5.0 * n + 30.0, "its round trips")
        assert isinstance(r, dict)
        values = r["rtts"]
        assert isinstance(values, list)
        return [float(v) for v in values]


@contextlib.contextmanager
def running_pair(kind: Kind, pem: tuple[bytes, bytes]) -> Iterator[Pair]:
    with (
        child_process(receiver_child, f"bench-msg-{kind}-receiver") as receiver,
        child_process(sender_child, f"bench-msg-{kind}-sender") as sender,
    ):
        if can_pin():
            c = cpus()
            pin(sender.pid, c[0])
            pin(receiver.pid, c[1])
        receiver.conn.send(kind)
        if kind == "tls":
            receiver.conn.send(pem)
        hello = expect(receiver.conn, 30.0, "its address")
        sender.conn.send(kind)
        sender.conn.send(hello)
        if kind == "tls":
            sender.conn.send(pem)
        if expect(sender.conn, 30.0, "ready") != "ready":
            raise RuntimeError("sender not ready")
        yield Pair(kind, sender, receiver)
        with contextlib.suppress(OSError):
            sender.conn.send("stop")
            sender.conn.poll(2.0)
            receiver.conn.send("stop")


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window",
        type=int,
        default=WINDOW,
        help=f"messages in flight beyond the receiver's credit (default {WINDOW}; above 4096 "
        "the receiving Node's inbox can overflow and drop acknowledged messages)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="only run ours once under cProfile (both processes) and print the hot spots",
    )


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH, options)
    max_n, max_s, n_rtt = (200_000, 2.0, 200) if args.quick else (1_000_000, 10.0, 1000)
    window = int(args.window)
    if args.profile:
        with running_pair("cellmesh", self_signed_pem()) as pair:
            r = pair.run(max_n, min(max_s, 3.0), window, profile=True)
        print(f"under cProfile (rank, do not quote): {r.rate:,.0f} messages/s")
        print("--- receiver\n" + str(r.receiver.get("profile", "")))
        print("--- sender\n" + str(r.sender.get("profile", "")))
        return 0
    print_header(
        BENCH,
        f"{SIZE}-byte messages, up to {max_n:,} or {max_s:g} s per side; {n_rtt} round trips; "
        "sender and receiver pinned apart",
    )
    t_start = time.monotonic()
    pem = self_signed_pem()
    with running_pair("cellmesh", pem) as ours_pair, running_pair("tls", pem) as base_pair:
        ours_pair.rtts(20)  # warm-up
        base_pair.rtts(20)
        ours = ours_pair.run(max_n, max_s, window)
        base = base_pair.run(max_n, max_s)
        rtt_ours: list[float] = []
        rtt_base: list[float] = []
        for _ in range(4):
            rtt_ours += ours_pair.rtts(n_rtt // 4)
            rtt_base += base_pair.rtts(n_rtt // 4)
    so, sb = summarize(rtt_ours), summarize(rtt_base)
    for r in (ours, base):
        if not r.ok:
            print(
                f"  !! {r.kind}: delivered {r.delivered} of {r.sent}, duplicates "
                f"{r.receiver.get('duplicates')}, corrupt {r.receiver.get('corrupt')}"
            )
    report(
        Result(
            bench=BENCH,
            case="reliable 1 KiB messages, throughput",
            ours="Node.send_message -> Node.recv_message (reliable, unordered), "
            f"app window {window}",
            baseline="asyncio TCP+TLS 1.3, 4-byte length + 1 KiB per message, drain per write",
            metrics=[
                Metric("messages/s", ours.rate, base.rate, "/s", "higher"),
                Metric("payload", ours.rate * SIZE, base.rate * SIZE, "MB/s", "higher"),
                Metric(
                    "sender CPU / wall",
                    float(str(ours.sender["cpu"])) / ours.seconds,
                    float(str(base.sender["cpu"])) / base.seconds,
                    "%",
                    "lower",
                ),
                Metric(
                    "receiver CPU / wall",
                    float(str(ours.receiver["cpu"])) / ours.seconds,
                    float(str(base.receiver["cpu"])) / base.seconds,
                    "%",
                    "lower",
                ),
            ],
            targets=[Target("ours >= 100,000 messages/s", ours.rate >= TARGET_RATE)],
            notes=[
                f"ours: {ours.delivered:,} of {ours.sent:,} messages in {ours.seconds:.2f} s, "
                f"duplicates {ours.receiver.get('duplicates')}, corrupt "
                f"{ours.receiver.get('corrupt')}, receiver inbox_dropped "
                f"{ours.receiver.get('inbox_dropped')}; {ours.sender.get('packets_sent')} packets "
                f"(path MTU {ours.sender.get('mtu')}), {ours.sender.get('packets_lost')} declared "
                f"lost; sender waited for window credit {ours.sender.get('window_waits')} times",
                f"baseline: {base.delivered:,} of {base.sent:,} messages in {base.seconds:.2f} s, "
                "in order",
                "every message checked (length, body, distinct sequence number) at the receiver: "
                + ("all delivered exactly once" if ours.ok and base.ok else "PROBLEMS (see above)"),
            ],
            extra={"ours": run_dict(ours), "baseline": run_dict(base)},
        ),
        args.json,
        args.quick,
    )
    report(
        Result(
            bench=BENCH,
            case="reliable 1 KiB message, round trip",
            ours="send_message(ECHO) -> peer app recv_message + send_message -> recv_message",
            baseline="TLS: write + drain, peer readexactly + write, readexactly",
            metrics=[
                Metric("median", so.median, sb.median, "us", "lower"),
                Metric("p99", so.p99, sb.p99, "us", "lower"),
                Metric("mean", so.mean, sb.mean, "us", "lower"),
            ],
            notes=[
                f"{so.n} sequential round trips per side in 4 interleaved rounds, processes pinned "
                "to separate CPUs (each message wakes an idle vCPU, both sides pay it)"
            ],
        ),
        args.json,
        args.quick,
    )
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0 if ours.ok and base.ok else 1


def run_dict(r: Run) -> dict[str, object]:
    keep = ("cpu", "window_waits", "packets_sent", "packets_lost", "mtu", "inbox_dropped")
    return {
        "sent": r.sent,
        "delivered": r.delivered,
        "seconds": r.seconds,
        "rate": r.rate,
        "sender": {k: v for k, v in r.sender.items() if k in keep},
        "receiver": {k: v for k, v in r.receiver.items() if k in keep or k == "duplicates"},
    }


if __name__ == "__main__":
    sys.exit(main())
