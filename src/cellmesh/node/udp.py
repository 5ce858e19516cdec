"""UDP sockets for the node: dual-stack binding, address normalisation, batched I/O, GSO/GRO.

Why not asyncio's DatagramProtocol: it makes one callback per datagram, which this machine measured
at ~22k packets/s with heavy loss. We register the raw non-blocking socket with `loop.add_reader` and
drain it in a loop on every readiness event (up to `MAX_BATCH` datagrams), which runs several times
faster and lets the core coalesce its replies.

On Linux, runs of equal-sized datagrams to one address leave in a single `sendmsg` with UDP_SEGMENT
(GSO: the kernel cuts them), and receiving sockets enable UDP_GRO, so the kernel may hand us several
datagrams glued together with their segment size, which we split again. Both are probed at start
and silently fall back to one syscall per datagram where the kernel says no.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cellmesh.config import parse_host_port
from cellmesh.wire.header import Datagram

log = logging.getLogger("cellmesh.udp")

Addr = tuple[str, int]
MAX_BATCH = 512
SHARED_BATCH = 128
"""Datagrams drained from a shared (listening) socket per readiness event: small, so that under
a flood the event loop comes back to the peers' own sockets often."""
MAX_LANES = 256
MAX_DATAGRAM = 65535
MAX_BACKLOG = 4096
_MAPPED = "::ffff:"
# Linux socket options (include/uapi/linux/udp.h); Python's socket module does not name them.
IP_MTU_DISCOVER = 10
IPV6_MTU_DISCOVER = 23
PMTUDISC_PROBE = 3
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_GSO_SIZE = struct.Struct("=H")
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_LITTLE = struct.pack("=H", 1) == b"\x01\x00"


def _probe_mode(sock: socket.socket, family: int) -> None:
    """Set the Don't Fragment bit and ignore the kernel's path-MTU cache (PMTUDISC_PROBE).

    Path MTU discovery (RFC 8899) probes with datagrams larger than the current size: they must
    be dropped, not silently fragmented, when the path cannot carry them, or a lossy path would
    settle on a size that loses a fragment of every datagram.
    """
    with contextlib.suppress(OSError, AttributeError):
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, PMTUDISC_PROBE)
        if family == socket.AF_INET or family == socket.AF_INET6:
            # Dual-stack IPv6 sockets carry IPv4 too: set both where the kernel allows.
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_PROBE)


def normalize_addr(raw: tuple[object, ...]) -> Addr:
    """Turn a socket address into the (host, port) the core uses (IPv4-mapped IPv6 -> IPv4)."""
    host = str(raw[0])
    if host.startswith(_MAPPED) and "." in host:
        host = host[len(_MAPPED) :]
    port = raw[1]
    assert isinstance(port, int)
    return host, port


def format_addr(addr: Addr) -> str:
    """HOST:PORT with IPv6 hosts in brackets; "via mesh" for a peer reached through relays."""
    host, port = addr
    if host.startswith("~"):
        return "via mesh"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class UdpStats:
    """Socket-level counters (the core counts protocol drops)."""

    send_errors: int = 0
    send_backlogged: int = 0
    send_dropped: int = 0
    recv_errors: int = 0
    gso_batches: int = 0
    gro_batches: int = 0
    deliver_errors: int = 0
    """Datagrams whose handling raised (a bug: the cores promise never to raise on input)."""


