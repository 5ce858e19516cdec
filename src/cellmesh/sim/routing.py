"""Routing cores in the simulator: an adapter, a mesh harness over any graph, and a baseline.

`RoutingCore` speaks in neighbour CellIDs (a destination CellID, or None for every neighbour);
`SimNetwork` speaks in addresses. `RoutingSimCore` is the thin driver between the two, the same
job the asyncio node does with sessions: a message for None is sent to every neighbour whose
link the driver believes is up, one unicast copy each (as over per-neighbour sessions); a
received datagram is fed to the core with the sender's CellID.

`RoutingMesh` builds such nodes over an explicit graph. Every edge is a pair of directed
`LinkModel`s (latency, loss, jitter) set with `SimNetwork.set_link`; nodes that share no edge
never address each other. Link failures are modelled as the node would see them: `disconnect`
blocks the pair at once (datagrams in flight still arrive, later ones are dropped) and tells both
cores `neighbour_down` after `detect_after` seconds (the session failure detector's delay);
`connect` reports `neighbour_up` with the link's RTT (twice the latency) and round-trip loss.

Checks. Every `RouteChanged` event is counted (`routes_total` is the number of (node,
destination) pairs with a route, kept in O(1) per event) and, for the destinations being
watched (`watch`), the next-hop chain from the node that changed is followed at that instant.
A forwarding loop can only appear when some node changes its next hop, and a new loop must pass
through that node, so checking its chain after every change checks the whole network at every
step. `check` walks every (node, destination) pair with memoisation (O(nodes) per destination).

`NaiveDistanceVector` is the textbook baseline: Bellman-Ford over the neighbours' latest
advertisements, periodic and triggered updates, routes aging out, a hop limit, and nothing else
(no sequence numbers, no feasibility condition, no split horizon). It uses the same message
format and link cost, so figures compare protocols, not encodings. FOR COMPARISON ONLY: it
forms routing loops and counts to infinity, which is what it is here to show.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from cellmesh.errors import DecodeError
from cellmesh.routing.core import Outgoing, RoutingCore
from cellmesh.routing.events import RouteChanged
from cellmesh.routing.messages import (
    HEADER_LEN,
    ROUTE_RECORD_LEN,
    pack_route_record,
    pull_update_records,
    push_update,
)
from cellmesh.routing.metric import INFINITY, add_metric, link_cost
from cellmesh.routing.settings import MIN_INTERVAL, RoutingSettings
from cellmesh.sim.links import LinkModel
from cellmesh.sim.network import SimNetwork, SimNode
from cellmesh.sim.protocol import Addr

__all__ = [
    "Link",
    "LoopSighting",
    "NaiveDistanceVector",
    "PairCheck",
    "RoutingDriver",
    "RoutingMesh",
    "RoutingSimCore",
    "babel_factory",
    "core_link_cost",
    "line_edges",
    "naive_factory",
    "random_geometric_edges",
    "ring_edges",
    "sim_cell",
]


class RoutingDriver(Protocol):
    """What the harness needs from a routing core (`RoutingCore` and the baseline)."""

    def neighbour_up(
        self, cell: bytes, now: float, rtt: float | None = None, loss: float = 0.0
    ) -> bool:
        """A neighbour came up."""
        ...

    def neighbour_down(self, cell: bytes, now: float) -> bool:
        """A neighbour went away."""
        ...

    def neighbour_metric(self, cell: bytes, rtt: float | None, loss: float, now: float) -> bool:
        """A neighbour's link quality changed."""
        ...

    def receive(self, from_neighbour: bytes, data: bytes, now: float) -> None:
        """A message from a neighbour."""

    def updates_to_send(self, now: float) -> list[Outgoing]:
        """Messages due now."""
        ...

    def get_timer(self) -> float | None:
        """The next deadline."""
        ...

    def handle_timer(self, now: float) -> None:
        """Fire the deadline."""

    def next_hop(self, dst: bytes) -> bytes | None:
        """The selected next hop towards `dst`."""
        ...

    def next_event(self) -> RouteChanged | None:
        """The next event."""
        ...


