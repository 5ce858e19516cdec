"""Transport behaviours that were implemented but unproven: coalescing of small reliable messages
and pacing of a burst. Sans-IO, virtual time only (keepalives: tests/sim/test_sim_behaviour.py).

The endpoint tests reuse the in-memory `Net` harness of test_endpoint.py; the connection tests
reuse the `Pipe` harness of test_connection.py.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
from test_connection import SMALL, T0, Pipe, is_ack_only, payload, records, transfer
from test_endpoint import CONFIG, connected_pair

from cellmesh.transport.connection import HEADER_AND_TAG, Connection, TransportParams
from cellmesh.transport.events import MessageReceived
from cellmesh.wire.messages import Message, Msg

# ------------------------------------------------------------------------------ coalescing


def test_many_small_reliable_messages_share_packets() -> None:
    c = Connection(SMALL, True, T0)
    sent = [bytes([i]) * 20 for i in range(50)]
    for m in sent:
        c.send_message(m)
    packets: list[list[Message]] = []
    # One second between builds: the pacer never holds a packet back, so every call may send.
    for pn in range(50):
        pt = c.build_packet(pn, T0 + pn)
        if pt is None:
            break
        packets.append(records(pt))
    else:
        raise AssertionError("one packet per message: nothing was coalesced")
    got = [m.data for p in packets for m in p if isinstance(m, Msg)]
    assert sorted(got) == sorted(sent)  # each exactly once
    # 50 x (20 + 11 bytes of record) = 1,550 bytes: two 1,200-byte packets.
    per_packet = [sum(isinstance(m, Msg) for m in p) for p in packets]
    assert len(packets) <= 2, per_packet
    assert max(per_packet) >= 30


def test_a_burst_of_endpoint_messages_leaves_in_few_datagrams() -> None:
    net, a, aa, b, ba = connected_pair(replace(CONFIG, max_datagram=1200))
    net.advance(1.0)
    before = sum(1 for _, src, _dst in net.log if src == aa)
    for i in range(50):  # one turn of the driver: the endpoint defers and coalesces
        a.send_message(b.cell_id, bytes([i]) * 20, net.now)
    net.run()
    datagrams = sum(1 for _, src, _dst in net.log if src == aa) - before
    got = [e.data for e in net.of(ba, MessageReceived) if isinstance(e, MessageReceived)]
    assert sorted(got) == sorted(bytes([i]) * 20 for i in range(50))
    assert datagrams <= 3, f"50 messages took {datagrams} datagrams"


# ------------------------------------------------------------------------------ pacing


def test_a_burst_of_stream_data_is_paced_over_virtual_time() -> None:
    pipe = Pipe()
    conn = pipe.a.conn
    assert conn.cc.name == "bbr"
    rate = conn.cc.pacing_rate(conn.rtt)
    assert rate > 0
    sid = transfer(pipe, payload(300_000))
    assert sid in pipe.b.fin
    data = [(t, pt) for _, t, pt in pipe.a.sent if not is_ack_only(pt)]
    assert len(data) > 100
    # Never two data packets at one instant, although all 300 kB were queued at T0.
    per_instant = Counter(t for t, _ in data)
    assert max(per_instant.values()) == 1
    # Before the first acknowledgement can come back (one RTT = 20 ms), packets leave exactly
    # one packet-time apart at the initial pacing rate.
    first_rtt = [(t, pt) for t, pt in data if t < T0 + 2 * pipe.delay]
    assert len(first_rtt) >= 5
    assert first_rtt[0][0] == T0
    for (t0, pt0), (t1, _) in itertools.pairwise(first_rtt):
        assert t1 - t0 == pytest.approx((len(pt0) + HEADER_AND_TAG) / rate, rel=1e-6)


def test_the_pacer_not_the_congestion_window_holds_back_the_next_packet() -> None:
    """Control for the test above: right after the first packet the window is still open, yet
    nothing may leave until the pacing deadline, when the next packet may go."""
    c = Connection(TransportParams(max_datagram=1200), True, T0)
    sid = c.open_stream()
    c.write(sid, payload(300_000))
    assert c.build_packet(0, T0) is not None
    assert c.bytes_in_flight < c.cc.cwnd
    assert not c.wants_to_send(T0)
    assert c.build_packet(1, T0) is None
    due = c.get_timer(T0)
    assert due is not None
    assert due == pytest.approx(T0 + 1200 / c.cc.pacing_rate(c.rtt), rel=1e-6)
    assert not c.wants_to_send(due - 1e-6)
    assert c.wants_to_send(due)
    assert c.build_packet(1, due) is not None
