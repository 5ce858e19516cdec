"""The failure detector in virtual time: alive -> suspect -> dead, and back when the peer returns."""

from __future__ import annotations

from cellmesh.sim import SIM_CONFIG, LinkModel, SimNetwork, add_endpoint
from cellmesh.transport.events import PeerConnected, PeerDisconnected, PeerStateChanged


def test_silent_peer_goes_suspect_then_dead_and_recovers_when_it_returns() -> None:
    net = SimNetwork(21, default_link=LinkModel(latency=0.005))
    a, b = add_endpoint(net), add_endpoint(net)
    a.act(lambda e, now: e.add_static_peer(b.addr, now))
    assert net.run_until(lambda: bool(a.events_of(PeerConnected)), 5.0)
    net.run_for(30.0)  # idle but alive: keepalives flow, no suspicion
    assert not a.events_of(PeerStateChanged)
    net.set_node_down(b)
    assert net.run_until(lambda: bool(a.events_of(PeerDisconnected)), SIM_CONFIG.idle_timeout + 5)
    states = [e.state for e in a.events_of(PeerStateChanged)]
    assert states == ["suspect", "dead"]
    (t_suspect, _), (t_dead, _) = a.timed_events_of(PeerStateChanged)
    (gone,) = a.events_of(PeerDisconnected)
    # Unanswered keepalive probes give the peer up well before the hard idle timeout.
    assert t_suspect <= t_dead
    assert t_dead - 30.0 < SIM_CONFIG.idle_timeout - 10
    assert "unresponsive" in gone.reason
    # B comes back: the static peer is redialled and the session re-established.
    net.set_node_up(b)
    connects_before = len(a.events_of(PeerConnected))
    assert net.run_until(lambda: len(a.events_of(PeerConnected)) > connects_before, 60.0)
    assert a.core.session_for(b.core.cell_id) is not None


def test_suspect_peer_that_speaks_again_is_alive() -> None:
    net = SimNetwork(22, default_link=LinkModel(latency=0.005))
    a, b = add_endpoint(net), add_endpoint(net)
    a.act(lambda e, now: e.connect(b.addr, now))
    net.run_for(2.0)
    net.partition([[a], [b]])
    assert net.run_until(
        lambda: any(e.state == "suspect" for e in a.events_of(PeerStateChanged)), 50.0
    )
    net.heal()
    assert net.run_until(
        lambda: any(e.state == "alive" for e in a.events_of(PeerStateChanged)), 30.0
    )
    assert not a.events_of(PeerDisconnected)
