"""`Node`: a cellmesh node inside an asyncio application (and the daemon behind `cellmesh node`).

Theory of operation: the node owns one `Endpoint` (the sans-IO core), its UDP sockets and one timer.
It only loops: on socket readiness it drains every queued datagram into the core, sends what the core
returns, dispatches the core's events to whoever awaits them, and re-arms the single timer at
`endpoint.get_timer()`. All protocol decisions live in the core.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections import defaultdict
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from cellmesh.config import NodeConfig, parse_beacon_tags, parse_host_port
from cellmesh.discovery.beacon import Capabilities
from cellmesh.discovery.settings import DiscoverySettings
from cellmesh.errors import LocalProtocolError, PeerUnreachableError
from cellmesh.filter.inspection import Inspector
from cellmesh.identity.cellid import format_cell_id, parse_cell_id
from cellmesh.identity.keys import Identity
from cellmesh.node.allocator import tune_malloc
from cellmesh.node.anchor import ANCHOR_MAGIC, AnchorDriver
from cellmesh.node.blob_service import BlobService
from cellmesh.node.channels import ChannelDriver
from cellmesh.node.discovery import DiscoveryDriver
from cellmesh.node.inbox import DatagramInbox
from cellmesh.node.membership import cert_dict, load_membership_cert, session_admission
from cellmesh.node.routing import RoutingDriver
from cellmesh.node.services import StreamServices
from cellmesh.node.state import StateDriver
from cellmesh.node.streams import Stream, StreamError, peer_gone
from cellmesh.node.udp import Addr, UdpSockets, format_addr
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import (
    ChannelMessageReceived,
    DatagramReceived,
    EndpointStats,
    HandshakeFailed,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    PeerInfo,
    PeerMoved,
    PingReply,
    RouteMessageReceived,
    StreamData,
    StreamFinished,
    StreamOpened,
    StreamReset,
    StreamWritable,
    TraceReply,
)
from cellmesh.wire.header import FrameType

log = logging.getLogger("cellmesh.node")
MAX_INBOX = 4096
DISCOVERY_TYPES = frozenset((int(FrameType.BEACON), int(FrameType.SOLICIT)))
MAX_ACCEPT_BACKLOG = 64
CORK_LIMIT = 64  # application calls that may wait for the end of a loop turn (one GSO batch)
REFUSED = 2


class _PingTimeout(Exception):
    """No PONG came in time (turned into PeerUnreachableError by `Node.ping`)."""


def _expire_ping(fut: asyncio.Future[float]) -> None:
    if not fut.done():
        fut.set_exception(_PingTimeout())


def _as_cell(cell_id: bytes | str) -> bytes:
    return parse_cell_id(cell_id) if isinstance(cell_id, str) else cell_id


def resolve_addr(spec: str) -> Addr:
    """HOST:PORT to a numeric (host, port), resolving a name once (static peers only)."""
    host, port = parse_host_port(spec)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise PeerUnreachableError(f"cannot resolve {spec}: {exc.strerror}") from exc
    fam, _, _, _, sa = infos[0]
    h = str(sa[0])
    if fam == socket.AF_INET6 and h.startswith("::ffff:") and "." in h:
        h = h[7:]
    return h, int(sa[1])


class Node:
    """A running cellmesh node. Use as `async with Node(identity, config) as node: ...`."""

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig | None = None,
        discovery: DiscoverySettings | None = None,
        inspectors: list[Inspector] | None = None,
    ) -> None:
        self.identity = identity
        self._inspectors = inspectors
        self.config = config if config is not None else NodeConfig()
        # Discovery runs only where it can mean something and is wanted: settings were given (or
        # config.discovery is on) and the node listens on a wildcard address. A node bound to
        # loopback only, as in local tests, never multicasts.
        self._discovery_settings = discovery
        self.discovery: DiscoveryDriver | None = None
        self.anchor: AnchorDriver | None = None
        """The anchor election (node/anchor.py): runs while discovery does and config.anchor."""
        self.started_at = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: UdpSockets | None = None
        self._endpoint: Endpoint | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._writing = False
        self._corked = 0  # application calls whose output waits for the end of this loop turn
        self._cork_scheduled = False
        self._ping_waiters: dict[int, tuple[bytes, asyncio.Future[float]]] = {}
        self._connect_waiters: dict[bytes, list[asyncio.Future[bytes]]] = defaultdict(list)
        self._addr_waiters: dict[Addr, list[asyncio.Future[bytes]]] = defaultdict(list)
        self._inbox = DatagramInbox(MAX_INBOX)
        self._streams: dict[tuple[bytes, int], Stream] = {}
        self._accept: asyncio.Queue[Stream] = asyncio.Queue(MAX_ACCEPT_BACKLOG)
        # Unbounded on purpose: each peer may have at most MESSAGE_WINDOW messages here that
        # the application has not taken (message credit, Endpoint.manual_message_credit), so
        # none is ever dropped after the transport acknowledged it.
        self._messages: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        self._stopped = asyncio.Event()
        self._channels: ChannelDriver | None = None
        self._state: StateDriver | None = None
        self.routing: RoutingDriver | None = None
        self._lane_of: dict[bytes, Addr] = {}  # peers with a socket of their own
        self.services = StreamServices(self)
        """Stream kinds the node serves itself (sync, blobs, queries): node/services.py."""
        self.blobs = BlobService(self)
        """Blob exchange with peers (node/blob_service.py): serves "blob" streams, `fetch`."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def cell_id(self) -> bytes:
        """This node's CellID (16 bytes)."""
        return self.identity.cell_id

    @property
    def endpoint(self) -> Endpoint:
        """The protocol core (for statistics and tests)."""
        if self._endpoint is None:
            raise LocalProtocolError("node is not running")
        return self._endpoint

    @property
    def channels(self) -> ChannelDriver:
        """Channels, access control, capabilities and inspection (see `ChannelDriver`)."""
        if self._channels is None:
            raise LocalProtocolError("node is not running")
        return self._channels

    @property
    def state(self) -> StateDriver:
        """Signed, durable channel logs (see `StateDriver`); needs config.database."""
        if self._state is None:
            if self._channels is None:
                raise LocalProtocolError("node is not running")
            raise LocalProtocolError(
                "no state database: set database (an absolute path, or relative to a home)"
            )
        return self._state

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind sockets, start the core, dial static peers."""
        loop = asyncio.get_running_loop()
        if self.config.tune_malloc:
            tune_malloc()  # (node/allocator.py: why, and what it costs)
        # Settings first: a bad membership certificate is a ConfigError before anything is bound.
        settings = self._discovery_settings
        if settings is None and self.config.discovery:
            settings = discovery_settings_from(self.config, self.cell_id)
        membership = settings
        if membership is None and (self.config.mesh_authorities or self.config.membership_cert):
            membership = discovery_settings_from(self.config, self.cell_id)
        self._loop = loop
        self._udp = UdpSockets(self.config.listen, self.config.recv_buffer)
        now = loop.time()
        self._endpoint = Endpoint(
            self.identity, self.config, now, random.Random(), os.urandom, time.time() - now
        )
        self._endpoint.manual_message_credit = True  # recv_message takes them: see there
        self._endpoint.datagram_sink = self._inbox.put  # straight to recv_datagram's inbox
        self._endpoint.stream_sink = self._take_stream_data  # straight to the Stream object
        if membership is not None:
            # Certificates gate sessions too, not only discovery (node/membership.py).
            self._endpoint.set_membership(*session_admission(membership))
        try:
            self._channels = ChannelDriver(self, self._inspectors)
        except BaseException:
            self._udp.close()
            self._endpoint = None
            raise
        self._channels.start()
        # A relative database path is only meaningful against a home directory (NodeHome
        # resolves it); a Node built from a bare NodeConfig opens no database then.
        if self.config.database and os.path.isabs(self.config.database):
            try:
                self._state = StateDriver(self, self.config.database)
            except BaseException:
                self._channels.stop()
                self._udp.close()
                self._endpoint = None
                raise
            self._state.start()
        self.blobs.start()
        if self.config.routing:
            self.routing = RoutingDriver(self)
            self.routing.start()
            self._endpoint.set_relay_admission(self._channels.relay_admission())
        self._udp_local_check()
        for sock in self._udp.sockets:
            loop.add_reader(sock.fileno(), self._on_readable, sock)
        for spec in self.config.peers:
            try:
                addr = resolve_addr(spec)
            except PeerUnreachableError as exc:
                log.warning("static peer skipped: %s", exc)
                continue
            self._endpoint.add_static_peer(addr, loop.time())
        if settings is not None and any(
            host in ("::", "0.0.0.0") for host, _ in self.local_addresses()
        ):
            self.discovery = DiscoveryDriver(self, settings)
            shared = next(
                (
                    sk
                    for sk in self._udp.sockets
                    if sk.family == socket.AF_INET6
                    and sk.getsockname()[0] == "::"
                    and sk.getsockname()[1] == settings.group_port
                ),
                None,
            )
            try:
                await self.discovery.start(shared)
            except OSError as exc:
                log.warning("discovery disabled: %s", exc)
                self.discovery.stop()
                self.discovery = None
        if self.discovery is not None and self.config.anchor:
            self.anchor = AnchorDriver(self)  # members come from discovery: only beside it
            self.anchor.start()
        log.info(
            "node %s listening on %s",
            format_cell_id(self.cell_id),
            ", ".join(format_addr(a) for a in self.local_addresses()),
        )
        self._pump()

    async def stop(self) -> None:
        """Close sessions politely, then the sockets."""
        if self._endpoint is None or self._loop is None or self._udp is None:
            return
        if self.anchor is not None:
            self.anchor.stop()
            self.anchor = None
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
        await self.blobs.stop()
        await self.services.stop()
        if self._state is not None:
            self._state.close()
            self._state = None
        if self._channels is not None:
            self._channels.stop()
        if self.routing is not None:
            self.routing.stop()
        self._endpoint.shutdown(self._loop.time())
        self._pump()
        if self._timer is not None:
            self._timer.cancel()
        for cell in list(self._lane_of):
            self._close_lane(cell)
        for sock in self._udp.sockets:
            self._loop.remove_reader(sock.fileno())
        if self._writing:
            for sock in self._udp.sockets:
                self._loop.remove_writer(sock.fileno())
        self._udp.close()
        for _, fut in self._ping_waiters.values():
            if not fut.done():
                fut.set_exception(PeerUnreachableError("node stopped"))
        self._endpoint = None
        self._stopped.set()

    def request_stop(self) -> None:
        """Ask `serve_forever` to return (signal handlers call this)."""
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Run until `request_stop` is called."""
        await self._stopped.wait()

    def _open_lane(self, cell: bytes, addr: Addr) -> None:
        """A socket of the peer's own (see `UdpSockets.open_lane`): its traffic keeps flowing
        while a flood fills the shared socket."""
        udp, loop = self._udp, self._loop
        if udp is None or loop is None or addr[0].startswith("~") or cell in self._lane_of:
            return
        sock = udp.open_lane(addr)
        if sock is not None:
            self._lane_of[cell] = addr
            loop.add_reader(sock.fileno(), self._on_readable, sock)
            if self._writing:
                loop.add_writer(sock.fileno(), self._on_writable)

    def _close_lane(self, cell: bytes) -> None:
        addr = self._lane_of.pop(cell, None)
        udp, loop = self._udp, self._loop
        if addr is None or udp is None or loop is None:
            return
        sock = udp.close_lane(addr)
        if sock is not None:
            loop.remove_reader(sock.fileno())
            if self._writing:
                loop.remove_writer(sock.fileno())
            sock.close()

    def _udp_local_check(self) -> None:
        """Give the endpoint what NAT traversal needs from the operating system: a test for
        "this address is one of our sockets" and the specific addresses we listen on."""
        ep = self._endpoint
        if ep is None:
            return
        ports = {port for _, port in self.local_addresses()}
        cache: dict[str, bool] = {}

        def is_local(addr: Addr) -> bool:
            if addr[1] not in ports:
                return False
            host = addr[0]
            if host not in cache:
                cache[host] = _ip_is_ours(host)
            return cache[host]

        ep.set_local_check(is_local)
        ep.set_local_candidates(self.local_addresses())

    def local_addresses(self) -> list[Addr]:
        """The addresses the node listens on, with real ports."""
        return self._udp.local_addresses() if self._udp is not None else []

    # ------------------------------------------------------------------ driver loop

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_readable(self, sock: socket.socket) -> None:
        ep = self._endpoint
        udp = self._udp
        if ep is None or udp is None:
            return
        receive = ep.receive_datagram
        clock = self._loop.time if self._loop is not None else time.monotonic
        disc = self.discovery
        anchor = self.anchor
        # A timestamp per read, not per batch: a batch of hundreds would otherwise make RTT
        # samples look shorter than the path and shrink the congestion window.
        if disc is None:
            udp.drain_timed(sock, receive, clock, ep.receive_batch)
        else:
            # Discovery shares the port: BEACON and SOLICIT frames (type byte 6 or 7) go to it.
            # Anchor messages (byte 0 is 0xCA, never a wire version) go to the anchor driver
            # while it runs; otherwise the endpoint drops them as bad_version.
            def deliver(data: bytes, addr: Addr, now: float) -> None:
                if anchor is not None and data and data[0] == ANCHOR_MAGIC:
                    anchor.feed(data, addr, now)
                elif len(data) > 1 and data[1] in DISCOVERY_TYPES:
                    disc.feed(data, addr, now)
                else:
                    receive(data, addr, now)

            def deliver_many(batch: list[bytes], addr: Addr, now: float) -> None:
                # A GRO batch is one peer's run of equal-sized datagrams: nearly always frames
                # for the endpoint, which takes them together.
                for data in batch:
                    if (anchor is not None and data and data[0] == ANCHOR_MAGIC) or (
                        len(data) > 1 and data[1] in DISCOVERY_TYPES
                    ):
                        for one in batch:
                            deliver(one, addr, now)
                        return
                receive_batch(batch, addr, now)

            receive_batch = ep.receive_batch
            udp.drain_timed(sock, deliver, clock, deliver_many)
            disc.flush()
            if anchor is not None:
                anchor.flush()
        self._pump()

    def _on_writable(self) -> None:
        udp = self._udp
        if udp is None:
            return
        udp.flush_backlog()
        if not udp.has_backlog:
            self._set_writing(False)

    def _set_writing(self, on: bool) -> None:
        if self._loop is None or self._udp is None or on == self._writing:
            return
        self._writing = on
        for sock in self._udp.all_sockets():
            if on:
                self._loop.add_writer(sock.fileno(), self._on_writable)
            else:
                self._loop.remove_writer(sock.fileno())

    def _pump_soon(self) -> None:
        """Send what an application call produced at the end of this turn of the event loop.

        A burst of `send_datagram` / `send_message` / stream writes made without yielding then
        shares packets (small records coalesce) and leaves in GSO batches: one `sendmsg` for up
        to 64 datagrams instead of one syscall, timer check and flush each. Latency does not
        suffer (the output leaves before the loop polls again), and at most CORK_LIMIT calls
        wait, so a long synchronous burst still streams out and never piles up in memory.
        """
        self._corked += 1
        if self._corked >= CORK_LIMIT:
            self._pump()
        elif not self._cork_scheduled and self._loop is not None:
            self._cork_scheduled = True
            self._loop.call_soon(self._uncork)

    def _uncork(self) -> None:
        self._cork_scheduled = False
        if self._corked:
            self._pump()

    def _pump(self) -> None:
        self._corked = 0
        ep = self._endpoint
        udp = self._udp
        if ep is None or udp is None or self._loop is None:
            return
        out = ep.datagrams_to_send()
        if out:
            udp.send_many(out)
        if udp.has_backlog:
            self._set_writing(True)
        while (ev := ep.next_event()) is not None:
            self._dispatch(ev)
        when = ep.get_timer()
        if when is None:
            return
        if self._timer is not None:
            if abs(self._timer_when - when) < 1e-4:
                return
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._endpoint is None:
            return
        self._endpoint.handle_timer(self._now())
        self._pump()

    def _take_stream_data(
        self, cell_id: bytes, stream_id: int, data: bytes | memoryview, fin: bool
    ) -> bool:
        """The endpoint's stream sink: bytes for a stream we hold go straight to it."""
        st = self._streams.get((cell_id, stream_id))
        if st is None:
            return False  # (a StreamData event then: `_dispatch` knows what to do with it)
        st._feed(data, fin)
        return True

    def _dispatch(self, ev: object) -> None:
        # The per-packet events first: this chain runs once per datagram received.
        if isinstance(ev, DatagramReceived):
            self._inbox.put(ev.cell_id, ev.data)  # (the endpoint's sink takes most directly)
        elif isinstance(ev, MessageReceived):
            self._messages.put_nowait((ev.cell_id, ev.data))
        elif isinstance(ev, StreamData):
            st = self._streams.get((ev.cell_id, ev.stream_id))
            if st is not None:
                st._feed(ev.data, ev.fin)
            elif self._endpoint is not None:
                # Data for a stream nobody holds (refused or dropped): consume it so windows move.
                self._endpoint.stream_consumed(ev.cell_id, ev.stream_id, len(ev.data), self._now())
        elif isinstance(ev, StreamWritable):
            st = self._streams.get((ev.cell_id, ev.stream_id))
            if st is not None:
                st._on_writable()
        elif isinstance(ev, StreamFinished):
            st = self._streams.get((ev.cell_id, ev.stream_id))
            if st is not None:
                st._on_finished()
                if st.at_eof:
                    del self._streams[(ev.cell_id, ev.stream_id)]
        elif isinstance(ev, StreamOpened):
            st = Stream(self, ev.cell_id, ev.stream_id)
            self._streams[(ev.cell_id, ev.stream_id)] = st
            if self.services.active:
                if not self.services.route(st):
                    self._refuse_stream(st)
            else:
                self._hand_to_application(st)
        elif isinstance(ev, StreamReset):
            st = self._streams.pop((ev.cell_id, ev.stream_id), None)
            if st is not None:
                who = "the peer" if ev.by_peer else "us"
                st._fail(StreamError(f"stream reset by {who} (code {ev.code})", ev.code))
        elif isinstance(ev, ChannelMessageReceived):
            if self._channels is not None:
                self._channels.on_message(ev)
        elif isinstance(ev, RouteMessageReceived):
            if self.routing is not None:
                self.routing.on_message(ev.cell_id, ev.data)
        elif isinstance(ev, TraceReply):
            if self.routing is not None:
                self.routing.on_trace_reply(ev)
        elif isinstance(ev, PeerMoved):
            log.info("peer %s now at %s", format_cell_id(ev.cell_id), format_addr(ev.addr))
            self._close_lane(ev.cell_id)
            self._open_lane(ev.cell_id, ev.addr)
            if self.routing is not None:
                self.routing.on_moved(ev.cell_id, ev.addr)
        elif isinstance(ev, PingReply):
            w = self._ping_waiters.pop(ev.ping_id, None)
            if w is not None and not w[1].done():
                w[1].set_result(ev.rtt)
        elif isinstance(ev, PeerConnected):
            if not ev.rekey:
                log.info(
                    "peer %s connected from %s (%s)",
                    format_cell_id(ev.cell_id),
                    format_addr(ev.addr),
                    "we dialled" if ev.initiator else "they dialled",
                )
            for waiter in self._connect_waiters.pop(ev.cell_id, []):
                if not waiter.done():
                    waiter.set_result(ev.cell_id)
            for waiter in self._addr_waiters.pop(ev.addr, []):
                if not waiter.done():
                    waiter.set_result(ev.cell_id)
            if not ev.rekey and self._channels is not None:
                self._channels.on_connected(ev.cell_id)
            self._open_lane(ev.cell_id, ev.addr)
            if self.routing is not None:
                self.routing.on_connected(ev.cell_id, ev.addr)
        elif isinstance(ev, PeerDisconnected):
            log.info("peer %s disconnected: %s", format_cell_id(ev.cell_id), ev.reason)
            err = peer_gone(format_cell_id(ev.cell_id), ev.reason)
            for key in [k for k in self._streams if k[0] == ev.cell_id]:
                self._streams.pop(key)._fail(err)
            if self._channels is not None:
                self._channels.on_gone(ev.cell_id)
            self._close_lane(ev.cell_id)
            if self.routing is not None:
                self.routing.on_gone(ev.cell_id)
        elif isinstance(ev, HandshakeFailed):
            who = format_cell_id(ev.cell_id) if ev.cell_id else format_addr(ev.addr)
            log.warning("handshake with %s failed: %s", who, ev.reason)
            err = PeerUnreachableError(f"handshake with {who} failed: {ev.reason}")
            waiters = self._addr_waiters.pop(ev.addr, [])
            if ev.cell_id is not None:
                waiters += self._connect_waiters.pop(ev.cell_id, [])
                for pid, (cell, pending) in list(self._ping_waiters.items()):
                    if cell == ev.cell_id and not pending.done():
                        pending.set_exception(err)
                        del self._ping_waiters[pid]
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(err)

    # ------------------------------------------------------------------ application API

    async def connect(self, addr: str | Addr, timeout: float = 5.0) -> bytes:
        """Handshake with whoever listens at `addr`; returns its CellID."""
        target = resolve_addr(addr) if isinstance(addr, str) else addr
        ep = self.endpoint
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._addr_waiters[target].append(fut)
        ep.connect(target, self._now())
        self._pump()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise PeerUnreachableError(
                f"no handshake with {format_addr(target)} within {timeout:g} s"
            ) from None

    async def ping(self, cell_id: bytes | str, timeout: float = 2.0, data: bytes = b"") -> float:
        """Encrypted echo to `cell_id`; returns the round-trip time in seconds.

        Raises `PeerUnreachableError` if the peer is unknown, the handshake fails, or no reply
        comes within `timeout`.
        """
        cell = _as_cell(cell_id)
        ep = self.endpoint
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        pid = ep.send_ping(cell, loop.time(), data)
        self._ping_waiters[pid] = (cell, fut)
        self._pump()
        # A timer handle rather than asyncio.wait_for: no extra task and loop turn per ping,
        # which is most of what an echo over loopback costs beyond the protocol itself.
        expire = loop.call_later(timeout, _expire_ping, fut)
        try:
            return await fut
        except _PingTimeout:
            raise PeerUnreachableError(
                f"no reply from {format_cell_id(cell)} within {timeout:g} s"
            ) from None
        finally:
            expire.cancel()
            self._ping_waiters.pop(pid, None)

    def send_datagram(self, cell_id: bytes | str, data: bytes) -> None:
        """Send one encrypted, unreliable datagram (queued behind a handshake if needed)."""
        ep = self._endpoint
        if ep is None or self._loop is None:
            raise LocalProtocolError("node is not running")
        ep.send_datagram(
            cell_id if type(cell_id) is bytes else _as_cell(cell_id), data, self._loop.time()
        )
        self._pump_soon()

    async def recv_datagram(self) -> tuple[bytes, bytes]:
        """The next (CellID, data) application datagram received."""
        item = self._inbox.get_nowait()  # most calls find one waiting: no inner coroutine
        return item if item is not None else await self._inbox.get()

    async def recv_datagrams(self, limit: int = 1024) -> list[tuple[bytes, bytes]]:
        """Every (CellID, data) datagram waiting, up to `limit`; waits for the first one.

        The same datagrams in the same order as `recv_datagram`, a batch per call: a reader
        that keeps up with a fast peer spends one await per batch instead of one per datagram.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._inbox.get_batch(limit)

    @property
    def inbox_dropped(self) -> int:
        """Application datagrams dropped because the inbox (MAX_INBOX) was full."""
        return self._inbox.dropped

    def _learn_and_dial(self, cell_id: bytes, noise_static: bytes, addr: Addr) -> None:
        """A peer discovered on the link: remember its key and open a Noise IK session."""
        ep = self._endpoint
        if ep is None or cell_id == self.cell_id:
            return
        ep.learn_peer(cell_id, noise_static, addr)
        if ep.session_for(cell_id) is None:
            ep.connect(addr, self._now(), cell_id)
            self._pump()

    # ------------------------------------------------------------------ streams and messages

    async def ensure_connected(self, cell_id: bytes | str, timeout: float = 5.0) -> bytes:
        """Make sure a session with `cell_id` exists (handshaking if needed); returns the CellID."""
        cell = _as_cell(cell_id)
        ep = self.endpoint
        if ep.session_for(cell) is not None:
            return cell
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._connect_waiters[cell].append(fut)
        # A ping triggers the handshake towards the known address (or raises if unknown).
        ep.send_ping(cell, self._now())
        self._pump()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise PeerUnreachableError(
                f"no session with {format_cell_id(cell)} within {timeout:g} s"
            ) from None

    async def open_stream(self, cell_id: bytes | str, timeout: float = 5.0) -> Stream:
        """Open a reliable, ordered byte stream to `cell_id` (connecting first if needed)."""
        cell = await self.ensure_connected(cell_id, timeout)
        sid = self.endpoint.open_stream(cell)
        st = Stream(self, cell, sid)
        self._streams[(cell, sid)] = st
        return st

    def _hand_to_application(self, st: Stream) -> None:
        """Queue an incoming stream for `accept_stream` (refused when the backlog is full)."""
        try:
            self._accept.put_nowait(st)
        except asyncio.QueueFull:
            self._refuse_stream(st)

    def _refuse_stream(self, st: Stream) -> None:
        self._streams.pop((st.cell_id, st.stream_id), None)
        st._fail(StreamError("refused: accept backlog full", REFUSED))
        if self._endpoint is not None:
            now = self._now()
            try:
                self._endpoint.stream_stop(st.cell_id, st.stream_id, REFUSED, now)
                self._endpoint.stream_reset(st.cell_id, st.stream_id, REFUSED, now)
            except PeerUnreachableError:
                return
            if self._loop is not None:
                self._loop.call_soon(self._pump)  # may run inside _dispatch: no re-entry

    async def accept_stream(self) -> Stream:
        """The next stream a peer opened to us."""
        return await self._accept.get()

    async def send_message(self, cell_id: bytes | str, data: bytes, timeout: float = 5.0) -> None:
        """Send a reliable (retransmitted until acknowledged), unordered message."""
        cell = await self.ensure_connected(cell_id, timeout)
        self.endpoint.send_message(cell, data, self._now())
        self._pump_soon()

    async def recv_message(self) -> tuple[bytes, bytes]:
        """The next (CellID, data) reliable message. Taking it lets that peer send one more:
        a peer whose messages are not taken stops after MESSAGE_WINDOW (its `send_message`
        then queues, and raises once its queue is full), so nothing is lost."""
        cell, data = await self._messages.get()
        if self._endpoint is not None:
            self._endpoint.messages_consumed(cell, 1, self._now())
            self._pump_soon()
        return cell, data

    def _stream_space(self, st: Stream) -> int:
        try:
            return self.endpoint.stream_send_space(st.cell_id, st.stream_id)
        except PeerUnreachableError as exc:
            st._fail(exc)
            raise

    def _stream_write(self, st: Stream, data: bytes, fin: bool) -> None:
        try:
            self.endpoint.stream_write(st.cell_id, st.stream_id, data, self._now(), fin=fin)
        except PeerUnreachableError as exc:
            st._fail(exc)
            raise
        self._pump_soon()

    def _stream_eof(self, st: Stream) -> None:
        """The application read to the end of the stream."""
        if st._acknowledged.is_set():
            self._streams.pop((st.cell_id, st.stream_id), None)  # both halves are finished

    def _stream_consumed(self, st: Stream, n: int) -> None:
        if st.at_eof and st._acknowledged.is_set():
            self._streams.pop((st.cell_id, st.stream_id), None)  # both halves are finished
        if self._endpoint is not None:
            self._endpoint.stream_consumed(st.cell_id, st.stream_id, n, self._now())
            self._pump_soon()

    def _stream_reset(self, st: Stream, code: int) -> None:
        if self._endpoint is None:
            return
        now = self._now()
        try:
            self._endpoint.stream_reset(st.cell_id, st.stream_id, code, now)
            self._endpoint.stream_stop(st.cell_id, st.stream_id, code, now)
        except PeerUnreachableError:
            return
        self._streams.pop((st.cell_id, st.stream_id), None)
        self._pump()

    def peer_rows(self) -> list[dict[str, Any]]:
        """Connected peers merged with what discovery knows (what `cellmesh peers` shows)."""
        rows: dict[bytes, dict[str, Any]] = {p.cell_id: peer_dict(p) for p in self.peers()}
        if self.discovery is not None and self._loop is not None:
            now = self._loop.time()
            for rec in self.discovery.peers():
                row = rows.get(rec.cell_id)
                if row is None:
                    row = {
                        "cell_id": format_cell_id(rec.cell_id),
                        "public_key": rec.public_key.hex(),
                        "address": format_addr(rec.observed_addr),
                        "state": "discovered",
                    }
                    rows[rec.cell_id] = row
                row["discovered"] = {
                    "name": rec.name,
                    "type": rec.node_type,
                    "zone": rec.zone,
                    "ego": rec.ego,
                    "capabilities": {
                        "relay": rec.caps.relay,
                        "storage": rec.caps.storage,
                        "anchor_eligible": rec.caps.anchor_eligible,
                        "bandwidth_class": rec.caps.bandwidth_class,
                    },
                    "tags": dict(rec.tags),
                    "first_seen_s_ago": round(now - rec.first_seen, 3),
                    "last_seen_s_ago": round(now - rec.last_seen, 3),
                    "interval_s": round(rec.interval, 3),
                    "state": str(rec.state.value)
                    if hasattr(rec.state, "value")
                    else str(rec.state),
                }
        return list(rows.values())

    def peers(self) -> list[PeerInfo]:
        """Connected peers."""
        return self.endpoint.peers(self._now())

    def statistics(self) -> EndpointStats:
        """Protocol counters, including drops by reason."""
        return self.endpoint.statistics()

    def status(self) -> dict[str, Any]:
        """What `cellmesh status` and the control API report about this node."""
        stats = self.statistics()
        udp = self._udp.stats if self._udp is not None else None
        return {
            "cell_id": format_cell_id(self.cell_id),
            "public_key": self.identity.public_key.hex(),
            "name": self.config.name,
            "listen": [format_addr(a) for a in self.local_addresses()],
            "uptime": time.time() - self.started_at,
            "stats": stats_dict(stats),
            "socket": {
                "send_errors": udp.send_errors if udp else 0,
                "send_dropped": udp.send_dropped if udp else 0,
                "recv_errors": udp.recv_errors if udp else 0,
                "deliver_errors": udp.deliver_errors if udp else 0,
                "gso": bool(self._udp is not None and self._udp.gso),
                "gso_batches": udp.gso_batches if udp else 0,
                "gro_batches": udp.gro_batches if udp else 0,
            },
            "inbox_dropped": self.inbox_dropped,
            "discovery": self.discovery_status(),
        }

    def discovery_status(self) -> dict[str, Any] | None:
        """Discovery's counters and what this node announces, or None when it is not running.

        Refused beacons and SOLICITs never reach the transport, so without these counters a
        node that hears nobody (wrong mesh key, missing certificate, skewed clock) would look
        exactly like one alone on its link.
        """
        disc = self.discovery
        core = disc.core if disc is not None else None
        if disc is None or core is None:
            return None
        s = disc.settings
        st = core.statistics()
        return {
            "mesh_name": s.mesh_name,
            "keyed": s.mesh_key is not None,
            "peers": st.peers,
            "received": st.datagrams_received,
            "admitted": st.beacons_accepted + st.solicits_accepted,
            "beacons_accepted": st.beacons_accepted,
            "solicits_accepted": st.solicits_accepted,
            "beacons_sent": st.beacons_sent,
            "replies_sent": st.replies_sent,
            "solicits_sent": st.solicits_sent,
            "suppressed": st.suppressed,
            "forced": st.forced,
            "introductions": st.introductions,
            "asks": st.asks,
            "trickle_interval_s": round(st.trickle_interval, 3),
            "announce_interval_s": round(st.announce_interval, 3),
            "drops": dict(sorted((k, v) for k, v in st.drops.items() if v)),
            "announced": {
                "capabilities": {
                    "relay": s.caps.relay,
                    "storage": s.caps.storage,
                    "anchor_eligible": s.caps.anchor_eligible,
                    "bandwidth_class": s.caps.bandwidth_class,
                },
                "tags": dict(s.tags),
                "ego": s.ego,
            },
            "admission": {
                "allowlist": len(s.allowlist) if s.allowlist is not None else None,
                "authorities": sorted(k.hex() for k in s.authority_keys),
                "membership_cert": cert_dict(s.membership_cert)
                if s.membership_cert is not None
                else None,
            },
        }


def stats_dict(s: EndpointStats) -> dict[str, Any]:
    """EndpointStats as plain JSON-able data."""
    return {
        "datagrams_in": s.datagrams_in,
        "datagrams_out": s.datagrams_out,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
        "sessions": s.sessions,
        "pending_initiations": s.pending_initiations,
        "pending_responses": s.pending_responses,
        "handshakes_completed": s.handshakes_completed,
        "cookies_sent": s.cookies_sent,
        "drops": dict(sorted(s.drops.items())),
    }


def peer_dict(p: PeerInfo) -> dict[str, Any]:
    """PeerInfo as plain JSON-able data."""
    return {
        "cell_id": format_cell_id(p.cell_id),
        "public_key": p.public_key.hex(),
        "address": format_addr(p.addr),
        "rtt_ms": None if p.rtt is None else round(p.rtt * 1000, 3),
        "session_age_s": round(p.session_age, 3),
        "last_seen_s": round(p.last_seen, 3),
        "initiator": p.initiator,
        "packets_in": p.packets_in,
        "packets_out": p.packets_out,
        "bytes_in": p.bytes_in,
        "bytes_out": p.bytes_out,
        "sessions": p.sessions,
        "state": p.state,
        "mtu": p.mtu,
        "cwnd": p.cwnd,
        "packets_lost": p.packets_lost,
        "bytes_retransmitted": p.bytes_retransmitted,
        "open_streams": p.open_streams,
        "path": "relayed" if p.relayed else "direct",
        "path_note": p.path_note,
    }


def discovery_settings_from(
    config: NodeConfig, cell_id: bytes | None = None, wall: float | None = None
) -> DiscoverySettings:
    """The discovery settings a `NodeConfig` describes (mesh key read by the caller's config).

    Reads and checks the `membership_cert` file (a relative path is taken from the working
    directory: `NodeHome.load_config` has already made it absolute against the home) against
    `cell_id` (this node; None skips that check) at Unix time `wall` (default now). Raises
    `ConfigError` for a certificate discovery could not use.
    """
    groups: tuple[str, ...] = tuple(config.discovery_groups)
    allow = frozenset(parse_cell_id(c) for c in config.allowlist) if config.allowlist else None
    cert = (
        load_membership_cert(
            config.membership_cert,
            cell_id=cell_id,
            mesh_name=config.mesh_name,
            wall=time.time() if wall is None else wall,
        )
        if config.membership_cert
        else None
    )
    caps = Capabilities(
        # Frames are relayed only along routes, which the routing protocol advertises: a node
        # without routing never relays, whatever config.relay says.
        relay=config.relay and config.routing,
        storage=config.announce_storage,
        anchor_eligible=config.anchor,  # node/anchor.py: who may hold the role
        bandwidth_class=config.bandwidth_class,
    )
    return DiscoverySettings(
        mesh_name=config.mesh_name,
        mesh_key=bytes.fromhex(config.mesh_key) if config.mesh_key else None,
        allowlist=allow,
        authority_keys=frozenset(bytes.fromhex(k) for k in config.mesh_authorities),
        membership_cert=cert,
        name=config.name,
        node_type=config.node_type,
        zone=config.zone,
        ego=config.ego,
        caps=caps,
        tags=parse_beacon_tags(config.beacon_tags),
        group_hosts=groups,
        group_port=config.discovery_port,
    )


def _ip_is_ours(host: str) -> bool:
    """Whether `host` is an address of this machine: binding a throwaway socket to it works."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def env_snapshot() -> Mapping[str, str]:
    """The process environment (kept here so that only node/ reads it)."""
    return dict(os.environ)
