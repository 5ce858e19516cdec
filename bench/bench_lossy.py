"""Goodput through a lossy, slow path: 5% random loss each way and 20 ms RTT, cellmesh vs TCP+TLS.

The path (when running as root with /dev/net/tun and `ip`): two network namespaces created for the
run, each holding one TUN device (MTU 1500, 10.201.0.1 <-> 10.201.0.2, point to point), and a
forwarder thread in this process that reads every IP packet from one TUN device and writes it to
the other through `cellmesh.node.chaos.ChaosModel` (one model per direction, seeded): loss 5%
(Bernoulli, per IP packet), delay 10 ms each way, order kept. The kernels' TCP really sees the
losses (fast retransmits, SACK recovery, RTOs). The namespaces are anonymous: each is held by a
child process, so they disappear with the processes, even after a SIGKILL; nothing is left on the
machine and nothing outside the two namespaces is touched.

Both sides cross the *same* TUN path, as the honest comparison: the same per-packet impairment,
the same 1500-byte MTU, the same forwarder (whose CPU cost both pay).

* ours: a cellmesh stream between a `Node` in each namespace, `max_datagram=1472` (the largest
  UDP payload in a 1500-byte IP packet, so one datagram = one IP packet, as a TCP segment is),
  congestion control bbr (the default), and reno for comparison.
* baseline: TCP + TLS 1.3 (asyncio streams, self-signed Ed25519 certificate), the kernel's TCP with CUBIC (the usual Linux default) and with BBR (set per socket with
  TCP_CONGESTION; this machine's default is shown in the header).
* also shown: cellmesh through `UdpChaosRelay` on loopback (loss 5%, 10 ms each way; the relay
  impairs UDP datagrams, not IP packets) with `max_datagram=1472`, labelled as a different path;
  and with `--default-mtu`, cellmesh with its default `max_datagram=65507` across the TUN path
  (path MTU discovery then meets IP fragmentation: see the note it prints).

Every transfer sends deterministic data for a fixed time (4 s, 3 rounds with the kinds
alternating, the median transfer of each kind reported; `--quick`: 2 s, 1 round) and is then cut
off: the sender stops (cellmesh resets its stream) and the receiver reports at once what it got
in order. Goodput = those bytes, verified (count and BLAKE3 of the prefix), divided by the time
from the first write to the last byte received. What was still buffered or in flight at the
deadline neither counts nor takes time: with 4 MiB send buffers (cellmesh's default, and TCP's
autotuned socket buffer) at well under 1 MB/s, draining would take longer than the transfer. TCP
then opens a new connection for the next transfer, untimed (Linux keeps the path's RTT and
ssthresh across connections, and a connection idle for longer than its RTO restarts from the
initial window anyway); cellmesh keeps its session and opens a new stream. Each pair makes a
0.5 s warm-up transfer first (path MTU discovery, the first RTT samples), not counted.
Processes are not pinned (three busy threads on two CPUs).

Without root or TUN: the reason is printed and TCP falls back to `TcpShaper` (10 ms each way, NO
loss): that row is clearly labelled NOT a loss baseline; `--no-tun` forces this fallback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import heapq
import multiprocessing.reduction
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from _common import (
    LOOPBACK,
    Connection,
    Metric,
    Result,
    Target,
    child_process,
    exit_on_sigterm,
    expect,
    parse_args,
    print_header,
    report,
    run_child,
    send_error,
)
from bench_bulk import (
    Addr,
    Pair,
    Payload,
    Setup,
    Transfer,
    new_netns,
    running_pair,
    self_signed_pem,
)
from cellmesh.node.chaos import ChaosModel, Impairment, TcpShaper, UdpChaosRelay

BENCH = "bench_lossy"
LOSS = 0.05
DELAY = 0.010
TUN_NAME = "cmb0"
NET_A, NET_B = "10.201.0.1", "10.201.0.2"
TUN_MTU = 1500
TUN_DATAGRAM = TUN_MTU - 28  # 1472: one UDP datagram per 1500-byte IP packet
TXQUEUELEN = 10000
CHUNK = 64 * 1024
FOREVER = 1 << 40
TARGET = 3.0
CUMULATIVE = ("packets_sent", "packets_lost", "bytes_retransmitted", "pto_count")
LIFETIME = 600.0
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


# ------------------------------------------------------------------------------ namespaces + TUN


def tun_problem() -> str | None:
    """Why the TUN path cannot be built here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (network namespaces and TUN devices need CAP_NET_ADMIN/CAP_SYS_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


@dataclass(frozen=True, slots=True)
class TunSpec:
    local: str
    peer: str
    name: str = TUN_NAME
    mtu: int = TUN_MTU


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def netns_child(conn: Connection) -> None:
    """Hold a new network namespace with one configured TUN device; hand its fd to the parent.

    The namespace lives as long as this process (and whoever joined it); so does nothing else.
    Commands: "stats" -> the device's /proc/net/dev counters; "stop" or EOF -> exit.
    """
    try:
        new_netns()
        spec = conn.recv()
        assert isinstance(spec, TunSpec)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(
                fd, _TUNSETIFF, struct.pack("16sH22x", spec.name.encode(), _IFF_TUN | _IFF_NO_PI)
            )
            _ip("link", "set", "dev", "lo", "up")
            _ip("addr", "add", f"{spec.local}/32", "peer", f"{spec.peer}/32", "dev", spec.name)
            _ip(
                "link",
                "set",
                "dev",
                spec.name,
                "mtu",
                str(spec.mtu),
                "txqueuelen",
                str(TXQUEUELEN),
                "up",
            )
            multiprocessing.reduction.send_handle(conn, fd, os.getppid())
        finally:
            os.close(fd)  # the parent holds the device open; it vanishes with the parent's copy
        conn.send(("ready", os.getpid()))
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd == "stats":
                conn.send(_dev_stats(spec.name))
            else:
                return
    except BaseException as exc:
        send_error(conn, exc)
        raise


def _dev_stats(name: str) -> dict[str, int]:
    with open("/proc/net/dev", encoding="ascii") as f:
        for line in f:
            if line.strip().startswith(name + ":"):
                v = [int(x) for x in line.split(":", 1)[1].split()]
                return {"rx_packets": v[1], "rx_drop": v[3], "tx_packets": v[9], "tx_drop": v[11]}
    return {}


@dataclass(slots=True)
class DirectionCount:
    packets: int = 0
    dropped: int = 0
    overflow: int = 0
    write_errors: int = 0


class TunForwarder:
    """A thread moving IP packets between two TUN fds through one `ChaosModel` per direction."""

    MAX_PENDING = 50_000

    def __init__(self, fd_a: int, fd_b: int, impairment: Impairment, seed: str) -> None:
        self.fds = (fd_a, fd_b)
        self.models = {
            fd_a: ChaosModel.seeded(impairment, f"{seed}:a->b"),
            fd_b: ChaosModel.seeded(impairment, f"{seed}:b->a"),
        }
        self.counts = {fd_a: DirectionCount(), fd_b: DirectionCount()}
        self._peer = {fd_a: fd_b, fd_b: fd_a}
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="tun-forwarder", daemon=True)
        self.error: BaseException | None = None
        for fd in self.fds:
            os.set_blocking(fd, False)

    def set_impairment(self, impairment: Impairment) -> None:
        for m in self.models.values():
            m.impairment = impairment  # a plain attribute swap: atomic under the GIL

    def snapshot(self) -> tuple[int, int]:
        """(packets offered, packets dropped by the model), both directions."""
        c = self.counts.values()
        return sum(x.packets for x in c), sum(x.dropped for x in c)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001  (handed to the coordinator, which raises it)
            self.error = exc

    def _loop(self) -> None:
        ep = select.epoll()
        for fd in (*self.fds, self._wake_r):
            ep.register(fd, select.EPOLLIN)
        heap: list[tuple[float, int, int, bytes]] = []
        seq = 0
        clock = time.monotonic
        read, write = os.read, os.write
        try:
            while True:
                timeout = max(0.0, heap[0][0] - clock()) if heap else 0.5
                events = ep.poll(timeout)
                now = clock()
                for fd, _ in events:
                    if fd == self._wake_r:
                        return
                    model, out, count = self.models[fd], self._peer[fd], self.counts[fd]
                    for _ in range(256):
                        try:
                            pkt = read(fd, 65536)
                        except BlockingIOError:
                            break
                        count.packets += 1
                        d = model.decide(now, len(pkt))
                        if d.dropped is not None:
                            count.dropped += 1
                            continue
                        for when in d.times:
                            if len(heap) >= self.MAX_PENDING:
                                count.overflow += 1
                                continue
                            seq += 1
                            heapq.heappush(heap, (when, seq, out, pkt))
                now = clock()
                while heap and heap[0][0] <= now + 2e-4:
                    _, _, out, pkt = heapq.heappop(heap)
                    try:
                        write(out, pkt)
                    except OSError:
                        self.counts[self._peer[out]].write_errors += 1
        finally:
            ep.close()


