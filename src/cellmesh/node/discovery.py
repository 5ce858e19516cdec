"""The discovery driver: link-local multicast sockets around the sans-IO `DiscoveryCore`.

Theory of operation. Beacons and SOLICITs go out once per up, multicast-capable, non-loopback
interface (a *link*), with hop limit / TTL 1 so they never leave it. Each link is re-examined
before every multicast (`links()`): one with a usable IPv6 link-local address gets the IPv6
groups of the settings (`ff02::1`); one without (IPv6 disabled, no link-local address, or a
node that cannot carry IPv6 data) falls back to IPv4 multicast to `DEFAULT_GROUP_V4`
(`224.0.0.1`, all-hosts, never routed) on the same port, or to the IPv4 groups of the settings
when some are configured (those go out on every link with an IPv4 address anyway). Every IPv4
datagram names its link with `IP_MULTICAST_IF` (interface index and address), so it needs no
multicast or default route. Every node always listens on the IPv4 group too, and a node with
IPv6 also announces on IPv4 while it knows a neighbour that announced no IPv6 address, so mixed
links work in both directions.

Sockets. Discovery shares the node's own data socket whenever one listens on the group port on
a wildcard address (the dual-stack `[::]` one, or `0.0.0.0`): the node demultiplexes the BEACON
and SOLICIT frames it receives to `feed` and everything else stays with the transport. A second
socket bound to the same port with SO_REUSEPORT would instead take a share of the node's unicast
(its handshakes above all) and drop it. Only where the node has no such socket does the driver
open its own: for IPv6 one on `[::]:group_port` (SO_REUSEPORT, so several nodes on one host
share the port), for IPv4 one bound to each group address itself (the kernel delivers nothing
but that group's datagrams to it, so it can steal no one's unicast) plus an ephemeral-port
socket to send from and to receive the unicast answers to our SOLICITs on.

Each discovered peer is handed to the endpoint with the Noise static key from its signed beacon,
and the node dials it at the beacon's source address (with the interface scope for link-local
peers) and the port it announced, using Noise IK. Nothing here decides anything: the core does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cellmesh.discovery.core import DiscoveryCore
from cellmesh.discovery.events import DiscoveryEvent, PeerDiscovered, PeerExpired, PeerUpdated
from cellmesh.discovery.settings import DEFAULT_GROUP_V4, DiscoverySettings
from cellmesh.discovery.table import PeerRecord
from cellmesh.identity.cellid import format_cell_id
from cellmesh.node.udp import Addr, format_addr

if TYPE_CHECKING:
    from cellmesh.node.node import Node

log = logging.getLogger("cellmesh.discovery")
MAX_DATAGRAM = 2048
# Interface flags (include/uapi/linux/if.h), ioctls (linux/sockios.h) and IPv6 address flags
# (linux/if_addr.h): Python's socket module names none of them.
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_MULTICAST = 0x1000
SIOCGIFADDR = 0x8915
IFA_F_DADFAILED = 0x08
IPV6_SCOPE_LINK = 0x20
_MAPPED = "::ffff:"


@dataclass(frozen=True, slots=True)
class Link:
    """An interface discovery announces on."""

    index: int
    name: str
    ipv6: bool
    """It has a usable IPv6 link-local address (IPv6 is enabled on it)."""
    ipv4: str | None
    """Its (primary) IPv4 address, or None."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _ipv6_link_local_interfaces() -> set[str]:
    """Names of interfaces with an IPv6 link-local address that did not fail DAD.

    /proc/net/if_inet6 lists one address a line: hex address, ifindex, prefix length, scope,
    flags, name. It is absent when the kernel has no IPv6, and an interface where IPv6 is
    disabled (net.ipv6.conf.*.disable_ipv6=1) has no addresses in it. A tentative address still
    counts: it becomes usable within DAD's second or so, and falling back to IPv4 for that
    moment would only make every neighbour see us twice.
    """
    text = _read("/proc/net/if_inet6") or ""
    out: set[str] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        try:
            scope, flags = int(fields[3], 16), int(fields[4], 16)
        except ValueError:
            continue
        if scope == IPV6_SCOPE_LINK and not flags & IFA_F_DADFAILED:
            out.add(fields[5])
    return {
        n for n in out if (_read(f"/proc/sys/net/ipv6/conf/{n}/disable_ipv6") or "0")[:1] != "1"
    }


