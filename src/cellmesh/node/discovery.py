"""The discovery driver: link-local multicast sockets around the sans-IO `DiscoveryCore`.

Theory of operation. One IPv6 UDP socket bound to `[::]:group_port` (SO_REUSEADDR/SO_REUSEPORT,
so several nodes on one host can share the port) receives the beacons and SOLICITs of the link;
beacons to the group go out once per multicast-capable, up, non-loopback interface (hop limit 1,
so they never leave the link). Where the settings name an IPv4 group, a second IPv4 socket does
the same for the IPv4 fallback. Each discovered peer is handed to the endpoint with the Noise
static key from its signed beacon, and the node dials it at the beacon's source address (with the
interface scope for link-local peers) and the port it announced, using Noise IK. Nothing here
decides anything: the core does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cellmesh.discovery.core import DiscoveryCore
from cellmesh.discovery.events import DiscoveryEvent, PeerDiscovered, PeerExpired, PeerUpdated
from cellmesh.discovery.settings import DiscoverySettings
from cellmesh.discovery.table import PeerRecord
from cellmesh.identity.cellid import format_cell_id
from cellmesh.node.udp import Addr, format_addr

if TYPE_CHECKING:
    from cellmesh.node.node import Node

log = logging.getLogger("cellmesh.discovery")
MAX_DATAGRAM = 2048


def multicast_interfaces() -> list[tuple[int, str]]:
    """(index, name) of interfaces that are up, multicast-capable and not loopback."""
    out = []
    for idx, name in socket.if_nameindex():
        try:
            with open(f"/sys/class/net/{name}/flags") as f:
                flags = int(f.read().strip(), 16)
        except (OSError, ValueError):
            continue
        up, loopback, multicast = flags & 0x1, flags & 0x8, flags & 0x1000
        if up and multicast and not loopback:
            out.append((idx, name))
    return out


def dial_address(peer: PeerRecord) -> Addr:
    """Where to reach a discovered peer: the beacon's source host, the port it announced."""
    host = peer.observed_addr[0]
    family_v6 = ":" in host
    for a_host, a_port in peer.addresses:
        if (":" in a_host) == family_v6 and a_port:
            unspecified = ipaddress.ip_address(a_host.split("%")[0]).is_unspecified
            return (host if unspecified else a_host, a_port)
    for _, a_port in peer.addresses:
        if a_port:
            return (host, a_port)
    return peer.observed_addr


