"""`Session.seal_parts`, the bulk sender's sealing: the datagram is built once and encrypted
where it lies. It must be exactly the datagram `seal` builds from the joined parts, and the
receiving endpoint must take it like any other."""

from __future__ import annotations

import pytest
from test_endpoint import connected_pair

from cellmesh.transport.events import StreamData
from cellmesh.wire.messages import push_stream_parts


@pytest.mark.parametrize("channel", [0, 0x1234ABCD])
@pytest.mark.parametrize(
    "parts",
    [
        [b"\x00"],
        [b"abc", memoryview(b"0123456789")[2:8], b""],
        [bytes(range(256)) * 200, memoryview(bytes(5000))],
    ],
)
def test_seal_parts_is_seal_of_the_joined_parts(
    parts: list[bytes | memoryview], channel: int
) -> None:
    net, a, _aa, b, _ba = connected_pair()
    s = a.session_for(b.cell_id)
    assert s is not None
    pn = s.send_counter
    built = s.seal_parts(parts, net.now, channel)
    assert isinstance(built, bytearray)
    s.send_counter = pn  # the same packet number, sealed the ordinary way
    assert bytes(built) == s.seal(b"".join(parts), net.now, channel)
    assert s.send_counter == pn + 1
    assert s.counters.packets_out >= 2


def test_a_stream_packet_sealed_in_place_is_delivered() -> None:
    net, a, aa, b, ba = connected_pair()
    s = a.session_for(b.cell_id)
    conn = a.connection(b.cell_id)
    assert s is not None
    assert conn is not None
    sid = a.open_stream(b.cell_id)
    data = bytes(range(256)) * 10
    head, body = push_stream_parts(sid, 0, memoryview(data), False)
    pn = s.send_counter
    datagram = s.seal_parts([head, body], net.now)
    conn.note_untracked(pn)
    b.receive_datagram(datagram, aa, net.now)  # a bytearray, as the simulator may hand it on
    net.run()
    got = net.of(ba, StreamData)
    assert b"".join(e.data for e in got if isinstance(e, StreamData)) == data
    assert b.statistics().drops.get("auth_failed", 0) == 0