@dataclass(slots=True)
class TunPath:
    """Two namespaces joined by the forwarder: pids to join, and the forwarder to steer."""

    pid_a: int
    pid_b: int
    forwarder: TunForwarder
    holders: tuple[Connection, Connection]

    def device_stats(self) -> list[object]:
        out: list[object] = []
        for c in self.holders:
            c.send("stats")
            out.append(expect(c, 5.0, "device statistics"))
        return out


@contextlib.contextmanager
def tun_path(impairment: Impairment, seed: str, lifetime: float = LIFETIME) -> Iterator[TunPath]:
    """Build namespaces A and B with TUN devices and forward between them; always torn down."""
    with (
        child_process(netns_child, "bench-lossy-netns-a", lifetime) as a,
        child_process(netns_child, "bench-lossy-netns-b", lifetime) as b,
    ):
        fds: list[int] = []
        pids: list[int] = []
        forwarder: TunForwarder | None = None
        try:
            for holder, spec in ((a, TunSpec(NET_A, NET_B)), (b, TunSpec(NET_B, NET_A))):
                holder.conn.send(spec)
                if not holder.conn.poll(20.0):
                    raise TimeoutError("namespace holder did not answer")
                fds.append(multiprocessing.reduction.recv_handle(holder.conn))
                msg = expect(holder.conn, 20.0, "ready")
                assert isinstance(msg, tuple)
                pids.append(int(msg[1]))
            forwarder = TunForwarder(fds[0], fds[1], impairment, seed)
            forwarder.start()
            yield TunPath(pids[0], pids[1], forwarder, (a.conn, b.conn))
        finally:
            if forwarder is not None:
                forwarder.stop()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


