"""Relaying through the endpoint core: end-to-end sessions across neighbours that forward
RELAY records by destination CellID, never holding the end-to-end keys."""

from __future__ import annotations

from dataclasses import replace

from test_endpoint import CONFIG, Addr, Net

from cellmesh.config import NodeConfig
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import DatagramReceived, PeerConnected, PingReply, StreamData
from cellmesh.transport.relay import QUEUE_PER_NEIGHBOUR, RELAY_OVERHEAD, RelayQueues, via, via_cell
from cellmesh.wire.messages import Relay, pull_messages, push_message


def line(n: int, config: NodeConfig = CONFIG) -> tuple[Net, list[Endpoint], list[Addr]]:
    """n endpoints in a line; only neighbours can exchange datagrams; static next hops."""
    net = Net()
    eps: list[Endpoint] = []
    addrs: list[Addr] = []
    for i in range(n):
        ep, addr = net.add(i + 1, config)
        eps.append(ep)
        addrs.append(addr)
    index = {a: i for i, a in enumerate(addrs)}
    net.drop = lambda d, s, t: abs(index[s] - index[t]) != 1
    for i in range(n - 1):
        eps[i].connect(addrs[i + 1], net.now)
        net.run()
    position: dict[bytes, int] = {bytes(ep.cell_id): i for i, ep in enumerate(eps)}
    for i, ep in enumerate(eps):

        def route(dst: bytes, i: int = i) -> bytes | None:
            j = position.get(dst)
            if j is None or j == i:
                return None
            return eps[i + 1 if j > i else i - 1].cell_id

        ep.set_router(route)
    return net, eps, addrs


def test_virtual_addresses_round_trip() -> None:
    cell = bytes(range(16))
    assert via_cell(via(cell)) == cell
    assert via_cell(("10.0.0.1", 5)) is None
    assert via_cell(("~zz", 0)) is None


def test_ping_and_datagrams_cross_three_relays_end_to_end() -> None:
    net, eps, addrs = line(5)
    a, e = eps[0], eps[4]
    pid = a.send_ping(e.cell_id, net.now)
    net.advance(1.0)
    assert any(isinstance(r, PingReply) and r.ping_id == pid for r in net.events[addrs[0]])
    # An end-to-end session: both ends see each other at a virtual address.
    assert a.session_for(e.cell_id) is not None
    assert e.session_for(a.cell_id) is not None
    (connected,) = [
        c for c in net.events[addrs[4]] if isinstance(c, PeerConnected) and c.cell_id == a.cell_id
    ]
    assert connected.addr == via(a.cell_id)
    a.send_datagram(e.cell_id, b"hello over the mesh", net.now)
    net.run()
    assert DatagramReceived(a.cell_id, b"hello over the mesh") in net.of(addrs[4], DatagramReceived)
    # The relays forwarded frames, and hold sessions only with their neighbours.
    for i in (1, 2, 3):
        total, by_neighbour = eps[i].relay_statistics()
        assert total > 0
        assert set(by_neighbour) <= {eps[i - 1].cell_id, eps[i + 1].cell_id}
        assert eps[i].session_for(a.cell_id) is None or i == 1
        assert eps[i].session_for(e.cell_id) is None or i == 3


def test_streams_cross_relays_byte_exact() -> None:
    net, eps, addrs = line(4)
    a, d = eps[0], eps[3]
    a.send_ping(d.cell_id, net.now)
    net.advance(1.0)
    sid = a.open_stream(d.cell_id)
    payload = bytes(range(256)) * 2000  # 512 KB: many packets, each wrapped at every hop
    a.stream_write(d.cell_id, sid, payload, net.now, fin=True)
    received = bytearray()
    for _ in range(400):
        net.advance(0.05, tick=0.01)
        for ev in net.events[addrs[3]]:
            if isinstance(ev, StreamData):
                received += ev.data
                d.stream_consumed(a.cell_id, ev.stream_id, len(ev.data), net.now)
        net.events[addrs[3]].clear()
        if len(received) >= len(payload):
            break
    assert bytes(received) == payload
    # Packets never exceeded what a hop carries: the relayed session's base is 1,200 - overhead.
    conn = a.connection(d.cell_id)
    assert conn is not None
    assert conn.base_mtu == 1200 - RELAY_OVERHEAD