R = TypeVar("R", bound=RoutingDriver)
CoreFactory = Callable[[bytes, float, random.Random], R]
"""Builds a core: (its CellID, now, its own seeded random source) -> core."""


def sim_cell(seed: int, label: str) -> bytes:
    """A 16-byte CellID for a simulated node (a hash of the seed and label; no key behind it:
    the routing core needs names, not identities)."""
    return hashlib.blake2b(
        f"{seed}|{label}".encode(), digest_size=16, person=b"cm-sim-cell"
    ).digest()


def babel_factory(settings: RoutingSettings) -> CoreFactory[RoutingCore]:
    """A factory of `RoutingCore`s with `settings`."""

    def make(cell: bytes, now: float, rng: random.Random) -> RoutingCore:
        return RoutingCore(cell, settings, now, rng)

    return make


def naive_factory(settings: RoutingSettings) -> CoreFactory[NaiveDistanceVector]:
    """A factory of the `NaiveDistanceVector` baseline with the same timers and link costs."""

    def make(cell: bytes, now: float, rng: random.Random) -> NaiveDistanceVector:
        return NaiveDistanceVector(cell, settings, now, rng)

    return make


# ---------------------------------------------------------------------- graphs


def line_edges(n: int) -> list[tuple[int, int]]:
    """0 - 1 - ... - (n-1)."""
    return [(i, i + 1) for i in range(n - 1)]


def ring_edges(n: int) -> list[tuple[int, int]]:
    """A line closed into a ring."""
    return [*line_edges(n), (n - 1, 0)] if n > 2 else line_edges(n)


