"""Bulk goodput of one reliable cellmesh stream between two processes on 127.0.0.1.

Layout: a sender process pinned to one CPU and a receiver process pinned to the other; this process
only coordinates through pipes and sleeps during transfers. Every transfer is a fixed number of
bytes (1 GiB; `--quick`: 16 MiB) of deterministic data, 1 MiB chunks, each chunk different; the
receiver hashes everything it gets with BLAKE3 and counts it, and this process checks the count and
the digest against its own copy of the data. (Transfers were 100 MiB until 2026-11-22; at the
MTU that lasted 65-95 ms, so one scheduler hiccup moved a round by up to 30%; a 1 GiB transfer
lasts ~0.7-1 s there and the rounds agree within a few per cent.) Goodput is the verified application bytes divided by
the time from the sender's first write to the receiver holding the last byte (both clocks are
CLOCK_MONOTONIC, which is system-wide). MB/s is 10**6 bytes per second.

* ours: a `Node` in each process. The sender opens a stream, writes the chunks (`Stream.write`),
  closes it and waits for `wait_acknowledged`; the receiver accepts it and reads until EOF with
  `Stream.read_chunks` (the pieces as they arrived, as a bulk consumer such as `cp` reads). Two
  configurations: `max_datagram=1200` (no path MTU discovery above the 1200-byte floor) and the
  default `max_datagram=65507` (the discovered path MTU; on loopback 65507). The session, a
  warm-up transfer (which lets path MTU discovery finish and BBR measure the path) and its
  figures are outside the timing; the warm-up's goodput is shown as a note ("cold start").
* baseline (a): TCP + TLS 1.3 with asyncio streams (`asyncio.open_connection(ssl=...)` /
  `start_server(ssl=...)`), a self-signed Ed25519 certificate made with `cryptography`, one
  connection per pair set up before the timing, each transfer framed as 4-byte length + chunk and
  ended by a zero length. The kernel's default TCP congestion control is used.
* baseline (b): raw UDP + ChaCha20-Poly1305, the same datagram size as ours (1200 bytes, and the
  MTU ours discovered). `cryptography`'s AEAD built once, counter nonce, a 64-byte header (same
  size as ours) as associated data; one `sendto` / `recv` per datagram, no batching. Made reliable
  with a **sliding window, go-back-N**: at most `W` datagrams beyond the receiver's cumulative
  acknowledgement (W x size at most ~1.1-4 MiB, below the receiver's socket buffer, so the
  window itself does not overflow it); the receiver authenticates, hashes and accepts only the next
  expected sequence number, and sends one cumulative ACK per drained batch of datagrams; the sender
  goes back to the first unacknowledged datagram when no ACK advanced for 20 ms (re-encrypted under
  a fresh nonce). Retransmissions and out-of-order drops are counted and printed.

Every process, ours and the baselines', runs with the glibc malloc thresholds a Node sets for its
own process (`cellmesh.node.allocator.tune_malloc`: mmap 4 MiB, trim 64 MiB), so the ratios compare
code, not allocator settings; with glibc's adaptive defaults every kind's goodput at the MTU drops
and swings from transfer to transfer (the raw baseline ~1,000 instead of ~1,400 MB/s).

Kinds alternate in rounds (3 full, 1 quick); the best round of each kind is reported (noise on a
shared machine only ever lowers a rate) and every round is printed. The processes' own CPU time
per transfer is reported too (which side limits: a side whose CPU time is close to the wall time
is saturated). `--profile` runs one transfer per cellmesh configuration with cProfile in both
Nodes and prints their hot spots (goodput under the profiler is not comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import ctypes
import datetime
import io
import os
import pstats
import random
import resource
import select
import selectors
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import blake3
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.x509.oid import NameOID

from _common import (
    CHILD_MAX_LIFETIME,
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
)
from cellmesh.config import NodeConfig
from cellmesh.errors import CellmeshError
from cellmesh.identity.keys import Identity
from cellmesh.node.allocator import tune_malloc
from cellmesh.node.node import Node
from cellmesh.node.streams import Stream
from cellmesh.node.transfer import hash_pieces

BENCH = "bench_bulk"
MIB = 1 << 20
CHUNK = MIB
HEADER = 64
TAG = 16
SOCK_BUF = 4 * MIB
TLS_NAME = "server.bench"
TARGET_TLS = 0.80
TARGET_RAW = 0.70
RAW_RTO = 0.020
PROFILE_ENV = "CELLMESH_BENCH_PROFILE"
CLONE_NEWNET = 0x40000000
Kind = Literal["cellmesh", "tls", "raw"]
Addr = tuple[str, int]

_RAW_HEADER = struct.Struct("!BBBBHH16s16sQQII")  # cellmesh's header layout: total, pn, seq, trial
_ACK = struct.Struct("!IQ")  # trial, next expected sequence number
_NONCE = struct.Struct("<4xQ")
_FRAME = struct.Struct("!I")
_TCP_INFO = 232
_TCPI_TOTAL_RETRANS = 100
_TCPI_SEGS_OUT = 136


# ------------------------------------------------------------------------------ data


class Payload:
    """The deterministic byte stream every transfer sends: chunk i is `i` (8 bytes) + a fixed
    random block, so every chunk differs and a misplaced or repeated chunk changes the digest."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._base = random.Random(f"cellmesh-bench-bulk:{chunk}").randbytes(chunk)
        self._cache: dict[int, bytes] = {}

    def chunk_at(self, i: int) -> bytes:
        """Chunk number `i`."""
        return i.to_bytes(8, "big") + self._base[8:]

    def slice(self, offset: int, n: int) -> bytes:
        """`n` bytes of the stream from `offset` (cached chunks; older ones are forgotten)."""
        out = b""
        while n > 0:
            i, off = divmod(offset, self.chunk)
            c = self._cache.get(i)
            if c is None:
                if len(self._cache) > 4:
                    self._cache.clear()
                c = self._cache[i] = self.chunk_at(i)
            part = c[off : off + n]
            out = part if not out else out + part
            n -= len(part)
            offset += len(part)
        return out

    def digest(self, nbytes: int) -> str:
        """BLAKE3 (hex) of the first `nbytes` bytes of the stream."""
        h = blake3.blake3()
        full, rest = divmod(nbytes, self.chunk)
        for i in range(full):
            h.update(self.chunk_at(i))
        if rest:
            h.update(self.chunk_at(full)[:rest])
        return str(h.hexdigest())


