"""The routing core: feasibility, retraction and recovery, aging, bounds, split horizon.

Single cores are fed crafted messages; small meshes run on `Pump`, a zero-latency event loop
that delivers every message at once and fires timers in order (the simulator tests use real
links).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from cellmesh.errors import LocalProtocolError
from cellmesh.routing import (
    INFINITY,
    RouteChanged,
    RouteRecord,
    RoutingCore,
    RoutingSettings,
    SeqnoRequest,
    SeqnoRequestRecord,
    Update,
    decode_message,
    encode_message,
)
from cellmesh.routing.messages import MessageType, message_type
from cellmesh.sim.routing import NaiveDistanceVector

S = RoutingSettings()
RTT = 0.02
COST = 10 + 20  # hop_cost + 1000 * RTT


def cell(n: int) -> bytes:
    return bytes([n]) * 16


A, B, C, D, E, F = (cell(i) for i in range(1, 7))
NAMES = {cell(i): "ABCDEF"[i - 1] for i in range(1, 7)}


def update(
    *routes: tuple[bytes, int, int, int], interval_ds: int = 300, dump: bool = False
) -> bytes:
    return encode_message(Update(interval_ds, tuple(RouteRecord(*r) for r in routes), dump))


def request(*reqs: tuple[bytes, int, int]) -> bytes:
    return encode_message(SeqnoRequest(tuple(SeqnoRequestRecord(*q) for q in reqs)))


def core(me: bytes = A, settings: RoutingSettings = S, seqno: int | None = 100) -> RoutingCore:
    return RoutingCore(me, settings, 0.0, random.Random(me), seqno=seqno)


def flush(c: RoutingCore, now: float) -> list[tuple[bytes | None, Update | SeqnoRequest]]:
    """Everything `c` sends by `now` (after its batching delay), decoded."""
    out = c.updates_to_send(now + S.triggered_delay)
    return [(to, decode_message(msg)) for to, msg in out]


def routes_in(
    msgs: Iterable[tuple[bytes | None, Update | SeqnoRequest]], to: bytes | None
) -> dict[bytes, RouteRecord]:
    found: dict[bytes, RouteRecord] = {}
    for dst, m in msgs:
        if dst == to and isinstance(m, Update):
            for r in m.routes:
                found[r.destination] = r
    return found


def requests_in(
    msgs: Iterable[tuple[bytes | None, Update | SeqnoRequest]], to: bytes
) -> list[SeqnoRequestRecord]:
    return [q for dst, m in msgs if dst == to and isinstance(m, SeqnoRequest) for q in m.requests]


def events(c: RoutingCore) -> list[RouteChanged]:
    out = []
    while (ev := c.next_event()) is not None:
        out.append(ev)
    return out


class Pump:
    """Zero-latency wiring of cores: messages are delivered as soon as they are sent, timers
    fire in order. `sent` logs (from, to, message type) for assertions."""

    def __init__(self, settings: RoutingSettings = S) -> None:
        self.s = settings
        self.cores: dict[bytes, RoutingCore] = {}
        self.adj: dict[bytes, set[bytes]] = {}
        self.now = 0.0
        self.sent: list[tuple[bytes, bytes, MessageType]] = []
        self.loops = 0

    def add(self, *cells: bytes) -> None:
        for c in cells:
            self.cores[c] = RoutingCore(c, self.s, self.now, random.Random(c), seqno=1000)
            self.adj[c] = set()

    def link(self, a: bytes, b: bytes, rtt: float = RTT) -> None:
        self.adj[a].add(b)
        self.adj[b].add(a)
        self.cores[a].neighbour_up(b, self.now, rtt)
        self.cores[b].neighbour_up(a, self.now, rtt)

    def cut(self, a: bytes, b: bytes) -> None:
        self.adj[a].discard(b)
        self.adj[b].discard(a)
        self.cores[a].neighbour_down(b, self.now)
        self.cores[b].neighbour_down(a, self.now)

    def _deliver(self) -> None:
        busy = True
        while busy:
            busy = False
            for c, core in self.cores.items():
                for to, msg in core.updates_to_send(self.now):
                    targets = self.adj[c] if to is None else ({to} & self.adj[c])
                    for t in sorted(targets):
                        self.sent.append((c, t, message_type(msg)))
                        self.cores[t].receive(c, msg, self.now)
                        busy = True
            self.check_loops()

    def run(self, duration: float) -> None:
        end = self.now + duration
        self._deliver()
        while True:
            t = min(c.get_timer() or end for c in self.cores.values())
            if t > end:
                break
            self.now = max(self.now, t)
            for c in self.cores.values():
                timer = c.get_timer()
                if timer is not None and timer <= self.now:
                    c.handle_timer(self.now)
            self._deliver()
        self.now = end

    def path(self, src: bytes, dst: bytes) -> list[bytes] | None:
        path = [src]
        while path[-1] != dst:
            nh = self.cores[path[-1]].next_hop(dst)
            if nh is None:
                return None
            if nh in path:
                raise AssertionError(f"routing loop: {[NAMES.get(p, p) for p in [*path, nh]]}")
            path.append(nh)
        return path

    def check_loops(self) -> None:
        for src in self.cores:
            for dst in self.cores:
                if src != dst:
                    self.path(src, dst)  # raises on a loop


# ---------------------------------------------------------------------------- basics


def test_a_neighbour_route_comes_from_its_own_update() -> None:
    a = core()
    assert a.neighbour_up(B, 0.0, RTT)
    assert a.next_hop(B) is None  # nothing until B advertises itself
    a.receive(B, update((B, 7, 0, 0)), 0.1)
    assert a.next_hop(B) == B
    info = a.route(B)
    assert info is not None
    assert (info.metric, info.seqno, info.hops, info.next_hop) == (COST, 7, 1, B)
    assert events(a) == [RouteChanged(B, None, B, COST)]


def test_new_neighbour_gets_a_full_dump_flagged_dump_request() -> None:
    a = core()
    a.neighbour_up(B, 0.0, RTT)
    assert a.updates_to_send(0.0) == []  # batched
    assert a.get_timer() == pytest.approx(S.triggered_delay)
    out = flush(a, 0.0)
    assert len(out) == 1
    to, msg = out[0]
    assert to == B
    assert isinstance(msg, Update)
    assert msg.dump_request
    assert msg.routes == (RouteRecord(A, 100, 0, 0),)
    assert msg.interval_ds == 300


def test_a_dump_request_is_answered_once_per_interval() -> None:
    a = core()
    a.neighbour_up(B, 0.0, RTT)
    flush(a, 0.0)
    a.receive(B, update((B, 1, 0, 0), dump=True), 1.0)
    out = flush(a, 1.0)
    assert routes_in(out, B).keys() == {A}  # our table minus routes through B (split horizon)
    a.receive(B, update((B, 1, 0, 0), dump=True), 1.5)
    assert a.drops["dump_rate_limited"] == 1


def test_line_metrics_add_up_and_hops_count() -> None:
    p = Pump()
    p.add(A, B, C, D)
    p.link(A, B)
    p.link(B, C, rtt=0.05)
    p.link(C, D, rtt=0.0)
    p.run(1.0)
    a = p.cores[A]
    assert p.path(A, D) == [A, B, C, D]
    info = a.route(D)
    assert info is not None
    assert info.metric == (10 + 20) + (10 + 50) + (10 + 0)
    assert info.hops == 3
    assert [r.destination for r in a.routes()] == sorted([B, C, D])


# ---------------------------------------------------------------------------- feasibility


def crafted_loop_scenario(c: RoutingCore | NaiveDistanceVector) -> None:
    """A has neighbours B and C; D is two hops beyond B. A selects D via B and advertises it.
    C (whose only way to D is through A) has advertised D back to A with A's metric plus its
    own link: what a neighbour without split horizon, or with a stale table, says. Then the
    link A - B fails."""
    c.neighbour_up(B, 0.0, RTT)
    c.neighbour_up(C, 0.0, RTT)
    c.receive(B, update((B, 1, 0, 0), (D, 50, 100, 2)), 0.1)
    assert c.next_hop(D) == B
    c.updates_to_send(1.0)  # A advertises D at 100 + 30: FD(D) = (50, 130)
    c.receive(C, update((C, 1, 0, 0), (D, 50, 130 + COST, 4)), 1.1)
    assert c.next_hop(D) == B  # worse than B's route anyway
    c.neighbour_down(B, 2.0)


def test_naive_distance_vector_loops_in_the_crafted_scenario() -> None:
    naive = NaiveDistanceVector(A, S, 0.0, random.Random(1))
    crafted_loop_scenario(naive)
    # Bellman-Ford takes C's route, which goes through A itself: A -> C -> A.
    assert naive.next_hop(D) == C


def test_feasibility_refuses_the_route_that_would_loop_and_asks_for_a_new_seqno() -> None:
    a = core()
    crafted_loop_scenario(a)
    assert a.feasibility_distance(D) == (50, 130)
    assert a.next_hop(D) is None  # C's (50, 160) is not better than FD (50, 130)
    evs = events(a)
    assert evs[-1] == RouteChanged(D, B, None, INFINITY)
    out = flush(a, 2.0)
    # The route is retracted to everyone left (C) ...
    assert routes_in(out, C)[D].metric == INFINITY
    # ... and A asks C, the neighbour with an unfeasible route, for seqno FD + 1.
    assert requests_in(out, C) == [SeqnoRequestRecord(D, 51, S.request_hops)]
    # C comes back with the newer seqno: feasible whatever the metric.
    a.receive(C, update((D, 51, 400, 5)), 2.5)
    assert a.next_hop(D) == C
    assert a.statistics().pending_requests == 0


def test_same_seqno_with_a_smaller_metric_than_fd_is_feasible() -> None:
    a = core()
    crafted_loop_scenario(a)
    a.receive(C, update((D, 50, 129, 3)), 2.5)  # 129 < FD metric 130
    assert a.next_hop(D) == C


def test_older_seqno_is_never_feasible_but_a_direct_route_always_is() -> None:
    a = core()
    a.neighbour_up(B, 0.0, RTT)
    a.neighbour_up(C, 0.0, RTT)
    a.receive(B, update((B, 1, 0, 0), (C, 500, 40, 1)), 0.1)
    a.updates_to_send(1.0)
    a.neighbour_down(B, 1.5)
    a.receive(C, update((C, 400, 0, 0)), 2.0)  # C restarted with a lower seqno
    assert a.next_hop(C) == C  # next hop = destination: cannot loop, always feasible


def test_seqno_wraps_around_at_the_origin_and_at_its_neighbours() -> None:
    origin = core(B, seqno=0xFFFF)
    origin.neighbour_up(A, 0.0, RTT)
    flush(origin, 0.0)
    origin.receive(A, request((B, 0, 10)), 1.0)  # 0 is newer than 65535
    assert origin.seqno == 0
    out = flush(origin, 1.0)
    assert routes_in(out, A)[B] == RouteRecord(B, 0, 0, 0)
    # A neighbour two hops away holding FD seqno 65535 accepts seqno 0 as newer.
    a = core()
    a.neighbour_up(C, 0.0, RTT)
    a.receive(C, update((C, 1, 0, 0), (B, 0xFFFF, 50, 1)), 0.1)
    a.updates_to_send(0.5)
    assert a.feasibility_distance(B) == (0xFFFF, 50 + COST)
    a.receive(C, update((B, 0xFFFF, 5000, 1)), 1.0)  # worse, same seqno: unfeasible
    assert a.next_hop(B) is None
    a.receive(C, update((B, 0, 5000, 1)), 1.5)  # the wrapped seqno: newer, feasible
    assert a.next_hop(B) == C


def test_origin_bumps_at_most_once_per_bump_interval() -> None:
    b = core(B, seqno=10)
    b.neighbour_up(A, 0.0, RTT)
    flush(b, 0.0)
    b.receive(A, request((B, 11, 5)), 1.0)
    flush(b, 1.0)
    assert b.seqno == 11
    b.receive(A, request((B, 12, 5)), 1.1)  # too soon: served when the interval ends
    b.receive(A, request((B, 13, 5)), 1.2)
    assert b.seqno == 11
    assert b.get_timer() == pytest.approx(1.0 + S.seqno_bump_interval)
    b.handle_timer(1.5)
    assert b.seqno == 13
    out = flush(b, 1.5)
    assert routes_in(out, A)[B].seqno == 13
    st = b.statistics()
    assert (st.seqno_bumps, st.seqno_bumps_deferred) == (2, 2)


# ---------------------------------------------------------------------------- retraction, recovery


def ring5() -> Pump:
    p = Pump()
    p.add(A, B, C, D, E)
    for x, y in ((A, B), (B, C), (C, D), (D, E), (E, A)):
        p.link(x, y)
    p.run(2.0)
    return p


def test_ring_reroutes_the_long_way_through_a_seqno_request() -> None:
    p = ring5()
    assert p.path(C, A) == [C, B, A]
    assert p.path(D, A) == [D, E, A]
    bumps = p.cores[A].seqno
    p.cut(A, B)  # checked for loops after every delivery from here on
    p.run(3.0)
    # C held D's route (seqno s, metric 2 hops): equal to its FD, so unfeasible. It asked for
    # s + 1; D and E forwarded the request to A, which bumped its seqno.
    assert p.cores[C].statistics().requests_sent >= 1
    assert p.cores[D].statistics().requests_forwarded >= 1
    assert p.cores[A].seqno == (bumps + 1) & 0xFFFF
    assert p.path(B, A) == [B, C, D, E, A]
    assert p.path(C, A) == [C, D, E, A]
    info = p.cores[B].route(A)
    assert info is not None
    assert info.metric == 4 * COST
    assert info.hops == 4


def test_a_destination_that_dies_is_retracted_everywhere_and_forgotten() -> None:
    settings = RoutingSettings(update_interval=2.0, source_gc_time=20.0)
    p = Pump(settings)
    p.add(A, B, C, D)
    p.link(A, B)
    p.link(B, C)
    p.link(C, D)
    p.run(1.0)
    assert p.path(A, D) == [A, B, C, D]
    p.cut(C, D)
    p.run(0.5)
    for x in (A, B, C):
        assert p.cores[x].next_hop(D) is None
    assert D in p.cores[A].destinations()  # kept for its FD
    p.run(30.0)
    assert D not in p.cores[A].destinations()  # forgotten after source_gc_time


def test_routes_expire_unless_refreshed() -> None:
    settings = RoutingSettings(update_interval=2.0, source_gc_time=60.0)
    a = core(settings=settings)
    a.neighbour_up(B, 0.0, RTT)
    a.receive(B, update((B, 1, 0, 0), (C, 5, 40, 1), interval_ds=10), 0.0)  # hold: 3.5 s
    assert a.next_hop(C) == B
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        a.handle_timer(t)
        a.updates_to_send(t)
        a.receive(B, update((B, 1, 0, 0), interval_ds=10), t)  # B refreshes itself only
    a.handle_timer(6.0)
    assert a.next_hop(B) == B
    assert a.next_hop(C) is None
    assert events(a)[-1] == RouteChanged(C, B, None, INFINITY)


def test_route_info_reports_age_and_expiry() -> None:
    a = core()
    a.neighbour_up(B, 0.0, RTT)
    a.receive(B, update((B, 1, 0, 0), interval_ds=100), 10.0)
    info = a.route(B, now=12.0)
    assert info is not None
    assert info.age == pytest.approx(2.0)
    assert info.expires_in == pytest.approx(35.0 - 2.0)
    assert info.alternatives == 0


# ---------------------------------------------------------------------------- link quality


def test_a_worse_link_moves_routes_to_a_better_neighbour() -> None:
    a = core()
    a.neighbour_up(B, 0.0, RTT)
    a.neighbour_up(C, 0.0, 0.03)
    a.receive(B, update((B, 1, 0, 0), (D, 9, 100, 2)), 0.1)
    a.receive(C, update((C, 1, 0, 0), (D, 9, 100, 2)), 0.1)
    assert a.next_hop(D) == B  # 100 + 30 beats 100 + 40
    assert a.neighbour_metric(B, 0.021, 0.0, 1.0)  # noise: ignored
    assert a.next_hop(D) == B
    assert a.neighbour_metric(B, 0.2, 0.0, 2.0)  # B's link is now 210
    assert a.next_hop(D) == C
    assert not a.neighbour_metric(E, 0.1, 0.0, 2.0)  # not a neighbour
    assert a.neighbour_metric(C, 0.03, 0.95, 3.0)  # lossy beyond max_loss: unusable
    assert a.next_hop(D) == B
    assert a.next_hop(C) is None


def test_hysteresis_keeps_the_current_route_for_a_marginal_gain() -> None:
    a = core()
    a.neighbour_up(B, 0.0, RTT)
    a.neighbour_up(C, 0.0, RTT)
    a.receive(B, update((D, 9, 100, 2)), 0.1)
    a.receive(C, update((D, 9, 97, 2)), 0.2)  # 3 better: within hysteresis 4
    assert a.next_hop(D) == B
    a.receive(C, update((D, 9, 95, 2)), 0.3)  # 5 better
    assert a.next_hop(D) == C


# ---------------------------------------------------------------------------- split horizon


def test_split_horizon_leaves_routes_out_of_updates_to_their_next_hop() -> None:
    b = core(B)
    b.neighbour_up(A, 0.0, RTT)
    b.neighbour_up(C, 0.0, RTT)
    flush(b, 0.0)
    b.receive(A, update((A, 1, 0, 0)), 0.1)
    b.receive(C, update((C, 1, 0, 0), (D, 3, 30, 1)), 0.1)
    out = flush(b, 0.1)
    # Triggered: the route to D goes through C, so only A hears of it; nobody hears of itself.
    to_c = routes_in(out, C)
    to_a = routes_in(out, A)
    assert to_c.keys() == {A}
    assert to_a.keys() == {C, D}
    assert to_a[D].metric == 30 + COST
    # Periodic dump: routes through a neighbour are left out of its copy.
    b.handle_timer(S.update_interval + 1)
    out = [(to, decode_message(m)) for to, m in b.updates_to_send(S.update_interval + 1)]
    assert routes_in(out, C).keys() == {A, B}
    assert routes_in(out, A).keys() == {B, C, D}


def test_without_split_horizon_updates_go_to_everyone_at_once() -> None:
    b = core(B, settings=RoutingSettings(split_horizon=False))
    b.neighbour_up(A, 0.0, RTT)
    b.neighbour_up(C, 0.0, RTT)
    flush(b, 0.0)
    b.receive(C, update((C, 1, 0, 0), (D, 3, 30, 1)), 0.1)
    out = flush(b, 0.1)
    assert {to for to, _ in out} == {None}
    assert routes_in(out, None)[D].metric == 30 + COST


# ---------------------------------------------------------------------------- bounds


def test_table_is_bounded_and_evicts_unreachable_first_then_the_worst() -> None:
    a = core(settings=RoutingSettings(max_routes=4))
    a.neighbour_up(B, 0.0, RTT)
    many = [cell(0x40 + i) for i in range(8)]
    a.receive(B, update(*((d, 1, 100 + i, 1) for i, d in enumerate(many))), 0.1)
    assert len(list(a.destinations())) == 4
    assert a.drops["table_full"] == 4
    # Better newcomers evict the worst metric (here, the 103 route)...
    a.receive(B, update((cell(0x60), 1, 50, 1)), 2.0)
    assert a.next_hop(cell(0x60)) == B
    assert a.next_hop(many[3]) is None
    assert a.statistics().evictions == 1
    # ... and a retracted destination goes before any reachable one.
    a.receive(B, update((many[0], 1, INFINITY, 0)), 3.0)
    a.receive(B, update((cell(0x61), 1, 500, 1)), 3.0)
    assert a.next_hop(cell(0x61)) == B
    assert many[0] not in a.destinations()
    assert a.next_hop(many[1]) == B


def test_alternates_are_bounded_keeping_the_best() -> None:
    a = core(settings=RoutingSettings(max_alternates=2))
    for n in (B, C, E):
        a.neighbour_up(n, 0.0, RTT)
    a.receive(B, update((D, 1, 100, 2)), 0.1)
    a.receive(C, update((D, 1, 300, 2)), 0.1)
    a.receive(E, update((D, 1, 200, 2)), 0.1)  # replaces C's worse route
    info = a.route(D)
    assert info is not None
    assert info.alternatives == 1
    a.neighbour_down(B, 1.0)
    assert a.next_hop(D) == E  # C's route was dropped for E's; nothing advertised, no FD yet


def test_neighbours_are_bounded() -> None:
    a = core(settings=RoutingSettings(max_neighbours=2))
    assert a.neighbour_up(B, 0.0)
    assert a.neighbour_up(C, 0.0)
    assert not a.neighbour_up(D, 0.0)
    assert a.neighbour_up(B, 0.0, 0.01)  # already up: an update, not a new one
    assert a.drops["neighbour_limit"] == 1
    assert [n.cell for n in a.neighbours()] == [B, C]


def test_messages_never_exceed_the_size_limit() -> None:
    settings = RoutingSettings(max_message_size=400)
    a = core(settings=settings)
    a.neighbour_up(B, 0.0, RTT)
    a.neighbour_up(C, 0.0, RTT)
    dsts = [cell(0x40 + i) for i in range(150)]
    for i in range(0, 150, 50):
        a.receive(B, update(*((d, 1, 10, 1) for d in dsts[i : i + 50])), 0.1)
    out = a.updates_to_send(1.0)
    assert all(len(m) <= 400 for _, m in out)
    seen: set[bytes] = set()
    for to, m in out:
        if to == C:
            msg = decode_message(m)
            assert isinstance(msg, Update)
            seen.update(r.destination for r in msg.routes)
    assert seen == {A, *dsts}


def test_pending_requests_are_bounded() -> None:
    a = core(settings=RoutingSettings(max_pending_requests=2))
    a.neighbour_up(B, 0.0, RTT)
    a.neighbour_up(C, 0.0, RTT)
    dsts = [cell(0x40 + i) for i in range(4)]
    a.receive(B, update(*((d, 1, 10, 1) for d in dsts)), 0.1)
    a.receive(C, update(*((d, 1, 900, 1) for d in dsts)), 0.1)
    a.updates_to_send(1.0)
    a.neighbour_down(B, 2.0)  # four stuck destinations, room for two requests
    assert a.statistics().pending_requests == 2
    assert a.drops["requests_full"] == 2


def test_events_are_bounded() -> None:
    a = core(settings=RoutingSettings(max_events=2))
    a.neighbour_up(B, 0.0, RTT)
    a.receive(B, update(*((cell(0x40 + i), 1, 10, 1) for i in range(5))), 0.1)
    assert len(events(a)) == 2
    assert a.drops["events"] == 3


# ---------------------------------------------------------------------------- requests


def test_a_request_is_answered_from_a_route_with_a_new_enough_seqno() -> None:
    b = core(B)
    b.neighbour_up(A, 0.0, RTT)
    b.neighbour_up(C, 0.0, RTT)
    b.receive(C, update((D, 8, 40, 1)), 0.1)
    flush(b, 0.1)
    b.receive(A, request((D, 8, 10)), 1.0)
    out = flush(b, 1.0)
    assert routes_in(out, A)[D].seqno == 8
    assert b.statistics().requests_answered == 1


def test_a_request_is_forwarded_once_towards_the_origin_and_the_answer_goes_back() -> None:
    b = core(B)
    for n in (A, C, E):
        b.neighbour_up(n, 0.0, RTT)
    b.receive(C, update((D, 8, 40, 1)), 0.1)
    flush(b, 0.1)
    b.receive(A, request((D, 9, 10)), 1.0)
    b.receive(E, request((D, 9, 10)), 1.0)  # a duplicate: not forwarded again
    out = flush(b, 1.0)
    assert requests_in(out, C) == [SeqnoRequestRecord(D, 9, 9)]
    assert b.statistics().requests_forwarded == 1
    b.receive(C, update((D, 9, 40, 1)), 1.2)
    out = flush(b, 1.2)
    assert routes_in(out, A)[D].seqno == 9
    assert routes_in(out, E)[D].seqno == 9
    assert b.statistics().pending_requests == 0


def test_a_route_with_the_requested_seqno_is_taken_to_answer_a_request() -> None:
    """B selects D via C (metric 40 + 30) and forwards A's request for seqno 9 there. The new
    seqno arrives through E with a slightly worse metric: B switches to it (feasible, and the
    only way to answer) instead of leaving A stuck on the old seqno."""
    b = core(B)
    for n in (A, C, E):
        b.neighbour_up(n, 0.0, RTT)
    b.receive(C, update((D, 8, 40, 1)), 0.1)
    b.receive(E, update((D, 8, 45, 1)), 0.1)
    flush(b, 0.1)
    b.receive(A, request((D, 9, 10)), 1.0)
    assert requests_in(flush(b, 1.0), C) == [SeqnoRequestRecord(D, 9, 9)]
    b.receive(E, update((D, 9, 45, 1)), 1.2)
    assert b.next_hop(D) == E
    out = flush(b, 1.2)
    assert routes_in(out, A)[D] == RouteRecord(D, 9, 45 + COST, 2)
    assert b.statistics().pending_requests == 0
    # Already holding the requested seqno when the request arrives: switch and answer at once.
    b.receive(C, update((D, 10, 43, 1)), 2.0)
    assert b.next_hop(D) == E  # 73 against 75: within hysteresis
    b.receive(A, request((D, 10, 10)), 2.5)
    assert b.next_hop(D) == C
    assert routes_in(flush(b, 2.5), A)[D].seqno == 10


def test_requests_stop_at_hop_count_one_and_at_dead_ends() -> None:
    b = core(B)
    b.neighbour_up(A, 0.0, RTT)
    b.neighbour_up(C, 0.0, RTT)
    b.receive(C, update((D, 8, 40, 1)), 0.1)
    b.receive(A, request((D, 9, 1)), 1.0)
    assert b.drops["request_hop_limit"] == 1
    b.receive(C, request((D, 9, 5)), 1.0)  # its only route is through the requester
    assert b.drops["request_dead_end"] == 1
    b.receive(A, request((E, 9, 5)), 1.0)
    assert b.drops["request_unknown"] == 1


def test_unanswered_requests_are_resent_with_backoff_then_dropped() -> None:
    a = core()
    crafted_loop_scenario(a)
    sent = []
    t = 2.0
    while t < 20.0:
        a.handle_timer(t)
        sent += requests_in([(to, decode_message(m)) for to, m in a.updates_to_send(t)], C)
        t += 0.05
    assert len(sent) == S.request_retries
    assert a.statistics().requests_sent == S.request_retries
    assert a.statistics().pending_requests == 0


# ---------------------------------------------------------------------------- API misuse


def test_api_misuse_raises_local_protocol_error() -> None:
    a = core()
    with pytest.raises(LocalProtocolError):
        a.neighbour_up(A, 0.0)
    with pytest.raises(LocalProtocolError):
        a.neighbour_up(b"short", 0.0)
    with pytest.raises(LocalProtocolError):
        a.neighbour_up(bytes(16), 0.0)
    with pytest.raises(LocalProtocolError):
        a.neighbour_up(B, 0.0, rtt=-1.0)
    with pytest.raises(LocalProtocolError):
        a.neighbour_up(B, 0.0, loss=2.0)
    with pytest.raises(LocalProtocolError):
        RoutingCore(bytes(16), S, 0.0, random.Random(1))
    with pytest.raises(LocalProtocolError):
        RoutingCore(A, S, 0.0, random.Random(1), seqno=70000)
    assert not a.neighbour_down(B, 0.0)


def test_statistics_snapshot() -> None:
    p = Pump()
    p.add(A, B, C)
    p.link(A, B)
    p.link(B, C)
    p.run(S.update_interval * 1.1)
    st = p.cores[B].statistics()
    assert (st.neighbours, st.destinations, st.routes) == (2, 2, 2)
    assert st.full_dumps >= 1
    assert st.sent["UPDATE"] >= 2
    assert st.bytes_sent["UPDATE"] > 0
    assert st.received >= 2
    assert st.route_changes == 2
    assert st.drops == {}
    assert st.seqno == 1000