def _ipv4_address(probe: socket.socket, name: str) -> str | None:
    """The interface's primary IPv4 address (SIOCGIFADDR), or None when it has none."""
    req = struct.pack("256s", name.encode()[:15])
    try:
        res = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, req)
    except OSError:
        return None
    return socket.inet_ntoa(res[20:24])


def multicast_interfaces() -> list[tuple[int, str]]:
    """(index, name) of interfaces that are up, multicast-capable and not loopback."""
    out = []
    for idx, name in socket.if_nameindex():
        try:
            flags = int((_read(f"/sys/class/net/{name}/flags") or "").strip(), 16)
        except ValueError:
            continue
        if flags & IFF_UP and flags & IFF_MULTICAST and not flags & IFF_LOOPBACK:
            out.append((idx, name))
    return out


def links() -> list[Link]:
    """The interfaces to announce on, and which address families each can carry now."""
    ifaces = multicast_interfaces()
    if not ifaces:
        return []
    v6 = _ipv6_link_local_interfaces()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return [Link(idx, name, name in v6, _ipv4_address(probe, name)) for idx, name in ifaces]


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
        self._sockets: list[socket.socket] = []  # our own; the node's shared ones are not ours
        self._v6: socket.socket | None = None
        self._v4: socket.socket | None = None
        self._v4_mapped = False  # _v4 is the node's dual-stack socket: IPv4 hosts as ::ffff:a.b.c.d
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._joined: set[tuple[str, int]] = set()
        self._v4_rx: dict[str, socket.socket] = {}  # own receiving socket of each IPv4 group
        self._v6_groups = tuple(g for g in settings.group_hosts if ":" in g)
        self._v4_groups = tuple(g for g in settings.group_hosts if ":" not in g)
        # The IPv4 groups we listen on: the configured ones, else the fallback group, which every
        # node joins whether or not it needs the fallback itself, so it hears the neighbours that do.
        self._v4_listen = self._v4_groups or (DEFAULT_GROUP_V4,)
        self.links: tuple[Link, ...] = ()
        """The interfaces announced on at the last multicast, with the families each carries."""
        self.ipv4_neighbours = False
        """A known peer announced no IPv6 address: we announce on IPv4 on every link too."""
        self.send_errors = 0
        self.listeners: list[Callable[[DiscoveryEvent], None]] = []
        """Called with every discovery event, after this driver has handled it (the anchor
        driver mirrors admissions and expiries into its membership this way)."""

    async def start(self, shared: socket.socket | None = None) -> None:
        """Open the sockets, announce ourselves and ask the link who is there.

        `shared`: the node's own IPv6 data socket when it is bound to `[::]:group_port`. Then
        discovery rides on it (one port, as NEXUS-0 uses), the node hands us the BEACON/SOLICIT
        frames it receives (`feed`), and we only join the groups and send from it. The node's
        IPv4 socket on `0.0.0.0:group_port`, if any, is shared the same way.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        port = self.settings.group_port
        node_socks = self._node_sockets()
        if shared is None:
            shared = next(
                (s for s in node_socks if s.family == socket.AF_INET6 and _wildcard_on(s, port)),
                None,
            )
        shared4 = next(
            (s for s in node_socks if s.family == socket.AF_INET and _wildcard_on(s, port)), None
        )
        # Which families the node can carry data on at all (on any port): announcing on a family
        # the node cannot be dialled over would make peers dial a socket that drops all but
        # discovery frames.
        node_v6 = any(s.family == socket.AF_INET6 for s in node_socks)
        node_v4 = any(s.family == socket.AF_INET or _dual(s) for s in node_socks)
        if not node_socks:  # a node that exposes no sockets: assume both, as before
            node_v6 = node_v4 = True
        errors: list[str] = []
        if node_v6 and self._v6_groups:
            try:
                self._v6 = shared if shared is not None else self._own(socket.AF_INET6, "::", port)
                self._v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
                self._v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            except OSError as exc:  # no IPv6 in this kernel: the IPv4 fallback still works
                errors.append(f"IPv6: {exc}")
                self._v6 = None
        if node_v4:
            try:
                if shared4 is not None:
                    self._v4 = shared4
                elif shared is not None and _dual(shared):
                    self._v4, self._v4_mapped = shared, True
                else:
                    # No node socket to share. An own socket on 0.0.0.0:group_port would take,
                    # through SO_REUSEPORT, a share of the unicast of any other socket on that
                    # port (another node's data socket on this host, say; handshakes would
                    # time out there). So receive the groups on sockets bound to the group
                    # addresses themselves, to which the kernel delivers nothing but datagrams
                    # addressed to that group, and send from an ephemeral port of our own,
                    # where the unicast answers to our SOLICITs come back.
                    for group in self._v4_listen:
                        self._v4_rx[group] = self._own(socket.AF_INET, group, port)
                    self._v4 = self._own(socket.AF_INET, "0.0.0.0", 0)
                # IP-level options work on a dual-stack IPv6 socket too (Linux hands SOL_IP
                # options of AF_INET6 sockets to the IPv4 code): they govern its IPv4 traffic.
                self._v4.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                self._v4.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            except OSError as exc:
                errors.append(f"IPv4: {exc}")
                self._v4 = None
        if self._v6 is None and self._v4 is None:
            raise OSError(f"no discovery socket on port {port}: {'; '.join(errors) or 'no family'}")
        for err in errors:
            log.warning("discovery without %s", err)
        self.links = tuple(self._usable(links()))
        self._join()
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
            self._describe(),
            port,
            self.settings.mesh_name,
            ", keyed" if self.settings.mesh_key else "",
        )

    def _node_sockets(self) -> list[socket.socket]:
        # The node's listening sockets (node/udp.py). Read here rather than handed over so the
        # node only has to say "discovery, start"; the driver lives beside it in this package.
        udp = getattr(self.node, "_udp", None)
        socks = getattr(udp, "sockets", None)
        return [s for s in socks if isinstance(s, socket.socket)] if socks else []

    def _own(self, family: int, host: str, port: int) -> socket.socket:
        """A socket of our own (the node has none on the group port to share)."""
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._prepare(s)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
        except OSError:
            s.close()
            raise
        self._sockets.append(s)
        return s

    @staticmethod
    def _prepare(s: socket.socket) -> None:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(AttributeError, OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def _usable(self, found: Iterable[Link]) -> list[Link]:
        """The links as this node can use them: a family counts only with a socket for it."""
        return [
            Link(
                ln.index,
                ln.name,
                ln.ipv6 and self._v6 is not None,
                ln.ipv4 if self._v4 is not None else None,
            )
            for ln in found
        ]

    def _join(self) -> None:
        """Join the groups on every link not joined yet (links may come up after start).

        IPv4 joins name the interface (ip_mreqn with its index): a join on INADDR_ANY lands on
        whatever interface the routing table picks for the group, which with no multicast or
        default route is none at all.
        """
        for ln in self.links:
            if ln.ipv6 and self._v6 is not None:
                for group in self._v6_groups:
                    if (group, ln.index) not in self._joined:
                        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack(
                            "@I", ln.index
                        )
                        with contextlib.suppress(OSError):  # EADDRINUSE: already a member
                            self._v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                        self._joined.add((group, ln.index))
            if ln.ipv4 is not None and self._v4 is not None:
                for group in self._v4_listen:
                    if (group, ln.index) not in self._joined:
                        mreqn = _mreqn(group, "0.0.0.0", ln.index)
                        rx = self._v4_rx.get(group, self._v4)
                        with contextlib.suppress(OSError):
                            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                        self._joined.add((group, ln.index))

    def _describe(self) -> str:
        parts = []
        for ln in self.links:
            fams = []
            if ln.ipv6:
                fams.append("IPv6 " + " ".join(self._v6_groups))
            if ln.ipv4 is not None and self._v4_groups:
                fams.append("IPv4 " + " ".join(self._v4_groups))
            elif ln.ipv4 is not None and not ln.ipv6:
                fams.append(f"IPv4 {DEFAULT_GROUP_V4} fallback: no usable IPv6 link-local address")
            elif ln.ipv4 is not None and self.ipv4_neighbours:
                fams.append(f"IPv4 {DEFAULT_GROUP_V4} for IPv4-only neighbours")
            parts.append(f"{ln.name} ({'; '.join(fams) or 'no usable address: silent'})")
        return ", ".join(parts) or "no multicast interface"

    def _announced(self) -> list[Addr]:
        # The wildcard "::" stands for both families on the node's dual-stack socket; announce
        # its IPv6 half only while a link carries IPv6, so that a neighbour can tell an
        # IPv4-only node (and announce on IPv4 for it, see `_send_group`).
        v6 = any(ln.ipv6 for ln in self.links)
        out: list[Addr] = []
        for host, port in self.node.local_addresses():
            if host == "::":
                if v6:
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
        self._v4_rx.clear()
        self._v6 = self._v4 = None
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

    def _refresh(self, now: float) -> None:
        """Re-read the links before a multicast: interfaces come and go, IPv6 gets disabled or
        enabled, addresses change. Joins new links, re-announces, and logs what changed."""
        core = self.core
        if core is None:
            return
        fresh = tuple(self._usable(links()))
        v4_only = any(
            p.addresses and all(":" not in h for h, _ in p.addresses) for p in core.peers()
        )
        if fresh == self.links and v4_only == self.ipv4_neighbours:
            return
        before = self._describe()
        self.links, self.ipv4_neighbours = fresh, v4_only
        self._join()
        core.set_addresses(self._announced(), now)  # a no-op unless it changed
        if self._describe() != before:
            log.info("discovery now on %s", self._describe())

    def _send(self, data: bytes, addr: Addr) -> None:
        host, port = addr
        if host in self.settings.group_hosts:
            self._send_group(data, host, port)
            return
        try:
            if ":" in host and self._v6 is not None:
                self._v6.sendto(data, (host, port))
            elif ":" not in host and self._v4 is not None:
                self._v4.sendto(data, self._v4_target(host, port))
            else:
                self.send_errors += 1
        except OSError:
            self.send_errors += 1

    def _send_group(self, data: bytes, group: str, port: int) -> None:
        """One multicast of the core, on every link in the family (or families) it can carry."""
        if ":" in group:
            for ln in self.links:
                if ln.ipv6 and self._v6 is not None:
                    target6 = (group, port, 0, ln.index)
                    self._try(
                        self._v6,
                        socket.IPPROTO_IPV6,
                        socket.IPV6_MULTICAST_IF,
                        ln.index,
                        data,
                        target6,
                    )
            # The fallback rides on the first IPv6 group only (the core sends once per group),
            # and only when no IPv4 group is configured: those already go out on every link.
            if self._v4_groups or group != self._v6_groups[0]:
                return
            targets = [
                ln
                for ln in self.links
                if ln.ipv4 is not None and (not ln.ipv6 or self.ipv4_neighbours)
            ]
            group = DEFAULT_GROUP_V4
        else:
            targets = [ln for ln in self.links if ln.ipv4 is not None]
        if self._v4 is None:
            return
        for ln in targets:
            assert ln.ipv4 is not None
            # IP_MULTICAST_IF with the interface index (ip_mreqn): without it the kernel routes
            # the group like any destination, and with no multicast or default route the send
            # fails (or leaves by the wrong interface).
            mreqn = _mreqn("0.0.0.0", ln.ipv4, ln.index)
            target4 = self._v4_target(group, port)
            self._try(self._v4, socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn, data, target4)

    def _try(
        self,
        s: socket.socket,
        level: int,
        opt: int,
        value: int | bytes,
        data: bytes,
        target: tuple[str, int] | tuple[str, int, int, int],
    ) -> None:
        # One link failing (going down under us, say) must not keep the others from hearing us.
        try:
            s.setsockopt(level, opt, value)
            s.sendto(data, target)
        except OSError:
            self.send_errors += 1

    def _v4_target(self, host: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
        return (_MAPPED + host, port, 0, 0) if self._v4_mapped else (host, port)

    def _pump(self) -> None:
        core = self.core
        loop = self._loop
        if core is None or loop is None:
            return
        out = core.datagrams_to_send()
        if any(host in self.settings.group_hosts for _, (host, _) in out):
            self._refresh(loop.time())
        for data, addr in out:
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


def _mreqn(group: str, address: str, index: int) -> bytes:
    """struct ip_mreqn: group, local address, interface index (linux/in.h)."""
    return socket.inet_aton(group) + socket.inet_aton(address) + struct.pack("@i", index)


def _wildcard_on(s: socket.socket, port: int) -> bool:
    host, bound = s.getsockname()[:2]
    return bool(host in ("::", "0.0.0.0") and bound == port)


def _dual(s: socket.socket) -> bool:
    """An IPv6 socket that carries IPv4 too (IPV6_V6ONLY off)."""
    if s.family != socket.AF_INET6:
        return False
    try:
        return s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except OSError:
        return False