# ------------------------------------------------------------------------------ setup


def self_signed_pem(name: str = TLS_NAME) -> tuple[bytes, bytes]:
    """A fresh self-signed Ed25519 certificate and its key, PEM."""
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def tls_server_context(pem: tuple[bytes, bytes]) -> ssl.SSLContext:
    """TLS 1.3-only server context for the certificate `pem` (cert, key)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0
    with tempfile.TemporaryDirectory(prefix="cellmesh-bench-") as tmp:
        cert_path, key_path = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert_path.write_bytes(pem[0])
        key_path.write_bytes(pem[1])
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def tls_client_context(cert_pem: bytes) -> ssl.SSLContext:
    """TLS 1.3-only client context trusting `cert_pem` (chain and hostname verified)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=cert_pem.decode("ascii"))
    return ctx


@dataclass(frozen=True, slots=True)
class Setup:
    """What a transfer child needs to know (sent as its first message)."""

    kind: Kind
    host: str = LOOPBACK
    max_datagram: int = 65507
    congestion: str = ""  # cellmesh: bbr/reno; TCP: a kernel algorithm ("" = default)
    tls_pem: tuple[bytes, bytes] | None = None
    netns_pid: int | None = None  # join the network namespace of this process first
    chunk: int = CHUNK
    raw_window: int = 0

    def describe(self) -> str:
        if self.kind == "cellmesh":
            return f"cellmesh stream, max_datagram={self.max_datagram}, cc={self.congestion}"
        if self.kind == "tls":
            return f"TCP+TLS 1.3 (asyncio), tcp cc={self.congestion or 'kernel default'}"
        return f"raw UDP+ChaCha20-Poly1305, {self.max_datagram}-byte datagrams, window {self.raw_window}"