class UdpSockets:
    """The node's bound UDP sockets, with family-aware sending and a bounded send backlog."""

    def __init__(self, listen: tuple[str, ...], recv_buffer: int) -> None:
        self.sockets: list[socket.socket] = []
        self.stats = UdpStats()
        self._last_deliver_log = -60.0
        self._backlog: deque[tuple[socket.socket, Datagram, tuple[object, ...]]] = deque()
        self._v4: socket.socket | None = None
        self._v6: socket.socket | None = None
        self._v6_dual = False
        self.gso = hasattr(socket.socket, "sendmsg")
        self._gro: set[int] = set()
        self._lanes: dict[Addr, socket.socket] = {}
        self._lane_targets: dict[Addr, tuple[object, ...]] = {}
        self._lane_fds: set[int] = set()
        self._recv_buffer = recv_buffer
        try:
            for spec in listen:
                self._bind(spec, recv_buffer)
        except BaseException:
            self.close()
            raise

    def _bind(self, spec: str, recv_buffer: int) -> None:
        host, port = parse_host_port(spec)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                dual = host == "::"
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, recv_buffer)
            # Lets per-peer connected sockets share the port (see `open_lane`). Only processes
            # of the same user can join the group, and they can read our keystore anyway.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setblocking(False)
            _probe_mode(sock, family)
            sock.bind((host, port))
            try:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self._gro.add(sock.fileno())
            except OSError:
                pass  # no GRO on this kernel: plain datagrams
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {spec}: {exc.strerror}") from exc
        self.sockets.append(sock)
        if family == socket.AF_INET6:
            if self._v6 is None:
                self._v6 = sock
                self._v6_dual = host == "::"
        elif self._v4 is None:
            self._v4 = sock

    def local_addresses(self) -> list[Addr]:
        """Where we actually listen (ports resolved when 0 was asked for)."""
        return [normalize_addr(s.getsockname()) for s in self.sockets]

    # ------------------------------------------------------------------ lanes

    def open_lane(self, addr: Addr) -> socket.socket | None:
        """A socket of its own for an established peer: connected to its address and sharing
        our port, so the kernel queues that peer's datagrams apart from everything else.

        A flood of junk then overflows only the shared socket's queue: the peers' datagrams
        are neither dropped with it nor waiting behind it. Returns None when the kernel
        refuses, the address is not IP, or `MAX_LANES` are open (the shared socket still works).
        """
        if addr in self._lanes or len(self._lanes) >= MAX_LANES:
            return None
        route = self._route(addr)
        if route is None:
            return None
        shared, target = route
        family = shared.family
        local = shared.getsockname()
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self._v6_dual else 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, self._recv_buffer)
            sock.setblocking(False)
            _probe_mode(sock, family)
            sock.bind(local[:2] if family == socket.AF_INET else (local[0], local[1], 0, 0))
            sock.connect(target)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self._gro.add(sock.fileno())
        except (OSError, AttributeError):
            sock.close()
            return None
        self._lanes[addr] = sock
        self._lane_targets[addr] = target
        self._lane_fds.add(sock.fileno())
        return sock

    def close_lane(self, addr: Addr) -> socket.socket | None:
        """Close the peer's own socket (its datagrams go to the shared socket again)."""
        sock = self._lanes.pop(addr, None)
        self._lane_targets.pop(addr, None)
        if sock is not None:
            self._lane_fds.discard(sock.fileno())
            self._gro.discard(sock.fileno())
        return sock

    @property
    def lanes(self) -> int:
        """How many peers have a socket of their own."""
        return len(self._lanes)

    def all_sockets(self) -> list[socket.socket]:
        """The shared sockets and the peers' own."""
        return [*self.sockets, *self._lanes.values()]

    def _route(self, addr: Addr) -> tuple[socket.socket, tuple[object, ...]] | None:
        lane = self._lanes.get(addr)
        if lane is not None:
            return lane, self._lane_targets[addr]
        host, port = addr
        if ":" in host:
            if self._v6 is None:
                return None
            return self._v6, (host, port)
        if self._v4 is not None:
            return self._v4, (host, port)
        if self._v6 is not None and self._v6_dual:
            return self._v6, (_MAPPED + host, port)
        return None

    def send(self, data: Datagram, addr: Addr) -> bool:
        """Send now, or backlog when the kernel buffer is full. False if dropped."""
        route = self._route(addr)
        if route is None:
            self.stats.send_errors += 1
            return False
        sock, target = route
        if self._backlog:
            return self._enqueue(sock, data, target)
        try:
            sock.sendto(data, target)
        except BlockingIOError:
            return self._enqueue(sock, data, target)
        except OSError:
            self.stats.send_errors += 1
            return False
        return True

    def send_many(self, items: Sequence[tuple[Datagram, Addr]]) -> None:
        """Send datagrams in order, gluing runs of equal size to one address into GSO batches."""
        i, n = 0, len(items)
        while i < n:
            data, addr = items[i]
            size = len(data)
            j = i + 1
            if self.gso and not self._backlog:
                total = size
                end = min(n, i + GSO_MAX_SEGMENTS)
                while j < end:
                    nxt, nxt_addr = items[j]
                    k = len(nxt)
                    if nxt_addr != addr or k > size or total + k > GSO_MAX_BYTES:
                        break
                    total += k
                    j += 1
                    if k < size:
                        break  # only the last segment of a batch may be shorter
            if j - i >= 2 and self._send_gso(items, i, j, addr, size):
                i = j
                continue
            for k in range(i, j):
                self.send(*items[k])
            i = j

    def _send_gso(
        self, items: Sequence[tuple[Datagram, Addr]], i: int, j: int, addr: Addr, size: int
    ) -> bool:
        """Send items[i:j] (all to `addr`, all `size` bytes but the last) in one GSO sendmsg."""
        route = self._route(addr)
        if route is None:
            return False
        sock, target = route
        batch = items[i:j]
        try:
            # The datagrams go as the message's pieces (an iovec each): the kernel gathers them,
            # so the batch is never joined into one buffer here.
            sock.sendmsg(
                [d for d, _ in batch],
                [(socket.SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))],
                0,
                target,
            )
        except BlockingIOError:
            for d, _ in batch:
                self._enqueue(sock, d, target)
            return True
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                self.gso = False  # the kernel or device cannot segment: fall back for good
                return False
            self.stats.send_errors += 1
            return True
        self.stats.gso_batches += 1
        return True

    def _enqueue(self, sock: socket.socket, data: Datagram, target: tuple[object, ...]) -> bool:
        if len(self._backlog) >= MAX_BACKLOG:
            self.stats.send_dropped += 1
            return False
        self._backlog.append((sock, data, target))
        self.stats.send_backlogged += 1
        return True

    @property
    def has_backlog(self) -> bool:
        """True while datagrams wait for the socket to become writable."""
        return bool(self._backlog)

    def flush_backlog(self) -> None:
        """Send what the backlog holds until the kernel pushes back again."""
        while self._backlog:
            sock, data, target = self._backlog[0]
            try:
                sock.sendto(data, target)
            except BlockingIOError:
                return
            except OSError:
                self.stats.send_errors += 1
            self._backlog.popleft()

    def drain(self, sock: socket.socket, deliver: Callable[[bytes, Addr], None]) -> int:
        """Read a batch of datagrams from `sock` and hand each to `deliver` (see `drain_timed`)."""
        return self.drain_timed(sock, lambda data, addr, _now: deliver(data, addr), _no_clock)

    def drain_timed(
        self,
        sock: socket.socket,
        deliver: Callable[[bytes, Addr, float], None],
        clock: Callable[[], float],
        deliver_many: Callable[[list[bytes], Addr, float], None] | None = None,
    ) -> int:
        """Read a batch of datagrams from `sock` and hand each to `deliver` with its arrival
        time: up to MAX_BATCH datagrams from a peer's own socket, SHARED_BATCH from a shared one
        (peers first under a flood). `clock()` is read once per read from the socket: a GRO read
        returns datagrams that arrived together, and they share it; with `deliver_many`, they
        are handed over together too."""
        limit = MAX_BATCH if sock.fileno() in self._lane_fds else SHARED_BATCH
        if sock.fileno() in self._gro:
            return self._drain_gro(sock, deliver, clock, limit, deliver_many)
        recv = sock.recvfrom
        n = 0
        while n < limit:
            try:
                data, raw = recv(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as exc:
                # ICMP errors (port unreachable) surface on UDP sockets as ECONNREFUSED: harmless.
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self.stats.recv_errors += 1
                n += 1
                continue
            n += 1
            try:
                deliver(data, normalize_addr(raw), clock())
            except Exception:  # noqa: BLE001 - logged with its traceback by _deliver_failed
                self._deliver_failed()
        return n

    def _deliver_failed(self) -> None:
        """One datagram's handling raised: count it, log it (at most once a minute), and go on
        with the batch, so a bug costs one datagram and never the node's receive path."""
        self.stats.deliver_errors += 1
        now = time.monotonic()
        if now - self._last_deliver_log >= 60.0:
            self._last_deliver_log = now
            log.exception(
                "handling a received datagram failed (%d so far)", self.stats.deliver_errors
            )

    def _drain_gro(
        self,
        sock: socket.socket,
        deliver: Callable[[bytes, Addr, float], None],
        clock: Callable[[], float],
        limit: int,
        deliver_many: Callable[[list[bytes], Addr, float], None] | None,
    ) -> int:
        recv = sock.recvmsg
        n = 0
        while n < limit:
            try:
                data, anc, _flags, raw = recv(MAX_DATAGRAM, _GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self.stats.recv_errors += 1
                n += 1
                continue
            now = clock()
            addr = normalize_addr(raw)
            seg = 0
            for level, kind, value in anc:
                if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                    seg = int.from_bytes(value[:4], "little" if _LITTLE else "big")
            if seg and len(data) > seg:
                self.stats.gro_batches += 1
                parts = [data[off : off + seg] for off in range(0, len(data), seg)]
            else:
                parts = [data]
            # The limit counts datagrams, not reads: one GRO read can carry 64 of them, and the
            # application must get a turn before its inbox overflows.
            n += len(parts)
            if deliver_many is not None and len(parts) > 1:
                try:
                    deliver_many(parts, addr, now)
                except Exception:  # noqa: BLE001 - logged with its traceback by _deliver_failed
                    self._deliver_failed()
                continue
            for part in parts:
                try:
                    deliver(part, addr, now)
                except Exception:  # noqa: BLE001 - logged with its traceback by _deliver_failed
                    self._deliver_failed()
        return n

    def close(self) -> None:
        """Close every socket."""
        for s in self.sockets:
            s.close()
        self.sockets.clear()
        for lane in self._lanes.values():
            lane.close()
        self._lanes.clear()
        self._lane_fds.clear()


def _no_clock() -> float:
    return 0.0
