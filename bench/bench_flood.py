"""Flood resilience: goodput of a legitimate cellmesh stream while a third process floods the
receiver with junk and handshake initiations at full speed, as a ratio of the goodput without
the flood, measured in the same invocation on 127.0.0.1.

Processes (all spawned by this one, which only coordinates through pipes and sleeps):

* receiver: a `Node` that accepts one stream and reads it forever, counting bytes;
* sender: a `Node` that connects, opens one stream and writes 1 MiB chunks into it forever
  (the stream's flow and congestion control decide the pace);
* flooder: sends pools of pre-built datagrams round and round at full speed with sendmmsg(2)
  (256 per system call, each a separate UDP datagram) at the receiver's port.

The stream runs for the whole benchmark. Phases follow one another; each is a settling time
(1 s; `--quick`: 0.5 s) after the flood starts, then a measurement window (3 s; `--quick`: 1 s)
over which goodput is the growth of the receiver's byte count divided by the receiver's own clock.
After a flood aimed at the receiver, the script waits until the stream runs again at half its
first no-flood pace (polling every 0.1 s, at most 10 s) and reports that recovery time, so the
next phase starts from a stream that moves. Phases, in order:

* none (four times, spread out): no flood; their mean is the baseline.
* sink: the flooder sends the junk pool at full speed to a socket of its own that nobody reads:
  the same CPU competition as a flood, but nothing reaches the receiver. This is the control
  that separates "the flood costs the receiver" from "the flooder steals a CPU" (below).
* junk: random bytes, 1-400 B, full speed.
* init_garbage: HANDSHAKE_INIT frames from random CellIDs, pattern XX, no cookie, a random Noise
  message (200 B), full speed: they reach the handshake budget and, over it, the cookie path.
* init_real: genuine Noise XX message-1 INITs from 2048 fresh identities (each built by an
  `Endpoint.connect`), cycled, full speed: the node does real handshake work for those its
  budget and half-open table admit, answers others with cookie replies, and drops the rest.
* mix: the three pools above interleaved, full speed.
* junk@50k, junk@100k, junk@200k (`--quick`: junk@100k only): the junk pool paced at these
  datagram rates (`--paced`), to show where between "no flood" and "full speed" the stream
  gives way.

For every phase the output gives the flooder's achieved send rate, the datagrams per second the
receiver node processed (legitimate ones included), what the kernel dropped at the receiver's full
socket (the `drops` column of /proc/net/udp), the receiver's drop counters by reason, the CPU
share of both nodes, and the sender's losses, probe timeouts and congestion-controller state.

CPU placement. The machine has 2 CPUs for three busy processes. The receiver node gets a CPU to
itself (its cost of shedding the flood is what the claim is about) and the flooder shares the
other CPU with the sender node (default `--flooder-cpu sender`). On loopback the kernel's receive
work (IP/UDP demultiplexing, socket enqueue, drops at a full socket) runs on the *sending* CPU, so
the receiver pays only its system calls and Python work, as it would behind a NIC minus the
softirq; the sender node, however, has to share its CPU with the flooder, which a real attack
from another host would not make it do. The sink phase measures that share alone, so the output gives
two ratios: flood / no flood (the issue's figure, CPU theft included) and flood / sink (the
receiver's own cost of the flood). `--flooder-cpu receiver` puts the flooder on the receiver's
CPU instead, `free` leaves it to the scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import resource
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from _common import (
    LOOPBACK,
    Blaster,
    Child,
    Connection,
    Metric,
    OtherLoad,
    Result,
    Target,
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
from cellmesh.errors import CellmeshError
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.node.udp import Addr
from cellmesh.transport.endpoint import Endpoint
from cellmesh.wire.header import HEADER_LEN, FrameType, pack_header
from cellmesh.wire.messages import COOKIE_LEN, HandshakePattern

BENCH = "bench_flood"
MIB = 1 << 20
CHUNK = MIB
SOCK_BUF = 4 * MIB
POOL = 2048
FRAME = 200
SETTLE_S = 1.0
TARGET = 0.80
FULL = 0.0
PACED_DEFAULT: tuple[float, ...] = (50_000.0, 100_000.0, 200_000.0)
RECOVERY_MAX_S = 10.0
CHILD_LIFETIME = 600.0
"""Children exit by themselves after this long (the run itself stays far below it)."""
BUSY_OTHERS = 0.10
"""Warn when other processes take more than this share of the CPUs during a window."""
RECOVERED = 0.5
"""After a flood, the stream counts as recovered once 0.1 s of goodput reaches this fraction of
the first no-flood window's."""


