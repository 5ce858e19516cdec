"""`Endpoint.receive_batch` (a GRO read) must do exactly what `receive_datagram` does on each
datagram in turn: the same datagrams delivered in the same order, the same drops by reason, the
same counters and the same acknowledgement ranges, whatever the batch holds.

Two independent sessions cannot produce the same bytes (fresh keys), so the comparison runs on
two isomorphic pairs: the same application traffic is sent on each, the same script of
duplications, bit flips, truncations and junk is applied to both frame lists, one receiver takes
its list as one batch and the other one datagram at a time.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.transport.endpoint import Endpoint
from cellmesh.wire.header import HEADER_LEN

Addr = tuple[str, int]
A_ADDR: Addr = ("10.0.0.1", 1)
B_ADDR: Addr = ("10.0.0.1", 2)
NOW = 1000.0
BULK = bytes(range(256)) * 20  # 5,120 bytes: five 1200-byte packets
CONFIG = NodeConfig(listen=("127.0.0.1:0",), max_datagram=1200)


class Pair:
    """A sender and a receiver with a confirmed session, and the frames the sender produced."""

    def __init__(self, seed: int) -> None:
        self.a = Endpoint(Identity.generate(), CONFIG, NOW, random.Random(seed))
        self.b = Endpoint(Identity.generate(), CONFIG, NOW, random.Random(seed + 1))
        self.a.connect(B_ADDR, NOW)
        self._shuttle()
        assert self.a.session_for(self.b.cell_id) is not None
        while self.a.next_event() is not None or self.b.next_event() is not None:
            pass
        self.delivered: list[tuple[str, bytes]] = []
        self.b.datagram_sink = lambda cell, data: self.delivered.append(("dgram", data))

    def _shuttle(self) -> None:
        for _ in range(20):
            moved = False
            for src, dst, src_addr in ((self.a, self.b, A_ADDR), (self.b, self.a, B_ADDR)):
                for data, _ in src.datagrams_to_send():
                    dst.receive_datagram(data, src_addr, NOW)
                    moved = True
            if not moved:
                return

    def frames(self) -> list[bytes]:
        """The same traffic on every pair: datagrams, a ping, a stream write, more datagrams."""
        out: list[bytes] = []
        cell = self.b.cell_id

        def take() -> None:
            out.extend(bytes(d) for d, _ in self.a.datagrams_to_send())

        for i in range(6):
            self.a.send_datagram(cell, bytes([i]) * (1000 + i), NOW)
            take()
        self.a.send_ping(cell, NOW)
        take()
        sid = self.a.open_stream(cell)
        self.a.stream_write(cell, sid, b"stream bytes" * 10, NOW, fin=True)
        take()
        self.a.handle_timer(NOW + 0.05)  # pacing may hold the stream's first packet briefly
        take()
        # A bulk stream: packets that are exactly one STREAM record each (the batch path takes
        # them without leaving its run).
        bulk = self.a.open_stream(cell)
        self.a.stream_write(cell, bulk, BULK, NOW + 0.05, fin=True)
        start = len(out)
        take()
        self.bulk = out[start:]  # (a timer below may add retransmissions)
        for k in range(1, 20):
            self.a.handle_timer(NOW + 0.05 + k * 0.01)
            take()
        for i in range(6, 10):
            self.a.send_datagram(cell, bytes([i]) * 200, NOW)
            take()
        return out

    def outcome(self) -> dict[str, Any]:
        """Everything observable about what the receiver did."""
        events: list[tuple[str, Any]] = []
        while (ev := self.b.next_event()) is not None:
            events.append((type(ev).__name__, getattr(ev, "data", None)))
        stats = self.b.statistics()
        conn = self.b.connection(self.a.cell_id)
        return {
            "delivered": list(self.delivered),
            "events": events,
            "drops": dict(stats.drops),
            "datagrams_in": stats.datagrams_in,
            "bytes_in": stats.bytes_in,
            "received": conn._received.ranges() if conn is not None else None,
            "replies": len(self.b.datagrams_to_send()),
        }


Op = tuple[str, int, int]


def apply(frames: list[bytes], script: list[Op]) -> list[bytes]:
    out: list[bytes] = []
    for kind, i, arg in script:
        f = frames[i % len(frames)]
        if kind == "keep":
            out.append(f)
        elif kind == "flip":
            pos = arg % len(f)
            out.append(f[:pos] + bytes([f[pos] ^ (1 << (arg % 8))]) + f[pos + 1 :])
        elif kind == "trunc":
            out.append(f[: arg % len(f)])
        elif kind == "junk":
            out.append(random.Random(arg).randbytes(arg % 300))
        elif kind == "header_only":
            out.append(f[:HEADER_LEN])
    return out


def run_both(script: list[Op]) -> tuple[dict[str, Any], dict[str, Any]]:
    batched, single = Pair(1), Pair(3)
    fb, fs = batched.frames(), single.frames()
    assert len(fb) == len(fs)
    batched.b.receive_batch(apply(fb, script), A_ADDR, NOW + 1)
    for data in apply(fs, script):
        single.b.receive_datagram(data, A_ADDR, NOW + 1)
    return batched.outcome(), single.outcome()


def test_a_clean_batch_delivers_everything_in_order() -> None:
    p = Pair(5)
    frames = p.frames()
    p.b.receive_batch(frames, A_ADDR, NOW + 1)
    out = p.outcome()
    datagrams = [d for kind, d in out["delivered"] if kind == "dgram"]
    assert datagrams == [bytes([i]) * (1000 + i) for i in range(6)] + [
        bytes([i]) * 200 for i in range(6, 10)
    ]
    assert out["drops"] == {}
    assert ("StreamData", b"stream bytes" * 10) in out["events"]
    bulk = b"".join(
        d for kind, d in out["events"] if kind == "StreamData" and d != b"stream bytes" * 10
    )
    assert bulk == BULK


def test_replays_forgeries_and_junk_inside_a_batch_count_as_singly() -> None:
    script: list[Op] = [
        ("keep", 0, 0),
        ("keep", 1, 0),
        ("keep", 1, 0),  # replay inside the run
        ("flip", 2, 900),  # ciphertext corrupted: authentication fails
        ("keep", 2, 0),
        ("trunc", 3, 40),
        ("junk", 0, 77),
        ("flip", 3, 41),  # header: session id
        ("keep", 3, 0),
        ("keep", 6, 0),  # the ping: not a single APP record
        ("keep", 4, 0),
        ("keep", 7, 0),  # the stream frame
        ("keep", 5, 0),
        ("keep", 0, 0),  # an old replay at the end
    ]
    batched, single = run_both(script)
    assert batched == single
    assert batched["drops"]["replay"] == 2
    assert batched["drops"]["auth_failed"] == 1


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["keep", "keep", "keep", "flip", "trunc", "junk", "header_only"]),
            st.integers(0, 40),
            st.integers(0, 2000),
        ),
        max_size=40,
    )
)
def test_any_batch_has_the_same_outcome_as_one_datagram_at_a_time(script: list[Op]) -> None:
    batched, single = run_both(script)
    assert batched == single


def test_a_batch_of_stream_packets_stays_on_the_short_path() -> None:
    p = Pair(7)
    p.frames()
    stream_frames = p.bulk
    assert len(stream_frames) == 5  # the bulk stream's packets, sent in one burst
    runs = 0
    original = p.b._fast_path_for

    def counting(*args: Any) -> Any:
        nonlocal runs
        runs += 1
        return original(*args)

    p.b._fast_path_for = counting  # type: ignore[method-assign,assignment]
    p.b.receive_batch(stream_frames, A_ADDR, NOW + 1)
    assert runs == 1  # the first frame opened the run; the other four stayed in it
    out = p.outcome()
    assert b"".join(d for kind, d in out["events"] if kind == "StreamData") == BULK
    assert out["drops"] == {}