def raw_window(max_datagram: int) -> int:
    """Datagrams in flight for the raw baseline: ~1.1-4 MiB, within the receiver's buffer."""
    return max(16, min(1024, (4 * MIB) // max_datagram))


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def join_netns(pid: int | None) -> None:
    """Move this thread into the network namespace of process `pid` (None: stay)."""
    if pid is None:
        return
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace of {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


def new_netns() -> None:
    """Give this thread (and processes it forks) a new, empty network namespace."""
    if _libc().unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def hot_spots(profiler: cProfile.Profile, top: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _profiler() -> cProfile.Profile | None:
    return cProfile.Profile() if os.environ.get(PROFILE_ENV) == "1" else None


# ------------------------------------------------------------------------------ children


def receiver_child(conn: Connection) -> None:
    """Receives transfers of the kind its Setup names; reports each one (bytes, BLAKE3, times)."""
    try:
        setup = conn.recv()
        assert isinstance(setup, Setup)
        # Every process, ours and the baselines', runs with the allocator settings a Node
        # applies to its own process, so the ratio compares code, not malloc thresholds.
        tune_malloc()
        join_netns(setup.netns_pid)
        if setup.kind == "raw":
            _raw_receiver(conn, setup)
        else:
            asyncio.run(_async_receiver(conn, setup))
    except BaseException as exc:
        send_error(conn, exc)
        raise


def sender_child(conn: Connection) -> None:
    """Sends transfers on command: ("send", max_bytes, max_seconds, abort); reports each one."""
    try:
        setup = conn.recv()
        assert isinstance(setup, Setup)
        # Every process, ours and the baselines', runs with the allocator settings a Node
        # applies to its own process, so the ratio compares code, not malloc thresholds.
        tune_malloc()
        join_netns(setup.netns_pid)
        if setup.kind == "raw":
            _raw_sender(conn, setup)
        else:
            asyncio.run(_async_sender(conn, setup))
    except BaseException as exc:
        send_error(conn, exc)
        raise


def node_config(setup: Setup) -> NodeConfig:
    return NodeConfig(
        listen=(f"{setup.host}:0",),
        max_datagram=setup.max_datagram,
        congestion_control=setup.congestion or "bbr",
        recv_buffer=SOCK_BUF,
    )


class PipeCommands:
    """Commands from the parent, read from the pipe by the event loop (no extra thread)."""

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


async def _async_receiver(conn: Connection, setup: Setup) -> None:
    commands = PipeCommands(conn)
    rx = Receiving(conn, _profiler())
    try:
        if setup.kind == "cellmesh":
            async with Node(Identity.generate(), node_config(setup)) as node:
                conn.send((node.local_addresses()[0], node.cell_id))
                rx.tasks.append(asyncio.create_task(_serve_cellmesh(rx, node)))
                await _until_stop(commands, rx)
        else:
            assert setup.tls_pem is not None
            ctx = tls_server_context(setup.tls_pem)

            def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                rx.tasks.append(asyncio.create_task(_serve_tls(rx, r, w)))

            server = await asyncio.start_server(
                accept, setup.host, 0, ssl=ctx, limit=4 * setup.chunk
            )
            async with server:
                sock = server.sockets[0].getsockname()
                conn.send(((str(sock[0]), int(sock[1])), b""))
                await _until_stop(commands, rx)
    finally:
        commands.close()
        for t in rx.tasks:
            t.cancel()
        await asyncio.gather(*rx.tasks, return_exceptions=True)


async def _until_stop(commands: PipeCommands, rx: Receiving | None = None) -> None:
    while True:
        msg = await commands.queue.get()
        if msg == "cut" and rx is not None:
            rx.cut()
        elif msg is None or msg == "stop":
            return


class _Tally:
    """What a receiver counts during one transfer."""

    def __init__(self, profiler: cProfile.Profile | None) -> None:
        self.hasher = blake3.blake3()
        self.nbytes = 0
        self.t_first = self.t_last = 0.0
        self.cpu0 = cpu_seconds()
        self.profiler = profiler
        if profiler is not None:
            profiler.enable()

    def add_all(self, pieces: list[bytes | memoryview]) -> None:
        """Hash pieces as cellmesh's own `cp` receiver does (`hash_pieces`: runs of small
        pieces joined first, since BLAKE3 is 4-5x slower per byte on 1,100-byte inputs)."""
        t = time.perf_counter()
        if not self.nbytes:
            self.t_first = t
        self.t_last = t
        hash_pieces(self.hasher, pieces)
        self.nbytes += sum(map(len, pieces))

    def add(self, data: bytes | memoryview) -> None:
        t = time.perf_counter()
        if not self.nbytes:
            self.t_first = t
        self.t_last = t
        self.hasher.update(data)
        self.nbytes += len(data)

    def result(self, **extra: object) -> dict[str, object]:
        t_end = time.perf_counter()
        profile = ""
        if self.profiler is not None:
            self.profiler.disable()
            profile = hot_spots(self.profiler)
            self.profiler = None
        return {
            "bytes": self.nbytes,
            "digest": str(self.hasher.hexdigest()),
            "t_first": self.t_first,
            "t_last": self.t_last,
            "t_end": t_end,
            "cpu": cpu_seconds() - self.cpu0,
            "profile": profile,
            **extra,
        }


class Receiving:
    """The receiver's one transfer at a time, and how it reports it.

    A transfer that reaches its end (EOF, or the end frame) is reported at once. One that ends in
    an error (the sender reset the stream at its deadline) is held until the coordinator says
    "cut"; "cut" always answers ("cut", result or None) with what has not been reported yet, and
    abandons a transfer still in progress (its stream is reset, its TCP connection aborted).
    """

    def __init__(self, conn: Connection, profiler: cProfile.Profile | None) -> None:
        self.conn = conn
        self.profiler = profiler
        self.tally: _Tally | None = None
        self.pending = False  # the current tally has not been reported
        self.held: dict[str, object] | None = None
        self.abandon: Callable[[], None] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def begin(self, abandon: Callable[[], None]) -> _Tally:
        self.tally = _Tally(self.profiler)
        self.pending, self.held, self.abandon = True, None, abandon
        return self.tally

    def complete(self, tally: _Tally, **extra: object) -> None:
        if tally is self.tally and self.pending:
            self.pending, self.abandon = False, None
            self.conn.send(tally.result(**extra))

    def failed(self, tally: _Tally, error: BaseException) -> None:
        if tally is self.tally and self.pending:
            self.held = tally.result(error=f"{type(error).__name__}: {error}")
            self.abandon = None

    def cut(self) -> None:
        res: dict[str, object] | None = None
        if self.pending and self.tally is not None:
            res = self.held if self.held is not None else self.tally.result(cut=True)
            self.pending = False
        abandon, self.abandon, self.held = self.abandon, None, None
        self.conn.send(("cut", res))
        if abandon is not None:
            abandon()


async def _serve_cellmesh(rx: Receiving, node: Node) -> None:
    while True:
        st = await node.accept_stream()
        tally = rx.begin(st.reset)
        read = st.read_chunks  # (what a bulk consumer uses: no copy to join the pieces)
        try:
            while pieces := await read(1 << 20):
                tally.add_all(pieces)
        except CellmeshError as exc:  # reset by the sender at its deadline, or peer gone
            rx.failed(tally, exc)
            continue
        rx.complete(tally, inbox_dropped=node.inbox_dropped)
        with contextlib.suppress(CellmeshError):
            await st.close()


async def _serve_tls(
    rx: Receiving, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    tally: _Tally | None = None
    try:
        while True:
            tally = None
            while True:
                head = await reader.readexactly(_FRAME.size)
                n = _FRAME.unpack(head)[0]
                if tally is None:
                    tally = rx.begin(writer.transport.abort)
                if n == 0:
                    break
                while n > 0:
                    data = await reader.read(n)
                    if not data:
                        raise EOFError("TLS stream ended inside a frame")
                    tally.add(data)
                    n -= len(data)
            rx.complete(tally)
    except (asyncio.IncompleteReadError, EOFError, OSError) as exc:
        if tally is not None:
            rx.failed(tally, exc)
    finally:
        writer.close()


def tcp_info(sock: socket.socket | object) -> dict[str, int]:
    """Total retransmitted segments and segments sent, from TCP_INFO (Linux), or {}."""
    getsockopt = getattr(sock, "getsockopt", None)
    if getsockopt is None:
        return {}
    try:
        raw = getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO)
    except OSError:
        return {}
    if not isinstance(raw, bytes) or len(raw) < _TCPI_SEGS_OUT + 4:
        return {}
    return {
        "total_retrans": struct.unpack_from("I", raw, _TCPI_TOTAL_RETRANS)[0],
        "segs_out": struct.unpack_from("I", raw, _TCPI_SEGS_OUT)[0],
    }


async def _async_sender(conn: Connection, setup: Setup) -> None:
    target = conn.recv()
    assert isinstance(target, tuple)
    addr: Addr = (str(target[0][0]), int(target[0][1]))
    cell = bytes(target[1])
    commands = PipeCommands(conn)
    payload = Payload(setup.chunk)
    profiler = _profiler()
    try:
        if setup.kind == "cellmesh":
            async with Node(Identity.generate(), node_config(setup)) as node:
                await node.connect(addr)
                conn.send("ready")
                while True:
                    cmd = await commands.queue.get()
                    if not (isinstance(cmd, tuple) and cmd[0] == "send"):
                        return
                    st = await node.open_stream(cell)
                    res = await _send_stream(
                        st, payload, int(cmd[1]), float(cmd[2]), bool(cmd[3]), profiler
                    )
                    c = node.endpoint.connection(cell)
                    if c is not None:
                        s = c.stats
                        res.update(
                            mtu=c.mtu,
                            cwnd=c.cc.cwnd,
                            packets_sent=s.packets_sent,
                            packets_lost=s.packets_lost,
                            bytes_retransmitted=s.bytes_retransmitted,
                            pto_count=s.pto_count_total,
                            cc=_cc_state(c.cc),
                        )
                    conn.send(res)
        else:
            await _tls_sender(conn, setup, addr, commands, payload, profiler)
    finally:
        commands.close()


def _cc_state(cc: object) -> str:
    """The congestion controller's model, for diagnostics."""
    parts = [f"{k}={getattr(cc, k)}" for k in ("state", "cwnd", "ssthresh") if hasattr(cc, k)]
    for k, scale, unit in (("btl_bw", 1e-6, "MB/s"), ("min_rtt", 1e3, "ms")):
        v = getattr(cc, k, None)
        if isinstance(v, float):
            parts.append(f"{k}={v * scale:.3g}{unit}")
    hi = getattr(cc, "inflight_hi", None)
    if isinstance(hi, float | int) and hi != float("inf"):
        parts.append(f"inflight_hi={hi:.0f}")
    lo = getattr(cc, "bw_lo", None)
    if isinstance(lo, float) and lo != float("inf"):
        parts.append(f"bw_lo={lo * 1e-6:.3g}MB/s")
    extra = getattr(cc, "extra_acked", None)
    if isinstance(extra, float):
        parts.append(f"extra_acked={extra:.0f}")
    for k in ("congestion_rounds", "random_loss"):
        v = getattr(cc, k, None)
        if isinstance(v, int | float):
            parts.append(f"{k}={v:.3g}")
    return " ".join(parts)


async def _tls_connect(
    setup: Setup, addr: Addr
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, socket.socket]:
    assert setup.tls_pem is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if setup.congestion:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, setup.congestion.encode())
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, addr), 20.0)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                sock=sock,
                ssl=tls_client_context(setup.tls_pem[0]),
                server_hostname=TLS_NAME,
                limit=4 * setup.chunk,
            ),
            20.0,
        )
    except BaseException:
        sock.close()
        raise
    return reader, writer, sock


