"""Endpoint behaviours in virtual time: keepalives only on idle sessions, and a peer declared dead
that comes back from a new address with the same identity gets a session again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from cellmesh.sim import SIM_CONFIG, LinkModel, SimNetwork, add_endpoint, sim_identity
from cellmesh.transport.connection import Connection
from cellmesh.transport.endpoint import HOUSEKEEPING_INTERVAL, Endpoint
from cellmesh.transport.events import (
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
    PeerStateChanged,
    PingReply,
)
from cellmesh.wire.messages import Keepalive, Message, Msg, pull_messages

Sent = list[tuple[float, list[Message]]]


def spy_on_packets(conn: Connection) -> Sent:
    """Record (now, records) of every packet `conn` builds (the plaintext before sealing)."""
    sent: Sent = []
    build = conn.build_packet_parts

    def recording(pn: int, now: float) -> Sequence[bytes | memoryview] | None:
        parts = build(pn, now)
        if parts is not None:
            sent.append((now, pull_messages(b"".join(parts))))
        return parts

    conn.build_packet_parts = recording  # type: ignore[method-assign]
    return sent


def times_with(sent: Sent, kind: type) -> list[float]:
    return [t for t, msgs in sent if any(isinstance(m, kind) for m in msgs)]


def test_keepalives_are_sent_only_when_the_session_is_idle() -> None:
    # max_datagram = 1200: no path-MTU probes (which also carry a KEEPALIVE record).
    cfg = replace(SIM_CONFIG, keepalive_interval=2.0, idle_timeout=20.0, max_datagram=1200)
    net = SimNetwork(31, default_link=LinkModel(latency=0.005))
    a, b = add_endpoint(net, cfg), add_endpoint(net, cfg)
    a.act(lambda e, now: e.connect(b.addr, now))
    assert net.run_until(
        lambda: bool(a.events_of(PeerConnected)) and bool(b.events_of(PeerConnected)), 5.0
    )
    conn = a.core.connection(b.core.cell_id)
    assert conn is not None
    sent = spy_on_packets(conn)

    # Steady traffic for five keepalive intervals: a reliable message every 0.5 s.
    t0, n = net.now, 20

    def tick(i: int) -> Callable[[Endpoint, float], None]:
        return lambda e, now: e.send_message(b.core.cell_id, f"tick {i}".encode(), now)

    for i in range(n):
        a.call_at(t0 + 0.5 * i, tick(i))
    net.run_for(0.5 * n)
    assert len(b.events_of(MessageReceived)) == n
    assert len(times_with(sent, Msg)) == n
    assert times_with(sent, Keepalive) == [], "a KEEPALIVE went out while data was flowing"
    last_data = max(times_with(sent, Msg))

    # Then silence: one keepalive leaves once the session was idle for keepalive_interval.
    net.run_for(cfg.keepalive_interval + HOUSEKEEPING_INTERVAL + 0.1)
    kas = times_with(sent, Keepalive)
    assert len(kas) == 1, kas
    assert cfg.keepalive_interval <= kas[0] - last_data
    assert kas[0] - last_data <= cfg.keepalive_interval + HOUSEKEEPING_INTERVAL
    assert not a.events_of(PeerDisconnected)


def test_dead_peer_returning_from_a_new_address_gets_a_session_again() -> None:
    net = SimNetwork(23, default_link=LinkModel(latency=0.005))
    a = add_endpoint(net, identity=sim_identity(net, "a"))
    b_id = sim_identity(net, "b")
    b = add_endpoint(net, identity=b_id)
    a.act(lambda e, now: e.add_static_peer(b.addr, now))
    assert net.run_until(lambda: bool(a.events_of(PeerConnected)), 5.0)
    net.run_for(5.0)
    cell = b.core.cell_id

    # B's process dies: A goes alive -> suspect -> dead and drops the session.
    net.set_node_down(b)
    assert net.run_until(lambda: bool(a.events_of(PeerDisconnected)), SIM_CONFIG.idle_timeout + 5)
    assert [e.state for e in a.events_of(PeerStateChanged)] == ["suspect", "dead"]
    assert a.core.session_for(cell) is None

    # B restarts with the same identity behind a new address and dials A.
    new_addr = ("10.9.9.9", b.addr[1])
    assert new_addr != b.addr
    b2 = add_endpoint(net, identity=b_id, addr=new_addr)
    assert b2.core.cell_id == cell
    b2.act(lambda e, now: e.connect(a.addr, now, a.core.cell_id))
    connects_before = len(a.events_of(PeerConnected))
    assert net.run_until(lambda: len(a.events_of(PeerConnected)) > connects_before, 30.0)
    back = a.events_of(PeerConnected)[-1]
    assert back.cell_id == cell
    assert back.addr == new_addr
    assert a.core.session_for(cell) is not None
    (row,) = [p for p in a.core.peers(net.now) if p.cell_id == cell]
    assert row.addr == new_addr

    # The session carries traffic, both ways, at the new address.
    pid = a.act(lambda e, now: e.send_ping(cell, now))
    assert net.run_until(lambda: any(e.ping_id == pid for e in a.events_of(PingReply)), 5.0)
    net.run_for(10.0)  # and stays up: A's stale redials of the old address do not break it
    assert a.core.session_for(cell) is not None
    assert len(a.events_of(PeerDisconnected)) == 1