def _connected(n: int, edges: Iterable[tuple[int, int]]) -> bool:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen = {0}
    todo = [0]
    while todo:
        for j in adj[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == n


def random_geometric_edges(
    n: int, degree: float, rng: random.Random
) -> tuple[list[tuple[int, int, float]], float]:
    """A connected random geometric graph: `n` points uniform in the unit square, an edge
    between every two closer than a radius chosen for a mean `degree` (grown by 5% steps until
    the graph is connected). Returns ((i, j, distance / radius) for each edge, radius)."""
    pts = [(rng.random(), rng.random()) for _ in range(n)]
    radius = math.sqrt(degree / (math.pi * max(1, n - 1))) * 1.1  # the border thins degrees
    while True:
        cell_of: dict[tuple[int, int], list[int]] = {}
        for i, (x, y) in enumerate(pts):
            cell_of.setdefault((int(x / radius), int(y / radius)), []).append(i)
        edges: list[tuple[int, int, float]] = []
        r2 = radius * radius
        for (cx, cy), members in cell_of.items():
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    others = cell_of.get((cx + dx, cy + dy))
                    if not others:
                        continue
                    for i in members:
                        xi, yi = pts[i]
                        for j in others:
                            if j <= i:
                                continue
                            d2 = (xi - pts[j][0]) ** 2 + (yi - pts[j][1]) ** 2
                            if d2 <= r2:
                                edges.append((i, j, math.sqrt(d2) / radius))
        edges.sort()
        if _connected(n, ((a, b) for a, b, _ in edges)):
            return edges, radius
        radius *= 1.05


# ---------------------------------------------------------------------- the adapter


class RoutingSimCore(Generic[R]):
    """Drives one routing core with addresses: the `SansIOCore` shape `SimNetwork` needs."""

    def __init__(self, core: R, cell: bytes, net: SimNetwork, cell_at: dict[Addr, bytes]) -> None:
        self.core = core
        self.cell = cell
        self.net = net
        self.cell_at = cell_at
        """Address -> CellID, shared by every node of a mesh (what sessions know)."""
        self.neighbours: dict[bytes, Addr] = {}
        """Neighbours this node's driver believes are up, with their addresses."""
        self.unroutable = 0
        """Unicast messages for a CellID that is not (or no longer) a neighbour."""

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Feed a routing message with the sender's CellID."""
        src = self.cell_at.get(addr)
        if src is not None:
            self.core.receive(src, data, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """The core's messages, a copy per neighbour for None."""
        out: list[tuple[bytes, Addr]] = []
        for dst, data in self.core.updates_to_send(self.net.now):
            if dst is None:
                out.extend((data, addr) for addr in self.neighbours.values())
                continue
            addr = self.neighbours.get(dst)
            if addr is None:
                self.unroutable += 1
            else:
                out.append((data, addr))
        return out

    def get_timer(self) -> float | None:
        """The core's timer."""
        return self.core.get_timer()

    def handle_timer(self, now: float) -> None:
        """Fire the core's timer."""
        self.core.handle_timer(now)

    def next_event(self) -> RouteChanged | None:
        """The core's next event."""
        return self.core.next_event()

    def release(self) -> None:
        """Drop the core (see `RoutingMesh.close`); the node must not run again."""
        del self.core


# ---------------------------------------------------------------------- the mesh


@dataclass(frozen=True, slots=True)
class Link:
    """One undirected edge's behaviour (both directions alike)."""

    latency: float = 0.01
    """One-way delay, seconds."""
    loss: float = 0.0
    """Probability that a datagram is lost, each direction."""
    jitter: float = 0.0

    @property
    def rtt(self) -> float:
        """Round-trip time, as the node's RTT estimator would measure it."""
        return 2.0 * self.latency

    @property
    def round_trip_loss(self) -> float:
        """Fraction of round trips that fail (a probe or its answer lost)."""
        return 1.0 - (1.0 - self.loss) ** 2

    def model(self) -> LinkModel:
        """The `LinkModel` of each direction."""
        return LinkModel(latency=self.latency, loss=self.loss, jitter=self.jitter)


@dataclass(frozen=True, slots=True)
class LoopSighting:
    """A routing loop seen at `time`: following next hops towards `destination` from `node`
    revisits `cycle[-1]` (node indices, in order)."""

    time: float
    node: int
    destination: int
    cycle: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PairCheck:
    """The state of every (node, destination) pair checked by `RoutingMesh.check`."""

    pairs: int
    ok: int
    """The chain of next hops reaches the destination over links that are up."""
    no_route: int
    """Some node on the chain has no route (a black hole, not a loop)."""
    stale: int
    """The chain reaches the destination but crosses a link that is down (not yet detected)."""
    looping: int
    """The chain revisits a node: a forwarding loop."""
    wrong_metric: int = 0
    """Routes whose metric differs from the shortest path's (when metrics were checked)."""


SimRoutingNode = SimNode[RoutingSimCore[R]]

_OK, _NONE, _STALE, _LOOP = 1, 2, 3, 4


class RoutingMesh(Generic[R]):
    """Routing cores over an explicit graph in one `SimNetwork` (module docstring)."""

    def __init__(
        self,
        net: SimNetwork,
        factory: CoreFactory[R],
        *,
        detect_after: float = 0.0,
        on_change: Callable[[int, RouteChanged], None] | None = None,
    ) -> None:
        self.net = net
        self.factory = factory
        self.detect_after = detect_after
        """Default delay between a link failing and its ends calling `neighbour_down`."""
        self.on_change = on_change
        self.nodes: list[SimNode[RoutingSimCore[R]]] = []
        self.cells: list[bytes] = []
        self.index: dict[bytes, int] = {}
        self.cell_at: dict[Addr, bytes] = {}
        self.links: dict[tuple[int, int], Link] = {}
        """Edges that are up now, (smaller index, larger index) -> behaviour."""
        self.adj: list[dict[int, Link]] = []
        self.watch: set[int] | None = set()
        """Destinations (node indices) whose chains are checked at every change; None = all."""
        self.loops: list[LoopSighting] = []
        self.routes_total = 0
        """(node, destination) pairs that have a route now."""
        self.route_changes = 0
        self.last_change = 0.0
        self._expected_routes: int | None = None

    # ------------------------------------------------------------------ building

    def add(self, label: str | None = None) -> int:
        """A new node (no links yet); returns its index."""
        i = len(self.nodes)
        label = label if label is not None else f"r{i}"
        net = self.net
        cell = sim_cell(net.seed, label)
        core = self.factory(cell, net.now, random.Random(net.derive_seed(f"routing/{label}")))
        adapter = RoutingSimCore(core, cell, net, self.cell_at)
        node = net.add_node(adapter, name=label, on_event=self._on_event, record_events=False)
        self.nodes.append(node)
        self.cells.append(cell)
        self.index[cell] = i
        self.cell_at[node.addr] = cell
        self.adj.append({})
        self._expected_routes = None
        return i

    def add_many(self, n: int, prefix: str = "r") -> list[int]:
        """`n` new nodes labelled prefix0, prefix1, ..."""
        return [self.add(f"{prefix}{len(self.nodes)}") for _ in range(n)]

    def core(self, i: int) -> R:
        """Node `i`'s routing core."""
        return self.nodes[i].core.core

    def connect(self, a: int, b: int, link: Link | None = None, *, notify: bool = True) -> None:
        """Bring up the edge a - b; with `notify` both cores get `neighbour_up` now."""
        link = link if link is not None else Link()
        na, nb = self.nodes[a], self.nodes[b]
        self.net.unblock(na, nb)
        self.net.set_link(na, nb, link.model())
        self.links[_key(a, b)] = link
        self.adj[a][b] = link
        self.adj[b][a] = link
        self._expected_routes = None
        if notify:
            self._tell_up(a, b, link)
            self._tell_up(b, a, link)

    def _tell_up(self, a: int, b: int, link: Link) -> None:
        node = self.nodes[a]
        cell_b = self.cells[b]
        node.core.neighbours[cell_b] = self.nodes[b].addr
        node.act(lambda c, now: c.core.neighbour_up(cell_b, now, link.rtt, link.round_trip_loss))

    def _tell_down(self, a: int, b: int) -> None:
        node = self.nodes[a]
        cell_b = self.cells[b]
        if node.core.neighbours.pop(cell_b, None) is not None:
            node.act(lambda c, now: c.core.neighbour_down(cell_b, now))

    def disconnect(self, a: int, b: int, detect_after: float | None = None) -> None:
        """Cut the edge a - b now; both ends notice after `detect_after` seconds."""
        na, nb = self.nodes[a], self.nodes[b]
        self.net.block(na, nb)
        self.links.pop(_key(a, b), None)
        self.adj[a].pop(b, None)
        self.adj[b].pop(a, None)
        self._expected_routes = None
        delay = self.detect_after if detect_after is None else detect_after

        def notice() -> None:
            if _key(a, b) in self.links:
                return  # reconnected meanwhile
            self._tell_down(a, b)
            self._tell_down(b, a)

        if delay <= 0:
            notice()
        else:
            self.net.call_later(delay, notice)

    def set_quality(self, a: int, b: int, link: Link) -> None:
        """Change the edge's behaviour; both ends get `neighbour_metric` now."""
        na, nb = self.nodes[a], self.nodes[b]
        self.net.set_link(na, nb, link.model())
        self.links[_key(a, b)] = link
        self.adj[a][b] = link
        self.adj[b][a] = link
        for x, y in ((a, b), (b, a)):
            self._tell_metric(x, y, link)

    def _tell_metric(self, a: int, b: int, link: Link) -> None:
        cell_b = self.cells[b]
        self.nodes[a].act(
            lambda c, now: c.core.neighbour_metric(cell_b, link.rtt, link.round_trip_loss, now)
        )

    def build(self, edges: Iterable[tuple[int, int]], link: Link | None = None) -> None:
        """Connect every edge with the same link behaviour."""
        for a, b in edges:
            self.connect(a, b, link)

    # ------------------------------------------------------------------ running checks

    def _on_event(self, node: SimNode[RoutingSimCore[R]], ev: object) -> None:
        if not isinstance(ev, RouteChanged):
            return
        self.route_changes += 1
        self.last_change = self.net.now
        if ev.old_next_hop is None:
            self.routes_total += 1
        if ev.new_next_hop is None:
            self.routes_total -= 1
        i = self.index[node.core.cell]
        dst = self.index.get(ev.destination)
        if dst is not None and ev.new_next_hop is not None:
            watch = self.watch
            if watch is None or dst in watch:
                cycle = self._cycle_from(i, ev.destination)
                if cycle is not None:
                    self.loops.append(LoopSighting(self.net.now, i, dst, cycle))
        if self.on_change is not None:
            self.on_change(i, ev)

    def _cycle_from(self, i: int, dst_cell: bytes) -> tuple[int, ...] | None:
        """Follow next hops from `i`: the path up to the first revisited node, or None."""
        path = [i]
        seen = {i}
        index = self.index
        cur = i
        while True:
            nh = self.nodes[cur].core.core.next_hop(dst_cell)
            if nh is None:
                return None
            j = index.get(nh)
            if j is None:
                return None
            if j in seen:
                path.append(j)
                return tuple(path)
            if nh == dst_cell:
                return None
            seen.add(j)
            path.append(j)
            cur = j

    def path(self, src: int, dst: int) -> tuple[str, list[int]]:
        """Follow next hops from `src` to `dst`: ("ok" | "no_route" | "stale" | "loop", path)."""
        dst_cell = self.cells[dst]
        path = [src]
        seen = {src}
        cur = src
        stale = False
        while cur != dst:
            nh = self.nodes[cur].core.core.next_hop(dst_cell)
            j = self.index.get(nh) if nh is not None else None
            if j is None:
                return "no_route", path
            if j not in self.adj[cur]:
                stale = True
            path.append(j)
            if j in seen:
                return "loop", path
            seen.add(j)
            cur = j
        return ("stale" if stale else "ok"), path

    def check(
        self,
        destinations: Iterable[int] | None = None,
        metric_of: Callable[[Link], int] | None = None,
    ) -> PairCheck:
        """Walk every (node, destination) pair, memoised: O(nodes) per destination. Nodes that
        are down are skipped. With `metric_of` (a link's cost), also count selected metrics that
        differ from the shortest path's (for a `RoutingCore`, whose `route()` gives metrics)."""
        dsts = range(len(self.nodes)) if destinations is None else list(destinations)
        pairs = ok = none = stale = looping = wrong = 0
        up = [n.up for n in self.nodes]
        for dst in dsts:
            if not up[dst]:
                continue
            state = self._states(dst)
            best = self.shortest(dst, metric_of) if metric_of is not None else None
            for i, st in enumerate(state):
                if i == dst or not up[i]:
                    continue
                pairs += 1
                if st == _OK:
                    ok += 1
                elif st == _NONE:
                    none += 1
                elif st == _STALE:
                    stale += 1
                else:
                    looping += 1
                if best is not None and st == _OK:
                    core = self.core(i)
                    if isinstance(core, RoutingCore):
                        info = core.route(self.cells[dst])
                        if info is None or info.metric != best[i]:
                            wrong += 1
        return PairCheck(pairs, ok, none, stale, looping, wrong)

    def _states(self, dst: int) -> list[int]:
        n = len(self.nodes)
        dst_cell = self.cells[dst]
        state = [0] * n
        state[dst] = _OK
        index = self.index
        adj = self.adj
        for start in range(n):
            if state[start]:
                continue
            path: list[int] = []
            on_path: dict[int, int] = {}
            cur = start
            result = _OK
            crossed: list[bool] = []
            while True:
                if state[cur]:
                    result = state[cur]
                    break
                if cur in on_path:
                    result = _LOOP
                    break
                on_path[cur] = len(path)
                path.append(cur)
                nh = self.nodes[cur].core.core.next_hop(dst_cell)
                j = index.get(nh) if nh is not None else None
                if j is None:
                    result = _NONE
                    break
                crossed.append(j not in adj[cur])
                cur = j
            # Propagate: a node is stale if its own hop or any later one crosses a dead link.
            later_stale = result == _STALE
            for k in range(len(path) - 1, -1, -1):
                r = result
                if r in (_OK, _STALE):
                    if k < len(crossed) and crossed[k]:
                        later_stale = True
                    r = _STALE if later_stale else _OK
                state[path[k]] = r
        return state

    def shortest(self, dst: int, metric_of: Callable[[Link], int]) -> list[int]:
        """Every node's shortest-path metric to `dst` over the links that are up (Dijkstra,
        additive, saturating at INFINITY like the protocol)."""
        n = len(self.nodes)
        dist = [INFINITY] * n
        dist[dst] = 0
        heap = [(0, dst)]
        while heap:
            d, u = heapq.heappop(heap)
            if d > dist[u]:
                continue
            for v, link in self.adj[u].items():
                nd = add_metric(d, metric_of(link))
                if nd < dist[v]:
                    dist[v] = nd
                    heapq.heappush(heap, (nd, v))
        return dist

    def components(self) -> list[list[int]]:
        """Connected components of the live graph (nodes that are up, links that are up)."""
        seen: set[int] = set()
        out: list[list[int]] = []
        for s in range(len(self.nodes)):
            if s in seen or not self.nodes[s].up:
                continue
            comp = [s]
            seen.add(s)
            todo = deque([s])
            while todo:
                u = todo.popleft()
                for v in self.adj[u]:
                    if v not in seen and self.nodes[v].up:
                        seen.add(v)
                        comp.append(v)
                        todo.append(v)
            out.append(comp)
        return out

    def is_bridge(self, a: int, b: int) -> bool:
        """True when removing the edge a - b would split the live graph (the cores are not
        told anything)."""
        seen = {a}
        todo = [a]
        while todo:
            u = todo.pop()
            for v in self.adj[u]:
                if (u, v) in ((a, b), (b, a)) or v in seen or not self.nodes[v].up:
                    continue
                if v == b:
                    return False
                seen.add(v)
                todo.append(v)
        return True

    @property
    def expected_routes(self) -> int:
        """Pairs that should have a route: sum of size * (size - 1) over components."""
        if self._expected_routes is None:
            self._expected_routes = sum(len(c) * (len(c) - 1) for c in self.components())
        return self._expected_routes

    def all_routed(self) -> bool:
        """Every node has a route to every node of its component (O(1) once computed); it
        says nothing of whether the routes are good: see `check`."""
        return self.routes_total == self.expected_routes

    def traffic(self) -> tuple[int, int]:
        """(datagrams, bytes) sent by every node so far (each unicast copy counts)."""
        msgs = byts = 0
        for node in self.nodes:
            msgs += node.sent
            byts += node.bytes_sent
        return msgs, byts

    def close(self) -> None:
        """Release every core. The simulator's nodes and network point at each other, so a
        finished mesh is only freed by a full cyclic-GC pass over every route object of every
        core (seconds at 1,000 nodes); the cores hold no cycles themselves, so releasing them
        here frees them at once by reference counting. The mesh cannot run afterwards."""
        for node in self.nodes:
            node.core.release()
        self.nodes = []
        self.loops = list(self.loops)

    def kill(self, i: int, detect_after: float | None = None) -> None:
        """Node `i` dies: every edge of it is cut (its neighbours notice after the delay)."""
        for j in list(self.adj[i]):
            self.disconnect(i, j, detect_after)
        self.net.set_node_down(self.nodes[i])
        self._expected_routes = None


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def core_link_cost(settings: RoutingSettings) -> Callable[[Link], int]:
    """The cost `RoutingCore` computes for a `Link` the harness reports (for `check`)."""

    def cost(link: Link) -> int:
        return link_cost(
            link.rtt,
            link.round_trip_loss,
            hop_cost=settings.hop_cost,
            default_rtt=settings.default_rtt,
            max_link_cost=settings.max_link_cost,
            max_loss=settings.max_loss,
        )

    return cost


# ---------------------------------------------------------------------- the baseline


@dataclass(slots=True)
class _NaiveEntry:
    adv: int
    hops: int
    expires: float


@dataclass(slots=True)
class _NaiveDest:
    routes: dict[bytes, _NaiveEntry] = field(default_factory=dict)
    via: bytes | None = None
    metric: int = INFINITY
    hops: int = 0
    advertised: int = INFINITY
    lost_at: float = 0.0


class NaiveDistanceVector:
    """Textbook distance vector (Bellman-Ford), the baseline of the routing benchmark.

    Each node takes, per destination, the neighbour whose last advertisement plus the link cost
    is smallest; it advertises its whole table to every neighbour each update interval and a
    triggered update whenever a route's next hop or metric changes; routes age out after the
    hold time; paths longer than `max_hops` count as unreachable. No sequence numbers, no
    feasibility condition, no split horizon: after a failure a node happily takes a neighbour's
    stale route through itself, and the two count to infinity. Same message format (seqno 0).
    """

    def __init__(
        self, self_cell: bytes, settings: RoutingSettings, now: float, rng: random.Random
    ) -> None:
        self._self = self_cell
        self._s = settings
        self._rng = rng
        self._cost: dict[bytes, int] = {}
        self._dests: dict[bytes, _NaiveDest] = {}
        self._next_hop: dict[bytes, bytes] = {}
        self._trig: dict[bytes, None] = {}
        self._new: list[bytes] = []
        self._dump_all = False
        self._flush_at: float | None = None
        self._next_dump = now + settings.update_interval * (
            1 - settings.update_jitter * rng.random()
        )
        self._next_sweep = now + settings.update_interval
        self._events: deque[RouteChanged] = deque()
        self._interval_ds = max(1, round(settings.update_interval * 10))
        self._per_msg = min(255, (settings.max_message_size - HEADER_LEN) // ROUTE_RECORD_LEN)

    def _link_cost(self, rtt: float | None, loss: float) -> int:
        s = self._s
        return link_cost(
            rtt,
            loss,
            hop_cost=s.hop_cost,
            default_rtt=s.default_rtt,
            max_link_cost=s.max_link_cost,
            max_loss=s.max_loss,
        )

    def neighbour_up(
        self, cell: bytes, now: float, rtt: float | None = None, loss: float = 0.0
    ) -> bool:
        """A neighbour came up: it gets our table at the next flush."""
        self._cost[cell] = self._link_cost(rtt, loss)
        self._new.append(cell)
        self._schedule(now)
        return True

    def neighbour_down(self, cell: bytes, now: float) -> bool:
        """Drop every route through `cell`."""
        if self._cost.pop(cell, None) is None:
            return False
        for dst, d in self._dests.items():
            if d.routes.pop(cell, None) is not None:
                self._select(dst, d, now)
        return True

    def neighbour_metric(self, cell: bytes, rtt: float | None, loss: float, now: float) -> bool:
        """Re-price every route through `cell`."""
        if cell not in self._cost:
            return False
        self._cost[cell] = self._link_cost(rtt, loss)
        for dst, d in self._dests.items():
            if cell in d.routes:
                self._select(dst, d, now)
        return True

    def receive(self, from_neighbour: bytes, data: bytes, now: float) -> None:
        """Take a neighbour's advertisements (anything undecodable is ignored)."""
        if from_neighbour not in self._cost:
            return
        try:
            _, interval_ds, records = pull_update_records(data)
        except DecodeError:
            return
        expires = now + self._s.hold_factor * max(MIN_INTERVAL, interval_ds / 10.0)
        for dst, _, metric, hops, _ in records:
            if dst == self._self:
                continue
            d = self._dests.get(dst)
            if d is None:
                if metric >= INFINITY:
                    continue
                d = self._dests[dst] = _NaiveDest()
            old = d.routes.get(from_neighbour)
            if metric >= INFINITY:
                if old is None:
                    continue
                del d.routes[from_neighbour]
            elif old is not None and old.adv == metric and old.hops == hops:
                old.expires = expires
                continue
            else:
                d.routes[from_neighbour] = _NaiveEntry(metric, hops, expires)
            self._select(dst, d, now)

    def _select(self, dst: bytes, d: _NaiveDest, now: float) -> None:
        best: bytes | None = None
        best_m = INFINITY
        best_h = 0
        for cell, e in d.routes.items():
            if e.hops + 1 > self._s.max_hops:
                continue
            m = add_metric(e.adv, self._cost.get(cell, INFINITY))
            if m < best_m or (m == best_m and best is not None and cell < best):
                best, best_m, best_h = cell, m, e.hops + 1
        if best_m >= INFINITY:
            best = None
        old = d.via
        if best == old and best_m == d.metric:
            return
        d.via, d.metric, d.hops = best, best_m, best_h
        if best is None:
            self._next_hop.pop(dst, None)
            d.lost_at = now
        else:
            self._next_hop[dst] = best
        if best != old:
            self._events.append(RouteChanged(dst, old, best, best_m))
        self._trig[dst] = None
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        if self._flush_at is None:
            self._flush_at = now + self._s.triggered_delay

    def _record(self, dst: bytes, d: _NaiveDest) -> bytes:
        d.advertised = d.metric
        return pack_route_record(dst, 0, d.metric, d.hops if d.via is not None else 0)

    def updates_to_send(self, now: float) -> list[Outgoing]:
        """Everything due: a full table for new neighbours and periodic dumps, else the changes."""
        if self._flush_at is None or now < self._flush_at:
            return []
        self._flush_at = None
        out: list[Outgoing] = []
        own = pack_route_record(self._self, 0, 0, 0)
        hold = self._s.hold_time
        full = [own] + [
            self._record(dst, d)
            for dst, d in self._dests.items()
            if d.via is not None or now - d.lost_at < hold
        ]
        if self._dump_all:
            self._chunk(None, full, out)
        else:
            if self._trig:
                recs = [self._record(dst, self._dests[dst]) for dst in self._trig]
                self._chunk(None, recs, out)
            for cell in self._new:
                if cell in self._cost:
                    self._chunk(cell, full, out)
        self._trig.clear()
        self._new.clear()
        self._dump_all = False
        return out

    def _chunk(self, to: bytes | None, recs: list[bytes], out: list[Outgoing]) -> None:
        step = self._per_msg
        for i in range(0, len(recs), step):
            out.append((to, push_update(self._interval_ds, recs[i : i + step])))

    def get_timer(self) -> float | None:
        """The next deadline."""
        t = min(self._next_dump, self._next_sweep)
        return self._flush_at if self._flush_at is not None and self._flush_at < t else t

    def handle_timer(self, now: float) -> None:
        """Periodic dump and route expiry."""
        s = self._s
        if now >= self._next_dump:
            self._dump_all = True
            self._flush_at = now
            self._next_dump = now + s.update_interval * (1 - s.update_jitter * self._rng.random())
        if now >= self._next_sweep:
            self._next_sweep = now + s.update_interval
            for dst, d in list(self._dests.items()):
                stale = [c for c, e in d.routes.items() if e.expires <= now]
                for c in stale:
                    del d.routes[c]
                if stale:
                    self._select(dst, d, now)
                if not d.routes and d.via is None and now - d.lost_at > s.hold_time:
                    del self._dests[dst]

    def next_hop(self, dst: bytes) -> bytes | None:
        """The selected next hop."""
        return self._next_hop.get(dst)

    def next_event(self) -> RouteChanged | None:
        """The next event."""
        return self._events.popleft() if self._events else None
