"""The reliable connection with one peer: streams, messages, acknowledgements, loss recovery,
congestion control, pacing and path MTU. Pure: time is passed in.

Theory of operation. A connection outlives the sessions (keys) it runs over: a rekey swaps the
session, the connection carries on. Packet numbers form one monotonically increasing space per
direction across sessions, so acknowledgements are never ambiguous.

Receiver side (NACK-driven): each received packet number is recorded. While packets arrive in order
the receiver stays quiet, acknowledging only every `ACK_EVERY` ack-eliciting packets or after
`MAX_ACK_DELAY`. A gap (or a late packet filling one) triggers an immediate acknowledgement whose
ranges expose exactly what is missing: a negative acknowledgement, rate-limited to one per
RTT/16.

Sender side (RFC 9002): a packet is declared lost when three later packets were acknowledged or it is
older than 9/8 RTT relative to an acknowledged later one; its frames (never its bytes) are queued again
and leave in a new packet with a new number, so the replay window never sees a reused number. A probe
timeout (tail-loss probe) fires when acknowledgements stop while data is outstanding, so a lost last
packet, or a lost acknowledgement, cannot stall a transfer. The congestion controller (congestion.py)
decides how much may be in flight and how fast to pace.

Path MTU (RFC 8899 style): start at 1200 bytes, probe larger sizes with padded packets that are not
counted against the congestion window, raise the size when a probe is acknowledged, stop after three
losses at a size, and fall back to 1200 if full-size packets vanish (a black hole).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cellmesh.errors import LocalProtocolError, RemoteProtocolError
from cellmesh.transport.congestion import RateSample, make_controller
from cellmesh.transport.ranges import RangeSet
from cellmesh.transport.rtt import RttEstimator
from cellmesh.transport.stream import (
    CHUNK_BYTES_PER_PIECE,
    MAX_CHUNKS,
    PieceBudget,
    RecvStream,
    SendStream,
    grown_window,
)
from cellmesh.wire.messages import (
    Ack,
    AppData,
    Candidates,
    Close,
    Keepalive,
    MaxData,
    MaxMessages,
    MaxStreamData,
    Message,
    Msg,
    MsgType,
    Observed,
    Padding,
    PathChallenge,
    PathResponse,
    Ping,
    Pong,
    Relay,
    ResetStream,
    Route,
    StopSending,
    StreamFrame,
    Trace,
    push_message,
    push_stream_parts,
)

HEADER_AND_TAG = 64 + 16
_KEEPALIVE = int(MsgType.KEEPALIVE)  # record type byte, as an int for hot-path comparisons
_UNRELIABLE = (
    Ping,
    Pong,
    AppData,
    Close,
    Relay,
    Route,
    PathChallenge,
    PathResponse,
    Observed,
    Candidates,
    Trace,
)
BASE_MTU = 1200
PMTU_CANDIDATES = (1452, 2048, 4096, 8192, 9000, 16384, 32768, 65507)
PMTU_MAX_PROBES = 3
PMTU_RAISE_INTERVAL = 600.0
MAX_ACK_DELAY = 0.025
ACK_EVERY = 4
# ...or after this many bytes of ack-eliciting packets, whichever comes first: with large
# datagrams (64 KB on loopback and jumbo links) a window is only a few packets, and waiting for
# the fourth would let the sender stall for a whole window before it hears anything.
ACK_EVERY_BYTES = 32 * 1024
PACKET_THRESHOLD = 3
PERSISTENT_CONGESTION_PTOS = 3
MAX_CONTROL_QUEUE = 4096
MAX_PTO_BACKOFF = 6
STREAM_LIMIT_ERROR = 5
STREAM_STATE_ERROR = 6
_STREAM_OVERHEAD = 3 + 13  # record header + STREAM head
_MSG_OVERHEAD = 3 + 8
_CHANNEL_EXTRA = 4  # a CHANNEL_MSG also carries the channel hash
_U64_LIMIT = 2**62


def _check_code(code: int) -> None:
    if not 0 <= code <= 0xFFFF:
        raise LocalProtocolError(f"stream error codes are 16-bit (0-65535), got {code}")


MESSAGE_WINDOW = 1024
"""Reliable messages (MSG and CHANNEL_MSG) a peer may send beyond those our application has
taken: the initial credit of both sides, and the step MAX_MESSAGES raises it by. It bounds what
unread messages can hold in memory (about 1,100 bytes each) per peer."""


@dataclass(frozen=True, slots=True)
class TransportParams:
    """Tunables of one connection (from NodeConfig)."""

    max_datagram: int = 65507
    stream_window: int = 4 * 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    stream_window_max: int = 16 * 1024 * 1024  # auto-tuning limits (see stream.grown_window)
    connection_window_max: int = 64 * 1024 * 1024
    send_buffer_max: int = 16 * 1024 * 1024  # see Connection._send_limit
    send_buffer: int = 4 * 1024 * 1024
    max_streams: int = 1024
    congestion_control: str = "bbr"
    max_message: int = 60000
    max_pending_messages: int = 100_000
    base_mtu: int = 1200


@dataclass(slots=True)
class SentPacket:
    """What we remember about a packet until it is acknowledged or lost."""

    pn: int
    time: float
    size: int
    ack_eliciting: bool
    in_flight: bool
    frames: list[tuple[Any, ...]]
    delivered: int
    delivered_time: float
    first_sent_time: float
    app_limited: bool
    probe_size: int = 0


@dataclass(slots=True)
class ConnectionStats:
    """Counters of one connection."""

    packets_sent: int = 0
    packets_acked: int = 0
    packets_lost: int = 0
    bytes_retransmitted: int = 0
    acks_sent: int = 0
    immediate_acks: int = 0
    pto_count_total: int = 0
    stream_bytes_sent: int = 0
    stream_bytes_received: int = 0
    duplicate_messages: int = 0
    control_dropped: int = 0


def _pn_of(p: SentPacket) -> int:
    return p.pn


class Connection:
    """Reliable delivery to one peer. See the module docstring."""

    def __init__(self, params: TransportParams, local_even: bool, now: float) -> None:
        self.params = params
        self.rtt = RttEstimator()
        self.base_mtu = min(params.base_mtu, params.max_datagram)
        """The size every path must carry: BASE_MTU, less the relay overhead on relayed paths."""
        self.mtu = self.base_mtu
        self.cc = make_controller(params.congestion_control, self.mtu)
        self.stats = ConnectionStats()
        self.events: deque[tuple[Any, ...]] = deque()
        # streams
        self._local_parity = 0 if local_even else 1
        self._next_local = self._local_parity
        self._next_peer = 1 - self._local_parity
        self._send: dict[int, SendStream] = {}
        self._recv: dict[int, RecvStream] = {}
        self._rr: deque[int] = deque()  # streams with something to send, round robin
        self._blocked: set[int] = set()
        # connection flow control
        self._peer_max_data = params.connection_window
        self._sent_new = 0
        self._local_max_data = params.connection_window
        self._conn_window = params.connection_window  # grows like a stream window does
        # Out-of-order pieces all streams together may hold: one per KiB of the connection
        # window (as for one stream and its window), at least MAX_CHUNKS. Small contiguous
        # arrivals merge, so an honest sender's pieces hold at least 1 KiB each (or follow a gap).
        self._pieces = PieceBudget(self._piece_limit())
        self._conn_window_max = max(params.connection_window, params.connection_window_max)
        self._conn_last_update: float | None = None
        self._learned_window = params.stream_window  # the largest stream window grown to
        self._recv_total = 0
        self._consumed_total = 0
        self._max_data_pending = False
        self._max_stream_pending: set[int] = set()
        self._reset_pending: dict[int, tuple[int, int]] = {}
        """stream id -> (code, final size), fixed when the reset is made: the send stream may
        be forgotten before the RESET_STREAM record is built or retransmitted."""
        self._stop_pending: dict[int, int] = {}
        # messages
        self._msgs: deque[Msg] = deque()
        self._next_msg_id = 0
        self._seen_msgs = RangeSet(limit=4096)
        # Message credit (MAX_MESSAGES): ids below the limit may be sent. The receiver raises
        # it as its application takes messages, so a reader that falls behind holds the sender
        # back instead of losing messages the transport already acknowledged.
        self._peer_msg_limit = MESSAGE_WINDOW
        self._local_msg_limit = MESSAGE_WINDOW
        self._msgs_consumed = 0
        self._max_msgs_pending = False
        # unreliable control records, sent once
        self._control: deque[bytes] = deque()
        # sender recovery
        self._sent: OrderedDict[int, SentPacket] = OrderedDict()
        self.bytes_in_flight = 0
        self._largest_acked = -1
        self._loss_time: float | None = None
        self._last_eliciting_sent = 0.0
        self._pto_count = 0
        self._probes_due = 0
        self._delivered = 0
        self._delivered_time = now
        self._first_sent_time = now
        self._next_send_time = now
        # receiver acknowledgements
        self._received = RangeSet(limit=1024)
        self._largest_received = -1
        self._largest_received_time = now
        self._unacked_eliciting = 0
        self._unacked_bytes = 0
        self._ack_deadline: float | None = None
        self._ack_now = False
        self._last_immediate_ack = -1.0
        self._ack_dirty = False
        # path MTU
        self._pmtu_index = 0
        self._pmtu_failures = 0
        self._pmtu_next_probe = now + 0.05
        self._pmtu_in_flight = False
        self._big_losses = 0
        self._last_big_ack = now
        self._largest_sent = -1
        self._last_pto_time = -1.0

    # ------------------------------------------------------------------ application API

    def open_stream(self) -> int:
        """Open a new outgoing stream; returns its id."""
        mine = sum(1 for sid in self._send if sid % 2 == self._local_parity)
        if mine >= self.params.max_streams:
            raise LocalProtocolError(f"at most {self.params.max_streams} open streams")
        sid = self._next_local
        self._next_local += 2
        self._create(sid)
        return sid

    def _create(self, sid: int) -> None:
        self._send[sid] = SendStream(sid, self.params.stream_window)
        r = RecvStream(sid, self.params.stream_window, self.params.stream_window_max, self._pieces)
        self._recv[sid] = r
        if self._learned_window > r.window:
            # A stream starts with the window earlier streams of this peer grew to (a transfer
            # per stream need not learn it again), advertised at once: the peer assumes the
            # configured initial window until told.
            r.window = r.max_data = self._learned_window
            self._max_stream_pending.add(sid)

    def write(self, sid: int, data: bytes, fin: bool = False) -> None:
        """Queue bytes on a stream (call `send_space` first to respect the send buffer)."""
        s = self._send.get(sid)
        if s is None:
            raise LocalProtocolError(f"stream {sid} is not open")
        s.write(data, fin)
        if sid not in self._rr:
            self._rr.append(sid)

    def send_space(self, sid: int) -> int:
        """Bytes the application may still write to `sid` before the send buffer is full."""
        s = self._send.get(sid)
        if s is None:
            return 0
        space = self._send_limit() - s.buffered
        if space <= 0:
            self._blocked.add(sid)
        return max(0, space)

    @property
    def receive_window(self) -> int:
        """The connection-level window we advertise now (auto-tuned, see `consumed`)."""
        return self._conn_window

    def _send_limit(self) -> int:
        """Bytes one stream may hold unacknowledged. Everything in flight stays buffered until
        acknowledged, so a buffer smaller than the congestion window would cap the window: the
        limit follows 2 x cwnd (as Linux sizes a socket's send buffer), from `send_buffer` up
        to `send_buffer_max`."""
        p = self.params
        return max(p.send_buffer, min(2 * self.cc.cwnd, p.send_buffer_max))

    def reset_stream(self, sid: int, code: int) -> None:
        """Abandon sending on `sid` and tell the peer."""
        _check_code(code)
        s = self._send.get(sid)
        if s is None or s.reset_code is not None:
            return
        s.reset_code = code
        self._reset_pending[sid] = (code, s.next_offset)
        self._maybe_forget(sid)

    def stop_sending(self, sid: int, code: int) -> None:
        """We will not read `sid` any more: ask the peer to reset it."""
        _check_code(code)
        r = self._recv.get(sid)
        if r is None or r.reset_code is not None:
            return
        r.reset_code = code
        r.drop_pieces()  # never to be read
        self._stop_pending[sid] = code
        # Nobody will read this stream again: return the credit of everything that arrived but
        # was not read, out-of-order bytes (and the holes between them, which the connection
        # counted too) included.
        unread = r.highest - r.consumed
        r.consumed = r.delivered = r.highest
        if unread > 0:
            self.consumed(-1, unread)

    def messages_consumed(self, n: int = 1) -> None:
        """The application took `n` reliable messages: the peer may send that many more (a
        MAX_MESSAGES record goes out once half a window has been taken)."""
        self._msgs_consumed += n
        target = self._msgs_consumed + MESSAGE_WINDOW
        if target - self._local_msg_limit >= MESSAGE_WINDOW // 2:
            self._local_msg_limit = target
            self._max_msgs_pending = True

    @property
    def messages_blocked(self) -> bool:
        """Messages wait for the peer's credit (its application is not taking them)."""
        return bool(self._msgs) and self._msgs[-1].msg_id >= self._peer_msg_limit

    def consumed(self, sid: int, n: int, now: float | None = None) -> None:
        """The application read `n` bytes of `sid`: reopen the windows. With `now`, windows the
        reader keeps exhausting grow (auto-tuning, see `stream.grown_window`)."""
        rtt = self.rtt.smoothed
        r = self._recv.get(sid)
        if r is not None:
            if r.on_consumed(n, now, rtt) is not None:
                self._max_stream_pending.add(sid)
                if r.window > self._learned_window:
                    self._learned_window = r.window
                # The connection window stays ahead of any one stream's (1.5x, as Chromium
                # does), or a grown stream window would only move the stall to the connection.
                floor = min(self._conn_window_max, r.window * 3 // 2)
                if floor > self._conn_window:
                    self._conn_window = floor
                    self._pieces.limit = self._piece_limit()
            self._maybe_forget(sid)
        self._consumed_total += n
        window = self._conn_window
        if self._consumed_total + window - self._local_max_data >= window // 2:
            if now is not None:
                window = grown_window(
                    window, self._conn_window_max, self._conn_last_update, now, rtt
                )
                self._conn_window = window
                self._pieces.limit = self._piece_limit()
                self._conn_last_update = now
            self._local_max_data = self._consumed_total + window
            self._max_data_pending = True

    def send_message(self, data: bytes, channel: int = 0) -> None:
        """Queue a reliable, unordered message (on the channel with hash `channel` if not 0)."""
        limit = self.max_message - (_CHANNEL_EXTRA if channel else 0)
        if len(data) > limit:
            raise LocalProtocolError(f"message of {len(data)} bytes exceeds {limit}; use a stream")
        if len(self._msgs) >= self.params.max_pending_messages:
            raise LocalProtocolError("too many messages waiting to be sent")
        self._msgs.append(Msg(self._next_msg_id, data, channel))
        self._next_msg_id += 1

    @property
    def max_message(self) -> int:
        """The largest reliable message: one message travels in one packet."""
        # One message travels in one packet, and a path can always fall back to the base MTU.
        return min(self.params.max_message, self.base_mtu - HEADER_AND_TAG - _MSG_OVERHEAD)

    @property
    def max_control_record(self) -> int:
        """The largest unreliable record that fits one packet on the path as it is now."""
        return self.mtu - HEADER_AND_TAG

    def queue_control(self, record: bytes) -> None:
        """An unreliable record (PING, PONG, CLOSE, KEEPALIVE, APP) for the next packet."""
        if len(self._control) >= MAX_CONTROL_QUEUE:
            self._control.popleft()  # oldest first: unreliable traffic may be shed
            self.stats.control_dropped += 1
        self._control.append(record)

    def note_untracked(self, pn: int) -> None:
        """A packet numbered `pn` was sent outside `build_packet` (a session confirmation)."""
        self._largest_sent = max(self._largest_sent, pn)

    def open_streams(self) -> int:
        """How many streams are open."""
        return len(self._send)

    # ------------------------------------------------------------------ receiving

    def on_packet(self, pn: int, msgs: list[Message], now: float, size: int = 0) -> list[Message]:
        """Process the transport records of packet `pn`; return the others for the caller.

        Raises `RemoteProtocolError` when the peer breaks a stream or flow-control rule.
        """
        other: list[Message] = []
        eliciting = False
        for m in msgs:
            if isinstance(m, Ack):
                self._on_ack(m, now)
                continue
            if isinstance(m, _UNRELIABLE):
                # PING/PONG/APP/CLOSE are fire-and-forget: they ask for no acknowledgement.
                other.append(m)
                continue
            eliciting = True
            if isinstance(m, StreamFrame):
                self._on_stream(m)
            elif isinstance(m, Msg):
                if m.msg_id >= self._local_msg_limit:
                    raise RemoteProtocolError(
                        f"message {m.msg_id} beyond the message credit {self._local_msg_limit}",
                        STREAM_LIMIT_ERROR,
                    )
                if m.msg_id in self._seen_msgs:
                    self.stats.duplicate_messages += 1
                else:
                    self._seen_msgs.add(m.msg_id, m.msg_id + 1)
                    self.events.append(("message", m.data, m.channel))
            elif isinstance(m, MaxMessages):
                self._peer_msg_limit = max(self._peer_msg_limit, m.limit)
            elif isinstance(m, MaxData):
                if m.maximum > self._peer_max_data:
                    self._peer_max_data = m.maximum
                    # Streams that stopped for lack of connection credit may go again.
                    for sid, snd in self._send.items():
                        if sid not in self._rr and snd.has_data():
                            self._rr.append(sid)
            elif isinstance(m, MaxStreamData):
                s = self._send.get(m.stream_id)
                if s is not None:
                    s.max_data = max(s.max_data, m.maximum)
                    if m.stream_id not in self._rr and s.has_data():
                        self._rr.append(m.stream_id)
            elif isinstance(m, ResetStream):
                self._on_reset(m)
            elif isinstance(m, StopSending):
                s = self._send.get(m.stream_id)
                if s is not None and s.reset_code is None:
                    self.reset_stream(m.stream_id, m.code)
                    self.events.append(("reset", m.stream_id, m.code, True))
            elif isinstance(m, Padding):
                continue
            else:
                other.append(m)
        self._record_received(pn, eliciting, now, size)
        return other

    def note_received(self, pn: int, now: float) -> None:
        """Packet `pn` carried only records that ask for no acknowledgement (e.g. one APP
        record, which the endpoint decoded itself): remember its number for our ACK ranges.
        (`_record_received` for a packet that elicits nothing, without the gap test.)"""
        self._received.add_one(pn)
        self._ack_dirty = True
        if pn > self._largest_received:
            self._largest_received = pn
            self._largest_received_time = now

    def note_received_range(self, lo: int, hi: int, now: float) -> None:
        """`note_received` for every packet number in [lo, hi) (a run from one GRO batch)."""
        self._received.add(lo, hi)
        self._ack_dirty = True
        if hi - 1 > self._largest_received:
            self._largest_received = hi - 1
            self._largest_received_time = now

    def _record_received(self, pn: int, eliciting: bool, now: float, size: int = 0) -> None:
        gap = self._largest_received >= 0 and pn != self._largest_received + 1
        self._received.add_one(pn)
        self._ack_dirty = True
        if pn > self._largest_received:
            self._largest_received = pn
            self._largest_received_time = now
        if not eliciting:
            return
        self._unacked_eliciting += 1
        self._unacked_bytes += size
        if gap and now - self._last_immediate_ack >= self.rtt.smoothed / 16:
            # A hole, or a late packet filling one: report it at once (the NACK).
            self._ack_now = True
            self._last_immediate_ack = now
            self.stats.immediate_acks += 1
        elif self._unacked_eliciting >= ACK_EVERY or self._unacked_bytes >= ACK_EVERY_BYTES:
            self._ack_now = True
        elif self._ack_deadline is None:
            self._ack_deadline = now + MAX_ACK_DELAY

    def _stream_for_peer_frame(self, sid: int) -> RecvStream | None:
        r = self._recv.get(sid)
        if r is not None:
            return r
        if sid % 2 == self._local_parity:
            if sid >= self._next_local:
                raise RemoteProtocolError(
                    f"peer used our stream id {sid} before we opened it", STREAM_STATE_ERROR
                )
            return None  # one of ours, already finished
        if sid < self._next_peer:
            return None  # finished earlier: a late retransmission
        opening = (sid - self._next_peer) // 2 + 1
        if len(self._recv) + opening > self.params.max_streams * 2:
            raise RemoteProtocolError("peer opened too many streams", STREAM_LIMIT_ERROR)
        while self._next_peer <= sid:
            self._create(self._next_peer)
            self.events.append(("opened", self._next_peer))
            self._next_peer += 2
        return self._recv[sid]

    def on_stream_packet(
        self,
        pn: int,
        sid: int,
        offset: int,
        data: bytes | memoryview,
        fin: bool,
        now: float,
        size: int,
    ) -> None:
        """`on_packet` for a packet that is exactly one STREAM record (the bulk of a transfer),
        given its decoded fields (`wire.messages.pull_single_stream`)."""
        self._on_stream_data(sid, offset, data, fin)
        self._record_received(pn, True, now, size)

    def _on_stream(self, m: StreamFrame) -> None:
        self._on_stream_data(m.stream_id, m.offset, m.data, m.fin)

    def _on_stream_data(
        self, stream_id: int, offset: int, chunk: bytes | memoryview, end: bool
    ) -> None:
        r = self._stream_for_peer_frame(stream_id)
        if r is None:
            return
        before = r.highest
        data, fin = r.on_frame(offset, chunk, end)
        grown = r.highest - before
        if grown > 0:
            self._recv_total += grown
            if self._recv_total > self._local_max_data:
                raise RemoteProtocolError("peer exceeded the connection flow-control limit", 3)
            if r.reset_code is not None:
                self.consumed(-1, grown)  # we stopped reading: bytes still in flight are let go
        if data or fin:
            self.stats.stream_bytes_received += len(data)
            self.events.append(("data", stream_id, data, fin))
        if fin:
            self._maybe_forget(stream_id)

    def _on_reset(self, m: ResetStream) -> None:
        r = self._stream_for_peer_frame(m.stream_id)
        if r is None:
            return
        if r.reset_code is not None:
            # Already reset (we stopped reading, or a repeat): what the peer sent past the
            # highest byte we saw was used credit too; it was lost in flight and will never be
            # resent, so count it received and let it go, or the connection window shrinks.
            if r.highest < m.final_size <= r.max_data:
                grown = m.final_size - r.highest
                r.highest = r.consumed = r.delivered = m.final_size
                self._recv_total += grown
                if self._recv_total > self._local_max_data:
                    raise RemoteProtocolError("peer exceeded the connection flow-control limit", 3)
                self.consumed(-1, grown)
            return
        if r.final_size is not None and r.final_size != m.final_size:
            raise RemoteProtocolError("RESET_STREAM final size differs", 4)
        if m.final_size < r.highest:
            raise RemoteProtocolError("RESET_STREAM final size below data already received", 4)
        if m.final_size > r.max_data:
            raise RemoteProtocolError("RESET_STREAM final size beyond the flow-control limit", 3)
        # The peer used credit up to final_size and will never send the rest: count it received,
        # and count everything the application will now never read as consumed, so the
        # connection window is not leaked by resets.
        self._recv_total += m.final_size - r.highest
        r.highest = m.final_size
        if self._recv_total > self._local_max_data:
            raise RemoteProtocolError("peer exceeded the connection flow-control limit", 3)
        unread = m.final_size - r.consumed
        r.consumed = m.final_size
        r.delivered = max(r.delivered, m.final_size)
        if unread > 0:
            self.consumed(-1, unread)
        r.reset_code = m.code
        r.drop_pieces()  # never to be delivered
        self.events.append(("reset", m.stream_id, m.code, True))
        # Stop sending on our half too: the peer has gone away from this stream.
        s = self._send.get(m.stream_id)
        if s is not None and not s.done:
            s.reset_code = m.code
        self._maybe_forget(m.stream_id)

    def _piece_limit(self) -> int:
        return max(MAX_CHUNKS, self._conn_window // CHUNK_BYTES_PER_PIECE)

    def _maybe_forget(self, sid: int) -> None:
        s = self._send.get(sid)
        r = self._recv.get(sid)
        if s is not None and r is not None and s.done and r.done:
            del self._send[sid]
            del self._recv[sid]
            r.drop_pieces()
            self._blocked.discard(sid)

    # ------------------------------------------------------------------ acknowledgements

    def _on_ack(self, ack: Ack, now: float) -> None:
        largest = ack.ranges[0][1] - 1
        if largest > self._largest_sent:
            raise RemoteProtocolError("peer acknowledged a packet we never sent", 7)
        if not self._sent:
            return
        newly: list[SentPacket] = []
        first = next(iter(self._sent))
        for start, end in ack.ranges:
            if end <= first:
                break
            for pn in range(max(start, first), end):
                p = self._sent.pop(pn, None)
                if p is not None:
                    newly.append(p)
        if not newly:
            return
        if largest > self._largest_acked:
            self._largest_acked = largest
        newly.sort(key=_pn_of)
        newest = newly[-1]
        if newest.pn == largest and newest.ack_eliciting:
            self.rtt.update(now - newest.time, ack.delay_us / 1e6, MAX_ACK_DELAY)
        runs: dict[int, list[Any]] = {}  # stream id -> [start, end, fin] of acknowledged bytes
        # The congestion controller hears of the whole acknowledgement once, with one
        # delivery-rate sample taken from its newest packet (as Linux's tcp_rate does): the
        # newest carries the most recent delivery state, so its sample is the one that counts.
        acked = packets = 0
        sampled: SentPacket | None = None
        for p in newly:
            if p.in_flight:
                self.bytes_in_flight -= p.size
                # A sample spanning a probe timeout measures the outage, not the path.
                if p.time > self._last_pto_time:
                    acked += p.size
                    packets += 1
                    sampled = p
            self._delivered += p.size
            if p.probe_size:
                self._pmtu_acked(p.probe_size, now)
            elif p.size > self.base_mtu:
                self._big_losses = 0
                self._last_big_ack = now
            for f in p.frames:
                if f[0] == "s":
                    # Contiguous pieces of one stream acknowledged together are handed to it
                    # as one range (a bulk transfer's ACK covers several packets of one stream).
                    sid, off, length, fin = f[1], f[2], f[3], f[4]
                    run = runs.get(sid)
                    if run is not None and run[1] == off and not run[2]:
                        run[1] = off + length
                        run[2] = fin
                    else:
                        if run is not None:
                            self._stream_acked(sid, run[0], run[1] - run[0], run[2])
                        runs[sid] = [off, off + length, fin]
        self.stats.packets_acked += len(newly)
        self._delivered_time = now
        if sampled is not None:
            p = sampled
            sample: RateSample | None = None
            interval = max(p.time - p.first_sent_time, now - p.delivered_time)
            if interval > 0:
                sample = RateSample(
                    (self._delivered - p.delivered) / interval,
                    self._delivered,
                    p.delivered,
                    p.app_limited,
                    now - p.time,
                )
            self._first_sent_time = p.time
            self.cc.on_acked(acked, p.time, sample, now, self.bytes_in_flight, packets)
        for sid, (start, end, fin) in runs.items():
            self._stream_acked(sid, start, end - start, fin)
        self._pto_count = 0
        self._detect_losses(now)

    def _stream_acked(self, sid: int, offset: int, length: int, fin: bool) -> None:
        s = self._send.get(sid)
        if s is None:
            return
        was_done = s.done
        s.on_acked(offset, length, fin)
        # (Below half the limit as it is now: the limit follows cwnd, so it may have grown
        # past the point where the writer stopped.)
        if sid in self._blocked and s.buffered < self._send_limit() // 2:
            self._blocked.discard(sid)
            self.events.append(("writable", sid))
        if s.done and not was_done and s.reset_code is None:
            self.events.append(("finished", sid))
        self._maybe_forget(sid)

    def _detect_losses(self, now: float) -> None:
        self._loss_time = None
        delay = self.rtt.loss_delay()
        lost: list[SentPacket] = []
        for pn, p in self._sent.items():
            if pn >= self._largest_acked:
                break
            # The same expression as the timer below (p.time + delay), so a timer that fires at
            # exactly that instant always finds the packet lost (no float-rounding livelock).
            if self._largest_acked - pn >= PACKET_THRESHOLD or p.time + delay <= now:
                lost.append(p)
            else:
                t = p.time + delay
                if self._loss_time is None or t < self._loss_time:
                    self._loss_time = t
        for p in lost:
            del self._sent[p.pn]
            self._on_packet_lost(p, now)

    def _on_packet_lost(self, p: SentPacket, now: float) -> None:
        self.stats.packets_lost += 1
        if p.in_flight:
            self.bytes_in_flight -= p.size
            self.cc.on_lost(p.size, p.time, now)
        if p.probe_size:
            self._pmtu_lost(now)
            return  # probe padding carries nothing to resend
        if p.size > self.base_mtu and self.mtu > self.base_mtu:
            self._big_losses += 1
            silent = now - self._last_big_ack > 3 * self.rtt.pto(MAX_ACK_DELAY)
            if self._big_losses >= 3 and silent:
                # A black hole: full-size packets vanish while small ones get through.
                self._set_mtu(self.base_mtu)
                self._pmtu_index = 0
                self._pmtu_next_probe = now + PMTU_RAISE_INTERVAL / 10
        self._requeue(p)

    # ------------------------------------------------------------------ path MTU

    def _set_mtu(self, size: int) -> None:
        self.mtu = size
        self.cc.mss = size

    def set_base_mtu(self, base: int, now: float) -> None:
        """The path changed (direct <-> relayed): `base` is what it surely carries now.

        Packets larger than it may vanish on the new path, so the size drops to it at once and
        path MTU discovery probes up again from there.
        """
        base = min(base, self.params.max_datagram)
        if base == self.base_mtu:
            return
        self.base_mtu = base
        self._set_mtu(base)
        self._pmtu_index = 0
        self._pmtu_next_probe = now + 0.05

    def _pmtu_acked(self, size: int, now: float) -> None:
        self._pmtu_in_flight = False
        if size > self.mtu:
            self._set_mtu(size)
        self._pmtu_index += 1
        self._pmtu_failures = 0
        self._pmtu_next_probe = now

    def _pmtu_lost(self, now: float) -> None:
        self._pmtu_in_flight = False
        self._pmtu_failures += 1
        if self._pmtu_failures >= PMTU_MAX_PROBES:
            self._pmtu_index = len(PMTU_CANDIDATES)  # search done until the raise timer
            self._pmtu_failures = 0
            self._pmtu_next_probe = now + PMTU_RAISE_INTERVAL
        else:
            self._pmtu_next_probe = now + self.rtt.smoothed

    def _pmtu_probe_size(self, now: float) -> int:
        if self._pmtu_in_flight or now < self._pmtu_next_probe:
            return 0
        if self._pmtu_index >= len(PMTU_CANDIDATES):
            if self.mtu < self.params.max_datagram:
                self._pmtu_index = 0  # raise timer expired: search again
            else:
                return 0
        while self._pmtu_index < len(PMTU_CANDIDATES):
            size = min(PMTU_CANDIDATES[self._pmtu_index], self.params.max_datagram)
            if size > self.mtu:
                return size
            self._pmtu_index += 1
        return 0

    # ------------------------------------------------------------------ sending

    def _ack_record(self, now: float) -> bytes | None:
        if not self._received:
            return None
        # A range length is u32 on the wire: report at most the top 2**32-1 of a very long run.
        ranges = tuple((max(a, b - 0xFFFFFFFF), b) for a, b in self._received.descending(64))
        delay = max(0.0, now - self._largest_received_time)
        return push_message(Ack(ranges, int(delay * 1e6)))

    def ack_due(self, now: float) -> bool:
        """An acknowledgement must go out now."""
        return self._ack_now or (self._ack_deadline is not None and now >= self._ack_deadline)

    def _has_reliable_work(self) -> bool:
        return bool(
            (self._msgs and self._msgs[0].msg_id < self._peer_msg_limit)
            or self._max_msgs_pending
            or self._rr
            or self._max_data_pending
            or self._max_stream_pending
            or self._reset_pending
            or self._stop_pending
        )

    def wants_to_send(self, now: float) -> bool:
        """Something can leave right now (congestion and pacing permitting)."""
        if self._control or self.ack_due(now) or self._probes_due:
            return True
        if self._pmtu_probe_size(now):
            return True
        return self._has_reliable_work() and self._cwnd_open() and now >= self._next_send_time

    def _cwnd_open(self) -> bool:
        return self.bytes_in_flight < self.cc.cwnd

    def build_packet(self, pn: int, now: float) -> bytes | None:
        """The plaintext of packet `pn`, or None when nothing may be sent now."""
        parts = self.build_packet_parts(pn, now)
        return None if parts is None else b"".join(parts)

    def build_packet_parts(self, pn: int, now: float) -> Sequence[bytes | memoryview] | None:
        """`build_packet`, as the pieces its plaintext is the concatenation of (stream data as
        views of what the application wrote): the sender seals them into the datagram with one
        copy (`Session.seal_parts`) rather than joining them first."""
        if (
            self._control
            and not (self._ack_now or self._ack_deadline is not None or self._probes_due)
            and not self._has_reliable_work()
        ):
            # Only unreliable records to send (the datagram path): no ACK is owed, no probe or
            # reliable data competes, so the packet is just as many as fit.
            return self._control_packet(pn, now)
        if (
            len(self._rr) == 1
            and not self._control
            and not self._probes_due
            and not self._ack_now
            and self._ack_deadline is None
            and not self._ack_dirty
            and not self._msgs
            and not self._max_data_pending
            and not self._max_stream_pending
            and not self._reset_pending
            and not self._stop_pending
            and not self._max_msgs_pending
            # (no path-MTU probe due: `_pmtu_probe_size` would return 0)
            and (
                self.mtu >= self.params.max_datagram
                or self._pmtu_in_flight
                or now < self._pmtu_next_probe
            )
            and self.bytes_in_flight < self.cc.cwnd
            and now >= self._next_send_time
        ):
            return self._stream_packet(pn, now)
        return self._general_packet(pn, now)

    def _stream_packet(self, pn: int, now: float) -> list[bytes | memoryview] | None:
        """The bulk case: one stream has data and nothing else is owed (no acknowledgement,
        control record, probe or other frame). Builds exactly the packet `_general_packet`
        would (its frames of that one stream, filled the same way), without its general
        bookkeeping."""
        rr = self._rr
        sid = rr[0]
        s = self._send.get(sid)
        if s is None:
            return self._general_packet(pn, now)
        limit = self.mtu - HEADER_AND_TAG
        parts: list[bytes | memoryview] = []
        frames: list[tuple[Any, ...]] = []
        used = 0
        while limit - used > _STREAM_OVERHEAD:
            credit = max(0, self._peer_max_data - self._sent_new)
            got = s.next_frame(limit - used - _STREAM_OVERHEAD, credit)
            if got is None:
                rr.popleft()
                break
            offset, data, fin, is_new = got
            if is_new:
                self._sent_new += len(data)
                self.stats.stream_bytes_sent += len(data)
            head, body = push_stream_parts(sid, offset, data, fin)
            parts.append(head)
            parts.append(body)
            frames.append(("s", sid, offset, len(data), fin))
            used += len(head) + len(body)
            if not s.has_data():
                rr.pop()
                break
        if not parts:
            return None
        # (app-limited when nothing more is waiting to be sent)
        self._track(pn, now, used + HEADER_AND_TAG, True, frames, not rr, 0)
        self.stats.packets_sent += 1
        if pn > self._largest_sent:
            self._largest_sent = pn
        return parts

    def _track(
        self,
        pn: int,
        now: float,
        size: int,
        in_flight: bool,
        frames: list[tuple[Any, ...]],
        app_limited: bool,
        probe: int,
    ) -> None:
        """Remember ack-eliciting packet `pn` until it is acknowledged or lost, and count what
        it puts in flight (congestion control, pacing)."""
        if not self.bytes_in_flight:
            self._first_sent_time = now
            self._delivered_time = now
        self._sent[pn] = SentPacket(
            pn,
            now,
            size,
            True,
            in_flight,
            frames,
            self._delivered,
            self._delivered_time,
            self._first_sent_time,
            app_limited,
            probe,
        )
        self._last_eliciting_sent = now
        if in_flight:
            self.bytes_in_flight += size
            self.cc.on_sent(size, now)
            self._pace(size, now)

    def _pace(self, size: int, now: float) -> None:
        """Space the next packet after one of `size` bytes at the pacing rate."""
        rate = self.cc.pacing_rate(self.rtt)
        if rate > 0:
            # Allow a small burst (timer granularity in an event loop is ~1 ms).
            gap = min(size / rate, max(self.rtt.smoothed, 0.001))  # never park for long
            self._next_send_time = max(self._next_send_time, now - 0.002) + gap

    def _general_packet(self, pn: int, now: float) -> list[bytes | memoryview] | None:
        limit = self.mtu - HEADER_AND_TAG
        probe = 0
        parts: list[bytes | memoryview] = []
        frames: list[tuple[Any, ...]] = []
        used = 0
        eliciting = False
        ack_due = self.ack_due(now)
        reliable_ok = self._probes_due > 0 or (self._cwnd_open() and now >= self._next_send_time)
        if not ack_due and not self._control and not self._probes_due:
            probe = self._pmtu_probe_size(now)
            if not probe and not (reliable_ok and self._has_reliable_work()):
                return None
        if probe:
            limit = probe - HEADER_AND_TAG
        # An acknowledgement rides on what we send while one is owed and something new arrived.
        if ack_due or (self._ack_dirty and (self._unacked_eliciting or self._has_reliable_work())):
            rec = self._ack_record(now)
            if rec is not None and len(rec) <= limit:
                parts.append(rec)
                used += len(rec)
                self._ack_now = False
                self._ack_dirty = False
                self._ack_deadline = None
                self._unacked_eliciting = 0
                self._unacked_bytes = 0
                self.stats.acks_sent += 1
        while self._control and len(self._control[0]) > self.mtu - HEADER_AND_TAG:
            # Too big for the path as it is now (e.g. a PONG to a large PING after the MTU fell
            # back): unreliable records are dropped, never allowed to block the queue.
            self._control.popleft()
            self.stats.control_dropped += 1
        while self._control and used + len(self._control[0]) <= limit:
            rec = self._control.popleft()
            parts.append(rec)
            used += len(rec)
            if rec[0] == MsgType.KEEPALIVE:
                eliciting = True  # keepalives are answered, which is how a silent peer is noticed
        if probe:
            parts.append(push_message(Keepalive()))
            used += 3
            pad = limit - used - 3
            if pad > 0:
                parts.append(push_message(Padding(pad)))
            self._pmtu_in_flight = True
            eliciting = True
        elif reliable_ok:
            used, eliciting = self._fill_reliable(parts, frames, used, limit, eliciting)
        if self._probes_due and not eliciting and used + 3 <= limit:
            parts.append(push_message(Keepalive()))  # a probe must elicit an acknowledgement
            eliciting = True
        if not parts:
            return None
        size = sum(map(len, parts)) + HEADER_AND_TAG
        in_flight = eliciting and not probe
        if self._probes_due and eliciting:
            self._probes_due -= 1
        if eliciting:
            self._track(pn, now, size, in_flight, frames, not self._has_reliable_work(), probe)
        self.stats.packets_sent += 1
        self._largest_sent = max(self._largest_sent, pn)
        return parts

    def _control_packet(self, pn: int, now: float) -> Sequence[bytes | memoryview] | None:
        """A packet of queued unreliable records only; what `build_packet` would build when
        nothing else is due (same drops, same accounting)."""
        limit = self.mtu - HEADER_AND_TAG
        ctl = self._control
        while ctl and len(ctl[0]) > limit:
            ctl.popleft()  # too big for the path as it is now: shed, never block the queue
            self.stats.control_dropped += 1
        parts: list[bytes] = []
        used = 0
        keepalive = False
        while ctl and used + len(ctl[0]) <= limit:
            rec = ctl.popleft()
            parts.append(rec)
            used += len(rec)
            if rec[0] == _KEEPALIVE:
                keepalive = True
        if not parts:
            return None
        if keepalive:
            # A keepalive is answered (how a silent peer is noticed), so its packet is tracked
            # like reliable data: leave that to the general builder.
            ctl.extendleft(reversed(parts))
            return self._general_packet(pn, now)
        self.stats.packets_sent += 1
        if pn > self._largest_sent:
            self._largest_sent = pn
        return parts

    def _fill_reliable(
        self,
        parts: list[bytes | memoryview],
        frames: list[tuple[Any, ...]],
        used: int,
        limit: int,
        eliciting: bool,
    ) -> tuple[int, bool]:
        def add(rec: bytes, frame: tuple[Any, ...]) -> bool:
            nonlocal used, eliciting
            if used + len(rec) > limit:
                return False
            parts.append(rec)
            frames.append(frame)
            used += len(rec)
            eliciting = True
            return True

        if self._max_data_pending and add(push_message(MaxData(self._local_max_data)), ("d",)):
            self._max_data_pending = False
        # (Each loop is guarded: building a packet must not copy three empty collections.)
        if self._max_stream_pending:
            for sid in list(self._max_stream_pending):
                r = self._recv.get(sid)
                if r is None or add(push_message(MaxStreamData(sid, r.max_data)), ("w", sid)):
                    self._max_stream_pending.discard(sid)
        if self._reset_pending:
            for sid, (code, final) in list(self._reset_pending.items()):
                if add(push_message(ResetStream(sid, code, final)), ("r", sid, code, final)):
                    del self._reset_pending[sid]
        if self._stop_pending:
            for sid, code in list(self._stop_pending.items()):
                if add(push_message(StopSending(sid, code)), ("x", sid, code)):
                    del self._stop_pending[sid]
        if self._max_msgs_pending and add(push_message(MaxMessages(self._local_msg_limit)), ("n",)):
            self._max_msgs_pending = False
        while (
            self._msgs
            and self._msgs[0].msg_id < self._peer_msg_limit
            and used
            + _MSG_OVERHEAD
            + (_CHANNEL_EXTRA if self._msgs[0].channel else 0)
            + len(self._msgs[0].data)
            <= limit
        ):
            m = self._msgs.popleft()
            add(push_message(m), ("m", m))
        # Stream data, round robin: each stream gets one frame per turn.
        turns = len(self._rr)
        while self._rr and turns > 0 and limit - used > _STREAM_OVERHEAD:
            turns -= 1
            sid = self._rr[0]
            s = self._send.get(sid)
            if s is None or not s.has_data():
                self._rr.popleft()
                continue
            credit = max(0, self._peer_max_data - self._sent_new)
            got = s.next_frame(limit - used - _STREAM_OVERHEAD, credit)
            if got is None:
                self._rr.popleft()
                continue
            offset, data, fin, is_new = got
            if is_new:
                self._sent_new += len(data)
                self.stats.stream_bytes_sent += len(data)
            head, body = push_stream_parts(sid, offset, data, fin)
            if used + len(head) + len(body) <= limit:  # (next_frame sized it to fit)
                parts.append(head)
                parts.append(body)
                frames.append(("s", sid, offset, len(data), fin))
                used += len(head) + len(body)
                eliciting = True
            self._rr.rotate(-1)
            if s.has_data():
                turns += 1  # keep filling this packet while there is room
            elif self._rr and self._rr[-1] == sid:
                self._rr.pop()
        return used, eliciting

    # ------------------------------------------------------------------ timers

    def get_timer(self, now: float) -> float | None:
        """The next time `handle_timer` must run, or None."""
        t: float | None = self._ack_deadline
        if self._loss_time is not None:
            t = self._loss_time if t is None else min(t, self._loss_time)
        elif self._sent:
            pto = self._last_eliciting_sent + self.rtt.pto(MAX_ACK_DELAY) * (
                2 ** min(self._pto_count, MAX_PTO_BACKOFF)
            )
            t = pto if t is None else min(t, pto)
        if self._has_reliable_work() and self._cwnd_open() and self._next_send_time > now:
            t = self._next_send_time if t is None else min(t, self._next_send_time)
        probe_at = self._pmtu_next_probe
        if not self._pmtu_in_flight and self.mtu < self.params.max_datagram:
            t = probe_at if t is None else min(t, probe_at)
        return t

    def handle_timer(self, now: float) -> None:
        """Declare losses or send probes, whichever is due."""
        if self._loss_time is not None and now >= self._loss_time:
            self._detect_losses(now)
            return
        if self._loss_time is None and self._sent:
            pto = self._last_eliciting_sent + self.rtt.pto(MAX_ACK_DELAY) * (
                2 ** min(self._pto_count, MAX_PTO_BACKOFF)
            )
            if now >= pto:
                self._pto_count += 1
                self.stats.pto_count_total += 1
                self._probes_due = 2
                self._last_pto_time = now
                if self._pto_count >= 2 and self.mtu > self.base_mtu:
                    # Big packets may be vanishing (a black hole before any ACK could tell us):
                    # probe with base-size packets until the path answers again.
                    self._set_mtu(self.base_mtu)
                    self._pmtu_index = 0
                    self._pmtu_next_probe = now + PMTU_RAISE_INTERVAL / 10
                if self._pto_count == PERSISTENT_CONGESTION_PTOS:
                    self.cc.on_persistent_congestion(now)
                # Re-send the oldest outstanding data in the probe rather than only new data.
                oldest = next((p for p in self._sent.values() if p.frames), None)
                if oldest is not None:
                    del self._sent[oldest.pn]
                    if oldest.in_flight:
                        self.bytes_in_flight -= oldest.size
                    self.stats.packets_lost += 1
                    self._requeue(oldest)

    def _requeue(self, p: SentPacket) -> None:
        """Queue again whatever a lost packet carried that still matters."""
        for f in p.frames:
            kind = f[0]
            if kind == "s":
                s = self._send.get(f[1])
                if s is not None:
                    s.on_lost(f[2], f[3], f[4])
                    self.stats.bytes_retransmitted += f[3]
                    if f[1] not in self._rr:
                        self._rr.append(f[1])
            elif kind == "m":
                self._msgs.appendleft(f[1])
            elif kind == "d":
                self._max_data_pending = True
            elif kind == "n":
                self._max_msgs_pending = True
            elif kind == "w" and f[1] in self._recv:
                self._max_stream_pending.add(f[1])
            elif kind == "r":
                self._reset_pending[f[1]] = (f[2], f[3])
            elif kind == "x" and f[1] in self._recv:
                self._stop_pending[f[1]] = f[2]

    @property
    def pto_count(self) -> int:
        """Consecutive probe timeouts without an acknowledgement (a sign the peer is gone)."""
        return self._pto_count

    def outstanding(self) -> int:
        """Packets sent and neither acknowledged nor declared lost."""
        return len(self._sent)