# ------------------------------------------------------------------------------ relay, shaper


def relay_child(conn: Connection) -> None:
    """A UdpChaosRelay on loopback towards the address it is given; ("set", Impairment) changes it."""
    run_child(conn, lambda: asyncio.run(_relay(conn)))


async def _relay(conn: Connection) -> None:
    target, impairment, seed = conn.recv()
    from bench_bulk import PipeCommands

    commands = PipeCommands(conn)
    spec = f"{target[0]}:{target[1]}"
    async with UdpChaosRelay(f"{LOOPBACK}:0", spec, impairment, seed=seed) as relay:
        conn.send(relay.address)
        while True:
            cmd = await commands.queue.get()
            if isinstance(cmd, tuple) and cmd[0] == "set":
                relay.set_impairment(cmd[1], cmd[1])
                conn.send("ok")
            elif cmd == "stats":
                s = relay.stats()
                conn.send(
                    {
                        "offered": s.up.received + s.down.received,
                        "dropped": s.up.dropped_loss + s.down.dropped_loss,
                    }
                )
            else:
                return


def shaper_child(conn: Connection) -> None:
    """A TcpShaper (delay only, no loss) on loopback towards the address it is given."""
    run_child(conn, lambda: asyncio.run(_shaper(conn)))


async def _shaper(conn: Connection) -> None:
    target, delay = conn.recv()
    from bench_bulk import PipeCommands

    commands = PipeCommands(conn)
    async with TcpShaper(f"{LOOPBACK}:0", f"{target[0]}:{target[1]}", delay=delay) as shaper:
        conn.send(shaper.address)
        while True:
            cmd = await commands.queue.get()
            if cmd is None or cmd == "stop":
                return


# ------------------------------------------------------------------------------ cases


