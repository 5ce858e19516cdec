"""Discovery cores in the simulator: convergence of 500 nodes, beacon load against density,
joining a stable mesh, mesh-key isolation and expiry of a stopped node.

All nodes share one `CachedVerifier`: every multicast beacon reaches hundreds of cores in this one
process, and Ed25519 verification is deterministic, so verifying each distinct frame once changes
how fast the simulation runs, never what it computes. The garbage collector is paused during the
large runs (hundreds of thousands of short-lived objects and no reference cycles to find).
"""

from __future__ import annotations

import functools
import gc
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from cellmesh.discovery import (
    CachedVerifier,
    DiscoveryCore,
    DiscoverySettings,
    PeerDiscovered,
    PeerExpired,
)
from cellmesh.sim import LinkModel, SansIOCore, SimNetwork, SimNode, sim_identity

WALL0 = 1_800_000_000.0
LAN = LinkModel(latency=0.002)
"""A modest LAN: 2 ms one way."""
JOIN_RATE = 150.0
"""Nodes powering on per second while a mesh forms (below the default SOLICIT budget of 200/s)."""
WINDOW = 300.0
"""Load is measured over one `max_announce_interval`, so every node's forced beacon is in it."""

DNode = SimNode[DiscoveryCore]


@contextmanager
def gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class Mesh:
    """N discovery cores in one broadcast segment, counting how many know everybody."""

    net: SimNetwork
    settings: DiscoverySettings = field(default_factory=DiscoverySettings)
    verifier: CachedVerifier = field(default_factory=CachedVerifier)
    nodes: list[DNode] = field(default_factory=list)
    complete: int = 0
    size: int = 0

    def wall(self) -> float:
        return WALL0 + self.net.now

    def _on_event(self, node: DNode, ev: object) -> None:
        if isinstance(ev, PeerDiscovered) and len(node.core) == self.size - 1:
            self.complete += 1
        elif isinstance(ev, PeerExpired) and len(node.core) == self.size - 2:
            self.complete -= 1

    def add(self, label: str, settings: DiscoverySettings | None = None) -> DNode:
        core = DiscoveryCore(
            sim_identity(self.net, label),
            settings or self.settings,
            self.net.now,
            self.wall,
            random.Random(self.net.derive_seed(label)),
            self.verifier,
        )
        node = self.net.add_node(core, name=label, on_event=self._on_event, record_events=False)
        node.act(lambda c, now: c.start(now))
        self.nodes.append(node)
        return node

    def form(self, n: int, timeout: float = 120.0) -> float:
        """Power on `n` nodes at `JOIN_RATE`; run until all know all; return the virtual time
        from the first start to that moment."""
        self.size = n
        start = self.net.now
        for i in range(n):
            self.net.call_at(start + i / JOIN_RATE, functools.partial(self.add, f"n{i}"))
        assert self.net.run_until(lambda: self.complete == n, timeout)
        return self.net.now - start

    def beacons_sent(self) -> int:
        total = 0
        for node in self.nodes:
            st = node.core.statistics()
            total += st.beacons_sent + st.replies_sent
        return total

    def load_per_node_minute(self, window: float) -> float:
        """Beacon datagrams (multicast and SOLICIT answers) per node per minute over `window`."""
        before = self.beacons_sent()
        self.net.run_for(window)
        return (self.beacons_sent() - before) / len(self.nodes) / (window / 60.0)


@dataclass(frozen=True)
class Formed:
    mesh: Mesh
    converge: float
    load: float
    wall: float


def form_and_measure(n: int, seed: int) -> Formed:
    t0 = time.perf_counter()
    mesh = Mesh(SimNetwork(seed, default_link=LAN))
    with gc_paused():
        converge = mesh.form(n)
        mesh.net.run_for(10.0)  # let the join-time Trickle resets decay
        load = mesh.load_per_node_minute(WINDOW)
    return Formed(mesh, converge, load, time.perf_counter() - t0)


@pytest.fixture(scope="module")
def dense() -> Formed:
    """One 500-node mesh, formed and measured once for the tests below."""
    return form_and_measure(500, seed=500)


def test_discovery_core_is_a_sans_io_core() -> None:
    core: SansIOCore = DiscoveryCore(
        sim_identity(1, "x"), DiscoverySettings(), 0.0, lambda: WALL0, random.Random(1)
    )
    assert core.get_timer() is None