@dataclass(frozen=True, slots=True)
class Plan:
    """One phase to run: a flood pool (None: no flood), where it goes, and its rate (0: full)."""

    pool: str | None
    where: str = "node"
    rate: float = FULL

    @property
    def name(self) -> str:
        if self.pool is None:
            return "none"
        if self.where == "sink":
            return "sink"
        return self.pool if self.rate <= 0 else f"{self.pool}@{self.rate / 1e3:g}k"


def plans(paced: tuple[float, ...]) -> list[Plan]:
    """The phases in order: full-speed floods with no-flood windows between them, then junk
    floods paced at the `paced` rates."""
    out = [
        Plan(None),
        Plan("junk", "sink"),
        Plan("junk"),
        Plan("init_garbage"),
        Plan(None),
        Plan("init_real"),
        Plan("mix"),
        Plan(None),
    ]
    out += [Plan("junk", rate=r) for r in paced]
    if paced:
        out.append(Plan(None))
    return out


DESCRIPTIONS = {
    "sink": "junk at full speed to the flooder's own unread socket (CPU-competition control)",
    "junk": "random bytes, 1-400 B",
    "init_garbage": "HANDSHAKE_INIT, XX, no cookie, random Noise message, random CellIDs",
    "init_real": "genuine Noise XX INITs from 2048 fresh identities, cycled",
    "mix": "junk, garbage INITs and genuine INITs interleaved",
}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def node_config(max_datagram: int) -> NodeConfig:
    return NodeConfig(listen=(f"{LOOPBACK}:0",), max_datagram=max_datagram, recv_buffer=SOCK_BUF)


class PipeCommands:
    """Commands from the parent, read by the event loop (no extra thread); None at EOF."""

    def __init__(self, conn: Connection) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self._conn = conn
        asyncio.get_running_loop().add_reader(conn.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            msg: object = self._conn.recv()
        except (EOFError, OSError):
            msg = None
        if msg is None:
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
        self.queue.put_nowait(msg)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())


async def _serve_marks(
    conn: Connection, commands: PipeCommands, snapshot: Callable[[], dict[str, object]]
) -> None:
    """Answer "mark" with a snapshot (plus clock and CPU time) until "stop" or EOF."""
    while True:
        cmd = await commands.queue.get()
        if cmd != "mark":
            return
        snap = snapshot()
        snap.update(t=time.perf_counter(), cpu=cpu_seconds())
        conn.send(snap)


# ------------------------------------------------------------------------------ receiver


def receiver_child(conn: Connection) -> None:
    """A Node that reads one stream forever and reports its counters on "mark"."""
    run_child(conn, lambda: asyncio.run(_receiver(conn)))


async def _receiver(conn: Connection) -> None:
    max_datagram = int(conn.recv())
    commands = PipeCommands(conn)
    got = 0
    errors: list[str] = []
    try:
        async with Node(Identity.generate(), node_config(max_datagram)) as node:
            port = node.local_addresses()[0][1]

            async def read_streams() -> None:
                nonlocal got
                while True:
                    st = await node.accept_stream()
                    try:
                        while chunk := await st.read(CHUNK):
                            got += len(chunk)
                    except CellmeshError as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")

            def snapshot() -> dict[str, object]:
                s = node.statistics()
                return {
                    "bytes": got,
                    "datagrams_in": s.datagrams_in,
                    "drops": dict(s.drops),
                    "cookies": s.cookies_sent,
                    "handshakes": s.handshakes_completed,
                    "half_open": s.pending_responses,
                    "sessions": s.sessions,
                    "kernel": udp_socket_drops(port),
                    "errors": list(errors),
                }

            conn.send((node.local_addresses()[0], node.cell_id))
            reader = asyncio.create_task(read_streams())
            try:
                await _serve_marks(conn, commands, snapshot)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    finally:
        commands.close()


# ------------------------------------------------------------------------------ sender


def sender_child(conn: Connection) -> None:
    """A Node that writes one stream to the receiver forever and reports on "mark"."""
    run_child(conn, lambda: asyncio.run(_sender(conn)))