async def _tls_sender(
    conn: Connection,
    setup: Setup,
    addr: Addr,
    commands: PipeCommands,
    payload: Payload,
    profiler: cProfile.Profile | None,
) -> None:
    link = await _tls_connect(setup, addr)
    conn.send("ready")
    try:
        while True:
            cmd = await commands.queue.get()
            if cmd == "relink":  # the coordinator cut the last transfer off: a new connection
                link[1].transport.abort()
                link = await _tls_connect(setup, addr)
                conn.send("ok")
                continue
            if not (isinstance(cmd, tuple) and cmd[0] == "send"):
                return
            _, writer, sock = link
            before = tcp_info(sock)
            res = await _send_tls(
                writer, payload, int(cmd[1]), float(cmd[2]), bool(cmd[3]), profiler
            )
            for k, v in tcp_info(sock).items():
                res[k] = v - before.get(k, 0)
            conn.send(res)
    finally:
        link[1].close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(link[1].wait_closed(), 2.0)


def _start(profiler: cProfile.Profile | None) -> tuple[float, float]:
    if profiler is not None:
        profiler.enable()
    return time.perf_counter(), cpu_seconds()


def _finish(
    t0: float, cpu0: float, written: int, profiler: cProfile.Profile | None
) -> dict[str, object]:
    profile = ""
    if profiler is not None:
        profiler.disable()
        profile = hot_spots(profiler)
    return {
        "t0": t0,
        "t_written": time.perf_counter(),
        "bytes": written,
        "cpu": cpu_seconds() - cpu0,
        "profile": profile,
    }


