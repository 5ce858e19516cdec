"""`Endpoint.stream_sink`: in-order stream bytes handed straight to a driver, never ahead of an
event that came before them, and left as events for streams the driver does not hold."""

from __future__ import annotations

import random

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import StreamData, StreamOpened

Addr = tuple[str, int]
A_ADDR: Addr = ("10.0.0.1", 1)
B_ADDR: Addr = ("10.0.0.1", 2)
NOW = 1000.0
CONFIG = NodeConfig(listen=("127.0.0.1:0",), max_datagram=1200)


def pair() -> tuple[Endpoint, Endpoint]:
    a = Endpoint(Identity.generate(), CONFIG, NOW, random.Random(1))
    b = Endpoint(Identity.generate(), CONFIG, NOW, random.Random(2))
    a.connect(B_ADDR, NOW)
    shuttle(a, b, NOW)
    while a.next_event() is not None or b.next_event() is not None:
        pass
    return a, b


def shuttle(a: Endpoint, b: Endpoint, now: float) -> None:
    a.handle_timer(now)  # (pacing may hold a stream's first packet briefly)
    for _ in range(50):
        moved = False
        for src, dst, src_addr in ((a, b, A_ADDR), (b, a, B_ADDR)):
            for data, _ in src.datagrams_to_send():
                dst.receive_datagram(data, src_addr, now)
                moved = True
        if not moved:
            return


def test_bytes_of_a_held_stream_go_to_the_sink_and_others_stay_events() -> None:
    a, b = pair()
    held: dict[int, bytearray] = {}

    def sink(cell: bytes, sid: int, data: bytes | memoryview, fin: bool) -> bool:
        if sid not in held:
            return False  # a stream the driver does not hold: leave it as an event
        held[sid] += data
        return True

    b.stream_sink = sink
    sid = a.open_stream(b.cell_id)
    a.stream_write(b.cell_id, sid, b"first bytes", NOW)
    shuttle(a, b, NOW + 0.05)
    events = []
    while (ev := b.next_event()) is not None:
        events.append(ev)
    # Unknown to the driver, and behind the stream's own StreamOpened: events, in order.
    assert isinstance(events[0], StreamOpened)
    assert [e.data for e in events if isinstance(e, StreamData)] == [b"first bytes"]
    held[sid] = bytearray()  # the driver accepted the stream
    now = NOW + 0.1
    a.stream_write(b.cell_id, sid, b"more bytes", now, fin=True)
    shuttle(a, b, now)
    assert held[sid] == b"more bytes"
    assert b.next_event() is None  # nothing left behind as an event


def test_the_sink_waits_behind_a_pending_event() -> None:
    a, b = pair()
    taken: list[bytes] = []

    def sink(cell: bytes, sid: int, data: bytes | memoryview, fin: bool) -> bool:
        taken.append(bytes(data))
        return True

    b.stream_sink = sink
    sid = a.open_stream(b.cell_id)
    a.stream_write(b.cell_id, sid, b"x" * 100, NOW)
    shuttle(a, b, NOW + 0.05)
    # The first bytes of a new stream come after its StreamOpened, which is still waiting to
    # be read: they must not overtake it.
    assert taken == []
    kinds = []
    while (ev := b.next_event()) is not None:
        kinds.append(type(ev).__name__)
    assert kinds[:2] == ["StreamOpened", "StreamData"]
    now = NOW + 0.1
    a.stream_write(b.cell_id, sid, b"y" * 100, now)
    shuttle(a, b, now)
    assert taken == [b"y" * 100]  # no event waiting now: straight to the sink