async def _sender(conn: Connection) -> None:
    max_datagram, addr_raw, cell = conn.recv()
    addr: Addr = (str(addr_raw[0]), int(addr_raw[1]))
    commands = PipeCommands(conn)
    written = 0
    failure: list[str] = []
    chunk = random.Random(7).randbytes(CHUNK)
    try:
        async with Node(Identity.generate(), node_config(int(max_datagram))) as node:
            await node.connect(addr)
            st = await node.open_stream(bytes(cell))

            async def write_forever() -> None:
                nonlocal written
                try:
                    while True:
                        await st.write(chunk)
                        written += len(chunk)
                except CellmeshError as exc:
                    failure.append(f"{type(exc).__name__}: {exc}")

            writer = asyncio.create_task(write_forever())
            conn.send("ready")

            def snapshot() -> dict[str, object]:
                c = node.endpoint.connection(bytes(cell))
                return {
                    "written": written,
                    "failure": list(failure),
                    "cc": f"mtu={c.mtu} {cc_state(c.cc)}" if c is not None else "",
                    "lost": c.stats.packets_lost if c is not None else 0,
                    "ptos": c.stats.pto_count_total if c is not None else 0,
                }

            try:
                await _serve_marks(conn, commands, snapshot)
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                st.reset()
    finally:
        commands.close()


def cc_state(cc: object) -> str:
    """The sender's congestion controller model, for diagnostics (what bench_bulk prints)."""
    parts = [f"{k}={getattr(cc, k)}" for k in ("state", "cwnd") if hasattr(cc, k)]
    for k, scale, unit in (("btl_bw", 1e-6, "MB/s"), ("min_rtt", 1e3, "ms")):
        v = getattr(cc, k, None)
        if isinstance(v, float):
            parts.append(f"{k}={v * scale:.3g}{unit}")
    return " ".join(parts)


# ------------------------------------------------------------------------------ flooder


def build_pools(target: Addr, identities: int, rng: random.Random) -> dict[str, list[bytes]]:
    """The flood pools (see the module docstring)."""
    junk = [rng.randbytes(rng.randrange(1, 401)) for _ in range(POOL)]
    garbage: list[bytes] = []
    for _ in range(POOL):
        b = bytes([HandshakePattern.XX]) + bytes(COOKIE_LEN)
        b += rng.randbytes(FRAME - HEADER_LEN - len(b))
        h = pack_header(FrameType.HANDSHAKE_INIT, rng.randbytes(16), bytes(16), 0, 0, len(b))
        garbage.append(h + b)
    config = NodeConfig(listen=(f"{LOOPBACK}:0",))
    real: list[bytes] = []
    for _ in range(identities):
        ep = Endpoint(Identity.generate(), config, 0.0)
        ep.connect(target, 0.0)
        frame = bytes(ep.datagrams_to_send()[0][0])
        if frame[1] != FrameType.HANDSHAKE_INIT:
            raise RuntimeError("Endpoint.connect did not produce a HANDSHAKE_INIT")
        real.append(frame)
    mix: list[bytes] = []
    for i in range(POOL):
        mix += [junk[i], garbage[i], real[i % len(real)]]
    return {"junk": junk, "init_garbage": garbage, "init_real": real, "mix": mix}


def flooder_child(conn: Connection) -> None:
    """Builds the pools, then floods on command: ("flood", pool, "node" | "sink", seconds,
    rate (0: full speed))."""
    run_child(conn, lambda: _flooder(conn))


def _flooder(conn: Connection) -> None:
    addr_raw, identities = conn.recv()
    target: Addr = (str(addr_raw[0]), int(addr_raw[1]))
    t0 = time.perf_counter()
    pools = build_pools(target, int(identities), random.Random(20261122))
    built = time.perf_counter() - t0
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    sink.bind((LOOPBACK, 0))
    socks: dict[str, socket.socket] = {}
    for name, dst in (("node", target), ("sink", sink.getsockname())):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
        s.bind((LOOPBACK, 0))
        s.connect(dst)
        socks[name] = s
    blasters = {(t, p): Blaster(s, pool) for t, s in socks.items() for p, pool in pools.items()}
    conn.send({"method": blasters[("node", "junk")].method, "build_s": built})
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if not (isinstance(cmd, tuple) and cmd[0] == "flood"):
                return
            _, pool, where, seconds, rate = cmd
            c0, t1 = cpu_seconds(), time.perf_counter()
            sent = blasters[(where, pool)].blast(float(seconds), float(rate))
            conn.send(
                {"sent": sent, "elapsed": time.perf_counter() - t1, "cpu": cpu_seconds() - c0}
            )
    finally:
        for s in socks.values():
            s.close()
        sink.close()