@dataclass(slots=True)
class Case:
    """One kind of transfer over one path."""

    label: str
    setup: Setup
    path: str  # "tun", "relay", "shaper"
    pair: Pair | None = None
    transfers: list[Transfer] = field(default_factory=list)
    losses: list[tuple[int, int]] = field(default_factory=list)  # (offered, dropped) per transfer
    side: Connection | None = None  # the relay's pipe
    counters: dict[str, int] = field(default_factory=dict)  # cumulative sender counters so far

    @property
    def is_tcp(self) -> bool:
        return self.setup.kind == "tls"

    def describe(self) -> str:
        where = {
            "tun": "across the TUN path (namespaces, ChaosModel per IP packet)",
            "relay": "through UdpChaosRelay on loopback (ChaosModel per UDP datagram)",
            "shaper": "through TcpShaper on loopback (delay only, NO LOSS)",
        }[self.path]
        return f"{self.setup.describe()}, {where}"


def cellmesh_case(label: str, path: str, cc: str, max_datagram: int) -> Case:
    return Case(
        label, Setup("cellmesh", max_datagram=max_datagram, congestion=cc, chunk=CHUNK), path
    )


def tcp_case(label: str, path: str, cc: str, pem: tuple[bytes, bytes]) -> Case:
    setup = Setup("tls", congestion=cc, tls_pem=pem, chunk=CHUNK)
    return Case(label, setup, path)


def start_case(
    case: Case, stack: contextlib.ExitStack, tun: TunPath | None, impairment: Impairment
) -> None:
    """Start the pair (and its relay or shaper) of `case` inside `stack`."""
    recv_setup = send_setup = case.setup
    route: Callable[[tuple[Addr, bytes]], tuple[Addr, bytes]] | None = None
    if case.path == "tun":
        assert tun is not None
        recv_setup = _with(case.setup, NET_B, tun.pid_b)
        send_setup = _with(case.setup, NET_A, tun.pid_a)
    elif case.path == "relay":

        def route(hello: tuple[Addr, bytes]) -> tuple[Addr, bytes]:
            relay = stack.enter_context(child_process(relay_child, "bench-lossy-relay", LIFETIME))
            relay.conn.send((hello[0], impairment, f"bench-lossy:{case.label}"))
            addr = expect(relay.conn, 20.0, "the relay address")
            assert isinstance(addr, tuple)
            case.side = relay.conn
            return (str(addr[0]), int(addr[1])), hello[1]

    else:

        def route(hello: tuple[Addr, bytes]) -> tuple[Addr, bytes]:
            shaper = stack.enter_context(
                child_process(shaper_child, "bench-lossy-shaper", LIFETIME)
            )
            shaper.conn.send((hello[0], impairment.delay))
            addr = expect(shaper.conn, 20.0, "the shaper address")
            assert isinstance(addr, tuple)
            return (str(addr[0]), int(addr[1])), hello[1]

    case.pair = stack.enter_context(
        running_pair(
            case.label,
            recv_setup,
            pin_apart=False,
            sender_setup=send_setup,
            route=route,
            lifetime=LIFETIME,
        )
    )


def _with(setup: Setup, host: str, pid: int) -> Setup:
    return dataclasses.replace(setup, host=host, netns_pid=pid)


def path_counts(case: Case, tun: TunPath | None) -> tuple[int, int]:
    """(packets offered, packets dropped) so far on the impairment `case` goes through."""
    if case.path == "tun" and tun is not None:
        return tun.forwarder.snapshot()
    if case.path == "relay" and case.side is not None:
        case.side.send("stats")
        s = expect(case.side, 5.0, "relay statistics")
        assert isinstance(s, dict)
        return int(s["offered"]), int(s["dropped"])
    return 0, 0


def set_loss(cases: list[Case], tun: TunPath | None, impairment: Impairment) -> None:
    """Change the impairment of every path (the TUN forwarder and each relay)."""
    if tun is not None:
        tun.forwarder.set_impairment(impairment)
    for c in cases:
        if c.path == "relay" and c.side is not None:
            c.side.send(("set", impairment))
            expect(c.side, 5.0, "ok")


def run_transfer(
    case: Case,
    seconds: float,
    payload: Payload,
    digests: dict[int, str],
    tun: TunPath | None,
    keep: bool = True,
) -> Transfer:
    assert case.pair is not None
    before = path_counts(case, tun)
    t = case.pair.transfer(FOREVER, seconds, payload, digests, abort=True)
    after = path_counts(case, tun)
    for k in CUMULATIVE:  # the Node's connection counters run over the session: keep the delta
        v = t.sender.get(k)
        if isinstance(v, int):
            t.sender[k] = v - case.counters.get(k, 0)
            case.counters[k] = v
    if tun is not None and tun.forwarder.error is not None:
        raise RuntimeError("the TUN forwarder failed") from tun.forwarder.error
    if keep:
        case.transfers.append(t)
        case.losses.append((after[0] - before[0], after[1] - before[1]))
    return t