def test_500_nodes_converge_and_beacon_load_falls_with_density(dense: Formed) -> None:
    runs = {10: form_and_measure(10, seed=10), 100: form_and_measure(100, seed=100), 500: dense}
    for n, r in runs.items():
        print(
            f"\n{n:4d} nodes: everyone knows everyone {r.converge:.2f} s after the first start "
            f"({n / JOIN_RATE:.2f} s of joins); {r.load:.3f} beacons/node/min "
            f"(fixed 5 s pulse: 12); {r.wall:.1f} s wall"
        )
        assert r.converge < n / JOIN_RATE + 1.0
        assert all(len(node.core) == n - 1 for node in r.mesh.nodes)
    loads = [runs[n].load for n in (10, 100, 500)]
    assert loads[0] > loads[1] > loads[2]
    assert loads[0] < 12.0
    stats = [node.core.statistics() for node in dense.mesh.nodes]
    assert sum(s.suppressed for s in stats) > sum(s.forced for s in stats) > 0
    assert all(s.announce_interval == 300.0 for s in stats)
    # Nothing refused; at most a second copy of an answer (sent twice to a repeated SOLICIT
    # that raced with the answerer's own start beacon) arriving as a duplicate.
    assert all(set(s.drops) <= {"duplicate"} for s in stats)


def test_a_new_node_sees_a_stable_500_node_mesh_within_half_a_second(dense: Formed) -> None:
    mesh = dense.mesh
    net = mesh.net
    mesh.size += 1  # "complete" now means knowing the newcomer too
    with gc_paused():
        newcomer = mesh.add("newcomer")
        joined = net.now
        assert net.run_until(lambda: len(newcomer.core) == 500, 0.5)
        seen = net.now - joined
        net.run_for(0.5)
    print(f"\nnew node saw all 500 neighbours after {seen * 1000:.0f} ms")
    assert seen < 0.5
    assert all(len(node.core) == 500 for node in mesh.nodes)
    assert newcomer.core.statistics().drops == {}


def test_a_node_with_the_wrong_mesh_key_learns_nothing_and_nobody_learns_it() -> None:
    net = SimNetwork(3, default_link=LAN)
    mesh = Mesh(net, DiscoverySettings(mesh_name="rig", mesh_key=b"K" * 32))
    mesh.size = 30
    for i in range(30):
        mesh.add(f"m{i}")
    intruder = mesh.add("intruder", DiscoverySettings(mesh_name="rig", mesh_key=b"X" * 32))
    net.run_for(60.0)
    assert len(intruder.core) == 0
    members = [n for n in mesh.nodes if n is not intruder]
    assert all(len(n.core) == 29 for n in members)
    assert all(intruder.core.cell_id not in {p.cell_id for p in n.core.peers()} for n in members)
    assert intruder.core.statistics().drops.keys() == {"bad_mac"}
    assert all(n.core.statistics().drops.get("bad_mac", 0) >= 2 for n in members)
    assert intruder.core.statistics().replies_sent == 0


def test_a_mesh_forms_quickly_on_a_lossy_link() -> None:
    """5% of all datagrams lost (Wi-Fi multicast has no retransmission): repeated SOLICITs,
    SOLICITs asked back and unasked introductions repair what the first round lost."""
    net = SimNetwork(5, default_link=LinkModel(latency=0.002, loss=0.05))
    mesh = Mesh(net)
    with gc_paused():
        formed = mesh.form(60, timeout=60.0)
        net.run_for(120.0)
    print(f"\n60 nodes at 5% loss: everyone knows everyone after {formed:.1f} s")
    assert formed < 20.0
    assert mesh.complete == 60  # and nobody expired since
    stats = [n.core.statistics() for n in mesh.nodes]
    assert sum(s.asks for s in stats) > 0


def test_a_stopped_node_expires_after_three_announced_intervals() -> None:
    net = SimNetwork(4, default_link=LAN)
    mesh = Mesh(net)
    mesh.size = 10
    expired: list[tuple[float, PeerExpired]] = []
    for i in range(10):
        node = mesh.add(f"s{i}")
        node.on_event = lambda _node, ev: (
            expired.append((net.now, ev)) if isinstance(ev, PeerExpired) else None
        )
    net.run_for(120.0)
    victim = mesh.nodes[0]
    interval = victim.core.announce_interval
    assert interval == pytest.approx(5.0 * 10 / 3)  # nine peers: Imax * (9 + 1) / k
    stopped = net.now
    net.set_node_down(victim)
    net.run_for(4 * interval)
    assert len(expired) == 9
    for t, ev in expired:
        assert ev.peer.cell_id == victim.core.cell_id
        assert ev.reason == "expired"
        assert ev.peer.interval == pytest.approx(interval, abs=1e-3)  # sent in ms
        assert t == pytest.approx(ev.peer.last_seen + 3 * ev.peer.interval)
        assert stopped - interval - 7.5 <= ev.peer.last_seen <= stopped
    print(f"\nstopped node expired {max(t for t, _ in expired) - stopped:.1f} s after it stopped")
    assert all(len(n.core) == 8 for n in mesh.nodes[1:])
