"""The endpoint core: every session and handshake of one node, as a sans-IO state machine.

Theory of operation. The driver (node/, or sim/) feeds the endpoint with `receive_datagram(data, addr,
now)` and `handle_timer(now)`, sends whatever `datagrams_to_send()` returns, re-arms one timer at
`get_timer()` and reads `next_event()`. The endpoint never touches a socket or a clock, so the same code
runs in an asyncio node and in a simulator with a thousand nodes in virtual time.

Receive path, cheapest test first: the header is parsed and checked (length, version, reserved bits);
frames claiming to come from ourselves are dropped as reflections; DATA frames must name us as the
destination and an index we issued, the CellID that index belongs to must match the header source, the
packet number must be inside the replay window, and only then is the AEAD tag checked. Every drop is
counted by reason and nothing raises out of `receive_datagram`.

Handshakes (see transport/handshake.py): an INIT starts a Noise XX or IK handshake. While the node is
over its handshake budget it answers INITs with stateless cookies (transport/cookies.py) instead of
doing Diffie-Hellman. XX responders keep a bounded table of half-open handshakes; IK needs none.
Initiators retransmit with exponential backoff and jitter until `handshake_timeout`; the last message
of XX is retransmitted until the responder's first authenticated packet confirms the session.

Sessions are rekeyed by a fresh IK handshake after `rekey_after_seconds` or `rekey_after_packets`; the
old session keeps decrypting in-flight packets until it falls silent. A session is never used after
`reject_after_seconds`. Idle sessions get keepalives; a peer silent for `idle_timeout` is disconnected.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cellmesh.config import NodeConfig
from cellmesh.errors import (
    AuthenticationError,
    CryptoError,
    DecodeError,
    LocalProtocolError,
    MalformedError,
    NonceExhaustedError,
    OversizeError,
    PeerUnreachableError,
    RemoteProtocolError,
    ReplayError,
    TruncatedError,
    VersionError,
)
from cellmesh.filter.buckets import KeyedBuckets, TokenBucket
from cellmesh.filter.inspection import BanList
from cellmesh.identity.keys import Identity
from cellmesh.transport.connection import (
    HEADER_AND_TAG,
    Connection,
    ConnectionStats,
    TransportParams,
)
from cellmesh.transport.cookies import CookieJar
from cellmesh.transport.events import (
    ChannelMessageReceived,
    DatagramReceived,
    EndpointStats,
    Event,
    HandshakeFailed,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    PeerInfo,
    PeerMoved,
    PeerStateChanged,
    PingReply,
    RouteMessageReceived,
    StreamData,
    StreamFinished,
    StreamOpened,
    StreamReset,
    StreamWritable,
    TraceReply,
)
from cellmesh.transport.failure import PhiAccrual
from cellmesh.transport.handshake import (
    InitiatorHandshake,
    PeerIdentity,
    ResponderHandshake,
    SessionKeys,
)
from cellmesh.transport.relay import (
    RELAY_OVERHEAD,
    VIA_PREFIX,
    RelayGuard,
    RelayQueues,
    via,
    via_cell,
)
from cellmesh.transport.session import AEAD_TAG_LEN, Session
from cellmesh.transport.traversal import (
    MAX_PROBE_ADDRS,
    PUNCH_DURATION,
    PUNCH_INTERVAL,
    PUNCH_RETRY_AFTER,
    Punch,
    Reflexive,
    is_ip,
    usable_candidate,
)
from cellmesh.wire.header import (
    FRAME_TYPES,
    HEADER_LEN,
    KNOWN_FLAGS,
    MAX_PAYLOAD,
    WIRE_VERSION,
    ZERO_CELL,
    Datagram,
    FrameHeader,
    FrameType,
    associated_data,
    pack_header,
    pull_header,
    pull_header_fields,
    unpack_header,
)
from cellmesh.wire.messages import (
    CHANNEL_CONTROL,
    COOKIE_LEN,
    MAX_CANDIDATES,
    PATH_DATA_LEN,
    AppData,
    Candidates,
    ChannelDatagram,
    Close,
    CloseCode,
    CookieReply,
    InitBody,
    Keepalive,
    Message,
    Observed,
    PathChallenge,
    PathResponse,
    Ping,
    Pong,
    Relay,
    Route,
    Trace,
    pull_cookie_reply,
    pull_extensions,
    pull_init_body,
    pull_messages,
    pull_single_app,
    pull_single_stream,
    push_app,
    push_cookie_reply,
    push_init_body,
    push_message,
    push_messages,
)

Addr = tuple[str, int]
ZERO_COOKIE = bytes(COOKIE_LEN)
_CHANNEL_OFFSET = 56  # the header's channel hash (docs/wire.md)
_TTL_OFFSET = 3
_CHANNEL_END = 60
_NO_CHANNEL = bytes(4)
_DATA = int(FrameType.DATA)
_VIEW_ABOVE = 4096  # bytes: decrypt larger frames from a view of the datagram (no copy)
_CHANNEL_DATAGRAM_OVERHEAD = 3 + 4  # record header + channel hash
MAX_CHANNEL_GATE = 65536
BASE_DATAGRAM = 1200
DEFAULT_TRACE_TTL = 64
PATH_CHALLENGE_INTERVAL = 1.0
DIRECT_PATH_HOLD = 15.0  # seconds of silence before a direct path gives way to the relays  # at most one challenge per peer and new address per second
MAX_BANNED = 4096
HOUSEKEEPING_INTERVAL = 0.5
INITIAL_RTO = 0.5
MAX_QUEUED_PER_PEER = 256
MAX_PENDING_PINGS = 4096
PING_MEMORY = 60.0
STALE_SESSION_GRACE = 15.0
RESPONDER_REKEY_DELAY = 10.0
MAX_KNOWN_PEERS = 65536
# Packets one flush may emit before yielding to the driver (the rest follow on an immediate timer).
MAX_BURST = 64
# Path MTU from which packets are sealed in place (`Session.seal_parts`): that saves a 64 KB
# packet a copy and an allocation (1-3 us), but costs a small one ~0.6 us more than joining.
SEAL_IN_PLACE_FROM = 16 * 1024
# Mesh admission on handshakes: bit 7 of the INIT pattern byte says a 16-byte MAC under the mesh
# key ends the body.
MESH_MAC_FLAG = 0x80
MESH_MAC_LEN = 16
# A retransmitted INIT is answered from cache at most this often: an honest initiator needs a
# few; a spoofer replaying one INIT at a victim's address gets nothing more.
MAX_REPEATED_ANSWERS = 4
MAX_INIT_STAMPS = 65536
"""Initiators whose newest IK timestamp we remember (as many as peers we could know)."""
# A peer with data outstanding that answers none of this many probe timeouts, and has been silent
# at least UNRESPONSIVE_FLOOR seconds (or idle_timeout, if shorter), is declared dead.
DEAD_AFTER_PTOS = 5
UNRESPONSIVE_FLOOR = 15.0
STATIC_CHECK_INTERVAL = 5.0
STATIC_MAX_BACKOFF = 30.0
# The largest plaintext one DATA frame may carry.
MAX_PLAINTEXT = MAX_PAYLOAD - AEAD_TAG_LEN

_DECODE_REASONS: dict[type[DecodeError], str] = {
    TruncatedError: "truncated",
    OversizeError: "oversize",
    VersionError: "bad_version",
    MalformedError: "malformed",
}


def _decode_reason(exc: DecodeError) -> str:
    return _DECODE_REASONS.get(type(exc), "malformed")


@dataclass(slots=True)
class _FastPath:
    """What `receive_batch` settled for the frames of one session from one address."""

    sid: int
    src: bytes
    session: Session
    peer: _Peer
    conn: Connection


def _header_fault(data: bytes) -> str:
    """The drop reason for a datagram whose header failed the inline checks."""
    try:
        pull_header_fields(data)
    except DecodeError as exc:
        return _decode_reason(exc)
    return "malformed"  # unreachable while the inline checks match pull_header_fields


def _digest(data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16).digest()


@dataclass(slots=True)
class _Initiation:
    hs: InitiatorHandshake
    addr: Addr
    expected_cell: bytes | None
    noise: bytes
    started: float
    next_send: float
    last_sent: float
    rekey: bool
    attempts: int = 1
    cookie: bytes = ZERO_COOKIE


@dataclass(slots=True)
class _HalfOpen:
    """An XX handshake we answered, waiting for message 3."""

    hs: ResponderHandshake
    addr: Addr
    claimed_src: bytes
    digest: bytes
    response_frame: bytes
    created: float


@dataclass(slots=True)
class _Peer:
    cell_id: bytes
    public_key: bytes
    noise_static: bytes
    addr: Addr
    first_seen: float
    current: Session | None = None
    sessions: list[Session] = field(default_factory=list)
    srtt: float | None = None
    finish_frame: bytes | None = None
    finish_next: float = 0.0
    finish_attempts: int = 0
    finish_started: float = 0.0
    connected: bool = False
    conn: Connection | None = None
    detector: PhiAccrual | None = None
    suspect: bool = False
    challenge: tuple[Addr, bytes, float] | None = None
    """A path validation in flight: the new address, the challenge data, when it was sent."""
    punch: Punch | None = None
    punch_failed_at: float | None = None
    candidates_sent: float | None = None
    path_note: str = ""
    """Why the path is what it is (shown by `peers`)."""
    last_direct: float = float("-inf")
    """When a frame last arrived over the session's direct path."""


@dataclass(slots=True)
class _StaticPeer:
    """A configured peer address (`--peer`) that the endpoint keeps a session with."""

    cell_id: bytes | None
    next_try: float
    failures: int = 0