async def _send_stream(
    st: Stream,
    payload: Payload,
    max_bytes: int,
    max_s: float,
    abort: bool,
    profiler: cProfile.Profile | None,
) -> dict[str, object]:
    """Write up to `max_bytes` for up to `max_s` seconds, then close (or, with `abort`, reset
    the stream at `max_s` so that what is still buffered does not count and takes no time)."""
    t0, cpu0 = _start(profiler)
    written = 0
    clock = time.perf_counter
    i = 0
    timed_out = False
    try:
        async with asyncio.timeout(max_s if abort else max_s + stall_grace(max_s)):
            while written < max_bytes and (abort or clock() - t0 < max_s):
                chunk = payload.chunk_at(i)[: max_bytes - written]
                await st.write(chunk)
                written += len(chunk)
                i += 1
            await st.close()
    except TimeoutError:
        timed_out = True
        st.reset()
    t_written = clock()
    res = _finish(t0, cpu0, st.bytes_written, profiler)
    res["t_written"] = t_written
    res["stalled"] = timed_out and not abort
    res["aborted"] = timed_out and abort
    if not timed_out:
        try:
            await asyncio.wait_for(st.wait_acknowledged(), stall_grace(max_s))
            res["t_acked"] = clock()
        except (TimeoutError, CellmeshError):
            res["unacknowledged"] = True
    return res


def stall_grace(max_s: float) -> float:
    """How long past its time a transfer may go without finishing before it counts as stalled."""
    return max(10.0, max_s)


async def _send_tls(
    writer: asyncio.StreamWriter,
    payload: Payload,
    max_bytes: int,
    max_s: float,
    abort: bool,
    profiler: cProfile.Profile | None,
) -> dict[str, object]:
    """Write up to `max_bytes` for up to `max_s` seconds, then the end frame; with `abort`,
    just stop writing at `max_s` (the coordinator cuts the receiver and has us reconnect)."""
    t0, cpu0 = _start(profiler)
    written = 0
    clock = time.perf_counter
    i = 0
    timed_out = False
    try:
        async with asyncio.timeout(max_s if abort else max_s + stall_grace(max_s)):
            while written < max_bytes and (abort or clock() - t0 < max_s):
                chunk = payload.chunk_at(i)[: max_bytes - written]
                writer.write(_FRAME.pack(len(chunk)))
                writer.write(chunk)
                written += len(chunk)
                i += 1
                await writer.drain()
            writer.write(_FRAME.pack(0))
            await writer.drain()
    except TimeoutError:
        timed_out = True
    res = _finish(t0, cpu0, written, profiler)
    res["stalled"] = timed_out and not abort
    res["aborted"] = timed_out and abort
    return res


# ------------------------------------------------------------------------------ raw UDP baseline


def _raw_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    sock.bind((host, 0))
    return sock


def _raw_receiver(conn: Connection, setup: Setup) -> None:
    aead = ChaCha20Poly1305(bytes(range(32)))
    sock = _raw_socket(setup.host)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(conn, selectors.EVENT_READ, "conn")
    name = sock.getsockname()
    conn.send(((str(name[0]), int(name[1])), b""))
    decrypt, nonce, unpack = aead.decrypt, _NONCE.pack, _RAW_HEADER.unpack_from
    trial = -1
    expected = 0
    total = 0
    tally: _Tally | None = None
    bad = ooo = 0
    done = False
    peer: tuple[str, int] | None = None
    size = setup.max_datagram
    while True:
        for k, _ in sel.select(1.0):
            if k.data == "conn":
                try:
                    cmd = conn.recv()
                except EOFError:
                    return
                if cmd == "stop":
                    return
                continue
            progressed = False
            for _ in range(512):
                try:
                    data, src = sock.recvfrom(size)
                except BlockingIOError:
                    break
                peer = (str(src[0]), int(src[1]))
                h = unpack(data)
                t_id, seq = h[11], h[10]
                if t_id != trial:
                    trial, expected, total, done = t_id, 0, h[8], False
                    tally = _Tally(_profiler())
                    bad = ooo = 0
                if seq != expected or done:
                    ooo += 1
                    progressed = True  # tell the sender where we are
                    continue
                try:
                    plain = decrypt(nonce(h[9]), data[HEADER:], data[:HEADER])
                except InvalidTag:
                    bad += 1
                    continue
                assert tally is not None
                tally.add(plain)
                expected += 1
                progressed = True
                if tally.nbytes >= total and not done:
                    done = True
                    conn.send(tally.result(bad=bad, out_of_order=ooo))
            if progressed and peer is not None:
                sock.sendto(_ACK.pack(trial, expected), peer)


