"""Unit tests for `cellmesh.transport.connection.Connection`: two connections wired back to back.

No sessions, no crypto, no sockets: `build_packet` output goes through `pull_messages` into the
peer's `on_packet`, with time injected. `Pipe` moves the plaintexts with a fixed one-way delay and
seeded, injectable loss, duplication and reordering, and advances virtual time to the next delivery
or timer (`get_timer` / `handle_timer`), the way `Endpoint` drives a connection.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from cellmesh.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from cellmesh.transport.connection import (
    ACK_EVERY,
    BASE_MTU,
    HEADER_AND_TAG,
    MAX_ACK_DELAY,
    MESSAGE_WINDOW,
    PMTU_CANDIDATES,
    PMTU_MAX_PROBES,
    STREAM_LIMIT_ERROR,
    STREAM_STATE_ERROR,
    Connection,
    TransportParams,
)
from cellmesh.wire.messages import (
    Ack,
    Keepalive,
    MaxData,
    Message,
    Msg,
    Padding,
    Ping,
    ResetStream,
    StreamFrame,
    pull_messages,
    push_message,
)

SMALL = TransportParams(max_datagram=1200)  # no path-MTU probing: packets are always 1200 bytes
T0 = 1000.0

# (sender name "a" or "b", packet number, plaintext, now) -> drop it?
DropFn = Callable[[str, int, bytes, float], bool]


@dataclass
class Side:
    """One connection and what its application saw."""

    name: str
    conn: Connection
    pn: int = 0
    consume: bool = True
    data: dict[int, bytearray] = field(default_factory=dict)
    fin: set[int] = field(default_factory=set)
    messages: list[bytes] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    sent: list[tuple[int, float, bytes]] = field(default_factory=list)

    def stream(self, sid: int) -> bytes:
        return bytes(self.data.get(sid, b""))


class Pipe:
    """Two connections, a lossy pipe between them and a virtual clock."""

    def __init__(
        self,
        params: TransportParams = SMALL,
        params_b: TransportParams | None = None,
        *,
        seed: int = 1,
        delay: float = 0.01,
        loss: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
        drop: DropFn | None = None,
    ) -> None:
        self.now = T0
        self.a = Side("a", Connection(params, True, T0))
        self.b = Side("b", Connection(params_b or params, False, T0))
        self.rng = random.Random(seed)
        self.delay = delay
        self.loss = loss
        self.dup = dup
        self.reorder = reorder
        self.drop = drop
        self.dropped = 0
        self._heap: list[tuple[float, int, Side, int, bytes]] = []
        self._seq = itertools.count()

    def peer(self, s: Side) -> Side:
        return self.b if s is self.a else self.a

    def flush(self, s: Side) -> None:
        c = s.conn
        for _ in range(100_000):
            if not c.wants_to_send(self.now):
                return
            pt = c.build_packet(s.pn, self.now)
            if pt is None:
                return
            pn = s.pn
            s.pn += 1
            s.sent.append((pn, self.now, pt))
            self._transmit(s, pn, pt)
        raise AssertionError("a connection kept sending at one instant")

    def _transmit(self, s: Side, pn: int, pt: bytes) -> None:
        if self.drop is not None and self.drop(s.name, pn, pt, self.now):
            self.dropped += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        at = self.now + self.delay
        if self.reorder and self.rng.random() < self.reorder:
            at += 2 * self.delay * self.rng.random()
        dst = self.peer(s)
        heapq.heappush(self._heap, (at, next(self._seq), dst, pn, pt))
        if self.dup and self.rng.random() < self.dup:
            heapq.heappush(self._heap, (at + self.delay / 2, next(self._seq), dst, pn, pt))

    def _app(self, s: Side) -> None:
        c = s.conn
        while c.events:
            e = c.events.popleft()
            s.events.append(e)
            if e[0] == "data":
                sid, chunk, fin = e[1], e[2], e[3]
                s.data.setdefault(sid, bytearray()).extend(chunk)
                if fin:
                    s.fin.add(sid)
                if s.consume and chunk:
                    c.consumed(sid, len(chunk), self.now)
            elif e[0] == "message":
                s.messages.append(e[1])
                if s.consume:
                    c.messages_consumed(1)  # the application took it: one more may come

    def step(self) -> bool:
        """Send what may go, then jump to the next delivery or timer and handle it."""
        for s in (self.a, self.b):
            self.flush(s)
        timers = (self.a.conn.get_timer(self.now), self.b.conn.get_timer(self.now))
        times = [t for t in timers if t is not None]
        if self._heap:
            times.append(self._heap[0][0])
        if not times:
            return False
        self.now = max(self.now, min(times))
        while self._heap and self._heap[0][0] <= self.now:
            _, _, dst, pn, pt = heapq.heappop(self._heap)
            dst.conn.on_packet(pn, pull_messages(pt), self.now)
            self._app(dst)
        for s in (self.a, self.b):
            t = s.conn.get_timer(self.now)
            if t is not None and t <= self.now:
                s.conn.handle_timer(self.now)
                self._app(s)
        return True

    def run_until(self, cond: Callable[[], bool], timeout: float) -> bool:
        end = self.now + timeout
        last, same = self.now, 0
        while not cond():
            if self.now > end or not self.step():
                return cond()
            same = same + 1 if self.now == last else 0
            last = self.now
            assert same < 10_000, f"time stuck at {self.now}: a timer that never fires"
        return True

    def run_for(self, dt: float) -> None:
        end = self.now + dt
        self.run_until(lambda: self.now >= end, dt)
        self.now = max(self.now, end)


def payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def records(pt: bytes) -> list[Message]:
    return pull_messages(pt)


def is_ack_only(pt: bytes) -> bool:
    return all(isinstance(m, Ack) for m in records(pt))


def transfer(pipe: Pipe, data: bytes, timeout: float = 600.0) -> int:
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, data, fin=True)
    assert pipe.run_until(lambda: sid in pipe.b.fin, timeout), (
        f"stalled at {len(pipe.b.stream(sid))}/{len(data)} bytes"
    )
    return sid


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize(
    ("loss", "dup", "reorder"), [(0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.3, 0.0, 0.0), (0.1, 0.1, 0.2)]
)
def test_stream_transfer_is_byte_exact(loss: float, dup: float, reorder: float) -> None:
    pipe = Pipe(seed=3, loss=loss, dup=dup, reorder=reorder)
    data = payload(300_000)
    sid = transfer(pipe, data)
    assert pipe.b.stream(sid) == data
    assert [e[1] for e in pipe.b.events if e[0] == "data" and e[3]] == [sid]  # one FIN
    assert [e for e in pipe.b.events if e[0] == "opened"] == [("opened", sid)]
    stats = pipe.a.conn.stats
    assert stats.stream_bytes_sent == len(data)  # new bytes counted once, however often resent
    assert pipe.b.conn.stats.stream_bytes_received == len(data)
    if loss:
        assert stats.packets_lost > 0
        assert stats.bytes_retransmitted > 0
    else:
        assert stats.packets_lost == 0
    # The sender learns that everything arrived.
    assert pipe.run_until(lambda: ("finished", sid) in pipe.a.events, 60)


def request_response(pipe: Pipe, request: bytes, response: bytes) -> int:
    """A writes a request and its FIN; B reads it, answers, and later ends its half with an
    empty FIN (write, then close, as an application does)."""
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, request, fin=True)
    assert pipe.run_until(lambda: sid in pipe.b.fin, 30)
    pipe.b.conn.write(sid, response)
    pipe.run_for(0.5)
    pipe.b.conn.write(sid, b"", fin=True)
    assert pipe.run_until(lambda: sid in pipe.a.fin, 30)
    pipe.run_for(1.0)
    assert pipe.a.stream(sid) == response
    return sid


def test_streams_are_forgotten_once_both_halves_finish() -> None:
    pipe = Pipe()
    sid = request_response(pipe, b"request", b"response")
    # The responder saw its response and FIN acknowledged after it had read the request.
    assert pipe.b.conn.open_streams() == 0
    assert ("finished", sid) in pipe.a.events
    assert ("finished", sid) in pipe.b.events


def test_requester_forgets_streams_ended_by_an_empty_fin() -> None:
    pipe = Pipe()
    for i in range(3):
        request_response(pipe, b"request %d" % i, b"response")
    assert pipe.a.conn.open_streams() == 0


def test_both_directions_and_many_streams_at_once() -> None:
    pipe = Pipe(seed=8, loss=0.1)
    sent: dict[tuple[str, int], bytes] = {}
    for i, side in enumerate((pipe.a, pipe.b, pipe.a, pipe.b, pipe.a)):
        sid = side.conn.open_stream()
        data = payload(20_000 + 1000 * i, seed=i)
        side.conn.write(sid, data, fin=True)
        sent[(side.name, sid)] = data

    def done() -> bool:
        return all(sid in pipe.peer(pipe.a if n == "a" else pipe.b).fin for n, sid in sent)

    assert pipe.run_until(done, 120)
    for (n, sid), data in sent.items():
        receiver = pipe.b if n == "a" else pipe.a
        assert receiver.stream(sid) == data


def test_reliable_messages_delivered_exactly_once_under_loss_and_duplication() -> None:
    pipe = Pipe(seed=5, loss=0.25, dup=0.25, reorder=0.2)
    msgs = [f"message {i} ".encode() * (1 + i % 40) for i in range(3000)]
    for m in msgs:
        pipe.a.conn.send_message(m)
    assert pipe.run_until(lambda: len(pipe.b.messages) >= len(msgs), 300)
    pipe.run_for(5.0)  # late duplicates and retransmissions must not deliver anything again
    assert sorted(pipe.b.messages) == sorted(msgs)
    assert pipe.b.conn.stats.duplicate_messages > 0


def test_flow_control_throttles_a_slow_reader_then_resumes() -> None:
    params = TransportParams(max_datagram=1200, stream_window=64 * 1024)
    pipe = Pipe(params)
    pipe.b.consume = False
    sid = pipe.a.conn.open_stream()
    data = payload(400_000)
    pipe.a.conn.write(sid, data, fin=True)
    pipe.run_for(5.0)
    assert len(pipe.b.stream(sid)) == 64 * 1024  # exactly one window, however long we wait
    pipe.b.consume = True
    pipe.b.conn.consumed(sid, 64 * 1024)
    assert pipe.run_until(lambda: sid in pipe.b.fin, 60)
    assert pipe.b.stream(sid) == data


def _tuning(maxima: bool) -> TransportParams:
    k = 1024
    return TransportParams(
        max_datagram=1200,
        stream_window=64 * k,
        connection_window=128 * k,
        stream_window_max=1024 * k if maxima else 64 * k,
        connection_window_max=2048 * k if maxima else 128 * k,
    )


def test_windows_auto_tune_for_a_reader_that_keeps_up() -> None:
    data = payload(3_000_000)
    took = {}
    for maxima in (False, True):
        pipe = Pipe(_tuning(maxima), delay=0.01)  # 20 ms RTT: a 64 KiB window is ~3 MB/s
        sid = pipe.a.conn.open_stream()
        pipe.a.conn.write(sid, data, fin=True)
        start = pipe.now
        assert pipe.run_until(lambda: sid in pipe.b.fin, 120)  # noqa: B023
        took[maxima] = pipe.now - start
        assert pipe.b.stream(sid) == data
        window = pipe.b.conn.receive_window
        if maxima:
            assert 128 * 1024 < window <= 2048 * 1024
        else:
            assert window == 128 * 1024
    # Virtual time, so deterministic: the grown windows let the path, not the window, pace it.
    assert took[True] < took[False] / 2


def test_a_reader_that_stops_holds_at_most_the_largest_stream_window() -> None:
    pipe = Pipe(_tuning(True), delay=0.01)
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, payload(12_000_000), fin=True)
    assert pipe.run_until(lambda: len(pipe.b.stream(sid)) >= 3_000_000, 120)
    pipe.b.consume = False  # the application stops reading
    read = len(pipe.b.stream(sid))
    pipe.run_for(10.0)
    unread = len(pipe.b.stream(sid)) - read
    assert 0 < unread <= 1024 * 1024  # never past stream_window_max, however fast it was read


def test_send_buffer_follows_the_congestion_window_within_its_bounds() -> None:
    params = TransportParams(max_datagram=1200, send_buffer=64 * 1024, send_buffer_max=256 * 1024)
    c = Connection(params, True, T0)
    sid = c.open_stream()
    c.cc.cwnd = 12_000
    assert c.send_space(sid) == 64 * 1024  # never below send_buffer
    c.cc.cwnd = 100_000
    assert c.send_space(sid) == 200_000  # 2 x cwnd: in flight stays buffered until acknowledged
    c.cc.cwnd = 10_000_000
    assert c.send_space(sid) == 256 * 1024  # never above send_buffer_max


@pytest.mark.parametrize(
    ("streams", "size", "connection_window", "stream_window"),
    [
        (1, 100_000, 20_000, 1 << 20),  # one stream, connection window the tighter one
        # Defaults' 4:1 ratio (16 MiB / 4 MiB) scaled down: many streams each under half a
        # stream window (so no MAX_STREAM_DATA wakes them) together exceed the connection window.
        # With the real defaults, 20 streams of 1 MB stall at exactly 16 MiB the same way.
        (8, 45_000, 200_000, 100_000),
    ],
)
def test_streams_blocked_by_the_connection_window_resume_on_max_data(
    streams: int, size: int, connection_window: int, stream_window: int
) -> None:
    params = TransportParams(
        max_datagram=1200, connection_window=connection_window, stream_window=stream_window
    )
    pipe = Pipe(params)
    sent: dict[int, bytes] = {}
    for i in range(streams):
        sid = pipe.a.conn.open_stream()
        sent[sid] = payload(size, seed=i)
        pipe.a.conn.write(sid, sent[sid], fin=True)
    assert pipe.run_until(lambda: all(sid in pipe.b.fin for sid in sent), 60), (
        f"stalled at {sum(len(pipe.b.stream(sid)) for sid in sent)} bytes"
    )
    assert all(pipe.b.stream(sid) == data for sid, data in sent.items())


def test_reset_streams_do_not_leak_connection_credit() -> None:
    params = TransportParams(max_datagram=1200, connection_window=40_000, stream_window=16_000)
    blocked: set[int] = set()

    def drop_head(who: str, pn: int, pt: bytes, now: float) -> bool:
        # Stream heads never arrive: the rest is received but cannot be delivered.
        return who == "a" and any(
            isinstance(m, StreamFrame) and m.stream_id in blocked and m.offset == 0
            for m in records(pt)
        )

    pipe = Pipe(params, drop=drop_head)
    for _ in range(4):
        sid = pipe.a.conn.open_stream()
        blocked.add(sid)
        pipe.a.conn.write(sid, b"x" * 15_000)
        pipe.run_for(1.0)
        pipe.a.conn.reset_stream(sid, 7)
        pipe.run_for(1.0)
        assert any(e[0] == "reset" and e[1] == sid for e in pipe.b.events)
    data = payload(15_000)
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, data, fin=True)
    assert pipe.run_until(lambda: sid in pipe.b.fin, 60)


def test_reset_reaches_the_peer_with_its_code() -> None:
    pipe = Pipe(loss=0.1, seed=2)
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, payload(50_000))
    pipe.run_for(0.05)
    pipe.a.conn.reset_stream(sid, 42)
    assert pipe.run_until(lambda: any(e[0] == "reset" for e in pipe.b.events), 30)
    (reset,) = [e for e in pipe.b.events if e[0] == "reset"]
    assert reset == ("reset", sid, 42, True)
    with pytest.raises(LocalProtocolError):
        pipe.a.conn.write(sid, b"more")


def test_out_of_range_reset_code_never_breaks_build_packet() -> None:
    c = Connection(SMALL, True, T0)
    sid = c.open_stream()
    c.write(sid, b"abc")
    with contextlib.suppress(LocalProtocolError):
        c.reset_stream(sid, 70_000)
    c.build_packet(0, T0)  # must not raise


def test_writable_event_when_the_send_buffer_drains() -> None:
    params = TransportParams(max_datagram=1200, send_buffer=20_000)
    pipe = Pipe(params)
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, payload(30_000))
    assert pipe.a.conn.send_space(sid) == 0  # over the buffer: the stream is now "blocked"
    assert pipe.run_until(lambda: ("writable", sid) in pipe.a.events, 10)
    assert pipe.a.conn.send_space(sid) > 10_000


# ------------------------------------------------------------------------- acknowledgements


def eliciting_packet(c: Connection, pn: int, now: float) -> None:
    c.on_packet(pn, [Keepalive()], now)


def test_in_order_packets_are_acknowledged_every_fourth() -> None:
    b = Connection(SMALL, False, T0)
    for pn in range(ACK_EVERY - 1):
        eliciting_packet(b, pn, T0 + pn * 0.001)
        assert not b.ack_due(T0 + pn * 0.001)
    eliciting_packet(b, ACK_EVERY - 1, T0 + 0.003)
    assert b.ack_due(T0 + 0.003)
    pt = b.build_packet(0, T0 + 0.003)
    assert pt is not None
    (ack,) = records(pt)
    assert isinstance(ack, Ack)
    assert ack.ranges == ((0, ACK_EVERY),)
    assert not b.ack_due(T0 + 0.003)
    assert b.stats.acks_sent == 1
    assert b.stats.immediate_acks == 0


def test_a_lone_packet_is_acknowledged_after_max_ack_delay() -> None:
    b = Connection(SMALL, False, T0)
    eliciting_packet(b, 0, T0)
    assert not b.ack_due(T0)
    assert b.get_timer(T0) == pytest.approx(T0 + MAX_ACK_DELAY)
    assert not b.ack_due(T0 + MAX_ACK_DELAY - 1e-6)
    assert b.ack_due(T0 + MAX_ACK_DELAY)
    b.handle_timer(T0 + MAX_ACK_DELAY)  # the driver's timer: nothing to declare lost
    assert b.wants_to_send(T0 + MAX_ACK_DELAY)
    pt = b.build_packet(0, T0 + MAX_ACK_DELAY)
    assert pt is not None
    (ack,) = records(pt)
    assert isinstance(ack, Ack)
    assert ack.delay_us == pytest.approx(MAX_ACK_DELAY * 1e6, abs=1)
    assert b.get_timer(T0 + MAX_ACK_DELAY) is None


def test_a_gap_triggers_an_immediate_ack_that_exposes_it() -> None:
    b = Connection(SMALL, False, T0)
    eliciting_packet(b, 0, T0)
    eliciting_packet(b, 1, T0 + 0.001)
    assert not b.ack_due(T0 + 0.001)
    eliciting_packet(b, 3, T0 + 0.002)  # 2 is missing
    assert b.ack_due(T0 + 0.002)
    assert b.stats.immediate_acks == 1
    pt = b.build_packet(0, T0 + 0.002)
    assert pt is not None
    (ack,) = records(pt)
    assert isinstance(ack, Ack)
    assert ack.ranges == ((3, 4), (0, 2))


def test_a_late_packet_filling_a_gap_also_triggers_an_ack_but_rate_limited() -> None:
    b = Connection(SMALL, False, T0)
    eliciting_packet(b, 0, T0)
    eliciting_packet(b, 2, T0 + 0.001)  # gap: immediate
    assert b.build_packet(0, T0 + 0.001) is not None
    # The filler arrives within RTT/16 of the last immediate ACK: no second immediate ACK.
    eliciting_packet(b, 1, T0 + 0.002)
    assert not b.ack_due(T0 + 0.002)
    assert b.stats.immediate_acks == 1
    # After RTT/16 a new gap is reported at once again.
    later = T0 + 0.001 + b.rtt.smoothed / 16 + 1e-6
    eliciting_packet(b, 5, later)
    assert b.ack_due(later)
    assert b.stats.immediate_acks == 2


def test_ack_only_packets_are_not_acknowledged() -> None:
    a = Connection(SMALL, True, T0)
    send_keepalives(a, 1, T0)
    for pn in range(10):  # the peer's ACK-only packets
        a.on_packet(pn, [Ack(((0, 1),), 0)], T0 + 0.01)
    assert a.outstanding() == 0
    assert not a.ack_due(T0 + 1.0)
    assert a.get_timer(T0 + 1.0) is None
    assert a.build_packet(1, T0 + 1.0) is None


def test_unreliable_records_neither_elicit_acks_nor_are_tracked() -> None:
    b = Connection(SMALL, False, T0)
    for pn in range(10):
        other = b.on_packet(pn, [Ping(pn)], T0)
        assert other == [Ping(pn)]
    assert not b.ack_due(T0 + 1.0)
    assert b.get_timer(T0) is None
    a = Connection(SMALL, True, T0)
    a.queue_control(push_message(Ping(1)))
    assert a.build_packet(0, T0) is not None
    assert a.outstanding() == 0  # sent once, never retransmitted, nothing to wait for
    a.queue_control(push_message(Keepalive()))
    assert a.build_packet(1, T0) is not None
    assert a.outstanding() == 1  # a keepalive asks for an acknowledgement


def test_clean_transfer_acks_are_sparse() -> None:
    pipe = Pipe()
    transfer(pipe, payload(500_000))
    data_packets = sum(1 for _, _, pt in pipe.a.sent if not is_ack_only(pt))
    ack_only = sum(1 for _, _, pt in pipe.b.sent if is_ack_only(pt))
    assert pipe.b.conn.stats.immediate_acks == 0
    # Every 4th packet (and a few deadline acks at the edges of bursts).
    assert data_packets / ACK_EVERY - 5 <= ack_only <= data_packets / ACK_EVERY + 20


# ---------------------------------------------------------------------------- loss detection


def send_keepalives(c: Connection, n: int, now: float, first_pn: int = 0) -> None:
    """n ack-eliciting packets at the same instant (control records bypass pacing)."""
    for pn in range(first_pn, first_pn + n):
        c.queue_control(push_message(Keepalive()))
        assert c.build_packet(pn, now) is not None


def test_loss_by_packet_threshold() -> None:
    a = Connection(SMALL, True, T0)
    send_keepalives(a, 4, T0)
    a.on_packet(0, [Ack(((1, 4),), 0)], T0 + 0.02)  # three later packets acknowledged
    assert a.stats.packets_lost == 1
    assert a.stats.packets_acked == 3
    assert a.outstanding() == 0


def test_two_later_acks_are_not_enough_then_the_time_threshold_fires() -> None:
    a = Connection(SMALL, True, T0)
    send_keepalives(a, 3, T0)
    now = T0 + 0.02
    a.on_packet(0, [Ack(((1, 3),), 0)], now)
    assert a.stats.packets_lost == 0
    assert a.outstanding() == 1
    loss_at = a.get_timer(now)
    assert loss_at is not None
    assert loss_at == pytest.approx(T0 + a.rtt.loss_delay())
    assert loss_at > now
    a.handle_timer(loss_at - 1e-6)
    assert a.stats.packets_lost == 0
    a.handle_timer(loss_at)
    assert a.stats.packets_lost == 1
    assert a.outstanding() == 0


def test_lost_frames_leave_again_under_a_new_packet_number() -> None:
    a = Connection(SMALL, True, T0)
    for i in range(5):
        a.send_message(bytes([i]) * 1000)  # one message fills a packet
    now = T0
    sent: dict[int, list[Message]] = {}
    for pn in range(5):
        pt = None
        while pt is None:  # paced: step the clock until the next one may go
            pt = a.build_packet(pn, now)
            now += 0.001
        sent[pn] = records(pt)
    (lost_msg,) = [m for m in sent[0] if isinstance(m, Msg)]
    a.on_packet(0, [Ack(((1, 5),), 0)], now + 0.02)
    assert a.stats.packets_lost == 1
    pt = a.build_packet(5, now + 0.02)
    assert pt is not None
    assert lost_msg in records(pt)  # the same message, in packet 5


def test_tail_loss_is_recovered_by_the_probe_timeout() -> None:
    dropped: list[int] = []

    def drop_fin_once(who: str, pn: int, pt: bytes, now: float) -> bool:
        if (
            who == "a"
            and not dropped
            and any(isinstance(m, StreamFrame) and m.fin for m in records(pt))
        ):
            dropped.append(pn)
            return True
        return False

    pipe = Pipe(drop=drop_fin_once)
    data = payload(5_000)
    sid = transfer(pipe, data, timeout=10)
    assert dropped
    assert pipe.b.stream(sid) == data
    assert pipe.a.conn.stats.pto_count_total >= 1


def test_lost_acks_do_not_stall_the_transfer() -> None:
    def drop_acks(who: str, pn: int, pt: bytes, now: float) -> bool:
        return who == "b" and (now < T0 + 0.5 or pn % 2 == 0)

    pipe = Pipe(drop=drop_acks)
    data = payload(200_000)
    sid = transfer(pipe, data, timeout=60)
    assert pipe.b.stream(sid) == data
    assert pipe.a.conn.stats.pto_count_total >= 1


def test_a_silent_peer_backs_the_probe_timeout_off() -> None:
    pipe = Pipe(drop=lambda who, pn, pt, now: True)  # nothing ever arrives
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, payload(10_000), fin=True)
    pipe.run_for(30.0)
    probes = [t for _, t, _ in pipe.a.sent]
    gaps = [b - a for a, b in itertools.pairwise(sorted(set(probes)))]
    assert pipe.a.conn.pto_count >= 5
    assert gaps[-1] > 4 * gaps[1]  # exponential backoff
    assert len(pipe.a.sent) < 60


# --------------------------------------------------------------------------- hostile ACKs


def test_ack_of_a_packet_never_sent_is_a_protocol_error() -> None:
    a = Connection(SMALL, True, T0)
    send_keepalives(a, 3, T0)
    with pytest.raises(RemoteProtocolError) as ei:
        a.on_packet(0, [Ack(((0, 4),), 0)], T0 + 0.01)
    assert ei.value.code == 7
    fresh = Connection(SMALL, True, T0)
    with pytest.raises(RemoteProtocolError):
        fresh.on_packet(0, [Ack(((0, 1),), 0)], T0)


def test_note_untracked_extends_what_may_be_acknowledged() -> None:
    a = Connection(SMALL, True, T0)
    a.note_untracked(5)
    a.on_packet(0, [Ack(((5, 6),), 0)], T0)  # a session confirmation we sent outside build_packet


def test_huge_ack_ranges_are_rejected_or_processed_in_bounded_time() -> None:
    a = Connection(SMALL, True, T0)
    send_keepalives(a, 200, T0)
    started = time.perf_counter()
    with pytest.raises(RemoteProtocolError):
        a.on_packet(0, [Ack(((0, 2**62),), 0)], T0 + 0.01)
    with pytest.raises(RemoteProtocolError):
        a.on_packet(0, [Ack(((2**63, 2**64 - 1),), 0)], T0 + 0.01)
    # The decoder refuses what could make the sender loop: unordered or overlapping ranges.
    with pytest.raises(MalformedError):
        pull_messages(push_message(Ack(((100, 200), (0, 4_000_000_000)), 0)))
    with pytest.raises(MalformedError):
        pull_messages(push_message(Ack(((100, 200), (150, 300)), 0)))
    # The largest legal ACK: 64 ranges down to 0, processed range by range.
    ranges = tuple((199 - 3 * i, 200 - 3 * i) for i in range(64))
    (ack,) = pull_messages(push_message(Ack(ranges, 2**32 - 1)))
    a.on_packet(0, [ack], T0 + 0.01)
    assert time.perf_counter() - started < 1.0
    assert a.stats.packets_acked == 64


def test_ack_of_a_run_longer_than_u32_still_encodes() -> None:
    b = Connection(SMALL, False, T0)
    eliciting_packet(b, 0, T0)
    b._received.add(0, 2**32 + 10)  # as if that many packets had arrived in order
    eliciting_packet(b, 2**32 + 10, T0)
    pt = b.build_packet(0, T0 + 1.0)
    assert pt is not None
    (ack,) = records(pt)
    assert isinstance(ack, Ack)
    assert ack.ranges[0][1] == 2**32 + 11


# ------------------------------------------------------------------------------ path MTU


def test_pmtu_grows_through_every_candidate_on_a_clean_path() -> None:
    pipe = Pipe(TransportParams())
    seen: list[int] = []

    def grown() -> bool:
        if not seen or seen[-1] != pipe.a.conn.mtu:
            seen.append(pipe.a.conn.mtu)
        return pipe.a.conn.mtu == 65_507

    assert pipe.a.conn.mtu == BASE_MTU
    assert pipe.run_until(grown, 10)
    assert seen == [BASE_MTU, *PMTU_CANDIDATES]
    probes = [len(pt) + HEADER_AND_TAG for _, _, pt in pipe.a.sent if len(pt) > BASE_MTU]
    assert probes == list(PMTU_CANDIDATES)  # one probe per size, each exactly that big
    assert pipe.a.conn.cc.mss == 65_507
    # Probes are padding, not congestion-window traffic; the data path still works after.
    data = payload(500_000)
    sid = transfer(pipe, data, timeout=30)
    assert pipe.b.stream(sid) == data
    assert max(len(pt) for _, _, pt in pipe.a.sent) + HEADER_AND_TAG == 65_507


def test_pmtu_probes_respect_max_datagram() -> None:
    pipe = Pipe(TransportParams(max_datagram=3000))
    assert pipe.run_until(lambda: pipe.a.conn.mtu == 3000, 10)
    pipe.run_for(5.0)
    sizes = sorted({len(pt) + HEADER_AND_TAG for _, _, pt in pipe.a.sent})
    assert max(sizes) == 3000
    assert [s for s in sizes if s > BASE_MTU] == [1452, 2048, 3000]


def test_pmtu_stays_below_a_silent_size_limit_and_stops_after_three_failures() -> None:
    limit = 5_000
    pipe = Pipe(TransportParams(), drop=lambda who, pn, pt, now: len(pt) + HEADER_AND_TAG > limit)
    pipe.run_for(60.0)
    assert pipe.a.conn.mtu == 4096
    too_big = [len(pt) + HEADER_AND_TAG for _, _, pt in pipe.a.sent if len(pt) + 80 > limit]
    assert too_big == [8192] * PMTU_MAX_PROBES
    # Data still flows at the discovered size.
    data = payload(200_000)
    sid = transfer(pipe, data, timeout=30)
    assert pipe.b.stream(sid) == data
    assert max(len(pt) + HEADER_AND_TAG for _, _, pt in pipe.a.sent[-20:]) <= 4096


def test_black_hole_mid_transfer_falls_back_to_base_mtu() -> None:
    hole: list[bool] = [False]

    def drop(who: str, pn: int, pt: bytes, now: float) -> bool:
        return hole[0] and who == "a" and len(pt) + HEADER_AND_TAG > BASE_MTU

    pipe = Pipe(TransportParams(max_datagram=9000), drop=drop)
    assert pipe.run_until(lambda: pipe.a.conn.mtu == 9000, 10)
    data = payload(2_000_000)
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, data, fin=True)
    pipe.run_for(0.2)
    assert 0 < len(pipe.b.stream(sid)) < len(data)
    hole[0] = True  # from now on, anything above 1200 bytes vanishes
    assert pipe.run_until(lambda: sid in pipe.b.fin, 30)
    assert pipe.a.conn.mtu == BASE_MTU
    assert pipe.b.stream(sid) == data


def test_black_hole_before_the_first_ack_falls_back_quickly() -> None:
    hole: list[bool] = [False]

    def drop(who: str, pn: int, pt: bytes, now: float) -> bool:
        return hole[0] and who == "a" and len(pt) + HEADER_AND_TAG > BASE_MTU

    pipe = Pipe(TransportParams(max_datagram=9000), drop=drop)
    assert pipe.run_until(lambda: pipe.a.conn.mtu == 9000, 10)
    pipe.run_for(5.0)
    hole[0] = True
    data = payload(300_000)
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, data, fin=True)
    assert pipe.run_until(lambda: sid in pipe.b.fin, 60)


# ------------------------------------------------------------------- congestion after outages


def time_to_finish_after_outage(cc: str, outage: float) -> float:
    silent_until: list[float] = [0.0]
    pipe = Pipe(
        TransportParams(max_datagram=1200, congestion_control=cc),
        drop=lambda who, pn, pt, now: now < silent_until[0],
    )
    pipe.run_for(1.0)
    silent_until[0] = pipe.now + outage
    transfer(pipe, payload(200_000), timeout=outage + 300)
    return pipe.now - silent_until[0]


def test_reno_resumes_promptly_after_an_outage_at_the_start() -> None:
    # The probe timeout backs off to at most 2**6 PTOs (~21 s here); then it is a normal transfer.
    assert time_to_finish_after_outage("reno", 100.0) < 10.0


def test_bbr_resumes_about_as_fast_as_reno_after_an_outage_at_the_start() -> None:
    reno = time_to_finish_after_outage("reno", 100.0)
    bbr = time_to_finish_after_outage("bbr", 100.0)
    assert bbr <= 2 * reno + 2.0, f"bbr {bbr:.1f} s vs reno {reno:.1f} s"


# ------------------------------------------------------------------------------ messages


def test_a_message_of_max_message_bytes_crosses_a_base_mtu_path() -> None:
    # max_message is bounded by the base MTU, so a message always fits the smallest path:
    # here every packet above 1200 bytes is dropped, and both messages still arrive.
    pipe = Pipe(TransportParams(), drop=lambda who, pn, pt, now: len(pt) + HEADER_AND_TAG > 1200)
    big = b"x" * pipe.a.conn.max_message
    pipe.a.conn.send_message(big)
    pipe.a.conn.send_message(b"small")
    assert pipe.run_until(lambda: len(pipe.b.messages) == 2, 30)
    with pytest.raises(LocalProtocolError):
        pipe.a.conn.send_message(b"x" * (pipe.a.conn.max_message + 1))


def test_message_api_limits() -> None:
    c = Connection(SMALL, True, T0)
    assert c.max_message == 1200 - HEADER_AND_TAG - 11
    c.send_message(b"x" * c.max_message)
    with pytest.raises(LocalProtocolError):
        c.send_message(b"x" * (c.max_message + 1))
    few = Connection(TransportParams(max_datagram=1200, max_pending_messages=3), True, T0)
    for _ in range(3):
        few.send_message(b"m")
    with pytest.raises(LocalProtocolError):
        few.send_message(b"m")


def test_messages_and_padding_and_unknown_records_in_on_packet() -> None:
    b = Connection(SMALL, False, T0)
    other = b.on_packet(
        0, [Msg(0, b"hello"), Padding(10), Keepalive(), Ping(7), MaxData(1 << 30)], T0
    )
    assert other == [Keepalive(), Ping(7)]  # not transport records: handed back to the caller
    assert list(b.events) == [("message", b"hello", 0)]
    b.on_packet(1, [Msg(0, b"hello")], T0)
    assert b.stats.duplicate_messages == 1
    assert len(b.events) == 1


# ------------------------------------------------------------------------------- streams


def test_stream_ids_parity_follows_local_even() -> None:
    even = Connection(SMALL, True, T0)
    odd = Connection(SMALL, False, T0)
    assert [even.open_stream() for _ in range(3)] == [0, 2, 4]
    assert [odd.open_stream() for _ in range(3)] == [1, 3, 5]
    assert even.open_streams() == 3


def test_peer_frame_opens_every_lower_id_of_its_parity() -> None:
    b = Connection(SMALL, False, T0)  # the peer opens even ids
    b.on_packet(0, [StreamFrame(4, 0, b"hi")], T0)
    assert [e for e in b.events if e[0] == "opened"] == [
        ("opened", 0),
        ("opened", 2),
        ("opened", 4),
    ]
    assert ("data", 4, b"hi", False) in b.events
    assert b.open_streams() == 3


def test_peer_using_one_of_our_ids_before_we_opened_it_is_a_protocol_error() -> None:
    b = Connection(SMALL, False, T0)
    with pytest.raises(RemoteProtocolError) as ei:
        b.on_packet(0, [StreamFrame(1, 0, b"x")], T0)
    assert ei.value.code == STREAM_STATE_ERROR
    sid = b.open_stream()
    assert sid == 1
    b.on_packet(1, [StreamFrame(1, 0, b"x")], T0)  # now it is a reply on our stream: fine
    assert ("data", 1, b"x", False) in b.events


def test_peer_opening_more_than_twice_max_streams_is_a_protocol_error() -> None:
    b = Connection(TransportParams(max_datagram=1200, max_streams=4), False, T0)
    b.on_packet(0, [StreamFrame(2 * 7, 0, b"x")], T0)  # opens 0, 2, ..., 14: eight streams
    assert b.open_streams() == 8
    with pytest.raises(RemoteProtocolError) as ei:
        b.on_packet(1, [StreamFrame(2 * 8, 0, b"x")], T0)
    assert ei.value.code == STREAM_LIMIT_ERROR


def test_one_frame_naming_a_huge_stream_id_is_refused_without_creating_streams() -> None:
    b = Connection(TransportParams(max_datagram=1200, max_streams=4), False, T0)
    started = time.perf_counter()
    with pytest.raises(RemoteProtocolError):
        b.on_packet(0, [StreamFrame(2**32 - 2, 0, b"x")], T0)
    assert time.perf_counter() - started < 0.1
    assert b.open_streams() == 0


def test_local_stream_limit_and_unknown_streams() -> None:
    c = Connection(TransportParams(max_datagram=1200, max_streams=2), True, T0)
    c.open_stream()
    c.open_stream()
    with pytest.raises(LocalProtocolError):
        c.open_stream()
    with pytest.raises(LocalProtocolError):
        c.write(99, b"x")
    assert c.send_space(99) == 0


def test_connection_flow_control_violation_is_a_protocol_error() -> None:
    b = Connection(
        TransportParams(max_datagram=1200, connection_window=1000, stream_window=10_000),
        False,
        T0,
    )
    b.on_packet(0, [StreamFrame(0, 0, bytes(600))], T0)
    with pytest.raises(RemoteProtocolError) as ei:
        b.on_packet(1, [StreamFrame(2, 0, bytes(600))], T0)  # 1200 > 1000 over two streams
    assert ei.value.code == 3


def test_stream_flow_control_violation_is_a_protocol_error() -> None:
    b = Connection(TransportParams(max_datagram=1200, stream_window=1000), False, T0)
    with pytest.raises(RemoteProtocolError) as ei:
        b.on_packet(0, [StreamFrame(0, 500, bytes(501))], T0)
    assert ei.value.code == 3


def test_reset_with_a_final_size_below_received_data_is_a_protocol_error() -> None:
    b = Connection(SMALL, False, T0)
    b.on_packet(0, [StreamFrame(0, 100, bytes(100))], T0)
    with pytest.raises(RemoteProtocolError):
        b.on_packet(1, [ResetStream(0, 1, 50)], T0)


@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_reset_after_the_other_half_finished_carries_the_bytes_already_sent(loss: float) -> None:
    # The receiving half is finished (FIN read) when the application resets: the stream is
    # forgotten at once, and the RESET_STREAM built later must still carry the final size of
    # what was sent (it once carried 0, which the peer rightly treats as a protocol violation).
    pipe = Pipe(loss=loss, seed=5)
    sid = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid, b"request", fin=True)
    assert pipe.run_until(lambda: sid in pipe.b.fin, 30)
    pipe.b.conn.write(sid, b"ok\n")
    assert pipe.run_until(lambda: pipe.a.stream(sid) == b"ok\n", 30)
    pipe.b.conn.reset_stream(sid, 9)
    assert pipe.run_until(lambda: any(e[0] == "reset" for e in pipe.a.events), 30)
    assert not any(e[0] == "closed" for e in pipe.a.events + pipe.b.events)
    sid2 = pipe.a.conn.open_stream()
    pipe.a.conn.write(sid2, b"still fine", fin=True)
    assert pipe.run_until(lambda: pipe.b.stream(sid2) == b"still fine", 30)


def test_messages_wait_for_credit_while_the_application_does_not_take_them() -> None:
    # The receiver's application takes nothing: after MESSAGE_WINDOW messages the sender holds
    # the rest (none is sent only to be dropped), and each message taken lets one more come.
    pipe = Pipe()
    pipe.b.consume = False
    n = MESSAGE_WINDOW + 300
    for i in range(n):
        pipe.a.conn.send_message(i.to_bytes(4, "big"))
    pipe.run_for(2.0)
    assert len(pipe.b.messages) == MESSAGE_WINDOW
    assert pipe.a.conn.messages_blocked
    pipe.b.conn.messages_consumed(MESSAGE_WINDOW)
    assert pipe.run_until(lambda: len(pipe.b.messages) == n, 30)
    assert sorted(int.from_bytes(m, "big") for m in pipe.b.messages) == list(range(n))
    assert not pipe.a.conn.messages_blocked


def test_a_message_beyond_the_credit_is_a_protocol_error() -> None:
    c = Connection(TransportParams(), False, T0)
    c.on_packet(0, [Msg(MESSAGE_WINDOW - 1, b"last allowed")], T0)
    with pytest.raises(RemoteProtocolError, match="message credit"):
        c.on_packet(1, [Msg(MESSAGE_WINDOW, b"one too many")], T0)


def _transfer_trace(fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    if not fast:
        monkeypatch.setattr(Connection, "_stream_packet", Connection._general_packet)
    pipe = Pipe(seed=11, loss=0.05, dup=0.02, reorder=0.1)
    sids = [pipe.a.conn.open_stream()]
    pipe.a.conn.write(sids[0], payload(300_000), fin=True)
    pipe.run_for(0.3)
    sids.append(pipe.a.conn.open_stream())  # a second stream for a while: the general path
    pipe.a.conn.write(sids[1], payload(20_000, seed=2), fin=True)
    pipe.a.conn.send_message(b"a message between stream packets")
    assert pipe.run_until(lambda: all(s in pipe.b.fin for s in sids), 120)
    monkeypatch.undo()
    return [pipe.a.sent, pipe.b.sent, pipe.b.stream(sids[0]), pipe.b.stream(sids[1])]


def test_the_bulk_packet_builder_builds_what_the_general_one_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Byte for byte and instant for instant, the same packets leave both ends (loss,
    duplication and reordering included) with and without the single-stream short path."""
    fast = _transfer_trace(True, monkeypatch)
    general = _transfer_trace(False, monkeypatch)
    assert fast[2] == payload(300_000)
    assert fast[3] == payload(20_000, seed=2)
    assert len(fast[0]) > 250  # (enough packets that both builders were exercised)
    assert fast == general


def test_a_new_stream_starts_with_the_window_earlier_streams_grew_to() -> None:
    took = {}
    for learned in (True, False):
        pipe = Pipe(_tuning(True), delay=0.01)  # the same history on both pipes
        first = pipe.a.conn.open_stream()
        pipe.a.conn.write(first, payload(3_000_000), fin=True)
        assert pipe.run_until(lambda: first in pipe.b.fin, 120)  # noqa: B023
        grown = pipe.b.conn._learned_window
        assert 64 * 1024 < grown <= 1024 * 1024
        if not learned:
            pipe.b.conn._learned_window = 64 * 1024  # as if every stream started afresh
        sid = pipe.a.conn.open_stream()
        start = pipe.now
        pipe.a.conn.write(sid, payload(2_000_000), fin=True)
        assert pipe.run_until(lambda: sid in pipe.b.fin, 120)  # noqa: B023
        assert pipe.b.stream(sid) == payload(2_000_000)
        took[learned] = pipe.now - start
    # The second transfer need not learn the window again (it is advertised with the stream's
    # first acknowledgement), so it finishes sooner. Virtual time: deterministic.
    assert took[True] < 0.8 * took[False]