# ------------------------------------------------------------------------------ coordinator


@dataclass(slots=True)
class Phase:
    """One measurement window."""

    name: str
    seconds: float = 0.0
    nbytes: int = 0
    receiver_cpu: float = 0.0
    sender_cpu: float = 0.0
    datagrams_in: int = 0
    kernel_drops: int | None = None
    drops: dict[str, int] = field(default_factory=dict)
    cookies: int = 0
    half_open: int = 0
    flood_sent: int = 0
    flood_seconds: float = 0.0
    flooder_cpu: float = 0.0
    lost: int = 0
    ptos: int = 0
    cc: str = ""
    other: float | None = None
    """Share of all CPUs used by processes other than this benchmark's during the window."""
    rate: float = FULL
    pool: str | None = None
    recovery: float | None = None
    """Seconds from the flood's end until the stream moved again at RECOVERED of its pace."""

    @property
    def goodput(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0

    def per_s(self, n: float | None) -> float:
        return (n or 0) / self.seconds if self.seconds > 0 else 0.0

    @property
    def flood_rate(self) -> float:
        return self.flood_sent / self.flood_seconds if self.flood_seconds > 0 else 0.0


def _snap(child: Child, what: str) -> dict[str, object]:
    child.conn.send("mark")
    msg = expect(child.conn, 15.0, what)
    if not isinstance(msg, dict):
        raise TypeError(f"{what}: expected a dict, got {msg!r}")
    return msg


def _f(d: dict[str, object], key: str) -> float:
    v = d.get(key)
    if not isinstance(v, int | float):
        raise TypeError(f"snapshot field {key!r} is {v!r}")
    return float(v)


def _drops(d: dict[str, object]) -> dict[str, int]:
    v = d.get("drops")
    return {str(k): int(n) for k, n in v.items()} if isinstance(v, dict) else {}


def _check(snap: dict[str, object], who: str) -> None:
    for key in ("errors", "failure"):
        v = snap.get(key)
        if isinstance(v, list) and v:
            raise RuntimeError(f"the {who}'s stream failed: {v[0]}")


def run_phase(
    plan: Plan, settle: float, window: float, receiver: Child, sender: Child, flooder: Child
) -> Phase:
    pool = plan.pool
    if pool is not None:
        flooder.conn.send(("flood", pool, plan.where, settle + window + 0.2, plan.rate))
    time.sleep(settle)
    others = OtherLoad([receiver.pid, sender.pid, flooder.pid])
    others.start()
    ra, sa = _snap(receiver, "a receiver snapshot"), _snap(sender, "a sender snapshot")
    time.sleep(window)
    rb, sb = _snap(receiver, "a receiver snapshot"), _snap(sender, "a sender snapshot")
    other = others.stop()
    for snap, who in ((ra, "receiver"), (rb, "receiver"), (sa, "sender"), (sb, "sender")):
        _check(snap, who)
    ka, kb = ra.get("kernel"), rb.get("kernel")
    da, db = _drops(ra), _drops(rb)
    ph = Phase(
        name=plan.name,
        rate=plan.rate,
        pool=pool,
        seconds=_f(rb, "t") - _f(ra, "t"),
        nbytes=int(_f(rb, "bytes") - _f(ra, "bytes")),
        receiver_cpu=_f(rb, "cpu") - _f(ra, "cpu"),
        sender_cpu=_f(sb, "cpu") - _f(sa, "cpu"),
        datagrams_in=int(_f(rb, "datagrams_in") - _f(ra, "datagrams_in")),
        kernel_drops=kb - ka if isinstance(ka, int) and isinstance(kb, int) else None,
        drops={k: db[k] - da.get(k, 0) for k in db if db[k] - da.get(k, 0)},
        cookies=int(_f(rb, "cookies") - _f(ra, "cookies")),
        half_open=int(_f(rb, "half_open")),
        lost=int(_f(sb, "lost") - _f(sa, "lost")),
        ptos=int(_f(sb, "ptos") - _f(sa, "ptos")),
        cc=str(sb.get("cc", "")),
        other=other,
    )
    if pool is not None:
        rep = expect(flooder.conn, window + 30.0, "its flood report")
        if not isinstance(rep, dict):
            raise TypeError(f"flooder report: {rep!r}")
        ph.flood_sent = int(rep["sent"])
        ph.flood_seconds = float(rep["elapsed"])
        ph.flooder_cpu = float(rep["cpu"])
    else:
        time.sleep(0.2)
    return ph


def wait_recovery(receiver: Child, pace: float) -> float | None:
    """Seconds until 0.1 s of stream goodput reaches RECOVERED x `pace` (bytes/s) again, polling
    the receiver; None if it does not within RECOVERY_MAX_S."""
    t0 = time.perf_counter()
    prev = _snap(receiver, "a receiver snapshot")
    while time.perf_counter() - t0 < RECOVERY_MAX_S:
        time.sleep(0.1)
        cur = _snap(receiver, "a receiver snapshot")
        _check(cur, "receiver")
        dt = _f(cur, "t") - _f(prev, "t")
        if dt > 0 and (_f(cur, "bytes") - _f(prev, "bytes")) / dt >= RECOVERED * pace:
            return time.perf_counter() - t0
        prev = cur
    return None


def reasons_text(ph: Phase, top: int = 4) -> str:
    total = sum(ph.drops.values())
    if not total:
        return "none"
    parts = sorted(ph.drops.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {n / ph.seconds / 1e3:,.1f}k/s" for k, n in parts)


def mbps(x: float) -> str:
    return f"{x / 1e6:.2f}"


def options(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # --help shows the docstring as is
    p.add_argument(
        "--window",
        type=float,
        default=None,
        metavar="S",
        help="seconds measured per phase, after 1 s of settling (default 3, --quick 1)",
    )
    p.add_argument(
        "--max-datagram",
        type=int,
        default=1200,
        metavar="N",
        help="the nodes' max_datagram (default 1200, an Internet-sized packet; 65507 lets path "
        "MTU discovery use loopback's 64 KiB datagrams)",
    )
    p.add_argument(
        "--flooder-cpu",
        choices=("sender", "receiver", "free"),
        default="sender",
        help="where the flooder runs: on the sender node's CPU (default), on the receiver's, or "
        "wherever the scheduler puts it (the nodes stay pinned apart)",
    )
    p.add_argument(
        "--paced",
        default=None,
        metavar="PPS,...",
        help="after the full-speed floods, junk floods paced at these rates in datagrams/s "
        f"(default {','.join(f'{r:g}' for r in PACED_DEFAULT)}; --quick: 100000; empty: none)",
    )
    p.add_argument(
        "--identities",
        type=int,
        default=POOL,
        metavar="N",
        help=f"fresh identities whose genuine INITs the init_real pool cycles (default {POOL})",
    )


def parse_paced(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"{BENCH}: --paced takes rates like 50000,100000, got {text!r}") from None
    if any(r <= 0 for r in rates):
        raise SystemExit(f"{BENCH}: --paced rates must be > 0")
    return rates


def run(args: argparse.Namespace) -> int:
    window = args.window if args.window is not None else (1.0 if args.quick else 3.0)
    settle = 0.5 if args.quick else SETTLE_S
    paced: tuple[float, ...]
    if args.paced is None:
        paced = (100_000.0,) if args.quick else PACED_DEFAULT
    else:
        paced = parse_paced(args.paced)
    schedule = plans(paced)
    print_header(
        BENCH,
        f"max_datagram {args.max_datagram}, flooder on the {args.flooder_cpu} CPU, "
        f"{settle:g} s settling + {window:g} s window per phase, {len(schedule)} phases",
    )
    t_start = time.monotonic()
    phases: list[Phase] = []
    with (
        child_process(receiver_child, "bench-flood-receiver", CHILD_LIFETIME) as receiver,
        child_process(sender_child, "bench-flood-sender", CHILD_LIFETIME) as sender,
        child_process(flooder_child, "bench-flood-flooder", CHILD_LIFETIME) as flooder,
    ):
        if can_pin():
            c = cpus()
            pin(sender.pid, c[0])
            pin(receiver.pid, c[1])
            if args.flooder_cpu != "free":
                pin(flooder.pid, c[0] if args.flooder_cpu == "sender" else c[1])
        receiver.conn.send(args.max_datagram)
        hello = expect(receiver.conn, 30.0, "its address")
        if not (isinstance(hello, tuple) and len(hello) == 2):
            raise TypeError(f"bad hello from the receiver: {hello!r}")
        addr: Addr = (str(hello[0][0]), int(hello[0][1]))
        flooder.conn.send((addr, args.identities))
        sender.conn.send((args.max_datagram, addr, bytes(hello[1])))
        if expect(sender.conn, 30.0, "ready") != "ready":
            raise RuntimeError("sender not ready")
        info = expect(flooder.conn, 120.0, "its pools")
        if not isinstance(info, dict):
            raise TypeError(f"bad flooder hello: {info!r}")
        print(
            f"  flooder: {info['method']}; pools of {POOL} datagrams, {args.identities} genuine "
            f"INITs built in {float(info['build_s']):.1f} s"
        )
        time.sleep(1.0)  # the stream ramps up (congestion control, path MTU) before phase 1
        pace = 0.0
        for plan in schedule:
            ph = run_phase(plan, settle, window, receiver, sender, flooder)
            phases.append(ph)
            if plan.pool is None and pace == 0.0:
                pace = ph.goodput
                if pace <= 0:
                    raise RuntimeError("the legitimate stream moved no data without a flood")
            if plan.pool is not None and plan.where == "node":
                ph.recovery = wait_recovery(receiver, pace)
            flood = f", flood {ph.flood_rate / 1e3:,.1f}k pps" if plan.pool is not None else ""
            rec = "" if plan.pool is None or plan.where == "sink" else f", {recovery_text(ph)}"
            print(
                f"  {ph.name:<12} goodput {mbps(ph.goodput)} MB/s{flood}, receiver took "
                f"{ph.per_s(ph.datagrams_in) / 1e3:,.1f}k dgrams/s, CPU receiver "
                f"{ph.receiver_cpu / ph.seconds:.0%} sender {ph.sender_cpu / ph.seconds:.0%}{rec}"
            )
            print(
                f"  {'':<12} sender: {ph.lost} packets lost, {ph.ptos} PTOs; at the end {ph.cc}; "
                f"other processes: {other_text(ph.other)} of the CPUs"
            )
        for child in (receiver, sender, flooder):
            child.conn.send("stop")
    nones = [p for p in phases if p.pool is None]
    base = sum(p.goodput for p in nones) / len(nones)
    sink = next(p for p in phases if p.name == "sink")
    spread = ", ".join(mbps(p.goodput) for p in nones)
    busy = [p for p in phases if p.other is not None and p.other > BUSY_OTHERS]
    if busy:
        print(
            f"\n  WARNING: other processes used more than {BUSY_OTHERS:.0%} of the CPUs during "
            f"{len(busy)} window(s) ({', '.join(p.name for p in busy)}): those figures are low "
            "and noisy; run again on a quiet machine"
        )
    lo, hi = min(p.goodput for p in nones), max(p.goodput for p in nones)
    if lo < 0.7 * hi:
        print(
            f"\n  WARNING: the no-flood windows range from {mbps(lo)} to {mbps(hi)} MB/s: ratios "
            "are uncertain by as much. If the windows after the floods stay low, the floods left "
            "the stream slower (see the sender's mtu= and congestion state above)."
        )
    for ph in phases:
        if ph.pool is None:
            continue
        report_phase(ph, base, sink, spread, window, args)
    print_summary(phases, base, sink, window, args)
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


def other_text(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def recovery_text(ph: Phase) -> str:
    if ph.recovery is None:
        return f"stream NOT recovered {RECOVERY_MAX_S:g} s after the flood"
    return f"stream recovered {ph.recovery:.1f} s after the flood"


def report_phase(
    ph: Phase, base: float, sink: Phase, spread: str, window: float, args: argparse.Namespace
) -> None:
    metrics = [Metric("goodput", ph.goodput, base, "MB/s", "higher")]
    if ph is not sink:
        metrics.append(
            Metric("goodput vs sink control", ph.goodput, sink.goodput, "MB/s", "higher")
        )
    paced = "full speed" if ph.rate <= 0 else f"paced at {ph.rate:,.0f}/s"
    notes = [
        f"no-flood windows: {spread} MB/s (baseline = their mean)",
        f"flooder ({paced}) sent {ph.flood_rate / 1e3:,.1f}k pps "
        f"(its CPU {ph.flooder_cpu / max(ph.flood_seconds, 1e-9):.0%}); the receiver "
        f"processed {ph.per_s(ph.datagrams_in) / 1e3:,.1f}k datagrams/s; the kernel dropped "
        f"{ph.per_s(ph.kernel_drops) / 1e3:,.1f}k/s at its full socket",
        f"CPU busy: receiver {ph.receiver_cpu / ph.seconds:.0%}, "
        f"sender {ph.sender_cpu / ph.seconds:.0%}; other processes: {other_text(ph.other)} "
        "of the CPUs",
        f"receiver drops: {reasons_text(ph)}",
        f"sender: {ph.lost} packets declared lost and {ph.ptos} probe timeouts in the window; "
        f"congestion controller at its end: {ph.cc}",
    ]
    if ph is not sink:
        notes.append(recovery_text(ph))
    if ph.cookies or ph.half_open:
        notes.append(
            f"cookie replies {ph.per_s(ph.cookies):,.0f}/s; half-open handshakes at the "
            f"window's end: {ph.half_open}"
        )
    assert ph.pool is not None
    report(
        Result(
            bench=BENCH,
            case=f"flood {ph.name}: {DESCRIPTIONS[ph.pool if ph is not sink else 'sink']}",
            ours=f"Node -> Node stream (max_datagram {args.max_datagram}) during the flood",
            baseline="the same stream without a flood (mean of the no-flood windows)",
            metrics=metrics,
            targets=(
                []
                if ph is sink
                else [Target(f"goodput >= {TARGET:.0%} of no flood", ph.goodput >= TARGET * base)]
            ),
            notes=notes,
            extra={
                "window_s": window,
                "max_datagram": args.max_datagram,
                "flooder_cpu": args.flooder_cpu,
                "flood_target_pps": ph.rate,
                "flood_pps": ph.flood_rate,
                "receiver_dgram_pps": ph.per_s(ph.datagrams_in),
                "kernel_drops_pps": ph.per_s(ph.kernel_drops),
                "drops": ph.drops,
                "recovery_s": ph.recovery,
                "other_load": ph.other,
            },
        ),
        args.json,
        args.quick,
    )


def print_summary(
    phases: list[Phase], base: float, sink: Phase, window: float, args: argparse.Namespace
) -> None:
    print(
        f"\n{BENCH} summary (max_datagram {args.max_datagram}, flooder on the "
        f"{args.flooder_cpu} CPU, {window:g} s windows; goodput in MB/s = 10^6 B/s of stream data; "
        f"baseline {mbps(base)} MB/s = mean of the no-flood windows)"
    )
    head = (
        "phase",
        "goodput",
        "/no flood",
        "/sink",
        "flood kpps",
        "rx kpps",
        "kernel drop kpps",
        "CPU rx/tx",
        "others",
        "recovery",
        "receiver drops (per s)",
    )
    rows = [head]
    for ph in phases:
        flooded = ph.pool is not None
        to_node = flooded and ph is not sink
        rows.append(
            (
                ph.name,
                mbps(ph.goodput),
                f"{ph.goodput / base:.2f}",
                f"{ph.goodput / sink.goodput:.2f}" if to_node and sink.goodput > 0 else "-",
                f"{ph.flood_rate / 1e3:,.1f}" if flooded else "-",
                f"{ph.per_s(ph.datagrams_in) / 1e3:,.1f}",
                f"{ph.per_s(ph.kernel_drops) / 1e3:,.1f}",
                f"{ph.receiver_cpu / ph.seconds:.0%}/{ph.sender_cpu / ph.seconds:.0%}",
                other_text(ph.other),
                "-"
                if not to_node
                else ("never" if ph.recovery is None else f"{ph.recovery:.1f} s"),
                reasons_text(ph, top=3),
            )
        )
    n = len(head) - 1
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    for r in rows:
        cells = [f"{r[0]:<{widths[0]}}", *(f"{r[i]:>{widths[i]}}" for i in range(1, n)), r[n]]
        print("  " + "  ".join(cells))
    print(
        "  (rx kpps: datagrams the receiver node processed per second, legitimate ones included; "
        "others: CPU share of processes not in this benchmark; recovery: time from the flood's "
        f"end until the stream ran at {RECOVERED:.0%} of its first no-flood pace again)"
    )


def main() -> int:
    return bench_main(BENCH, __doc__, options, run)


if __name__ == "__main__":
    sys.exit(main())