def loss_text(case: Case) -> str:
    offered = sum(o for o, _ in case.losses)
    dropped = sum(d for _, d in case.losses)
    if not offered:
        return "path counters: n/a"
    return f"the path dropped {dropped} of {offered} packets ({dropped / offered:.2%})"


def recovery_text(t: Transfer) -> str:
    s = t.sender
    cpu = f"CPU sender {t.cpu('sender'):.1f} s, receiver {t.cpu('receiver'):.1f} s; "
    if "total_retrans" in s:
        return cpu + f"TCP retransmitted {s.get('total_retrans')} of {s.get('segs_out')} segments"
    if "packets_lost" in s:
        return cpu + (
            f"cellmesh declared {s.get('packets_lost')} of {s.get('packets_sent')} packets lost, "
            f"resent {s.get('bytes_retransmitted')} bytes, {s.get('pto_count')} probe timeouts, "
            f"path MTU {s.get('mtu')}; controller at the end: {s.get('cc')}"
        )
    return ""


def tdict(case: Case, t: Transfer) -> dict[str, object]:
    keep = (
        "mtu",
        "packets_lost",
        "packets_sent",
        "bytes_retransmitted",
        "total_retrans",
        "segs_out",
    )
    return {
        "case": case.label,
        "bytes": t.nbytes,
        "seconds": t.seconds,
        "goodput": t.goodput,
        "verified": t.verified,
        "sender": {k: v for k, v in t.sender.items() if k in keep},
    }


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--default-mtu",
        action="store_true",
        help="also run cellmesh with the default max_datagram=65507 across the 1500-byte TUN path "
        "(IP fragmentation; may stall, which costs up to ~25 s more)",
    )
    p.add_argument(
        "--no-tun",
        action="store_true",
        help="do not build the TUN path: TCP through TcpShaper (delay only, NOT a loss baseline)",
    )


def default_tcp_cc() -> str:
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


@contextlib.contextmanager
def maybe_tun(use: bool, impairment: Impairment, seed: str) -> Iterator[TunPath | None]:
    if not use:
        yield None
        return
    with tun_path(impairment, seed) as tun:
        yield tun


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH, options)
    rounds, seconds, warm = (1, 2.0, 0.5) if args.quick else (3, 4.0, 0.5)
    problem = "--no-tun given" if args.no_tun else tun_problem()
    use_tun = problem is None
    impairment = Impairment(loss=LOSS, delay=DELAY)
    print_header(
        BENCH,
        f"loss {LOSS:.0%} each way, {DELAY * 1e3:g} ms each way; {seconds:g} s per transfer; "
        f"kernel default TCP congestion control: {default_tcp_cc()}",
    )
    if not use_tun:
        print(
            f"  NO TUN PATH: {problem}. TCP runs through TcpShaper (delay only): that is NOT a "
            "loss baseline, and ratios against it are not the goal's ratio."
        )
    t_start = time.monotonic()
    pem = self_signed_pem()
    path = "tun" if use_tun else "relay"
    tcp_path = "tun" if use_tun else "shaper"
    cases = [
        tcp_case("tcp-cubic", tcp_path, "cubic", pem),
        cellmesh_case("cellmesh-bbr", path, "bbr", TUN_DATAGRAM),
    ]
    if not args.quick:
        cases += [
            tcp_case("tcp-bbr", tcp_path, "bbr", pem),
            cellmesh_case("cellmesh-reno", path, "reno", TUN_DATAGRAM),
        ]
    if use_tun:
        cases.append(cellmesh_case("cellmesh-bbr-relay", "relay", "bbr", TUN_DATAGRAM))
        if args.default_mtu:
            cases.append(cellmesh_case("cellmesh-bbr-65507", "tun", "bbr", 65507))
    payload = Payload(CHUNK)
    digests: dict[int, str] = {}
    with maybe_tun(use_tun, impairment, "bench-lossy") as tun, contextlib.ExitStack() as stack:
        for c in cases:
            start_case(c, stack, tun, impairment)
        for c in cases:
            run_transfer(c, warm, payload, digests, tun, keep=False)  # warm-up
        for i in range(rounds):
            for c in cases:
                t = run_transfer(c, seconds, payload, digests, tun)
                print(
                    f"  round {i + 1} {c.label}: {t.goodput / 1e6:.2f} MB/s "
                    f"({t.nbytes / 1e6:.1f} MB in {t.seconds:.2f} s)"
                )
                sys.stdout.flush()
        dev = tun.device_stats() if tun is not None else []
    by = {c.label: c for c in cases}
    unverified = [t for c in cases for t in c.transfers if not t.verified]
    results = _results(by, use_tun, dev)
    for r in results:
        report(r, args.json, args.quick)
    if unverified:
        print("  !! some transfers were not verified (byte count or BLAKE3 mismatch)")
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0 if not unverified else 1