class DiscoveryDriver:
    """Runs a `DiscoveryCore` for a `Node` on the real link."""

    def __init__(self, node: Node, settings: DiscoverySettings) -> None:
        self.node = node
        self.settings = settings
        self.core: DiscoveryCore | None = None
        self._sockets: list[socket.socket] = []
        self._v6: socket.socket | None = None
        self._v4: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.send_errors = 0
        self.listeners: list[Callable[[DiscoveryEvent], None]] = []
        """Called with every discovery event, after this driver has handled it (the anchor
        driver mirrors admissions and expiries into its membership this way)."""

    async def start(self, shared: socket.socket | None = None) -> None:
        """Open the sockets, announce ourselves and ask the link who is there.

        `shared`: the node's own IPv6 data socket when it is bound to `[::]:group_port`. Then
        discovery rides on it (one port, as NEXUS-0 uses), the node hands us the BEACON/SOLICIT
        frames it receives (`feed`), and we only join the group and send from it.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        port = self.settings.group_port
        groups = self.settings.group_hosts
        if any(":" in g for g in groups):
            if shared is not None:
                s6 = shared
            else:
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                self._prepare(s6)
                s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s6.bind(("::", port))
                self._sockets.append(s6)
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            for group in (g for g in groups if ":" in g):
                for idx, _ in multicast_interfaces():
                    mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", idx)
                    with contextlib.suppress(OSError):
                        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            self._v6 = s6
        if any(":" not in g for g in groups):
            s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._prepare(s4)
            s4.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            s4.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            s4.bind(("0.0.0.0", port))
            for group in (g for g in groups if ":" not in g):
                mreq = socket.inet_aton(group) + socket.inet_aton("0.0.0.0")
                with contextlib.suppress(OSError):
                    s4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            self._v4 = s4
            self._sockets.append(s4)
        self.core = DiscoveryCore(
            self.node.identity, self.settings, loop.time(), time.time, random.Random()
        )
        self.core.set_addresses(self._announced(), loop.time())
        for s in self._sockets:
            loop.add_reader(s.fileno(), self._on_readable, s)
        self.core.start(loop.time())
        self._pump()
        log.info(
            "discovery on %s port %d (mesh %r%s)",
            ", ".join(n for _, n in multicast_interfaces()) or "no multicast interface",
            port,
            self.settings.mesh_name,
            ", keyed" if self.settings.mesh_key else "",
        )

    @staticmethod
    def _prepare(s: socket.socket) -> None:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(AttributeError, OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def _announced(self) -> list[Addr]:
        out: list[Addr] = []
        for host, port in self.node.local_addresses():
            if host == "::":
                out.append(("::", port))
                out.append(("0.0.0.0", port))
            else:
                out.append((host, port))
        return out[:8]

    def stop(self) -> None:
        """Close the sockets."""
        if self._timer is not None:
            self._timer.cancel()
        for s in self._sockets:
            if self._loop is not None:
                self._loop.remove_reader(s.fileno())
            s.close()
        self._sockets.clear()
        self.core = None

    def feed(self, data: bytes, addr: Addr, now: float) -> None:
        """A discovery frame that arrived on the node's shared socket (call `flush` after)."""
        if self.core is not None:
            self.core.receive_datagram(data, addr, now)

    def flush(self) -> None:
        """Send what the core queued and re-arm its timer."""
        self._pump()

    def _on_readable(self, s: socket.socket) -> None:
        core = self.core
        if core is None or self._loop is None:
            return
        for _ in range(256):
            try:
                data, raw = s.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError:
                continue
            host = str(raw[0])
            if len(raw) >= 4 and raw[3] and "%" not in host:
                host = f"{host}%{socket.if_indextoname(int(raw[3]))}"
            core.receive_datagram(data, (host, int(raw[1])), self._loop.time())
        self._pump()

    def _send(self, data: bytes, addr: Addr) -> None:
        host, port = addr
        try:
            if host in self.settings.group_hosts:
                if ":" in host and self._v6 is not None:
                    for idx, _ in multicast_interfaces():
                        self._v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
                        self._v6.sendto(data, (host, port, 0, idx))
                elif self._v4 is not None:
                    self._v4.sendto(data, (host, port))
            elif ":" in host and self._v6 is not None:
                self._v6.sendto(data, (host, port))
            elif self._v4 is not None:
                self._v4.sendto(data, (host, port))
        except OSError:
            self.send_errors += 1

    def _pump(self) -> None:
        core = self.core
        loop = self._loop
        if core is None or loop is None:
            return
        for data, addr in core.datagrams_to_send():
            self._send(data, addr)
        while (ev := core.next_event()) is not None:
            if isinstance(ev, PeerDiscovered):
                self._reach(ev.peer)
                log.info(
                    "discovered %s %r at %s",
                    format_cell_id(ev.peer.cell_id),
                    ev.peer.name,
                    format_addr(dial_address(ev.peer)),
                )
            elif isinstance(ev, PeerUpdated) and ev.changed & {"addresses", "noise_static"}:
                self._reach(ev.peer)
            elif isinstance(ev, PeerExpired):
                log.info("peer %s left the link (%s)", format_cell_id(ev.peer.cell_id), ev.reason)
            for listener in self.listeners:
                listener(ev)
        when = core.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.core is not None and self._loop is not None:
            self.core.handle_timer(self._loop.time())
            self._pump()

    def _reach(self, peer: PeerRecord) -> None:
        """Tell the endpoint who the peer is and open a Noise IK session to it."""
        self.node._learn_and_dial(peer.cell_id, peer.noise_static, dial_address(peer))

    def peers(self) -> tuple[PeerRecord, ...]:
        """The discovered peers."""
        return self.core.peers() if self.core is not None else ()
