"""Real transport `Endpoint` cores in the simulator: handshakes, pings, loss, partitions, scale."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from cellmesh.sim import (
    SIM_CONFIG,
    LinkModel,
    SansIOCore,
    SimNetwork,
    SimNode,
    add_endpoint,
    sim_identity,
)
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import (
    HandshakeFailed,
    PeerConnected,
    PeerDisconnected,
    PingReply,
)

Addr = tuple[str, int]
EpNode = SimNode[Endpoint]


def dial(addr: Addr, cell_id: bytes | None = None) -> Callable[[Endpoint, float], None]:
    """An action for `SimNode.act` / `call_at`: connect to `addr`."""
    return lambda ep, now: ep.connect(addr, now, cell_id)


def pinger(cell_id: bytes) -> Callable[[Endpoint, float], int]:
    """An action for `SimNode.act` / `call_at`: ping `cell_id`."""
    return lambda ep, now: ep.send_ping(cell_id, now)


def both_connected(a: EpNode, b: EpNode) -> bool:
    return (
        a.core.session_for(b.core.cell_id) is not None
        and b.core.session_for(a.core.cell_id) is not None
    )


def test_endpoint_is_a_sans_io_core() -> None:
    net = SimNetwork(1)
    core: SansIOCore = add_endpoint(net).core  # checked by mypy
    assert core.get_timer() is not None


def test_handshake_and_ping_take_the_configured_latency() -> None:
    lat, jit = 0.05, 0.002
    net = SimNetwork(1, default_link=LinkModel(latency=lat, jitter=jit))
    a, b = add_endpoint(net), add_endpoint(net)
    a.act(dial(b.addr))
    assert net.run_until(lambda: both_connected(a, b), 5.0)
    ((ta, ca),) = a.timed_events_of(PeerConnected)
    ((tb, cb),) = b.timed_events_of(PeerConnected)
    assert ca.cell_id == b.core.cell_id
    assert ca.initiator
    assert not cb.initiator
    assert ta == pytest.approx(2 * lat, abs=2 * jit)  # INIT out, RESP back
    assert tb == pytest.approx(3 * lat, abs=3 * jit)  # then FINISH
    net.run_for(1.0)
    sent_at = net.now
    pid = a.act(lambda ep, now: ep.send_ping(b.core.cell_id, now, b"hello"))
    net.run_for(1.0)
    ((t_reply, reply),) = a.timed_events_of(PingReply)
    assert reply.ping_id == pid
    assert reply.cell_id == b.core.cell_id
    assert reply.rtt == pytest.approx(2 * lat, abs=2 * jit)
    assert t_reply - sent_at == pytest.approx(reply.rtt)
    assert net.statistics().dropped == {}


def test_handshakes_complete_under_30_percent_loss() -> None:
    cfg = replace(SIM_CONFIG, handshake_timeout=30.0, handshake_retries=10)
    net = SimNetwork(2, default_link=LinkModel(latency=0.02, jitter=0.005, loss=0.3))
    pairs = [(add_endpoint(net, cfg), add_endpoint(net, cfg)) for _ in range(20)]
    for a, b in pairs:
        a.act(dial(b.addr))
    net.run_for(35.0)
    done = [both_connected(a, b) for a, b in pairs]
    assert sum(done) >= 18, done
    # It took retransmissions: lost datagrams, and handshakes finishing well after one RTT.
    assert net.statistics().dropped["loss"] > 20
    late = [a.timed_events_of(PeerConnected)[0][0] for a, _ in pairs if a.events_of(PeerConnected)]
    assert max(late) > 0.4
    print(f"\n{sum(done)}/20 handshakes completed under 30% loss; latest at {max(late):.2f} s")


def test_static_peer_reconnects_after_a_partition_heals() -> None:
    net = SimNetwork(3, default_link=LinkModel(latency=0.01))
    a, b = add_endpoint(net), add_endpoint(net)
    a.act(lambda ep, now: ep.add_static_peer(b.addr, now))
    assert net.run_until(lambda: both_connected(a, b), 5.0)
    net.partition([[a], [b]])
    net.run_for(SIM_CONFIG.idle_timeout + 15.0)
    for n in (a, b):
        (gone,) = n.events_of(PeerDisconnected)
        assert "idle" in gone.reason or "unresponsive" in gone.reason
    assert a.core.session_for(b.core.cell_id) is None
    assert a.events_of(HandshakeFailed)  # it kept redialling into the partition
    assert net.statistics().dropped["partition"] > 0
    healed_at = net.now
    net.heal()
    assert net.run_until(lambda: both_connected(a, b), 60.0)
    assert [t for t, _ in a.timed_events_of(PeerConnected) if t > healed_at]
    pid = a.act(lambda ep, now: ep.send_ping(b.core.cell_id, now))
    net.run_for(1.0)
    assert [r.ping_id for r in a.events_of(PingReply)] == [pid]
    print(f"\nreconnected {net.now - healed_at:.1f} s after the partition healed")


def endpoint_run(seed: int) -> tuple[str, list[tuple[int, float, str]]]:
    net = SimNetwork(seed, default_link=LinkModel(latency=0.01, jitter=0.003, loss=0.05))
    nodes = [add_endpoint(net, identity=sim_identity(net, f"n{i}")) for i in range(8)]
    for i, n in enumerate(nodes):
        n.call_at(i * 0.05, dial(nodes[(i + 1) % 8].addr))
    net.run_for(5.0)
    for i, n in enumerate(nodes):
        peer = nodes[(i + 1) % 8].core.cell_id
        n.act(pinger(peer))
    net.run_for(30.0)
    events = [(n.index, t, type(e).__name__) for n in nodes for t, e in n.timed_events_of(object)]
    return net.trace_digest(), events


def test_endpoint_runs_are_reproducible_from_the_seed() -> None:
    d1, e1 = endpoint_run(5)
    d2, e2 = endpoint_run(5)
    d3, _ = endpoint_run(6)
    assert d1 == d2
    assert e1 == e2
    assert any(name == "PingReply" for _, _, name in e1)
    assert d1 != d3


def test_burst_of_leaves_gets_through_the_hub_handshake_budget() -> None:
    net = SimNetwork(4, default_link=LinkModel(latency=0.005, jitter=0.001))
    hub = add_endpoint(net)
    leaves = [add_endpoint(net) for _ in range(300)]
    for leaf in leaves:
        leaf.act(dial(hub.addr, hub.core.cell_id))  # all at t = 0: over the hub's burst
    assert net.run_until(lambda: hub.core.statistics().sessions == 300, 20.0)
    assert hub.core.statistics().cookies_sent > 0
    assert all(leaf.core.session_for(hub.core.cell_id) is not None for leaf in leaves)


def test_thousand_endpoints_in_a_ring_handshake_and_ping() -> None:
    n_nodes = 1000
    wall0 = time.perf_counter()
    net = SimNetwork(2026, default_link=LinkModel(latency=0.01, jitter=0.002))
    counts = {"connected": 0, "pongs": 0, "failed": 0}

    def on_event(node: SimNode[Endpoint], ev: object) -> None:
        if isinstance(ev, PeerConnected) and ev.initiator:
            counts["connected"] += 1
            node.core.send_ping(ev.cell_id, node.now)
        elif isinstance(ev, PingReply):
            counts["pongs"] += 1
        elif isinstance(ev, HandshakeFailed):
            counts["failed"] += 1

    nodes = [add_endpoint(net, on_event=on_event) for _ in range(n_nodes)]
    wall_setup = time.perf_counter() - wall0
    starts = random.Random(1)
    for i, n in enumerate(nodes):
        n.call_at(starts.uniform(0.0, 1.0), dial(nodes[(i + 1) % n_nodes].addr))
    assert net.run_until(lambda: counts["pongs"] == n_nodes, 30.0)
    assert counts == {"connected": n_nodes, "pongs": n_nodes, "failed": 0}
    assert all(n.core.statistics().sessions == 2 for n in nodes)
    connected_at = net.now
    net.run_for(30.0)  # idle sessions: keepalives only, nobody disconnects
    assert not any(n.events_of(PeerDisconnected) for n in nodes)
    st = net.statistics()
    wall = time.perf_counter() - wall0
    print(
        f"\n{n_nodes} endpoints: setup {wall_setup:.2f} s, all pinged by t={connected_at:.2f} s, "
        f"{st.events_processed} events, {st.delivered} datagrams; {wall:.2f} s wall in total"
    )