def median(case: Case) -> Transfer:
    """The median transfer of `case` by goodput (the lower middle one of an even count)."""
    ordered = sorted(case.transfers, key=lambda t: t.goodput)
    return ordered[(len(ordered) - 1) // 2]


def spread(case: Case) -> str:
    return ", ".join(f"{t.goodput / 1e6:.2f}" for t in case.transfers)


def _results(by: dict[str, Case], use_tun: bool, dev: list[object]) -> list[Result]:
    out: list[Result] = []
    label = "5% loss, 20 ms RTT" + ("" if use_tun else " (TCP: delay only, NOT a loss baseline)")
    pairs = [
        ("cellmesh-bbr", "tcp-cubic", True),
        ("cellmesh-bbr", "tcp-bbr", True),
        ("cellmesh-reno", "tcp-cubic", False),
        ("cellmesh-reno", "tcp-bbr", False),
        ("cellmesh-bbr-relay", "tcp-cubic", False),
        ("cellmesh-bbr-65507", "tcp-cubic", False),
    ]
    for ours_l, base_l, goal in pairs:
        if ours_l not in by or base_l not in by:
            continue
        oc, bc = by[ours_l], by[base_l]
        o, b = median(oc), median(bc)
        notes = [
            f"every transfer (MB/s): ours {spread(oc)}; baseline {spread(bc)}; the median one "
            "of each is shown",
            f"ours: {o.nbytes / 1e6:.1f} MB in {o.seconds:.2f} s; {recovery_text(o)}",
            f"baseline: {b.nbytes / 1e6:.1f} MB in {b.seconds:.2f} s; {recovery_text(b)}",
            f"over all transfers: ours: {loss_text(oc)}; baseline: {loss_text(bc)}",
            "byte count and BLAKE3 verified at the receiver: "
            + ("all" if all(t.verified for t in oc.transfers + bc.transfers) else "NOT ALL"),
        ]
        if oc.path == "relay":
            notes.append(
                "ours crosses UdpChaosRelay (loss per UDP datagram of <= 1472 bytes) while the "
                "baseline crosses the TUN path: same loss and delay settings, different paths"
            )
        if ours_l.endswith("65507"):
            notes.append(
                "default max_datagram: path MTU discovery on a 1500-byte path; datagrams above "
                "1472 bytes leave as IP fragments, each lost with 5%, so a 64 KB datagram "
                "(45 fragments) survives only ~10% of the time"
            )
        if not use_tun:
            notes.append("NOT a loss baseline: TcpShaper adds delay only; TCP saw no loss")
        if dev:
            notes.append(f"TUN device counters (A, B) at the end: {dev}")
        targets = (
            [
                Target(
                    f"ours >= {TARGET:g}x TCP ({bc.setup.congestion})",
                    o.goodput >= TARGET * b.goodput,
                )
            ]
            if goal and use_tun
            else []
        )
        out.append(
            Result(
                bench=BENCH,
                case=f"{label}: {ours_l} vs {base_l}",
                ours=oc.describe(),
                baseline=bc.describe(),
                metrics=[Metric("goodput", o.goodput, b.goodput, "MB/s", "higher")],
                targets=targets,
                notes=notes,
                extra={
                    "ours": [tdict(oc, t) for t in oc.transfers],
                    "baseline": [tdict(bc, t) for t in bc.transfers],
                    "tun": use_tun,
                },
            )
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
