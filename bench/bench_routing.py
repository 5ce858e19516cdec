"""Routing: 1,000 nodes in a random geometric graph, our protocol against naive distance vector.

Ours: `RoutingCore` with its defaults (Babel-style seqnos and feasibility condition, seqno
requests, split horizon plus the unfeasible-route omission, 30 s full dumps, triggered updates
batched for 50 ms). Baseline, in the same invocation, on the same graph with the same failures:
`NaiveDistanceVector` (cellmesh.sim.routing), textbook Bellman-Ford with the same message
format, link costs, timers, hold time and 64-hop limit, and nothing else: no seqnos, no
feasibility condition, no split horizon.

Scenario, all in virtual time (`cellmesh.sim`, seeded; every node starts at t=0 with its links
up; links 1-21 ms one way, by distance):

* cold start: the time until every node has a route to every other, and the control traffic
  sent per node until then;
* steady state: every node's first periodic dump falls in [22.5 s, 30 s]; the traffic of that
  window, one full round, over the mean dump period (26.25 s) is the control traffic per node
  per second of an undisturbed mesh;
* link failure: the link that the most shortest paths of a sample of destinations cross (not a
  bridge) fails; its ends notice 0.5 s later. Repair time: until every sampled route that
  crossed it reaches its destination again;
* node failure: the node the most sampled shortest paths cross (its removal leaves the rest
  connected) dies; its neighbours notice 0.5 s later. Purge time: until no live node has a
  route to it; repair time: until every sampled route that crossed it works again.

Loops: after every route change of a sampled destination (and of the node that dies), the
harness follows the next hops from the node that changed; a loop is counted each time one
forms. Times are virtual and exact for the seed; wall time is what the simulation cost here.
A full run takes about 5 minutes on 2 cores; `--quick` runs 200 nodes and 20 sampled
destinations in under 10 s.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from _common import Metric, Result, Target, exit_on_sigterm, parse_args, print_header, report
from cellmesh.routing import RoutingSettings
from cellmesh.sim import SimNetwork
from cellmesh.sim.routing import (
    CoreFactory,
    Link,
    RoutingDriver,
    RoutingMesh,
    babel_factory,
    core_link_cost,
    naive_factory,
    random_geometric_edges,
)

BENCH = "bench_routing"
SEED = 7
DEGREE = 6.0  # target; the radius then grows until the graph is connected (about 8 at n=1000)
DETECT = 0.5
S = RoutingSettings()
COST = core_link_cost(S)
STEADY_FROM = S.update_interval * (1 - S.update_jitter) - 0.1  # just before the first dumps
STEADY_TO = S.update_interval + 0.1  # just after the last first dump
MEAN_PERIOD = S.update_interval * (1 - S.update_jitter / 2)


@dataclass(frozen=True, slots=True)
class Plan:
    """The graph and the failures, the same for both protocols."""

    n: int
    edges: list[tuple[int, int, float]]
    sample: list[int]
    link: tuple[int, int]
    node: int

    @property
    def degree(self) -> float:
        return 2 * len(self.edges) / self.n


@dataclass(frozen=True, slots=True)
class Figures:
    """What one protocol measured."""

    name: str
    cold_start: float | None
    cold_bytes: float
    cold_msgs: float
    cold_loops: int
    steady_bps: float
    steady_mps: float
    link_repair: float | None
    link_loops: int
    node_purge: float | None
    node_repair: float | None
    node_loops: int
    wall: float


def link_of(dist: float) -> Link:
    return Link(latency=0.001 + 0.02 * dist)


def plan(n: int, samples: int) -> Plan:
    """Build the graph; pick the busiest non-bridge link and the busiest non-cut node from the
    shortest-path trees of a sample of destinations (graph facts, not either protocol's)."""
    rng = random.Random(SEED)
    edges, _ = random_geometric_edges(n, DEGREE, rng)
    adj: list[dict[int, int]] = [{} for _ in range(n)]
    for a, b, dist in edges:
        adj[a][b] = adj[b][a] = COST(link_of(dist))
    sample = rng.sample(range(n), samples)
    link_use: Counter[tuple[int, int]] = Counter()
    node_use: Counter[int] = Counter()
    for dst in sample:
        dist_to = dijkstra(adj, dst)
        for src in range(n):
            u = src
            while u != dst:
                hops = adj[u]
                v = min(hops, key=lambda w: (dist_to[w] + hops[w], w))
                link_use[min(u, v), max(u, v)] += 1
                if v != dst:
                    node_use[v] += 1
                u = v
    link = next(e for e, _ in link_use.most_common() if connected(adj, skip_edge=e))
    node = next(
        v
        for v, _ in node_use.most_common()
        if v not in sample and v not in link and connected(adj, skip_node=v)
    )
    return Plan(n, edges, sample, link, node)


def dijkstra(adj: list[dict[int, int]], dst: int) -> list[float]:
    dist = [math.inf] * len(adj)
    dist[dst] = 0
    heap: list[tuple[float, int]] = [(0, dst)]
    while heap:
        d, u = heapq.heappop(heap)
        if d > dist[u]:
            continue
        for v, c in adj[u].items():
            if d + c < dist[v]:
                dist[v] = d + c
                heapq.heappush(heap, (d + c, v))
    return dist


def connected(
    adj: list[dict[int, int]],
    skip_edge: tuple[int, int] | None = None,
    skip_node: int | None = None,
) -> bool:
    start = 0 if skip_node != 0 else 1
    seen = {start}
    todo = [start]
    while todo:
        u = todo.pop()
        for v in adj[u]:
            if v == skip_node or v in seen or (skip_edge is not None and {u, v} == set(skip_edge)):
                continue
            seen.add(v)
            todo.append(v)
    return len(seen) == len(adj) - (1 if skip_node is not None else 0)


def crossing(
    mesh: RoutingMesh[RoutingDriver], p: Plan, hop: Callable[[list[int]], bool]
) -> list[tuple[int, int]]:
    """Sampled (source, destination) pairs whose current path satisfies `hop`."""
    return [
        (src, dst)
        for dst in p.sample
        for src in range(p.n)
        if src != dst and hop(mesh.path(src, dst)[1])
    ]


def wait_for(
    mesh: RoutingMesh[RoutingDriver], done: Callable[[], bool], limit: float
) -> float | None:
    """Run until `done()` holds (polled every 10 ms of virtual time); the time it took."""
    net = mesh.net
    start = net.now
    hit: list[float] = []

    def poll() -> None:
        if done():
            hit.append(net.now)
        elif net.now - start < limit:
            net.call_later(0.01, poll)

    poll()
    net.run_until(lambda: bool(hit), limit + 0.02)
    return hit[0] - start if hit else None


def run(name: str, factory: CoreFactory[RoutingDriver], p: Plan) -> Figures:
    t0 = time.perf_counter()
    mesh: RoutingMesh[RoutingDriver] = RoutingMesh(SimNetwork(SEED), factory)
    mesh.add_many(p.n)
    for a, b, dist in p.edges:
        mesh.connect(a, b, link_of(dist))
    mesh.watch = {*p.sample, p.node}
    net = mesh.net
    was = gc.isenabled()
    gc.disable()  # millions of long-lived objects: a cyclic collector pass finds nothing
    try:
        cold = net.run_until(mesh.all_routed, 60.0)
        cold_start = net.now if cold else None
        cold_msgs, cold_bytes = mesh.traffic()
        cold_loops = len(mesh.loops)

        net.run_until(STEADY_FROM)
        m0, b0 = mesh.traffic()
        net.run_until(STEADY_TO)
        m1, b1 = mesh.traffic()

        a, b = p.link
        affected = crossing(mesh, p, lambda path: a in path and b in path)
        loops0 = len(mesh.loops)
        mesh.disconnect(a, b, detect_after=DETECT)
        link_repair = wait_for(
            mesh, lambda: all(mesh.path(s, d)[0] == "ok" for s, d in affected), 20.0
        )
        net.run_for(5.0)
        link_loops = len(mesh.loops) - loops0

        dead = p.node
        dead_cell = mesh.cells[dead]
        through = crossing(mesh, p, lambda path: dead in path[1:-1])
        loops0 = len(mesh.loops)
        mesh.kill(dead, detect_after=DETECT)
        live = [i for i in range(p.n) if i != dead]
        purge_start = net.now
        node_purge = wait_for(
            mesh, lambda: all(mesh.core(i).next_hop(dead_cell) is None for i in live), 30.0
        )
        elapsed = net.now - purge_start
        repaired_at = wait_for(
            mesh, lambda: all(mesh.path(s, d)[0] == "ok" for s, d in through), 30.0
        )
        node_repair = None if repaired_at is None else elapsed + repaired_at
        net.run_for(5.0)
        node_loops = len(mesh.loops) - loops0
    finally:
        mesh.close()
        if was:
            gc.enable()
    return Figures(
        name=name,
        cold_start=cold_start,
        cold_bytes=cold_bytes / p.n,
        cold_msgs=cold_msgs / p.n,
        cold_loops=cold_loops,
        steady_bps=(b1 - b0) / p.n / MEAN_PERIOD,
        steady_mps=(m1 - m0) / p.n / MEAN_PERIOD,
        link_repair=link_repair,
        link_loops=link_loops,
        node_purge=node_purge,
        node_repair=node_repair,
        node_loops=node_loops,
        wall=time.perf_counter() - t0,
    )


def _t(x: float | None, limit: float) -> float:
    return limit if x is None else x


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH)
    n, samples = (200, 20) if args.quick else (1000, 50)
    print_header(BENCH, f"{n} nodes, random geometric graph, seed {SEED}")
    t_start = time.monotonic()
    p = plan(n, samples)
    ours = run("ours", babel_factory(S), p)
    naive = run("naive", naive_factory(S), p)
    never = "did not happen within the time limit (the limit is shown)"
    notes = [
        f"graph: {n} nodes, {len(p.edges)} links (mean degree {p.degree:.1f}); failed link "
        f"{p.link[0]}-{p.link[1]}, failed node {p.node}; failures noticed after {DETECT:g} s",
        f"loops formed (sampled destinations), ours / naive: cold start {ours.cold_loops} / "
        f"{naive.cold_loops}, link failure {ours.link_loops} / {naive.link_loops}, node "
        f"failure {ours.node_loops} / {naive.node_loops}",
        f"wall time of each simulation: ours {ours.wall:.1f} s, naive {naive.wall:.1f} s",
    ]
    for f in (ours, naive):
        for what, value in (
            ("cold start", f.cold_start),
            ("link repair", f.link_repair),
            ("node purge", f.node_purge),
            ("node repair", f.node_repair),
        ):
            if value is None:
                notes.append(f"{f.name}: {what} {never}")
    report(
        Result(
            bench=BENCH,
            case=f"{n}-node random geometric graph: convergence, failures, control traffic",
            ours="RoutingCore: seqnos + feasibility condition, seqno requests, split horizon",
            baseline="naive Bellman-Ford distance vector, same messages, costs and timers",
            metrics=[
                Metric(
                    "cold start: routes everywhere",
                    _t(ours.cold_start, 60.0),
                    _t(naive.cold_start, 60.0),
                    "s",
                    "lower",
                ),
                Metric(
                    "cold start: bytes sent per node",
                    ours.cold_bytes,
                    naive.cold_bytes,
                    "B",
                    "lower",
                ),
                Metric(
                    "steady state: bytes/s per node",
                    ours.steady_bps,
                    naive.steady_bps,
                    "B/s",
                    "lower",
                ),
                Metric(
                    "steady state: msgs/s per node",
                    ours.steady_mps,
                    naive.steady_mps,
                    "/s",
                    "lower",
                ),
                Metric(
                    "link failure: sampled routes repaired",
                    _t(ours.link_repair, 20.0),
                    _t(naive.link_repair, 20.0),
                    "s",
                    "lower",
                ),
                Metric(
                    "node failure: routes to it purged",
                    _t(ours.node_purge, 30.0),
                    _t(naive.node_purge, 30.0),
                    "s",
                    "lower",
                ),
                Metric(
                    "node failure: routes through it repaired",
                    _t(ours.node_repair, 60.0),
                    _t(naive.node_repair, 60.0),
                    "s",
                    "lower",
                ),
            ],
            targets=[
                Target(
                    "no routing loop at any step (ours)",
                    ours.cold_loops + ours.link_loops + ours.node_loops == 0,
                ),
                Target(
                    "the baseline does loop (the check is not vacuous)",
                    naive.cold_loops + naive.link_loops + naive.node_loops > 0,
                ),
                Target(
                    "routes through a failed link repaired within 2 s (ours)",
                    ours.link_repair is not None and ours.link_repair < 2.0,
                ),
            ],
            notes=notes,
            extra={
                "nodes": n,
                "degree": p.degree,
                "ours": asdict(ours),
                "naive": asdict(naive),
            },
        ),
        args.json,
        args.quick,
    )
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