def test_ttl_expires_and_relay_budget_and_refusal_are_counted() -> None:
    net, eps, addrs = line(3)
    a, b, c = eps
    a.send_ping(c.cell_id, net.now)
    net.advance(1.0)
    # A frame whose TTL is spent dies at the relay.
    s = a.session_for(b.cell_id)
    assert s is not None
    inner = bytearray(b"\x01" * 64)
    inner[1] = 5  # a DATA frame ...
    inner[3] = 1  # ... with one hop left: B may not pass it on
    b.receive_datagram(
        s.seal(push_message(Relay(c.cell_id, bytes(inner))), net.now), addrs[0], net.now
    )
    assert b.drops["ttl_expired"] == 1
    # A node with relaying off refuses to forward.
    net2, eps2, _ = line(3, replace(CONFIG, relay=False))
    eps2[0].send_ping(eps2[2].cell_id, net2.now)
    net2.advance(1.0)
    assert eps2[1].drops["relay_refused"] >= 1
    assert eps2[0].session_for(eps2[2].cell_id) is None


def test_relay_budget_per_neighbour() -> None:
    net, eps, addrs = line(3, replace(CONFIG, relay_rate=1.0, relay_burst=2.0))
    a, b, c = eps
    a.send_ping(c.cell_id, net.now)
    net.advance(2.0)  # the handshake's three frames fit B's budget for A, the pings too
    assert a.session_for(c.cell_id) is not None
    for _ in range(10):
        a.send_datagram(c.cell_id, b"x", net.now)
        net.run()
    assert b.drops["relay_rate"] > 0
    assert len(net.of(addrs[2], DatagramReceived)) < 10


def test_no_route_is_counted_and_a_bounce_back_is_a_loop() -> None:
    net, eps, _addrs = line(3)
    a, b, c = eps
    a.set_router(lambda dst: b.cell_id)  # A believes B leads everywhere
    b.set_router(lambda dst: a.cell_id if dst != a.cell_id else None)  # B points back at A
    a.send_ping(c.cell_id, net.now)
    net.run()
    assert b.drops["relay_loop"] >= 1
    b.set_router(lambda dst: None)  # B lost its routes: the retransmitted INIT has nowhere to go
    net.advance(2.0)
    assert b.drops["no_route"] >= 1
    assert a.session_for(c.cell_id) is None


def test_relay_record_round_trip() -> None:
    rec = Relay(bytes(range(16)), bytes(64) + b"payload")
    assert pull_messages(push_message(rec)) == [rec]


def test_relay_queues_are_fair_and_bounded_per_neighbour() -> None:
    q = RelayQueues()
    flooder, quiet = b"F" * 16, b"Q" * 16
    pushed = sum(q.push(flooder, b"f%d" % i, b"D" * 16) for i in range(QUEUE_PER_NEIGHBOUR + 50))
    assert pushed == QUEUE_PER_NEIGHBOUR  # the flooder fills only its own queue
    assert q.push(quiet, b"q0", b"D" * 16)
    assert q.push(quiet, b"q1", b"D" * 16)
    first = q.take(4)
    # Round robin: the quiet neighbour's frames go out in the first rounds, not after 256.
    assert [n for n, _, _ in first] == [flooder, quiet, flooder, quiet]
    q.drop(flooder)
    assert not q


def test_policy_relay_budget_drops_what_it_refuses() -> None:
    net, eps, _addrs = line(3)
    a, b, c = eps
    b.set_relay_admission(lambda neighbour, now: neighbour != a.cell_id)
    a.send_ping(c.cell_id, net.now)
    net.advance(1.0)
    assert b.drops["relay_policy"] >= 1
    assert a.session_for(c.cell_id) is None