def _raw_sender(conn: Connection, setup: Setup) -> None:
    target = conn.recv()
    assert isinstance(target, tuple)
    addr: Addr = (str(target[0][0]), int(target[0][1]))
    aead = ChaCha20Poly1305(bytes(range(32)))
    sock = _raw_socket(setup.host)  # blocking sends: a full send buffer simply waits
    conn.send("ready")
    payload = Payload(setup.chunk)
    per = setup.max_datagram - HEADER - TAG
    window = setup.raw_window or raw_window(setup.max_datagram)
    src, dst = bytes(range(16)), bytes(range(16, 32))
    encrypt, nonce, pack = aead.encrypt, _NONCE.pack, _RAW_HEADER.pack
    sendto, recv = sock.sendto, sock.recv
    clock = time.perf_counter
    pn = 0
    trial = 0
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            return
        if not (isinstance(cmd, tuple) and cmd[0] == "send"):
            return
        total = int(cmd[1])
        max_s = float(cmd[2])
        trial += 1
        n_dgrams = -(-total // per)
        profiler = _profiler()
        t0, cpu0 = _start(profiler)
        acked = nxt = 0
        retransmitted = 0
        last_progress = t0
        while acked < n_dgrams:
            now = clock()
            if now - t0 > max_s:
                raise TimeoutError(f"raw transfer not done after {max_s:g} s ({acked}/{n_dgrams})")
            burst = 0
            while nxt < n_dgrams and nxt < acked + window and burst < 64:
                off = nxt * per
                body = payload.slice(off, min(per, total - off))
                h = pack(1, 5, 0, 0, len(body) + TAG, 0, src, dst, total, pn, nxt, trial)
                sendto(h + encrypt(nonce(pn), body, h), addr)
                pn += 1
                nxt += 1
                burst += 1
            wait = 0.0 if nxt < n_dgrams and nxt < acked + window else RAW_RTO
            if select_read(sock, wait):
                while True:
                    try:
                        ack = recv(64, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    t_id, upto = _ACK.unpack_from(ack)
                    if t_id == trial and upto > acked:
                        acked = upto
                        last_progress = clock()
                if nxt < acked:
                    nxt = acked
            elif clock() - last_progress >= RAW_RTO:
                retransmitted += nxt - acked  # go back N
                nxt = acked
                last_progress = clock()
        res = _finish(t0, cpu0, total, profiler)
        res["retransmitted"] = retransmitted
        res["datagrams"] = n_dgrams
        conn.send(res)


def select_read(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` became readable within `timeout` seconds."""
    return bool(select.select([sock], [], [], timeout)[0])


# ------------------------------------------------------------------------------ coordinator


@dataclass(slots=True)
class Transfer:
    """One verified transfer as this process saw it."""

    kind: str
    nbytes: int
    seconds: float
    verified: bool
    sender: dict[str, object]
    receiver: dict[str, object]

    @property
    def goodput(self) -> float:
        """Verified bytes per second (0 when the bytes could not be verified)."""
        return self.nbytes / self.seconds if self.seconds > 0 and self.verified else 0.0

    @property
    def stalled(self) -> bool:
        return bool(self.sender.get("stalled"))

    def cpu(self, side: str) -> float:
        d = self.sender if side == "sender" else self.receiver
        v = d.get("cpu", 0.0)
        return float(v) if isinstance(v, int | float) else 0.0


@dataclass(slots=True)
class Pair:
    """A running sender/receiver pair of one kind."""

    label: str
    setup: Setup
    sender: Child
    receiver: Child
    transfers: list[Transfer] = field(default_factory=list)

    def transfer(
        self,
        nbytes: int,
        max_s: float,
        payload: Payload,
        digests: dict[int, str],
        abort: bool = False,
    ) -> Transfer:
        """One transfer of up to `nbytes` bytes or `max_s` seconds of writing, verified.

        Normally the sender ends the stream and the receiver reads to its end: goodput counts
        every byte, up to the last one at the receiver. With `abort`, the sender stops at
        `max_s` (cellmesh: resets its stream) and the receiver is cut off right away: goodput
        counts the verified prefix that arrived in order, up to its last byte, and what was
        still buffered or in flight neither counts nor takes time to drain (TCP then opens a new
        connection, untimed). A transfer whose end has not arrived `stall_grace` after the
        sender finished is cut off and counted as stalled: what arrived, over the whole time.
        """
        self.sender.conn.send(("send", nbytes, max_s, abort))
        grace = stall_grace(max_s)
        s = expect(self.sender.conn, max_s + 3 * grace + 40.0, "its send report")
        assert isinstance(s, dict)
        sent = int(s["bytes"])
        cut = abort and self.setup.kind != "raw"
        r: dict[str, object] | None = None
        if not cut and self.receiver.conn.poll(grace):
            msg = expect(self.receiver.conn, 1.0, "its receive report")
            assert isinstance(msg, dict)
            r = msg
        stalled = False
        if r is None:
            stalled = not cut
            r = self._cut()
            if self.setup.kind == "tls":
                self.sender.conn.send("relink")
                expect(self.sender.conn, 60.0, "a new connection")
        got = int(str(r.get("bytes", 0)))
        prefix = cut or stalled
        want = got if prefix else sent
        if want not in digests:
            if len(digests) > 64:
                digests.clear()
            digests[want] = payload.digest(want)
        verified = got <= sent and r.get("digest") == digests[want] and (prefix or got == sent)
        if cut:
            seconds = float(str(r.get("t_last", 0.0))) - float(s["t0"])
        else:
            seconds = float(str(r.get("t_end", 0.0))) - float(s["t0"])
        if stalled or s.get("stalled"):
            s["stalled"] = True
            print(f"  !! {self.label}: stalled: {got} bytes arrived in {seconds:.1f} s, cut off")
        elif not verified:
            print(f"  !! {self.label}: receiver got {got} of {sent} bytes, digest mismatch?")
        return Transfer(self.label, got, seconds, verified, s, r)

    def _cut(self) -> dict[str, object]:
        """Have the receiver report what it has now (and drop the rest of the transfer)."""
        self.receiver.conn.send("cut")
        last: dict[str, object] = {}
        while True:
            msg = expect(self.receiver.conn, 20.0, "what it has")
            if isinstance(msg, tuple) and msg[0] == "cut":
                return msg[1] if isinstance(msg[1], dict) else last
            if isinstance(msg, dict):
                last = msg


@contextlib.contextmanager
def running_pair(
    label: str,
    setup: Setup,
    pin_apart: bool = True,
    sender_setup: Setup | None = None,
    route: Callable[[tuple[Addr, bytes]], tuple[Addr, bytes]] | None = None,
    lifetime: float = CHILD_MAX_LIFETIME,
) -> Iterator[Pair]:
    """Start a receiver and a sender for `setup`, connected, optionally pinned to two CPUs.

    `sender_setup` (default: `setup`) may differ, e.g. in its network namespace and address;
    `route` may replace the receiver's address the sender dials (a relay in between).
    """
    with (
        child_process(receiver_child, f"bench-bulk-{label}-receiver", lifetime) as receiver,
        child_process(sender_child, f"bench-bulk-{label}-sender", lifetime) as sender,
    ):
        if pin_apart and can_pin():
            c = cpus()
            pin(sender.pid, c[0])
            pin(receiver.pid, c[1])
        receiver.conn.send(setup)
        msg = expect(receiver.conn, 30.0, "its address")
        assert isinstance(msg, tuple)
        hello: tuple[Addr, bytes] = ((str(msg[0][0]), int(msg[0][1])), bytes(msg[1]))
        if route is not None:
            hello = route(hello)
        sender.conn.send(sender_setup or setup)
        sender.conn.send(hello)
        if expect(sender.conn, 30.0, "ready") != "ready":
            raise RuntimeError("sender not ready")
        yield Pair(label, setup, sender, receiver)
        with contextlib.suppress(OSError):
            sender.conn.send("stop")
            sender.conn.poll(2.0)  # returns at EOF, when the sender has exited
            receiver.conn.send("stop")


def mbps(x: float) -> str:
    return f"{x / 1e6:.1f}"


def best(pair: Pair) -> Transfer:
    return max(pair.transfers, key=lambda t: t.goodput)


def describe(pair: Pair) -> str:
    return ", ".join(mbps(t.goodput) for t in pair.transfers) + " MB/s"


def cpu_note(t: Transfer) -> str:
    return (
        f"{t.kind}: CPU during the best transfer: sender {t.cpu('sender'):.2f} s, receiver "
        f"{t.cpu('receiver'):.2f} s of {t.seconds:.2f} s wall"
    )


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        action="store_true",
        help="only profile both cellmesh Nodes (cProfile) during one transfer per configuration",
    )


def run_profile(total: int) -> int:
    os.environ[PROFILE_ENV] = "1"
    payload = Payload()
    digests: dict[int, str] = {}
    try:
        for md in (1200, 65507):
            setup = Setup("cellmesh", max_datagram=md, congestion="bbr")
            with running_pair(f"cellmesh-{md}", setup) as pair:
                os.environ[PROFILE_ENV] = "0"
                pair.transfer(8 * MIB, 60.0, payload, digests)  # warm-up, not profiled
                t = pair.transfer(total, 120.0, payload, digests)
            print(
                f"\n=== cellmesh max_datagram={md}: {mbps(t.nbytes / t.seconds)} MB/s under "
                f"cProfile (rank, do not quote); CPU sender {t.cpu('sender'):.2f} s, receiver "
                f"{t.cpu('receiver'):.2f} s of {t.seconds:.2f} s"
            )
            print("--- receiver\n" + str(t.receiver.get("profile", "")))
            print("--- sender\n" + str(t.sender.get("profile", "")))
            os.environ[PROFILE_ENV] = "1"
    finally:
        os.environ.pop(PROFILE_ENV, None)
    return 0


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH, options)
    rounds, total, warm = (1, 16 * MIB, 4 * MIB) if args.quick else (3, 1024 * MIB, 16 * MIB)
    print_header(
        BENCH,
        f"{total // MIB} MiB per transfer, {rounds} round(s), sender and receiver pinned apart",
    )
    if args.profile:
        return run_profile(min(total, 100 * MIB))  # (under cProfile everything is slower)
    t_start = time.monotonic()
    payload = Payload()
    digests: dict[int, str] = {}
    pem = self_signed_pem()
    max_s = 60.0
    with contextlib.ExitStack() as stack:
        pairs: list[Pair] = []
        cold: dict[str, Transfer] = {}
        for label, md in (("cellmesh-1200", 1200), ("cellmesh-mtu", 65507)):
            pair = stack.enter_context(
                running_pair(label, Setup("cellmesh", max_datagram=md, congestion="bbr"))
            )
            cold[label] = pair.transfer(warm, max_s, payload, digests)
            pairs.append(pair)
        mtu = int(str(cold["cellmesh-mtu"].sender.get("mtu", 65507)))
        base_1200 = Setup("raw", max_datagram=1200, raw_window=raw_window(1200))
        base_mtu = Setup("raw", max_datagram=mtu, raw_window=raw_window(mtu))
        for label, setup in (
            ("tls", Setup("tls", tls_pem=pem)),
            ("raw-1200", base_1200),
            ("raw-mtu", base_mtu),
        ):
            pair = stack.enter_context(running_pair(label, setup))
            pair.transfer(warm, max_s, payload, digests)  # warm-up
            pairs.append(pair)
        for _ in range(rounds):
            for pair in pairs:
                pair.transfers.append(pair.transfer(total, max_s, payload, digests))
        by = {p.label: p for p in pairs}
    print("every transfer: " + "; ".join(f"{p.label} {describe(p)}" for p in pairs))
    unverified = [t for p in pairs for t in p.transfers if not t.verified]
    tls = best(by["tls"])
    for label, raw_label, what in (
        ("cellmesh-1200", "raw-1200", "max_datagram=1200"),
        ("cellmesh-mtu", "raw-mtu", f"discovered MTU {mtu}"),
    ):
        ours = best(by[label])
        raw = best(by[raw_label])
        c = cold[label]
        retrans = ours.sender.get("bytes_retransmitted", 0)
        extra_raw = raw.sender.get("retransmitted", 0)
        for base_t, base_desc, target, tname in (
            (tls, by["tls"].setup.describe(), TARGET_TLS, "TCP+TLS"),
            (raw, by[raw_label].setup.describe() + ", go-back-N", TARGET_RAW, "raw UDP+AEAD"),
        ):
            report(
                Result(
                    bench=BENCH,
                    case=f"bulk {what} vs {tname}",
                    ours=by[label].setup.describe() + ", Node per process",
                    baseline=base_desc,
                    metrics=[
                        Metric("goodput", ours.goodput, base_t.goodput, "MB/s", "higher"),
                        Metric(
                            "sender CPU / wall",
                            ours.cpu("sender") / ours.seconds,
                            base_t.cpu("sender") / base_t.seconds,
                            "%",
                            "lower",
                        ),
                        Metric(
                            "receiver CPU / wall",
                            ours.cpu("receiver") / ours.seconds,
                            base_t.cpu("receiver") / base_t.seconds,
                            "%",
                            "lower",
                        ),
                    ],
                    targets=[
                        Target(
                            f"ours >= {target:.0%} of {tname} goodput",
                            ours.goodput >= target * base_t.goodput,
                        )
                    ],
                    notes=[
                        f"every transfer (MB/s): ours {describe(by[label])}; baseline "
                        f"{describe(by[base_t.kind])}; best reported",
                        f"{ours.nbytes / MIB:.0f} MiB per transfer, BLAKE3 and byte count "
                        f"verified at the receiver: "
                        f"{'all' if not unverified else 'NOT ALL (see above)'}",
                        f"ours: path MTU {ours.sender.get('mtu')}, cwnd {ours.sender.get('cwnd')}, "
                        f"retransmitted {retrans} bytes in the best transfer; cold start "
                        f"(first {c.nbytes / MIB:.0f} MiB on a fresh session): "
                        f"{mbps(c.goodput)} MB/s",
                        cpu_note(ours),
                        cpu_note(base_t),
                        *(
                            [f"raw baseline: {extra_raw} datagrams resent (go-back-N)"]
                            if base_t is raw
                            else []
                        ),
                    ],
                    extra={
                        "transfers_ours": [tdict(t) for t in by[label].transfers],
                        "transfers_baseline": [tdict(t) for t in by[base_t.kind].transfers],
                        "cold_start": tdict(c),
                    },
                ),
                args.json,
                args.quick,
            )
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0 if not unverified else 1


def tdict(t: Transfer) -> dict[str, object]:
    keep = ("mtu", "cwnd", "packets_lost", "bytes_retransmitted", "retransmitted", "cpu")
    return {
        "bytes": t.nbytes,
        "seconds": t.seconds,
        "goodput": t.goodput,
        "verified": t.verified,
        "sender": {k: v for k, v in t.sender.items() if k in keep},
        "receiver_cpu": t.receiver.get("cpu"),
    }


if __name__ == "__main__":
    sys.exit(main())