class Endpoint:
    """All handshakes and sessions of one node. See the module docstring."""

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        now: float,
        rng: random.Random | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        wall_offset: float = 0.0,
    ) -> None:
        """`wall_offset` turns `now` into Unix time (the node passes time.time() - loop.time()):
        IK initiations carry a timestamp from it that must grow from one to the next."""
        self.identity = identity
        self.cell_id = identity.cell_id
        self.config = config
        self._rng = rng if rng is not None else random.Random()
        self._random_bytes = random_bytes
        self._cookies = CookieJar(random_bytes, now)
        burst = max(1.0, config.handshake_rate / 4)
        self._hs_budget = TokenBucket(config.handshake_rate, burst, now)
        self._addr_budget: KeyedBuckets[str] = KeyedBuckets(20.0, 10.0, capacity=4096)
        # Cookie replies and repeated answers cost a MAC, not a DH: allow many more of them, but
        # still a bounded number, so the node cannot be used to reflect a flood at a victim.
        reply_rate = max(1000.0, 10 * config.handshake_rate)
        self._reply_budget = TokenBucket(reply_rate, reply_rate / 4, now)
        self._by_index: dict[int, Session] = {}
        self._peers: dict[bytes, _Peer] = {}
        self._known: OrderedDict[bytes, tuple[bytes, Addr]] = OrderedDict()
        self._initiations: dict[int, _Initiation] = {}
        self._init_by_echo: dict[bytes, int] = {}
        self._initiating: dict[bytes, int] = {}  # CellID or addr key -> initiation index
        self._half_open: OrderedDict[int, _HalfOpen] = OrderedDict()
        self._answered: OrderedDict[bytes, tuple[bytes, float, Addr, int]] = OrderedDict()
        self._wall_offset = wall_offset
        self._max_app = self.max_app_datagram  # config is frozen: computed once
        self._reject_after = config.reject_after_seconds
        self.datagram_sink: Callable[[bytes, bytes], None] | None = None
        """None: application datagrams arrive as `DatagramReceived` events. A driver may set a
        callable (cell_id, data) that takes them directly instead: the one event a busy peer
        produces per packet, handed over without an event object and a queue in between."""
        self.stream_sink: Callable[[bytes, int, bytes | memoryview, bool], bool] | None = None
        """None: in-order stream bytes arrive as `StreamData` events. A driver may set a
        callable (cell_id, stream_id, data, fin) that takes them directly and returns True, or
        False to leave them as an event (a stream it does not hold yet). It is called only while
        no event waits, so stream bytes never overtake an earlier event (e.g. the
        `StreamOpened` of their own stream)."""
        self.manual_message_credit = False
        """False: a plain message counts as taken when it is handed out as an event. A driver
        with a bounded inbox sets True and calls `messages_consumed` as its application reads,
        so a slow reader holds senders back (MAX_MESSAGES) instead of losing messages."""
        self._own_ext = b""
        self._member_check: Callable[[bytes, dict[int, bytes]], str | None] | None = None
        self._last_init_stamp = 0
        self._init_stamps: OrderedDict[bytes, int] = OrderedDict()
        """Per initiator CellID, the newest IK timestamp accepted: an IK message 1 not above it
        is a replay (WireGuard's TAI64N rule). Bounded; the oldest entries go first."""
        self._queued: dict[bytes, deque[Message]] = {}
        self._pings: OrderedDict[int, tuple[bytes, float]] = OrderedDict()
        self._out: list[tuple[Datagram, Addr]] = []
        self._events: deque[Event] = deque()
        self._static: dict[Addr, _StaticPeer] = {}
        self._params = TransportParams(
            max_datagram=config.max_datagram,
            stream_window=config.stream_window,
            connection_window=config.connection_window,
            send_buffer=config.send_buffer,
            stream_window_max=config.stream_window_max,
            connection_window_max=config.connection_window_max,
            send_buffer_max=config.send_buffer_max,
            max_streams=config.max_streams,
            congestion_control=config.congestion_control,
        )
        # Ring 0 identity gate: O(1) set lookups on the header's source CellID, before any crypto.
        self._deny = frozenset(bytes.fromhex(c) for c in config.denylist)
        self._allow = frozenset(bytes.fromhex(c) for c in config.allowlist) or None
        self._banned = BanList(MAX_BANNED)
        self._any_banned = False  # len(self._banned) > 0, kept so the receive path asks cheaply
        self._route: Callable[[bytes], bytes | None] | None = None
        self._reflexive = Reflexive()
        self._punching: set[bytes] = set()  # peers with hole punching in progress
        self._is_local: Callable[[Addr], bool] = lambda addr: False
        self._local_candidates: list[Addr] = []
        self._relay = RelayGuard(config.relay_rate, config.relay_burst, config.max_sessions)
        self._relay_queues = RelayQueues()
        self._relay_admit: Callable[[bytes, float], bool] | None = None
        self._channel_gate: set[bytes] = set()  # CellID + channel hash (4 bytes, big-endian)
        self._peer_buckets: KeyedBuckets[bytes] | None = None
        if config.peer_packet_rate > 0:
            self._peer_buckets = KeyedBuckets(
                config.peer_packet_rate, config.peer_packet_burst, capacity=config.max_sessions
            )
        self._global_bucket: TokenBucket | None = None
        if config.global_packet_rate > 0:
            rate = config.global_packet_rate
            self._global_bucket = TokenBucket(rate, max(1.0, rate / 10), now)
        self._mesh_mac_key: bytes | None = None
        if config.mesh_key:
            self._mesh_mac_key = hashlib.blake2s(
                config.mesh_name.encode(), key=bytes.fromhex(config.mesh_key), person=b"cm-hsmac"
            ).digest()
        self._timer_heap: list[tuple[float, bytes]] = []
        self._dirty: dict[bytes, None] = {}  # peers with output pending (insertion-ordered)
        self._last_now = now
        self._finishing: set[bytes] = set()  # peers whose XX message 3 awaits confirmation
        self._ping_counter = int.from_bytes(random_bytes(8), "big")
        self._conn_timer: dict[bytes, float] = {}
        self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        self.drops: Counter[str] = Counter()
        self._datagrams_in = 0
        self._datagrams_out = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._handshakes_completed = 0
        self._cookies_sent = 0

    # ----------------------------------------------------------------- public API (sans-IO)

    def receive_datagram(self, data: Datagram, addr: Addr, now: float) -> None:
        """Feed one received datagram. Never raises for bad input: it is dropped and counted."""
        if type(data) is not bytes:
            # (a bytearray another endpoint sealed in place, handed over directly in the
            # simulator or a test; sockets always give bytes)
            data = bytes(data)
        self._datagrams_in += 1
        n = len(data)
        self._bytes_in += n
        if n > self.config.max_datagram:
            self.drops["oversize"] += 1
            return
        # The v1 header checks of `pull_header_fields`, inline: this runs for every datagram.
        # Anything that fails them goes to the full decoder, which names the fault.
        if n >= HEADER_LEN:
            ver, ftype, flags, _ttl, plen, frag, src, dst, sid, pn, chan, rsvd = unpack_header(data)
            ok = (
                ver == WIRE_VERSION
                and ftype in FRAME_TYPES
                and not (flags & ~KNOWN_FLAGS or frag or rsvd)
                and plen == n - HEADER_LEN
            )
        else:
            ok = False
        if not ok:
            self.drops[_header_fault(data)] += 1
            return
        if src == self.cell_id:
            self.drops["reflected"] += 1
            return
        if src in self._deny:
            self.drops["denied"] += 1
            return
        if self._any_banned and src in self._banned:
            if self._banned.is_banned(src, now):
                self.drops["banned"] += 1
                return
            self._banned.unban(src)
            self._any_banned = len(self._banned) > 0
        if ftype == _DATA:
            self._on_data(src, dst, sid, pn, chan, data, addr, now)
            return
        h = pull_header(data)  # the full record, for the (rare) handshake frames
        t = h.type
        if t is FrameType.HANDSHAKE_INIT:
            self._on_init(h, data, addr, now)
        elif t is FrameType.HANDSHAKE_RESP:
            self._on_response(h, data, addr, now)
        elif t is FrameType.HANDSHAKE_FINISH:
            self._on_finish(h, data, addr, now)
        elif t is FrameType.COOKIE_REPLY:
            self._on_cookie_reply(h, data, addr, now)
        else:
            # BEACON/SOLICIT belong to discovery; the node routes them there when it runs.
            self.drops["discovery_frame"] += 1

    def receive_batch(self, datagrams: list[bytes], addr: Addr, now: float) -> None:
        """Feed datagrams that arrived together from `addr` (one GRO read): the same as
        `receive_datagram` on each in order, at less cost per datagram.

        Consecutive DATA frames of one live session skip what the first of them settled for
        this `addr` and `now` (session and peer lookups, expiry, roaming, promotion, failure
        detector); every frame is still header-checked, replay-checked, rate-limited and
        authenticated on its own, and anything unusual takes the full path.
        """
        i, n = 0, len(datagrams)
        while i < n:
            data = datagrams[i]
            i += 1
            self.receive_datagram(data, addr, now)
            fast = self._fast_path_for(data, addr, now)
            if fast is not None and i < n:
                i = self._receive_run(fast, datagrams, i, addr, now)

    def _fast_path_for(self, data: bytes, addr: Addr, now: float) -> _FastPath | None:
        """After `data` took the full path: may the next frames of its session take the short
        one? Only while nothing is left to settle for (`addr`, `now`)."""
        if len(data) < HEADER_LEN:
            return None
        f = unpack_header(data)
        if f[1] != _DATA or f[10] or f[7] != self.cell_id:
            return None
        s = self._by_index.get(f[8])
        if s is None or addr != s.addr or addr[0].startswith(VIA_PREFIX):
            return None
        p = self._peers.get(s.peer.cell_id)
        if (
            p is None
            or p.current is not s
            or p.conn is None
            or p.finish_frame is not None
            or p.suspect
            or p.last_direct != now
            or now - s.created >= self._reject_after
        ):
            return None
        if p.detector is not None and p.detector.last_heartbeat != now:
            return None  # (the frame did not authenticate: it settled nothing)
        return _FastPath(f[8], s.peer.cell_id, s, p, p.conn)

    def _receive_run(
        self, fast: _FastPath, datagrams: list[bytes], i: int, addr: Addr, now: float
    ) -> int:
        """Take datagrams[i:] on the short path while they are frames of the session `fast`
        describes; return the index of the first one left for the full path.

        The checks are `receive_datagram`'s; the ones that depend only on the session, `addr`
        and `now` were made for the frame that opened the short path."""
        s = fast.session
        sid0, src0, conn = fast.sid, fast.src, fast.conn
        me, deny, drops = self.cell_id, self._deny, self.drops
        max_datagram = self.config.max_datagram
        check, open_checked = s.replay.check, s.open_checked
        peer_buckets, global_bucket = self._peer_buckets, self._global_bucket
        sink, events = self.datagram_sink, self._events
        lo = hi = -1  # a run of packet numbers to note in the connection's ACK ranges at once
        n = len(datagrams)
        while i < n:
            data = datagrams[i]
            size = len(data)
            if size < HEADER_LEN or size > max_datagram:
                break
            ver, ftype, flags, _ttl, plen, frag, src, dst, sid, pn, chan, rsvd = unpack_header(data)
            if not (
                sid == sid0
                and ftype == _DATA
                and src == src0
                and dst == me
                and ver == WIRE_VERSION
                and not (flags & ~KNOWN_FLAGS or frag or rsvd or chan)
                and plen == size - HEADER_LEN
                and src not in deny
                and not self._any_banned
                and check(pn)
            ):
                break  # nothing done with it: the full path decides
            i += 1
            self._datagrams_in += 1
            self._bytes_in += size
            if peer_buckets is not None and not peer_buckets.take(src, now):
                drops["peer_rate"] += 1
                continue
            if global_bucket is not None and not global_bucket.take(now):
                drops["global_rate"] += 1
                continue
            try:
                plaintext = open_checked(
                    pn,
                    data[:_TTL_OFFSET] + b"\0" + data[_TTL_OFFSET + 1 : HEADER_LEN],
                    data[HEADER_LEN:],
                    now,
                )
            except (ReplayError, NonceExhaustedError):
                drops["replay"] += 1
                continue
            except AuthenticationError:
                drops["auth_failed"] += 1
                continue
            app = pull_single_app(plaintext)
            if app is None:
                if hi > lo:
                    conn.note_received_range(lo, hi, now)  # (before a gap test sees pn)
                    lo = hi = -1
                st = pull_single_stream(plaintext)
                if st is not None:
                    # One STREAM record changes only the connection (what `_on_plaintext`
                    # would do with it): the run goes on.
                    if not self._on_stream_packet(fast.peer, s, conn, pn, st, now, len(plaintext)):
                        return i
                    self._mark(fast.peer, now)
                    continue
                # Anything else may change the session or the peer: handle this one in full
                # and leave the rest to the full path.
                self._on_plaintext(fast.peer, s, pn, plaintext, addr, now)
                return i
            if pn == hi:
                hi = pn + 1  # a GRO batch is a run of consecutive packet numbers
            else:
                if hi > lo:
                    conn.note_received_range(lo, hi, now)
                lo, hi = pn, pn + 1
            if sink is not None:
                sink(src0, app)
            else:
                events.append(DatagramReceived(src0, app))
        if hi > lo:
            conn.note_received_range(lo, hi, now)
        return i

    def datagrams_to_send(self) -> list[tuple[Datagram, Addr]]:
        """Take every datagram the endpoint wants sent, with its destination."""
        if self._dirty:
            dirty, self._dirty = self._dirty, {}
            for cell in dirty:
                dp = self._peers.get(cell)
                if dp is not None:
                    self._flush(dp, self._last_now)
        if self._relay_queues:
            self._serve_relays(self._last_now)
        out, self._out = self._out, []
        if any(a[0][:1] == "~" for _, a in out):
            out = self._wrap_relayed(out)
        for d, _ in out:
            self._bytes_out += len(d)
        self._datagrams_out += len(out)
        return out

    def next_event(self) -> Event | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called (absolute time)."""
        if self._dirty or self._relay_queues:
            return self._last_now  # output is waiting: the driver should collect it now
        t = self._next_housekeeping
        heap = self._timer_heap
        while heap and self._conn_timer.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # stale entry
        if heap:
            t = min(t, heap[0][0])
        for ini in self._initiations.values():
            t = min(t, ini.next_send)
        for cell in self._finishing:
            fp = self._peers.get(cell)
            if fp is not None and fp.finish_frame is not None:
                t = min(t, fp.finish_next)
        for cell in self._punching:
            pp = self._peers.get(cell)
            if pp is not None and pp.punch is not None:
                t = min(t, pp.punch.next_send)
        return t

    def handle_timer(self, now: float) -> None:
        """Retransmit, rekey, keep alive and expire whatever is due at `now`."""
        self._retransmit_initiations(now)
        self._retransmit_finishes(now)
        if self._punching:
            for cell in list(self._punching):
                pp = self._peers.get(cell)
                if pp is None or pp.punch is None:
                    self._punching.discard(cell)
                else:
                    self._punch(pp, now)
        heap = self._timer_heap
        due: list[bytes] = []
        while heap and heap[0][0] <= now:
            t, cell = heapq.heappop(heap)
            if self._conn_timer.get(cell) == t:
                del self._conn_timer[cell]
                due.append(cell)
        # Only what was due on entry: a flush may re-arm a timer at `now` (a burst cut short), and
        # that runs on the next call, so one call always returns.
        for cell in due:
            p = self._peers.get(cell)
            if p is not None and p.conn is not None:
                p.conn.handle_timer(now)
                self._flush(p, now)
        if now >= self._next_housekeeping:
            self._housekeeping(now)
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL

    def connect(self, addr: Addr, now: float, cell_id: bytes | None = None) -> None:
        """Start a handshake to `addr` (and, if given, insist that the peer is `cell_id`).

        Uses Noise IK when the peer's static key is known from an earlier session, XX otherwise.
        Does nothing if a session or a handshake with that peer already exists.
        """
        if cell_id is not None:
            if cell_id == self.cell_id:
                raise LocalProtocolError("cannot connect to ourselves")
            p = self._peers.get(cell_id)
            if p is not None and p.current is not None:
                return
        key = cell_id if cell_id is not None else _addr_key(addr)
        if key in self._initiating:
            return
        static: bytes | None = None
        if cell_id is not None:
            known = self._known.get(cell_id)
            if known is not None:
                static = known[0]
        self._start_initiation(addr, now, cell_id, static, rekey=False)

    def learn_peer(self, cell_id: bytes, noise_static: bytes, addr: Addr) -> None:
        """Remember how to reach `cell_id` and its Noise static key (from a signed beacon), so
        `connect`/`send_ping` to it use Noise IK. An established session is left alone."""
        if cell_id == self.cell_id or len(noise_static) != 32:
            return
        p = self._peers.get(cell_id)
        if p is not None and p.current is not None:
            return
        self._known[cell_id] = (noise_static, addr)
        self._known.move_to_end(cell_id)
        while len(self._known) > MAX_KNOWN_PEERS:
            self._known.popitem(last=False)

    def add_static_peer(self, addr: Addr, now: float, cell_id: bytes | None = None) -> None:
        """Keep a session with whoever answers at `addr`, redialling with backoff when it fails."""
        self._static[addr] = _StaticPeer(cell_id, now)
        self._maintain_static_peers(now)

    def _maintain_static_peers(self, now: float) -> None:
        for addr, st in self._static.items():
            if now < st.next_try:
                continue
            if st.cell_id is not None:
                p = self._peers.get(st.cell_id)
                if p is not None and p.current is not None:
                    st.failures = 0
                    st.next_try = now + STATIC_CHECK_INTERVAL
                    continue
            key = st.cell_id if st.cell_id is not None else _addr_key(addr)
            if key in self._initiating:
                continue
            self.connect(addr, now, st.cell_id)
            st.failures += 1
            st.next_try = now + min(STATIC_MAX_BACKOFF, 2.0 ** min(st.failures, 5))

    def knows_route(self, cell_id: bytes) -> bool:
        """True when there is a session with `cell_id`, an address, or a route through relays."""
        return (
            cell_id in self._peers or cell_id in self._known or self._next_hop(cell_id) is not None
        )

    def set_router(self, route: Callable[[bytes], bytes | None] | None) -> None:
        """Install the routing table's next-hop lookup (destination CellID -> neighbour CellID).

        With it, peers without a direct address are reached through relays, and this endpoint
        relays for its neighbours (unless `config.relay` is off).
        """
        self._route = route

    def send_route(self, cell_id: bytes, data: bytes, now: float) -> bool:
        """Send a routing message to a direct neighbour; False if it is not one (or too big)."""
        p = self._peers.get(cell_id)
        if p is None or p.current is None or p.conn is None or via_cell(p.addr) is not None:
            return False
        record = push_message(Route(data))
        if len(record) > p.conn.max_control_record:
            self.drops["route_too_big"] += 1
            return False
        p.conn.queue_control(record)
        self._mark(p, now)
        return True

    def start_trace(self, dst: bytes, ttl: int, now: float) -> int:
        """Send a path probe towards `dst` that stops after `ttl` hops; the answer arrives as a
        `TraceReply` event with the returned probe id. Raises `PeerUnreachableError` without
        a route or a direct session to `dst`."""
        hop = self._peers.get(dst)
        if hop is None or hop.current is None or via_cell(hop.addr) is not None:
            hop = self._next_hop(dst)
        if hop is None:
            raise PeerUnreachableError(f"no route to {dst.hex()}")
        probe_id = int.from_bytes(self._random_bytes(4), "big")
        self._send_hop(
            hop, Trace(False, probe_id, max(1, min(ttl, 255)), dst, self.cell_id, ZERO_CELL), now
        )
        return probe_id

    def _send_hop(self, hop: _Peer, msg: Message, now: float) -> None:
        s = hop.current
        if s is not None:
            self._seal_once(s, msg, hop.addr, now)

    def _on_trace(self, p: _Peer, m: Trace, now: float) -> None:
        if via_cell(p.addr) is not None:
            self.drops["relay_nested"] += 1
            return
        if not self._relay.admit(p.cell_id, now):
            self.drops["relay_rate"] += 1
            return
        if m.reply:
            if m.dst == self.cell_id:
                self._events.append(TraceReply(m.probe_id, m.hop))
                return
            target, msg = m.dst, Trace(True, m.probe_id, m.ttl - 1, m.dst, m.origin, m.hop)
            if m.ttl <= 1:
                self.drops["ttl_expired"] += 1
                return
        elif m.dst == self.cell_id or m.ttl <= 1:
            target = m.origin
            msg = Trace(True, m.probe_id, DEFAULT_TRACE_TTL, m.origin, m.origin, self.cell_id)
        else:
            target, msg = m.dst, Trace(False, m.probe_id, m.ttl - 1, m.dst, m.origin, m.hop)
        hop = self._peers.get(target)
        if hop is None or hop.current is None or via_cell(hop.addr) is not None:
            hop = self._next_hop(target)
        if hop is None:
            self.drops["no_route"] += 1
            return
        self._send_hop(hop, msg, now)

    def neighbours(self) -> list[bytes]:
        """CellIDs of peers with a live session over a direct path."""
        return [
            c
            for c, p in self._peers.items()
            if p.current is not None and p.conn is not None and via_cell(p.addr) is None
        ]

    def relay_statistics(self) -> tuple[int, dict[bytes, int]]:
        """Frames relayed in all, and by the neighbour that handed them over."""
        return self._relay.relayed_total, dict(self._relay.relayed)

    def send_ping(self, cell_id: bytes, now: float, data: bytes = b"") -> int:
        """Send an encrypted echo request; the reply arrives as a `PingReply` event.

        Raises `PeerUnreachableError` when there is neither a session with nor an address for
        `cell_id`; otherwise queues the ping behind a handshake if needed. Returns the ping id.
        """
        # A counter from a random start: ids need only be unique (a PONG is authenticated anyway).
        self._ping_counter = (self._ping_counter + 1) % (1 << 64)
        ping_id = self._ping_counter
        self._check_fits(cell_id, len(data) + 11, "ping payload")
        self._send_or_queue(cell_id, Ping(ping_id, data), now)
        return ping_id

    def send_datagram(self, cell_id: bytes, data: bytes, now: float) -> None:
        """Send one unreliable application datagram to `cell_id` (queued behind a handshake)."""
        p = self._peers.get(cell_id)
        if p is not None and p.current is not None and (conn := p.conn) is not None:
            n = len(data)
            if n <= self._max_app and n + 3 + HEADER_AND_TAG <= conn.mtu:  # _check_fits
                # The hot path: a live session and a datagram that fits. The record joins the
                # connection's unreliable queue and leaves with the next flush (several may
                # share a packet).
                conn.queue_control(push_app(data))
                self._dirty[cell_id] = None
                self._last_now = now
                return
        limit = self.max_app_datagram
        if len(data) > limit:
            raise LocalProtocolError(
                f"datagram of {len(data)} bytes exceeds the {limit}-byte limit"
            )
        self._check_fits(cell_id, len(data) + 3, "datagram")
        self._send_or_queue(cell_id, AppData(data), now)

    def _check_fits(self, cell_id: bytes, record_len: int, what: str) -> None:
        """Unreliable records travel in one packet: refuse what the path cannot carry now."""
        p = self._peers.get(cell_id)
        if p is not None and p.conn is not None and record_len > p.conn.max_control_record:
            raise LocalProtocolError(
                f"{what} of {record_len - 3} bytes does not fit the path MTU to this peer "
                f"({p.conn.mtu} bytes now; it grows as discovery probes succeed)"
            )

    @property
    def max_app_datagram(self) -> int:
        """The largest application datagram `send_datagram` accepts (max_datagram minus overhead)."""
        return min(MAX_PLAINTEXT, self.config.max_datagram - HEADER_LEN - AEAD_TAG_LEN) - 3

    def close_peer(self, cell_id: bytes, now: float, code: int = CloseCode.NORMAL) -> None:
        """Tell `cell_id` we are closing, and forget its sessions."""
        p = self._peers.get(cell_id)
        if p is None:
            return
        if p.current is not None:
            self._seal_to(p.current, [Close(code, "closing")], now)
            self._flush(p, now)  # now: the peer is forgotten right after
        self._drop_peer(p, "closed locally")

    def shutdown(self, now: float) -> None:
        """Close every session politely (the driver sends what this queues, then stops)."""
        for cell in list(self._peers):
            self.close_peer(cell, now, CloseCode.SHUTDOWN)

    def statistics(self) -> EndpointStats:
        """A frozen snapshot of the counters."""
        return EndpointStats(
            datagrams_in=self._datagrams_in,
            datagrams_out=self._datagrams_out,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            sessions=len(self._by_index),
            pending_initiations=len(self._initiations),
            pending_responses=len(self._half_open),
            handshakes_completed=self._handshakes_completed,
            cookies_sent=self._cookies_sent,
            drops=dict(self.drops),
        )

    def peers(self, now: float) -> list[PeerInfo]:
        """One row per peer that has a current session."""
        rows: list[PeerInfo] = []
        for p in self._peers.values():
            s = p.current
            if s is None:
                continue
            rows.append(
                PeerInfo(
                    cell_id=p.cell_id,
                    public_key=p.public_key,
                    addr=p.addr,
                    rtt=(
                        p.conn.rtt.smoothed if p.conn is not None and p.conn.rtt.samples else p.srtt
                    ),
                    session_age=now - s.created,
                    last_seen=now - max(x.last_recv for x in p.sessions),
                    initiator=s.is_initiator,
                    packets_in=sum(x.counters.packets_in for x in p.sessions),
                    packets_out=sum(x.counters.packets_out for x in p.sessions),
                    bytes_in=sum(x.counters.bytes_in for x in p.sessions),
                    bytes_out=sum(x.counters.bytes_out for x in p.sessions),
                    sessions=len(p.sessions),
                    state="suspect" if p.suspect else "alive",
                    mtu=p.conn.mtu if p.conn is not None else 0,
                    cwnd=p.conn.cc.cwnd if p.conn is not None else 0,
                    packets_lost=p.conn.stats.packets_lost if p.conn is not None else 0,
                    bytes_retransmitted=(
                        p.conn.stats.bytes_retransmitted if p.conn is not None else 0
                    ),
                    open_streams=p.conn.open_streams() if p.conn is not None else 0,
                    relayed=via_cell(p.addr) is not None,
                    path_note=p.path_note,
                )
            )
        return rows

    def session_for(self, cell_id: bytes) -> Session | None:
        """The current session with `cell_id` (for tests and statistics)."""
        p = self._peers.get(cell_id)
        return p.current if p is not None else None

    # ----------------------------------------------------------------- sending

    def _send_or_queue(self, cell_id: bytes, msg: Message, now: float) -> None:
        p = self._peers.get(cell_id)
        if p is not None and p.current is not None:
            self._seal_to(p.current, [msg], now)
            return
        if cell_id == self.cell_id:
            raise LocalProtocolError("cannot send to ourselves")
        known = self._known.get(cell_id)
        addr = p.addr if p is not None else (known[1] if known is not None else None)
        if addr is None and self._next_hop(cell_id) is not None:
            addr = via(cell_id)
        if addr is None:
            raise PeerUnreachableError(
                f"unknown CellID {cell_id.hex()}: no session and no address to reach it"
            )
        q = self._queued.setdefault(cell_id, deque())
        if len(q) >= MAX_QUEUED_PER_PEER:
            self.drops["queue_full"] += 1
            return
        q.append(msg)
        self.connect(addr, now, cell_id)

    def _seal_to(self, s: Session, msgs: list[Message], now: float) -> None:
        """Send unreliable records to the peer of `s` (through its connection when `s` is current)."""
        for m in msgs:
            if isinstance(m, Ping):
                self._pings[m.ping_id] = (s.peer.cell_id, now)
                if len(self._pings) > MAX_PENDING_PINGS:
                    self._pings.popitem(last=False)
        p = self._peers.get(s.peer.cell_id)
        conn = p.conn if p is not None else None
        if p is not None and conn is not None and p.current is s:
            for m in msgs:
                conn.queue_control(push_message(m))
            self._mark(p, now)
            return
        # A session that is not (yet) current: seal directly, outside the connection's bookkeeping.
        pn = s.send_counter
        self._out.append((s.seal(push_messages(msgs), now), s.addr))
        if conn is not None:
            conn.note_untracked(pn)

    def _mark(self, p: _Peer, now: float) -> None:
        """Note that the peer has something to send; `datagrams_to_send` flushes it.

        Deferring lets many calls in one turn of the driver (a burst of messages, a large write
        cut into pieces, several replies) share packets instead of one packet each.
        """
        self._dirty[p.cell_id] = None
        self._last_now = now

    def _flush(self, p: _Peer, now: float) -> None:
        """Send whatever the peer's connection has ready, then re-arm its timer."""
        s = p.current
        conn = p.conn
        if s is None or conn is None:
            return
        sent = 0
        out = self._out
        addr = s.addr
        build, seal, seal_parts = conn.build_packet_parts, s.seal, s.seal_parts
        # Large packets are copied once into the datagram and encrypted where they lie; for
        # small ones joining, encrypting and prefixing the header costs ~0.6 us less.
        in_place = conn.mtu >= SEAL_IN_PLACE_FROM
        # (build_packet_parts returns None exactly when wants_to_send would say no.)
        while sent < MAX_BURST:
            parts = build(s.send_counter, now)
            if parts is None:
                break
            out.append((seal_parts(parts, now) if in_place else seal(b"".join(parts), now), addr))
            sent += 1
        if s.packets_under_key >= self.config.rekey_after_packets:
            self._start_rekey(s, now)
        t = now if sent >= MAX_BURST else conn.get_timer(now)
        cell = p.cell_id
        if t is None:
            self._conn_timer.pop(cell, None)
        elif self._conn_timer.get(cell) != t:
            self._conn_timer[cell] = t
            heapq.heappush(self._timer_heap, (t, cell))

    def _conn_events(self, p: _Peer) -> None:
        conn = p.conn
        if conn is None:
            return
        cell = p.cell_id
        ev = self._events
        while conn.events:
            e = conn.events.popleft()
            kind = e[0]
            if kind == "data":
                sink = self.stream_sink
                if sink is None or ev or not sink(cell, e[1], e[2], e[3]):
                    # (A large frame's data may be a view of its packet: events carry bytes.)
                    data = e[2] if type(e[2]) is bytes else bytes(e[2])
                    ev.append(StreamData(cell, e[1], data, e[3]))
            elif kind == "message":
                if e[2]:
                    # The channel layer takes publications as they come (its own queues count
                    # what they cannot hold): they never wait on credit.
                    conn.messages_consumed(1)
                    ev.append(ChannelMessageReceived(cell, e[2], e[1], True))
                else:
                    if not self.manual_message_credit:
                        conn.messages_consumed(1)
                    ev.append(MessageReceived(cell, e[1]))
            elif kind == "opened":
                ev.append(StreamOpened(cell, e[1]))
            elif kind == "reset":
                ev.append(StreamReset(cell, e[1], e[2], e[3]))
            elif kind == "writable":
                ev.append(StreamWritable(cell, e[1]))
            elif kind == "finished":
                ev.append(StreamFinished(cell, e[1]))

    # ----------------------------------------------------------------- streams and messages

    def _conn(self, cell_id: bytes) -> tuple[_Peer, Connection]:
        p = self._peers.get(cell_id)
        if p is None or p.conn is None or p.current is None:
            raise PeerUnreachableError(f"not connected to {cell_id.hex()}")
        return p, p.conn

    def open_stream(self, cell_id: bytes) -> int:
        """Open a reliable, ordered, bidirectional stream to a connected peer."""
        return self._conn(cell_id)[1].open_stream()

    def stream_send_space(self, cell_id: bytes, stream_id: int) -> int:
        """How many bytes `stream_write` may take now without exceeding the send buffer."""
        return self._conn(cell_id)[1].send_space(stream_id)

    def stream_write(
        self, cell_id: bytes, stream_id: int, data: bytes, now: float, fin: bool = False
    ) -> None:
        """Append bytes to a stream (and end it when `fin`)."""
        p, conn = self._conn(cell_id)
        conn.write(stream_id, data, fin)
        self._mark(p, now)

    def stream_reset(self, cell_id: bytes, stream_id: int, code: int, now: float) -> None:
        """Abort our sending half of a stream."""
        p, conn = self._conn(cell_id)
        conn.reset_stream(stream_id, code)
        self._mark(p, now)

    def stream_stop(self, cell_id: bytes, stream_id: int, code: int, now: float) -> None:
        """Stop reading a stream; the peer is asked to reset its half."""
        p, conn = self._conn(cell_id)
        conn.stop_sending(stream_id, code)
        self._mark(p, now)

    def messages_consumed(self, cell_id: bytes, n: int, now: float) -> None:
        """The application took `n` plain messages of `cell_id` (with `manual_message_credit`):
        the peer may send as many more."""
        p = self._peers.get(cell_id)
        if p is None or p.conn is None:
            return
        p.conn.messages_consumed(n)
        self._mark(p, now)

    def stream_consumed(self, cell_id: bytes, stream_id: int, n: int, now: float) -> None:
        """The application read `n` bytes of a stream (reopens flow-control windows)."""
        p = self._peers.get(cell_id)
        if p is None or p.conn is None:
            return
        p.conn.consumed(stream_id, n, now)
        self._mark(p, now)

    def send_message(self, cell_id: bytes, data: bytes, now: float, channel: int = 0) -> None:
        """Send one reliable (retransmitted until acknowledged), unordered message.

        With `channel` (a channel hash, not 0) it travels as a CHANNEL_MSG on that channel.
        """
        if not 0 <= channel <= CHANNEL_CONTROL:
            # Checked now: the record is encoded later, in a flush, where it could only fail.
            raise LocalProtocolError(f"channel hash {channel:#x} is out of range")
        p, conn = self._conn(cell_id)
        conn.send_message(data, channel)
        self._mark(p, now)

    def send_channel_datagram(self, cell_id: bytes, channel: int, data: bytes, now: float) -> None:
        """Send one unreliable publication on `channel` in a frame of its own.

        The frame's header carries the channel hash, so the receiver's ring 0 gate drops it
        before decrypting unless it admitted (peer, channel) with `allow_channel`.
        """
        if not 0 < channel < CHANNEL_CONTROL:
            raise LocalProtocolError(f"channel hash {channel:#x} is reserved or out of range")
        p, conn = self._conn(cell_id)
        s = p.current
        assert s is not None
        # Checked before encoding: a record body over 64 KiB would raise a codec error instead.
        if len(data) + _CHANNEL_DATAGRAM_OVERHEAD > conn.max_control_record:
            raise LocalProtocolError(
                f"channel datagram of {len(data)} bytes does not fit the path MTU to this peer "
                f"({conn.mtu} bytes now); send it reliably instead"
            )
        record = push_message(ChannelDatagram(channel, data))
        pn = s.send_counter
        self._out.append((s.seal(record, now, channel), s.addr))
        conn.note_untracked(pn)
        self._last_now = now

    def allow_channel(self, cell_id: bytes, channel: int) -> None:
        """Ring 0: accept channel-tagged frames from `cell_id` on `channel` (bounded set)."""
        if len(self._channel_gate) >= MAX_CHANNEL_GATE and (
            cell_id + channel.to_bytes(4, "big") not in self._channel_gate
        ):
            raise LocalProtocolError(f"at most {MAX_CHANNEL_GATE} channel admissions")
        self._channel_gate.add(cell_id + channel.to_bytes(4, "big"))

    def disallow_channel(self, cell_id: bytes, channel: int) -> None:
        """Ring 0: drop channel-tagged frames from `cell_id` on `channel` again."""
        self._channel_gate.discard(cell_id + channel.to_bytes(4, "big"))

    def ban(self, cell_id: bytes, until: float) -> None:
        """Ring 0: drop every datagram from `cell_id` until `until` (ring 2 feeds this)."""
        self._banned.ban(cell_id, until)
        self._any_banned = len(self._banned) > 0
        p = self._peers.get(cell_id)
        if p is not None:
            self._drop_peer(p, "banned by inspection")

    def connection_stats(self, cell_id: bytes) -> ConnectionStats | None:
        """Reliability counters of the connection with `cell_id`."""
        p = self._peers.get(cell_id)
        return p.conn.stats if p is not None and p.conn is not None else None

    def connection(self, cell_id: bytes) -> Connection | None:
        """The connection object (for tests and diagnostics)."""
        p = self._peers.get(cell_id)
        return p.conn if p is not None else None

    def _flush_queue(self, p: _Peer, now: float) -> None:
        q = self._queued.pop(p.cell_id, None)
        if q and p.current is not None:
            for m in q:
                self._seal_to(p.current, [m], now)

    # ----------------------------------------------------------------- receive: DATA

    def _on_data(
        self,
        src: bytes,
        dst: bytes,
        sid: int,
        pn: int,
        chan: int,
        data: bytes,
        addr: Addr,
        now: float,
    ) -> None:
        if dst != self.cell_id:
            self.drops["not_for_us"] += 1
            return
        s = self._by_index.get(sid)
        if s is None:
            self.drops["unknown_session"] += 1
            return
        if src != s.peer.cell_id:
            self.drops["session_mismatch"] += 1
            return
        if now - s.created >= self._reject_after:
            self.drops["expired_session"] += 1
            return
        # A packet number already seen is dropped before it can spend the peer's bucket, so
        # replayed copies of its traffic cannot starve it.
        replay = s.replay
        if not replay.check(pn):
            self.drops["replay"] += 1
            return
        # Ring 0 rate limits keyed on the (claimed, then authenticated) peer: a flooding peer
        # costs a dictionary lookup per packet, not a decryption.
        if self._peer_buckets is not None and not self._peer_buckets.take(src, now):
            self.drops["peer_rate"] += 1
            return
        if self._global_bucket is not None and not self._global_bucket.take(now):
            self.drops["global_rate"] += 1
            return
        if chan and src + data[_CHANNEL_OFFSET:_CHANNEL_END] not in self._channel_gate:
            self.drops["channel_denied"] += 1
            return
        try:
            # The associated data is the header with the hop TTL zeroed (docs/wire.md).
            plaintext = s.open_checked(
                pn,
                data[:_TTL_OFFSET] + b"\0" + data[_TTL_OFFSET + 1 : HEADER_LEN],
                # A view spares a large frame's copy; for small ones the slice is cheaper.
                data[HEADER_LEN:] if len(data) <= _VIEW_ABOVE else memoryview(data)[HEADER_LEN:],
                now,
            )
        except (ReplayError, NonceExhaustedError):
            # A packet number at the very end of the space, which no honest peer sends (it
            # rekeys long before); an attacker who copied a header could.
            self.drops["replay"] += 1
            return
        except AuthenticationError:
            self.drops["auth_failed"] += 1
            return
        p = self._peers.get(s.peer.cell_id)
        if p is None:
            self.drops["unknown_session"] += 1
            return
        # Follow a peer that moved (roaming): only on an authenticated packet newer than any seen.
        if addr == s.addr:
            if not addr[0].startswith(VIA_PREFIX):  # a direct path (see relay.via_cell)
                p.last_direct = now
        # (pn is the highest now exactly when it was above every packet number seen before.)
        elif replay.highest == pn and not (
            # A direct path is kept while it lives: frames the peer still sends through the relays
            # (before it has switched too) must not pull the session back onto them.
            via_cell(addr) is not None
            and via_cell(s.addr) is None
            and now - p.last_direct < DIRECT_PATH_HOLD
        ):
            self._challenge_path(p, s, addr, now)
        if (
            p.current is not s
            and not s.is_initiator
            and (p.current is None or s.created > p.current.created)
        ):
            # First packet on a session the peer started: it is now confirmed and, being the
            # newest, replaces the older one (this is how a peer-initiated rekey takes effect).
            self._promote(p, s, now, rekey=p.current is not None)
            self._flush_queue(p, now)
        if p.finish_frame is not None and s is p.current:
            p.finish_frame = None
        if p.detector is not None:
            p.detector.heartbeat(now)
            if p.suspect:
                p.suspect = False
                self._events.append(PeerStateChanged(p.cell_id, "alive", 0.0))
        if chan:
            self._on_channel_frame(p, chan, plaintext)
            return
        self._on_plaintext(p, s, pn, plaintext, addr, now)

    def _protocol_violation(self, p: _Peer, s: Session, exc: Exception, now: float) -> None:
        """The peer broke the protocol: tell it why and forget it."""
        self.drops["protocol_violation"] += 1
        self._seal_to(s, [Close(CloseCode.PROTOCOL_ERROR, str(exc)[:200])], now)
        self._flush(p, now)  # now: the peer is forgotten right after
        self._drop_peer(p, f"protocol violation: {exc}")

    def _on_stream_packet(
        self,
        p: _Peer,
        s: Session,
        conn: Connection,
        pn: int,
        st: tuple[int, int, bytes | memoryview, bool],
        now: float,
        size: int,
    ) -> bool:
        """A packet that is exactly one STREAM record; False if it ended the peer."""
        try:
            conn.on_stream_packet(pn, st[0], st[1], st[2], st[3], now, size)
        except RemoteProtocolError as exc:
            self._protocol_violation(p, s, exc, now)
            return False
        if conn.events:
            self._conn_events(p)
        return True

    def _on_plaintext(
        self, p: _Peer, s: Session, pn: int, plaintext: bytes, addr: Addr, now: float
    ) -> None:
        """The records of an authenticated DATA frame (no channel tag) from `p` on `s`."""
        conn = p.conn
        app = pull_single_app(plaintext)
        if app is not None and conn is not None:
            # The common case of unreliable traffic: one APP record and nothing else. It asks
            # for no acknowledgement and changes nothing the connection would send or time, so
            # the connection only notes the packet number and the peer needs no flush.
            conn.note_received(pn, now)
            if self.datagram_sink is not None:
                self.datagram_sink(p.cell_id, app)
            else:
                self._events.append(DatagramReceived(p.cell_id, app))
            return
        if conn is not None:
            st = pull_single_stream(plaintext)
            if st is not None:
                # The bulk of a transfer: one STREAM record, decoded without record objects.
                if self._on_stream_packet(p, s, conn, pn, st, now, len(plaintext)):
                    self._mark(p, now)
                return
        try:
            msgs = pull_messages(plaintext)
            if conn is not None:
                msgs = conn.on_packet(pn, msgs, now, len(plaintext))
        except (DecodeError, RemoteProtocolError) as exc:
            self._protocol_violation(p, s, exc, now)
            return
        if conn is not None and conn.events:
            self._conn_events(p)
        if not msgs:
            self._mark(p, now)
            return
        replies: list[Message] = []
        for m in msgs:
            if isinstance(m, AppData):
                if self.datagram_sink is not None:
                    self.datagram_sink(p.cell_id, m.data)
                else:
                    self._events.append(DatagramReceived(p.cell_id, m.data))
            elif isinstance(m, Ping):
                replies.append(Pong(m.ping_id, m.data))
            elif isinstance(m, Pong):
                sent = self._pings.pop(m.ping_id, None)
                if sent is not None and sent[0] == p.cell_id:
                    rtt = now - sent[1]
                    p.srtt = rtt if p.srtt is None else 0.875 * p.srtt + 0.125 * rtt
                    self._events.append(PingReply(p.cell_id, m.ping_id, rtt))
            elif isinstance(m, Relay):
                self._on_relay(p, m, now)
            elif isinstance(m, PathChallenge):
                # Answer on the path the challenge came by, whatever our current address is.
                self._seal_once(s, PathResponse(m.data), addr, now)
            elif isinstance(m, PathResponse):
                self._on_path_response(p, s, m, addr, now)
            elif isinstance(m, Route):
                if via_cell(addr) is None:  # routing is between direct neighbours only
                    self._events.append(RouteMessageReceived(p.cell_id, m.data))
                else:
                    self.drops["route_not_neighbour"] += 1
            elif isinstance(m, Trace):
                self._on_trace(p, m, now)
            elif isinstance(m, Observed):
                if via_cell(addr) is None:
                    self._reflexive.report(p.cell_id, (m.host, m.port))
            elif isinstance(m, Candidates):
                self._on_candidates(p, m, now)
            elif isinstance(m, Close):
                self._drop_peer(p, f"closed by peer (code {m.code}: {m.reason})")
                return
        if replies:
            self._seal_to(s, replies, now)
        else:
            self._mark(p, now)

    # ----------------------------------------------------------------- roaming

    def _challenge_path(self, p: _Peer, s: Session, addr: Addr, now: float) -> None:
        """An authenticated packet came from a new address: prove the peer is there first.

        Traffic keeps going to the old address until the peer answers a random challenge sent
        to the new one, so someone who replays or spoofs the peer's packets from elsewhere
        cannot pull its traffic to another host (RFC 9000 path validation).
        """
        ch = p.challenge
        if ch is not None and ch[0] == addr and now - ch[2] < PATH_CHALLENGE_INTERVAL:
            return
        data = self._random_bytes(PATH_DATA_LEN)
        p.challenge = (addr, data, now)
        self._seal_once(s, PathChallenge(data), addr, now)

    def _on_path_response(
        self, p: _Peer, s: Session, m: PathResponse, addr: Addr, now: float
    ) -> None:
        ch = p.challenge
        punched = (
            p.punch is not None
            and addr in p.punch.addrs
            and hmac.compare_digest(p.punch.data, m.data)
        )
        if not punched and (ch is None or ch[0] != addr or not hmac.compare_digest(ch[1], m.data)):
            self.drops["path_response_unexpected"] += 1
            return
        p.challenge = None
        if via_cell(addr) is None:
            p.last_direct = now  # a validated direct path: hold it (see DIRECT_PATH_HOLD)
            if punched or via_cell(s.addr) is not None:
                p.punch = None
                p.path_note = "direct: hole punched" if punched else "direct: the peer came to us"
        elif via_cell(s.addr) is None:
            p.path_note = "relayed: the direct path went silent"
        s.addr = addr
        if p.current is s or p.current is None:
            p.addr = addr
        if p.conn is not None:
            p.conn.set_base_mtu(_base_mtu(addr), now)
        self._events.append(PeerMoved(p.cell_id, addr))

    # ----------------------------------------------------------------- NAT traversal

    def set_local_check(self, is_local: Callable[[Addr], bool]) -> None:
        """Install the driver's test for "this address is one of our own sockets"."""
        self._is_local = is_local

    def set_local_candidates(self, addrs: list[Addr]) -> None:
        """Addresses of our own that a peer elsewhere might reach (the driver lists them)."""
        self._local_candidates = [a for a in addrs if usable_candidate(a)][:MAX_CANDIDATES]

    def nat_status(self) -> dict[str, object]:
        """NAT type, why, and the reflexive addresses our neighbours report."""
        kind, why = self._reflexive.classify(self._is_local)
        return {
            "type": kind,
            "reason": why,
            "reflexive": [
                f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self._reflexive.addresses()
            ],
        }

    def _candidates(self) -> list[Addr]:
        addrs = self._reflexive.addresses()[:4] + self._local_candidates
        unique = list(dict.fromkeys(a for a in addrs if usable_candidate(a)))
        return unique[:MAX_CANDIDATES]

    def _offer_candidates(self, p: _Peer, now: float) -> None:
        """Give a relayed peer our direct addresses so we can both punch towards each other."""
        if p.current is None or via_cell(p.addr) is None:
            return
        if p.candidates_sent is not None and now - p.candidates_sent < PUNCH_DURATION:
            return
        ours = self._candidates()
        if not ours:
            p.path_note = "relayed: we know no address of ours to offer (no neighbour reported one)"
            return
        p.candidates_sent = now
        self._seal_to(p.current, [Candidates(tuple(ours))], now)

    def _on_candidates(self, p: _Peer, m: Candidates, now: float) -> None:
        s = p.current
        if s is None or via_cell(s.addr) is None:
            return  # already direct
        addrs = tuple(a for a in m.addrs if usable_candidate(a))[:MAX_PROBE_ADDRS]
        if not addrs:
            p.path_note = "relayed: the peer offered no usable address"
            return
        p.punch = Punch(addrs, self._random_bytes(PATH_DATA_LEN), now, now)
        self._punching.add(p.cell_id)
        p.path_note = f"relayed: hole punching towards {len(addrs)} address(es)"
        self._offer_candidates(p, now)  # so that both sides probe at the same time
        self._punch(p, now)

    def _punch(self, p: _Peer, now: float) -> None:
        pu, s = p.punch, p.current
        if pu is None or s is None:
            return
        if via_cell(s.addr) is None:
            p.punch = None
            return
        if pu.expired(now):
            p.punch = None
            p.punch_failed_at = now
            kind, _ = self._reflexive.classify(self._is_local)
            hint = " (our NAT maps per destination)" if kind == "endpoint-dependent" else ""
            p.path_note = (
                f"relayed: hole punching failed, {pu.sent} probes to {len(pu.addrs)} "
                f"address(es) unanswered{hint}"
            )
            return
        if pu.due(now):
            for addr in pu.addrs:
                self._seal_once(s, PathChallenge(pu.data), addr, now)
            pu.sent += len(pu.addrs)
            pu.next_send = now + PUNCH_INTERVAL

    def _maintain_paths(self, now: float) -> None:
        """Retry punching on relayed sessions, now and then."""
        for p in self._peers.values():
            if (
                p.punch is None
                and p.current is not None
                and via_cell(p.addr) is not None
                and p.punch_failed_at is not None
                and now - p.punch_failed_at > PUNCH_RETRY_AFTER
            ):
                p.punch_failed_at = None
                p.candidates_sent = None
                self._offer_candidates(p, now)

    def _seal_once(self, s: Session, msg: Message, addr: Addr, now: float) -> None:
        """Seal one record for `addr` on session `s`, outside the reliable connection."""
        p = self._peers.get(s.peer.cell_id)
        pn = s.send_counter
        self._out.append((s.seal(push_message(msg), now), addr))
        if p is not None and p.conn is not None and p.current is s:
            p.conn.note_untracked(pn)

    # ----------------------------------------------------------------- relaying

    def _next_hop(self, dst: bytes) -> _Peer | None:
        """The neighbour to hand a frame for `dst` to: routed, with a direct, live session."""
        if self._route is None:
            return None
        hop = self._route(dst)
        if hop is None:
            return None
        p = self._peers.get(hop)
        if p is None or p.current is None or p.conn is None or via_cell(p.addr) is not None:
            return None
        return p

    def _wrap_relayed(self, out: list[tuple[Datagram, Addr]]) -> list[tuple[Datagram, Addr]]:
        """Turn frames for virtual addresses into RELAY records for the next hop."""
        kept: list[tuple[Datagram, Addr]] = []
        for frame, addr in out:
            dst = via_cell(addr)
            if dst is None:
                kept.append((frame, addr))
            else:
                self._relay_to(bytes(frame), dst, self._last_now, None)
        kept.extend(self._out)
        self._out = []
        return kept

    def _relay_to(self, frame: bytes, dst: bytes, now: float, came_from: bytes | None) -> bool:
        hop = self._next_hop(dst)
        if hop is None:
            self.drops["no_route"] += 1
            return False
        if hop.cell_id == came_from:
            self.drops["relay_loop"] += 1
            return False
        s, conn = hop.current, hop.conn
        assert s is not None
        assert conn is not None
        record = push_message(Relay(dst, frame))
        if len(record) > conn.max_control_record:
            self.drops["relay_too_big"] += 1
            return False
        # Sealed on its own, outside the neighbour's reliable connection: the end-to-end
        # session above does its own loss recovery and congestion control.
        pn = s.send_counter
        self._out.append((s.seal(record, now), hop.addr))
        conn.note_untracked(pn)
        return True

    def _on_relay(self, p: _Peer, m: Relay, now: float) -> None:
        if via_cell(p.addr) is not None:
            self.drops["relay_nested"] += 1  # a peer we reach through relays cannot relay for us
            return
        frame = m.frame
        if m.dst == self.cell_id:
            src = frame[8:24]
            if src == ZERO_CELL:
                self.drops["relay_malformed"] += 1
                return
            # Received "from" the sender's virtual address, so that replies take the mesh too.
            self.receive_datagram(frame, via(src), now)
            return
        if not self.config.relay:
            self.drops["relay_refused"] += 1
            return
        if not self._relay.admit(p.cell_id, now):
            self.drops["relay_rate"] += 1
            return
        if self._relay_admit is not None and not self._relay_admit(p.cell_id, now):
            self.drops["relay_policy"] += 1
            return
        ttl = frame[_TTL_OFFSET]
        if ttl <= 1:
            self.drops["ttl_expired"] += 1
            return
        if self._relay.duplicate(frame):
            self.drops["relay_duplicate"] += 1
            return
        forwarded = frame[:_TTL_OFFSET] + bytes((ttl - 1,)) + frame[_TTL_OFFSET + 1 :]
        # Queued per neighbour and sent round robin when the driver collects output: a flood
        # from one neighbour waits behind everyone else's frames instead of in front of them.
        if self._relay_queues.push(p.cell_id, forwarded, m.dst):
            self._last_now = now
        else:
            self.drops["relay_queue_full"] += 1

    def _serve_relays(self, now: float) -> None:
        for neighbour, frame, dst in self._relay_queues.take():
            if self._relay_to(frame, dst, now, neighbour):
                self._relay.count(neighbour)

    def set_relay_admission(self, admit: Callable[[bytes, float], bool] | None) -> None:
        """Install the policy's relay budget: `admit(neighbour, now)` says whether one more frame
        from that neighbour may be relayed (the node maps ring-1 rules on `channel relay`)."""
        self._relay_admit = admit

    def _on_channel_frame(self, p: _Peer, channel: int, plaintext: bytes) -> None:
        """A channel-tagged frame: exactly one CHANNEL_DATAGRAM of the header's channel."""
        try:
            msgs = pull_messages(plaintext)
        except DecodeError:
            self.drops["channel_mismatch"] += 1
            return
        if len(msgs) != 1:
            self.drops["channel_mismatch"] += 1
            return
        m = msgs[0]
        if not isinstance(m, ChannelDatagram) or m.channel != channel:
            self.drops["channel_mismatch"] += 1
            return
        self._events.append(ChannelMessageReceived(p.cell_id, channel, m.data, False))

    # ----------------------------------------------------------------- receive: handshakes

    def _on_init(self, h: FrameHeader, data: bytes, addr: Addr, now: float) -> None:
        if h.dst != ZERO_CELL and h.dst != self.cell_id:
            self.drops["not_for_us"] += 1
            return
        if h.session_id != 0 or h.packet_number != 0:
            self.drops["malformed"] += 1
            return
        if self._allow is not None and h.src not in self._allow:
            self.drops["not_allowed"] += 1  # the claimed CellID is checked again once proven
            return
        raw = data[HEADER_LEN:]
        flagged = bool(raw) and bool(raw[0] & MESH_MAC_FLAG)
        if self._mesh_mac_key is not None:
            # Outsiders without the mesh key are ignored before any cryptographic work.
            if (
                not flagged
                or len(raw) <= MESH_MAC_LEN
                or not hmac.compare_digest(
                    raw[-MESH_MAC_LEN:],
                    self._mesh_mac(associated_data(data[:HEADER_LEN]) + raw[:-MESH_MAC_LEN]),
                )
            ):
                self.drops["admission"] += 1
                return
            raw = bytes([raw[0] & ~MESH_MAC_FLAG & 0xFF]) + raw[1:-MESH_MAC_LEN]
        elif flagged:
            self.drops["admission"] += 1  # a keyed mesh's node, and we are not in that mesh
            return
        try:
            body = pull_init_body(raw)
        except DecodeError as exc:
            self.drops[_decode_reason(exc)] += 1
            return
        digest = _digest(body.noise)
        cached = self._answered.get(digest)
        if cached is not None:
            # A retransmitted INIT whose answer was lost: answer again, do no new work. Only to the
            # address that sent the original, so a copied INIT cannot reflect answers at a victim.
            if cached[2] != addr or cached[3] >= MAX_REPEATED_ANSWERS:
                self.drops["unexpected_handshake"] += 1
            elif self._reply_budget.take(now):
                self._answered[digest] = (cached[0], cached[1], cached[2], cached[3] + 1)
                self._out.append((cached[0], addr))
            else:
                self.drops["rate_limited"] += 1
            return
        if not self._admit_handshake(body, addr, now):
            return
        local_index = self._new_index()
        rh = ResponderHandshake(self.identity, local_index, body.pattern, self._own_ext)
        try:
            res = rh.read_init(body.noise)
        except (DecodeError, CryptoError):
            self.drops["handshake_auth"] += 1
            return
        if res.peer is not None and res.peer.cell_id != h.src:
            self.drops["identity_mismatch"] += 1
            return
        if res.peer is not None and not self._fresh_init(res.peer.cell_id, res.timestamp_ns):
            self.drops["init_replay"] += 1
            return
        if res.peer is not None and self._membership_refusal(res.peer.cell_id, res.ext):
            self.drops["not_member"] += 1
            return
        frame = (
            pack_header(
                FrameType.HANDSHAKE_RESP,
                self.cell_id,
                h.src,
                res.initiator_index,
                0,
                len(res.response),
            )
            + res.response
        )
        self._remember_answer(digest, frame, addr, now)
        self._out.append((frame, addr))
        if res.peer is not None and res.keys is not None:
            # IK: the initiator is authenticated and keys exist; the session becomes current once
            # the initiator's first packet confirms it (so a replayed message 1 replaces nothing).
            self._new_session(
                res.peer,
                res.keys,
                local_index,
                res.initiator_index,
                addr,
                initiator=False,
                confirmed=False,
                now=now,
            )
            return
        self._half_open[local_index] = _HalfOpen(rh, addr, h.src, digest, frame, now)
        while len(self._half_open) > self.config.max_pending_handshakes:
            self._half_open.popitem(last=False)
            self.drops["half_open_evicted"] += 1

    def _admit_handshake(self, body: InitBody, addr: Addr, now: float) -> bool:
        """The handshake budget: under load, demand a cookie proving the source address."""
        loaded = len(
            self._half_open
        ) >= self.config.max_pending_handshakes * 3 // 4 or not self._hs_budget.take(now)
        if not loaded:
            return True
        if body.cookie != ZERO_COOKIE and self._cookies.check(body.cookie, addr, now):
            if self._addr_budget.take(addr[0], now):
                return True
            self.drops["rate_limited"] += 1
            return False
        if self._reply_budget.take(now):
            reply = push_cookie_reply(CookieReply(self._cookies.make(addr, now), body.noise[:16]))
            self._out.append(
                (
                    pack_header(FrameType.COOKIE_REPLY, self.cell_id, ZERO_CELL, 0, 0, len(reply))
                    + reply,
                    addr,
                )
            )
            self._cookies_sent += 1
        self.drops["cookie_required"] += 1
        return False

    def _remember_answer(self, digest: bytes, frame: bytes, addr: Addr, now: float) -> None:
        self._answered[digest] = (frame, now, addr, 0)
        while len(self._answered) > self.config.max_pending_handshakes:
            self._answered.popitem(last=False)

    def _on_response(self, h: FrameHeader, data: bytes, addr: Addr, now: float) -> None:
        if h.dst != self.cell_id:
            self.drops["not_for_us"] += 1
            return
        ini = self._initiations.get(h.session_id)
        if ini is None:
            self.drops["unexpected_handshake"] += 1
            return
        try:
            peer, remote_index, third, keys = ini.hs.read_response(data[HEADER_LEN:])
        except (DecodeError, CryptoError):
            self.drops["handshake_auth"] += 1
            # The Noise state may have absorbed the bad message: start over with a fresh one.
            self._restart_initiation(h.session_id, now)
            return
        if not self._admitted(peer.cell_id):
            self.drops["not_allowed"] += 1
            self._end_initiation(h.session_id)
            self._events.append(
                HandshakeFailed(ini.addr, ini.expected_cell, "peer is not on the allowlist")
            )
            return
        if peer.cell_id != h.src or (
            ini.expected_cell is not None and peer.cell_id != ini.expected_cell
        ):
            self.drops["identity_mismatch"] += 1
            self._end_initiation(h.session_id)
            self._events.append(
                HandshakeFailed(ini.addr, ini.expected_cell, "peer is not the CellID we dialled")
            )
            return
        refusal = self._membership_refusal(peer.cell_id, ini.hs.peer_ext)
        if refusal is not None:
            self.drops["not_member"] += 1
            self._end_initiation(h.session_id)
            self._events.append(
                HandshakeFailed(
                    ini.addr, ini.expected_cell, f"peer is not a member of the mesh ({refusal})"
                )
            )
            return
        self._end_initiation(h.session_id)
        s = self._new_session(
            peer, keys, h.session_id, remote_index, addr, initiator=True, confirmed=False, now=now
        )
        p = self._peers[peer.cell_id]
        if ini.attempts == 1:  # Karn: only unambiguous samples
            rtt = now - ini.last_sent
            p.srtt = rtt if p.srtt is None else 0.875 * p.srtt + 0.125 * rtt
        self._promote(p, s, now, rekey=ini.rekey)
        if third is not None:
            frame = (
                pack_header(
                    FrameType.HANDSHAKE_FINISH,
                    self.cell_id,
                    peer.cell_id,
                    remote_index,
                    0,
                    len(third),
                )
                + third
            )
            self._out.append((frame, addr))
            p.finish_frame = frame
            self._finishing.add(p.cell_id)
            p.finish_started = now
            p.finish_attempts = 1
            p.finish_next = now + self._backoff(1)
        queued = self._queued.get(p.cell_id)
        if not queued:
            self._seal_to(s, [Keepalive()], now)  # confirms the session to the responder
        self._flush_queue(p, now)

    def _on_finish(self, h: FrameHeader, data: bytes, addr: Addr, now: float) -> None:
        if h.dst != self.cell_id:
            self.drops["not_for_us"] += 1
            return
        body = data[HEADER_LEN:]
        half = self._half_open.get(h.session_id)
        if half is None:
            s = self._by_index.get(h.session_id)
            if s is not None and s.finish_digest and s.finish_digest == _digest(body):
                # Our confirmation was lost and the initiator retransmitted message 3.
                if self._reply_budget.take(now):
                    self._seal_to(s, [Keepalive()], now)
                self.drops["duplicate_finish"] += 1
                return
            self.drops["unexpected_handshake"] += 1
            return
        try:
            peer, keys = half.hs.read_finish(body)
        except (DecodeError, CryptoError):
            self.drops["handshake_auth"] += 1
            del self._half_open[h.session_id]
            return
        del self._half_open[h.session_id]
        if peer.cell_id != h.src or peer.cell_id != half.claimed_src:
            self.drops["identity_mismatch"] += 1
            return
        if self._membership_refusal(peer.cell_id, half.hs.peer_ext):
            self.drops["not_member"] += 1
            return
        s = self._new_session(
            peer,
            keys,
            h.session_id,
            half.hs.initiator_index,
            addr,
            initiator=False,
            confirmed=True,
            now=now,
        )
        s.finish_digest = _digest(body)
        p = self._peers[peer.cell_id]
        self._promote(p, s, now, rekey=False)
        self._seal_to(s, [Keepalive()], now)
        self._flush_queue(p, now)

    def _on_cookie_reply(self, h: FrameHeader, data: bytes, addr: Addr, now: float) -> None:
        try:
            reply = pull_cookie_reply(data[HEADER_LEN:])
        except DecodeError as exc:
            self.drops[_decode_reason(exc)] += 1
            return
        idx = self._init_by_echo.get(reply.echo)
        ini = self._initiations.get(idx) if idx is not None else None
        if ini is None or ini.addr != addr:
            self.drops["unexpected_handshake"] += 1
            return
        if reply.cookie == ini.cookie:
            return
        ini.cookie = reply.cookie
        self._send_init(ini, now)

    # ----------------------------------------------------------------- sessions and peers

    def _admitted(self, cell_id: bytes) -> bool:
        """The ring 0 identity gate, applied to an authenticated CellID."""
        if cell_id in self._deny:
            return False
        return self._allow is None or cell_id in self._allow

    def _mesh_mac(self, data: bytes) -> bytes:
        assert self._mesh_mac_key is not None
        return hashlib.blake2s(data, key=self._mesh_mac_key, digest_size=MESH_MAC_LEN).digest()

    def _new_index(self) -> int:
        while True:
            idx = int.from_bytes(self._random_bytes(8), "big")
            if (
                idx
                and idx not in self._by_index
                and idx not in self._initiations
                and (idx not in self._half_open)
            ):
                return idx

    def _new_session(
        self,
        peer: PeerIdentity,
        keys: SessionKeys,
        local_index: int,
        remote_index: int,
        addr: Addr,
        *,
        initiator: bool,
        confirmed: bool,
        now: float,
    ) -> Session:
        if len(self._by_index) >= self.config.max_sessions:
            self._evict_one_session()
        s = Session(
            local_cell=self.cell_id,
            local_index=local_index,
            remote_index=remote_index,
            peer=peer,
            keys=keys,
            addr=addr,
            is_initiator=initiator,
            now=now,
            replay_window=self.config.replay_window,
            confirmed=confirmed,
        )
        self._by_index[local_index] = s
        p = self._peers.get(peer.cell_id)
        if p is None or p.public_key != peer.public_key:
            p = _Peer(peer.cell_id, peer.public_key, peer.noise_static, addr, now)
            self._peers[peer.cell_id] = p
        if p.sessions:
            # One packet-number space per direction across rekeys (acknowledgements stay unambiguous).
            s.send_counter = s.start_counter = max(x.send_counter for x in p.sessions)
        p.sessions.append(s)
        self._handshakes_completed += 1
        return s

    def _promote(self, p: _Peer, s: Session, now: float, rekey: bool) -> None:
        had = p.current is not None or p.connected
        p.current = s
        # Only a confirmed (promoted) session may move where we send: a replayed IK message 1
        # creates an unconfirmed session and must not redirect the peer's address.
        p.addr = s.addr
        p.noise_static = s.peer.noise_static
        self._known[p.cell_id] = (p.noise_static, s.addr)
        self._known.move_to_end(p.cell_id)
        while len(self._known) > MAX_KNOWN_PEERS:
            self._known.popitem(last=False)
        if p.conn is None:
            # The lower CellID opens even-numbered streams: symmetric, so simultaneous opens agree.
            p.conn = Connection(self._params, self.cell_id < p.cell_id, now)
            p.detector = PhiAccrual(now, self.config.keepalive_interval)
        p.conn.set_base_mtu(_base_mtu(s.addr), now)
        if via_cell(s.addr) is None:
            # Tell a direct neighbour where we see it: its reflexive address (NAT traversal).
            if usable_candidate(s.addr) or is_ip(s.addr[0]):
                self._seal_to(s, [Observed(s.addr[0], s.addr[1])], now)
            p.path_note = "direct"
        else:
            p.path_note = "relayed: no direct address known"
            self._offer_candidates(p, now)
        p.connected = True
        st = self._static.get(s.addr)
        if st is not None and st.cell_id is None:
            st.cell_id = p.cell_id
            st.failures = 0
        self._events.append(PeerConnected(p.cell_id, s.addr, s.is_initiator, rekey or had))

    def _evict_one_session(self) -> None:
        victim = min(self._by_index.values(), key=lambda x: x.last_recv)
        self.drops["session_evicted"] += 1
        self._remove_session(victim, "evicted: session table full")

    def _remove_session(self, s: Session, reason: str) -> None:
        self._by_index.pop(s.local_index, None)
        p = self._peers.get(s.peer.cell_id)
        if p is None:
            return
        if s in p.sessions:
            p.sessions.remove(s)
        if p.current is s:
            p.current = max(
                (x for x in p.sessions if x.confirmed or x.is_initiator),
                key=lambda x: x.created,
                default=None,
            )
            p.finish_frame = None
        if not p.sessions:
            self._drop_peer(p, reason)

    def _drop_peer(self, p: _Peer, reason: str) -> None:
        for s in p.sessions:
            self._by_index.pop(s.local_index, None)
        p.sessions.clear()
        p.current = None
        self._peers.pop(p.cell_id, None)
        self._queued.pop(p.cell_id, None)
        self._conn_timer.pop(p.cell_id, None)
        self._relay_queues.drop(p.cell_id)
        self._relay.forget(p.cell_id)
        p.conn = None
        if p.connected:
            self._events.append(PeerDisconnected(p.cell_id, reason))

    # ----------------------------------------------------------------- initiations

    def _start_initiation(
        self, addr: Addr, now: float, cell_id: bytes | None, static: bytes | None, rekey: bool
    ) -> None:
        idx = self._new_index()
        stamp = max(int((now + self._wall_offset) * 1e9), self._last_init_stamp + 1)
        self._last_init_stamp = stamp  # strictly increasing, whatever the clock does
        hs = InitiatorHandshake(
            self.identity, idx, remote_static=static, timestamp_ns=stamp, ext=self._own_ext
        )
        noise = hs.first_message()
        ini = _Initiation(hs, addr, cell_id, noise, now, now, now, rekey)
        self._initiations[idx] = ini
        self._init_by_echo[noise[:16]] = idx
        self._initiating[cell_id if cell_id is not None else _addr_key(addr)] = idx
        self._send_init(ini, now)

    def set_membership(
        self, own_ext: bytes, check: Callable[[bytes, dict[int, bytes]], str | None] | None
    ) -> None:
        """Gate sessions on mesh membership (certificates; node/membership.py decides).

        `own_ext` (handshake extensions, e.g. our certificate) travels in every handshake
        message that carries our identity, so only after keys exist, never in clear. `check`
        gets a peer's CellID and its extensions once the handshake authenticated it, and
        answers None (a member) or the reason it is not; a refused handshake makes no session
        on either side (drop `not_member`). Rekeys are checked again (certificates expire).
        """
        self._own_ext = own_ext
        self._member_check = check

    def _membership_refusal(self, cell: bytes, ext: bytes) -> str | None:
        if self._member_check is None:
            return None
        try:
            exts = pull_extensions(ext)
        except DecodeError:
            return "bad_extension"
        return self._member_check(cell, exts)

    def _fresh_init(self, cell: bytes, stamp: int | None) -> bool:
        """An IK message 1 from `cell` is new only if its timestamp exceeds every one we
        accepted from it (a recorded message 1 replayed after the answer cache let it go is not).
        Retransmissions of one INIT are answered from the answer cache before this check."""
        if stamp is None:
            return False
        last = self._init_stamps.get(cell)
        if last is not None and stamp <= last:
            return False
        self._init_stamps[cell] = stamp
        self._init_stamps.move_to_end(cell)
        while len(self._init_stamps) > MAX_INIT_STAMPS:
            self._init_stamps.popitem(last=False)
        return True

    def _send_init(self, ini: _Initiation, now: float) -> None:
        body = push_init_body(InitBody(ini.hs.pattern, ini.cookie, ini.noise))
        dst = ini.expected_cell if ini.expected_cell is not None else ZERO_CELL
        if self._mesh_mac_key is None:
            frame = pack_header(FrameType.HANDSHAKE_INIT, self.cell_id, dst, 0, 0, len(body)) + body
        else:
            # Mesh admission: flag the pattern byte and append a MAC under the mesh key, which
            # the responder checks before any other work (WireGuard's mac1, keyed by the mesh).
            body = bytes([body[0] | MESH_MAC_FLAG]) + body[1:]
            head = pack_header(
                FrameType.HANDSHAKE_INIT, self.cell_id, dst, 0, 0, len(body) + MESH_MAC_LEN
            )
            frame = head + body + self._mesh_mac(associated_data(head) + body)
        self._out.append((frame, ini.addr))
        ini.last_sent = now
        deadline = ini.started + self.config.handshake_timeout
        ini.next_send = min(now + self._backoff(ini.attempts), deadline)

    def _backoff(self, attempts: int) -> float:
        return INITIAL_RTO * 2.0 ** (attempts - 1) * self._rng.uniform(0.9, 1.1)

    def _end_initiation(self, idx: int) -> _Initiation | None:
        ini = self._initiations.pop(idx, None)
        if ini is None:
            return None
        self._init_by_echo.pop(ini.noise[:16], None)
        key = ini.expected_cell if ini.expected_cell is not None else _addr_key(ini.addr)
        if self._initiating.get(key) == idx:
            del self._initiating[key]
        return ini

    def _restart_initiation(self, idx: int, now: float) -> None:
        ini = self._end_initiation(idx)
        if ini is None:
            return
        static = None
        if ini.expected_cell is not None:
            known = self._known.get(ini.expected_cell)
            static = known[0] if known is not None else None
        self._start_initiation(ini.addr, now, ini.expected_cell, static, ini.rekey)

    def _start_rekey(self, s: Session, now: float) -> None:
        cell = s.peer.cell_id
        if cell in self._initiating:
            return
        self._start_initiation(s.addr, now, cell, s.peer.noise_static, rekey=True)

    def _retransmit_initiations(self, now: float) -> None:
        for idx, ini in list(self._initiations.items()):
            if now < ini.next_send:
                continue
            if (
                now - ini.started >= self.config.handshake_timeout
                or ini.attempts > self.config.handshake_retries
            ):
                self._end_initiation(idx)
                if ini.expected_cell is not None:
                    q = self._queued.pop(ini.expected_cell, None)
                    if q:
                        self.drops["queue_expired"] += len(q)
                if not ini.rekey:
                    self._events.append(
                        HandshakeFailed(ini.addr, ini.expected_cell, "no answer (timed out)")
                    )
                continue
            ini.attempts += 1
            self._send_init(ini, now)

    def _retransmit_finishes(self, now: float) -> None:
        for cell in list(self._finishing):
            p = self._peers.get(cell)
            if p is None or p.finish_frame is None:
                self._finishing.discard(cell)
                continue
            if now < p.finish_next:
                continue
            if now - p.finish_started >= self.config.handshake_timeout:
                p.finish_frame = None
                if p.current is not None and not p.current.confirmed:
                    self._remove_session(p.current, "handshake not confirmed")
                continue
            p.finish_attempts += 1
            self._out.append((p.finish_frame, p.addr))
            p.finish_next = now + self._backoff(p.finish_attempts)

    def _housekeeping(self, now: float) -> None:
        cfg = self.config
        self._maintain_paths(now)
        for s in list(self._by_index.values()):
            p = self._peers.get(s.peer.cell_id)
            age = now - s.created
            if age >= cfg.reject_after_seconds:
                self._remove_session(s, "session expired")
                continue
            if p is None:
                self._by_index.pop(s.local_index, None)
                continue
            if p.current is s:
                last = p.detector.last_heartbeat if p.detector is not None else s.last_recv
                if now - max(last, s.last_recv) >= cfg.idle_timeout:
                    phi = p.detector.phi(now) if p.detector is not None else 0.0
                    self._events.append(PeerStateChanged(p.cell_id, "dead", phi))
                    self._drop_peer(p, "peer silent (idle timeout)")
                    continue
                silent = now - max(last, s.last_recv)
                if (
                    p.conn is not None
                    and p.conn.pto_count >= DEAD_AFTER_PTOS
                    and silent >= min(cfg.idle_timeout, UNRESPONSIVE_FLOOR)
                ):
                    # Data is outstanding and repeated probes went unanswered: the peer is gone.
                    # (An idle peer is only judged by idle_timeout; this catches dead peers in
                    # the middle of a transfer much sooner.)
                    phi = p.detector.phi(now) if p.detector is not None else 0.0
                    if not p.suspect:
                        self._events.append(PeerStateChanged(p.cell_id, "suspect", phi))
                    self._events.append(PeerStateChanged(p.cell_id, "dead", phi))
                    self._drop_peer(p, f"peer unresponsive ({p.conn.pto_count} probes unanswered)")
                    continue
                if p.detector is not None and not p.suspect:
                    phi = p.detector.phi(now)
                    if phi >= cfg.failure_threshold:
                        p.suspect = True
                        self._events.append(PeerStateChanged(p.cell_id, "suspect", phi))
                rekey_at = cfg.rekey_after_seconds + (
                    0 if s.is_initiator else RESPONDER_REKEY_DELAY
                )
                if age >= rekey_at:
                    self._start_rekey(s, now)
                if now - s.last_send >= cfg.keepalive_interval:
                    self._seal_to(s, [Keepalive()], now)
            elif now - s.last_recv >= STALE_SESSION_GRACE or (
                not s.confirmed and age >= cfg.handshake_timeout
            ):
                self._remove_session(s, "superseded")
        for idx, half in list(self._half_open.items()):
            if now - half.created >= cfg.handshake_timeout:
                del self._half_open[idx]
        while self._answered:
            digest, (_, t, _a, _n) = next(iter(self._answered.items()))
            if now - t < cfg.handshake_timeout:
                break
            del self._answered[digest]
        while self._pings:
            pid, (_, t) = next(iter(self._pings.items()))
            if now - t < PING_MEMORY:
                break
            del self._pings[pid]
        self._maintain_static_peers(now)


def _base_mtu(addr: Addr) -> int:
    """What a path to `addr` surely carries: 1,200 bytes, less one hop's wrapping if relayed."""
    return BASE_DATAGRAM - RELAY_OVERHEAD if via_cell(addr) is not None else BASE_DATAGRAM


def _addr_key(addr: Addr) -> bytes:
    return f"addr:{addr[0]}|{addr[1]}".encode()
