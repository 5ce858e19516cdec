"""Routing cores in the simulator: a line, a ring that loses a link, a lossy mesh, and 1,000
nodes in a random geometric graph.

Everything runs in virtual time from fixed seeds, so every time asserted here is an exact,
reproducible property of the protocol on that topology, not a measurement of this machine.
Loops are checked two ways: `RoutingMesh` follows the next-hop chain from every node that
changes a route, at the instant it changes (which catches every loop the moment it forms), and
the rings also walk every (node, destination) pair after every simulator event. The naive
Bellman-Ford baseline runs the same ring scenarios to show that the checks do catch loops.
"""

from __future__ import annotations

import gc
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest

from cellmesh.routing import RoutingCore, RoutingSettings
from cellmesh.sim import SimNetwork
from cellmesh.sim.routing import (
    Link,
    NaiveDistanceVector,
    RoutingDriver,
    RoutingMesh,
    babel_factory,
    core_link_cost,
    naive_factory,
    random_geometric_edges,
    ring_edges,
)

S = RoutingSettings()
COST = core_link_cost(S)
LAN = Link(latency=0.01)


@contextmanager
def gc_paused(mesh: RoutingMesh[RoutingCore]) -> Iterator[None]:
    """The 1,000-node run allocates millions of long-lived objects: the cyclic collector would
    rescan them all, over and over, for nothing (the cores hold no cycles). At the end the
    cores are released, so reference counting frees them in a fraction of a second."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        mesh.close()
        if was:
            gc.enable()


def babel_mesh(seed: int, settings: RoutingSettings = S) -> RoutingMesh[RoutingCore]:
    return RoutingMesh(SimNetwork(seed), babel_factory(settings))


R = TypeVar("R", bound=RoutingDriver)


def assert_no_loop_anywhere(mesh: RoutingMesh[R]) -> None:
    """Walk every (node, destination) pair: for the small topologies, after every event."""
    n = len(mesh.nodes)
    for src in range(n):
        for dst in range(n):
            if src != dst and mesh.nodes[src].up and mesh.nodes[dst].up:
                outcome, path = mesh.path(src, dst)
                assert outcome != "loop", f"t={mesh.net.now:.3f}: loop {path}"


def run_checking_every_event(mesh: RoutingMesh[R], duration: float) -> None:
    def never() -> bool:
        assert_no_loop_anywhere(mesh)
        return False

    mesh.net.run_until(never, duration)


# ---------------------------------------------------------------------------- line


def test_line_of_five_converges_and_metrics_add_up() -> None:
    mesh = babel_mesh(1)
    mesh.add_many(5)
    latencies = [0.005, 0.010, 0.020, 0.001]
    for i, lat in enumerate(latencies):
        mesh.connect(i, i + 1, Link(latency=lat))
    assert mesh.net.run_until(mesh.all_routed, 5.0)
    # Four hops, each batched for triggered_delay: converged after about 4 * 50 ms.
    assert mesh.net.now < 0.5
    result = mesh.check(metric_of=COST)
    assert (result.pairs, result.ok, result.wrong_metric) == (20, 20, 0)
    costs = [COST(Link(latency=lat)) for lat in latencies]
    assert costs == [20, 30, 50, 12]
    end_to_end = mesh.core(0).route(mesh.cells[4])
    assert end_to_end is not None
    assert end_to_end.metric == sum(costs) == 112
    assert end_to_end.hops == 4
    back = mesh.core(4).route(mesh.cells[0])
    assert back is not None
    assert back.metric == 112
    assert mesh.path(0, 4) == ("ok", [0, 1, 2, 3, 4])
    assert mesh.loops == []


def test_the_simulation_is_deterministic() -> None:
    digests = []
    for _ in range(2):
        mesh = babel_mesh(5)
        mesh.add_many(6)
        mesh.build(ring_edges(6), LAN)
        mesh.net.run_for(3.0)
        mesh.disconnect(0, 1)
        mesh.net.run_for(3.0)
        digests.append(mesh.net.trace_digest())
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------------- ring


def test_ring_reroutes_the_long_way_with_no_loop_at_any_step() -> None:
    n = 8
    mesh = babel_mesh(2)
    mesh.watch = None  # follow the chain on every route change, for every destination
    mesh.add_many(n)
    mesh.build(ring_edges(n), LAN)
    assert mesh.net.run_until(mesh.all_routed, 5.0)
    run_checking_every_event(mesh, 2.0)
    assert mesh.path(1, 0) == ("ok", [1, 0])
    assert mesh.path(2, 0) == ("ok", [2, 1, 0])
    origin_seqno = mesh.core(0).seqno

    # Node 1 and node 0 lose their link; the session failure detector needs 0.5 s to notice.
    mesh.disconnect(0, 1, detect_after=0.5)
    failed_at = mesh.net.now
    run_checking_every_event(mesh, 10.0)
    assert mesh.loops == []
    result = mesh.check(metric_of=COST)
    assert (result.ok, result.looping, result.wrong_metric) == (n * (n - 1), 0, 0)
    assert mesh.path(1, 0) == ("ok", [1, 2, 3, 4, 5, 6, 7, 0])
    assert mesh.path(0, 1) == ("ok", [0, 7, 6, 5, 4, 3, 2, 1])
    # Nodes that held only unfeasible routes asked for a newer seqno, and the origins (0 and 1,
    # whose routes were cut) raised theirs: recovery did not wait for a periodic update.
    assert sum(mesh.core(i).statistics().requests_sent for i in range(n)) > 0
    assert mesh.core(0).seqno != origin_seqno
    reconverged = mesh.last_change - failed_at
    assert reconverged < 2.0  # virtual seconds, detection delay included

    # The link comes back: the short routes return.
    mesh.connect(0, 1, LAN)
    run_checking_every_event(mesh, 5.0)
    assert mesh.path(1, 0) == ("ok", [1, 0])
    result = mesh.check(metric_of=COST)
    assert (result.ok, result.wrong_metric) == (n * (n - 1), 0)
    assert mesh.loops == []


def test_a_node_that_dies_is_retracted_without_counting_to_infinity() -> None:
    n = 8
    mesh = babel_mesh(3)
    mesh.watch = None
    mesh.add_many(n)
    mesh.build(ring_edges(n), LAN)
    assert mesh.net.run_until(mesh.all_routed, 5.0)
    mesh.kill(0, detect_after=0.5)
    run_checking_every_event(mesh, 10.0)
    assert mesh.loops == []
    dead = mesh.cells[0]
    assert all(mesh.core(i).next_hop(dead) is None for i in range(1, n))
    result = mesh.check()
    assert (result.ok, result.pairs) == ((n - 1) * (n - 2), (n - 1) * (n - 2))


@pytest.mark.parametrize("scenario", ["link", "node"])
def test_the_naive_baseline_loops_in_the_same_scenarios(scenario: str) -> None:
    """Control experiment: the loop checks are not vacuous."""
    n = 8
    mesh: RoutingMesh[NaiveDistanceVector] = RoutingMesh(SimNetwork(2), naive_factory(S))
    mesh.watch = None
    mesh.add_many(n)
    mesh.build(ring_edges(n), LAN)
    assert mesh.net.run_until(mesh.all_routed, 5.0)
    if scenario == "link":
        mesh.disconnect(0, 1, detect_after=0.5)
    else:
        mesh.kill(0, detect_after=0.5)
    mesh.net.run_for(20.0)
    assert len(mesh.loops) > 0


# ---------------------------------------------------------------------------- lossy mesh


def test_lossy_jittery_mesh_converges_and_never_loops() -> None:
    n = 40
    rng = random.Random(11)
    mesh = babel_mesh(11, RoutingSettings(update_interval=5.0))
    mesh.watch = None
    mesh.add_many(n)
    edges, _ = random_geometric_edges(n, 5.0, rng)
    for a, b, dist in edges:
        mesh.connect(a, b, Link(latency=0.002 + 0.02 * dist, loss=0.05, jitter=0.002))
    # Lost updates are repaired by requests and by the 5 s periodic dumps.
    assert mesh.net.run_until(mesh.all_routed, 30.0)
    mesh.net.run_for(12.0)
    assert mesh.check().ok == n * (n - 1)
    usage: Counter[tuple[int, int]] = Counter()
    for src in range(n):
        for dst in range(n):
            if src != dst:
                hops = mesh.path(src, dst)[1]
                usage.update(itertools.pairwise(hops))
    for (a, b), _count in usage.most_common():
        if not mesh.is_bridge(a, b):  # keep the graph whole
            mesh.disconnect(a, b, detect_after=1.0)
            break
    mesh.net.run_for(20.0)
    assert mesh.loops == []
    assert mesh.check().ok == n * (n - 1)


# ---------------------------------------------------------------------------- 1,000 nodes


def busiest_link(mesh: RoutingMesh[RoutingCore], sample: list[int]) -> tuple[int, int]:
    """The non-bridge edge that the most sampled routes cross."""
    usage: Counter[tuple[int, int]] = Counter()
    for dst in sample:
        for src in range(len(mesh.nodes)):
            if src != dst:
                path = mesh.path(src, dst)[1]
                usage.update((min(a, b), max(a, b)) for a, b in itertools.pairwise(path))
    for (a, b), _count in usage.most_common():
        if not mesh.is_bridge(a, b):
            return a, b
    raise AssertionError("every used edge is a bridge")


def test_thousand_nodes_random_geometric_graph() -> None:
    n = 1000
    seed = 7
    rng = random.Random(seed)
    mesh = babel_mesh(seed)
    mesh.add_many(n)
    edges, _ = random_geometric_edges(n, 6.0, rng)
    for a, b, dist in edges:
        mesh.connect(a, b, Link(latency=0.001 + 0.02 * dist))
    sample = rng.sample(range(n), 25)
    mesh.watch = set(sample)
    net = mesh.net
    with gc_paused(mesh):
        # Cold start: every node powers on at t=0 with its links up.
        assert net.run_until(mesh.all_routed, 30.0)
        cold_start = net.now
        msgs0, bytes0 = mesh.traffic()
        net.run_for(1.0)
        full = mesh.check()
        assert (full.ok, full.looping) == (n * (n - 1), 0)

        # Steady state, undisturbed: periodic dumps. Every node's first one falls at a seeded
        # random point of [22.5 s, 30 s]. Measure the quarter of them that fall in [22.5 s,
        # 24.5 s] and scale by the mean dump period (a full round's figure, for a quarter of it).
        net.run_until(22.4)
        m1, b1 = mesh.traffic()
        dumps1 = sum(mesh.core(i).statistics().full_dumps for i in range(n))
        net.run_until(24.5)
        m2, b2 = mesh.traffic()
        dumps = sum(mesh.core(i).statistics().full_dumps for i in range(n)) - dumps1

        # Cut the link the most sampled routes cross; its ends notice after 0.5 s.
        a, b = busiest_link(mesh, sample)
        affected = [
            (src, dst)
            for dst in sample
            for src in range(n)
            if src != dst and {a, b} <= set(mesh.path(src, dst)[1])
        ]
        assert affected
        failed_at = net.now
        mesh.disconnect(a, b, detect_after=0.5)
        repaired: list[float] = []

        def poll() -> None:
            if all(mesh.path(s, d)[0] == "ok" for s, d in affected):
                repaired.append(net.now)
            else:
                net.call_later(0.01, poll)

        net.call_later(0.01, poll)
        net.run_for(5.0)
        assert repaired, "routes through the failed link were not repaired"
        reconverge = repaired[0] - failed_at
        after = mesh.check(sample)
        assert (after.ok, after.looping) == (after.pairs, 0)

    assert mesh.loops == []
    assert dumps > n // 10
    degree = 2 * len(edges) / n
    period = S.update_interval * (1 - S.update_jitter / 2)
    steady_bps = (b2 - b1) / dumps / period
    steady_mps = (m2 - m1) / dumps / period
    print(
        f"\n1,000-node RGG (mean degree {degree:.1f}): routes everywhere {cold_start:.2f} s "
        f"after a cold start, {msgs0 / n:.0f} msgs and {bytes0 / n / 1000:.0f} kB per node; "
        f"{len(affected)} sampled routes crossed the busiest link, all repaired "
        f"{reconverge:.2f} s after it failed (0.5 s of it detection); steady state "
        f"{steady_bps:.0f} B/s and {steady_mps:.2f} msgs/s per node"
    )
    # Virtual-time bounds (deterministic for this seed, not wall-clock timings).
    assert cold_start < 5.0
    assert reconverge < 2.0
    # A full dump is at most 22 bytes per destination per neighbour; split horizon and the
    # unfeasible-route omission keep it well under.
    assert steady_bps < degree * 22 * n / period
