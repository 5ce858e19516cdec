"""Hostile and broken input: every bad message is a counted drop, never a crash, and the
core's invariants hold whatever a neighbour sends (hypothesis drives random sessions)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmesh.routing import (
    INFINITY,
    RouteRecord,
    RoutingCore,
    RoutingSettings,
    SeqnoRequest,
    SeqnoRequestRecord,
    Update,
    decode_message,
    encode_message,
)
from cellmesh.routing.metric import seqno_newer

S = RoutingSettings()
RTT = 0.02
COST = 30


def cell(n: int) -> bytes:
    return bytes([n]) * 16


A, B, C, D = cell(1), cell(2), cell(3), cell(4)


def update(*routes: tuple[bytes, int, int, int], interval_ds: int = 300) -> bytes:
    return encode_message(Update(interval_ds, tuple(RouteRecord(*r) for r in routes)))


def fresh(settings: RoutingSettings = S) -> RoutingCore:
    a = RoutingCore(A, settings, 0.0, random.Random(1), seqno=5)
    a.neighbour_up(B, 0.0, RTT)
    return a


def check_invariants(c: RoutingCore) -> None:
    """White-box consistency of the tables (what the fast paths must never break)."""
    s = c.settings
    assert len(c._dests) <= s.max_routes
    assert len(c._neighbours) <= s.max_neighbours
    assert len(c._pending) <= s.max_pending_requests
    assert c.self_cell not in c._dests
    for dst, nh in c._next_hop.items():
        d = c._dests[dst]
        assert d.selected is not None
        assert d.selected.neighbour == nh
        assert nh in c._neighbours
        assert d.selected.metric < INFINITY
        assert c._feasible(d, d.selected)
    for dst, d in c._dests.items():
        assert len(d.routes) <= s.max_alternates
        assert (d.selected is None) == (dst in c._lost)
        if d.selected is not None:
            assert d.routes[d.selected.neighbour] is d.selected
        for ncell, r in d.routes.items():
            assert r.neighbour == ncell
            assert c._neighbours[ncell].routes[dst] is r
    for nb in c._neighbours.values():
        for dst, r in nb.routes.items():
            assert c._dests[dst].routes[nb.cell] is r


# ---------------------------------------------------------------------------- named drops


def test_messages_from_non_neighbours_are_dropped() -> None:
    a = fresh()
    a.receive(C, update((C, 1, 0, 0)), 0.1)
    assert a.drops["not_neighbour"] == 1
    assert a.next_hop(C) is None


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ((A, 9, 40, 1), "route_to_self"),  # a route to us
        ((B, 9, 40, 0), "bad_origin"),  # B's own route must be metric 0
        ((B, 9, 0, 3), "bad_origin"),  # ... and hop 0
        ((C, 9, 0, 1), "zero_metric"),  # only the origin is at distance 0
        ((C, 9, 40, 0), "zero_metric"),
        ((C, 9, 40, 64), "hop_limit"),  # our hop count would exceed max_hops
        ((C, 9, INFINITY - 10, 1), "metric_overflow"),  # 65525 + 30 overflows
    ],
)
def test_nonsense_records_are_counted_and_ignored(
    record: tuple[bytes, int, int, int], reason: str
) -> None:
    a = fresh()
    a.receive(B, update((B, 1, 0, 0), record), 0.1)
    assert a.drops[reason] == 1
    assert a.next_hop(B) == B  # the good record of the same message still counts
    assert a.next_hop(C) is None
    check_invariants(a)


def test_an_overflowing_update_withdraws_the_route_it_replaces() -> None:
    a = fresh()
    a.receive(B, update((C, 9, 100, 1)), 0.1)
    assert a.next_hop(C) == B
    a.receive(B, update((C, 9, INFINITY - 1, 1)), 0.2)
    assert a.next_hop(C) is None
    assert a.drops["metric_overflow"] == 1


def test_a_retraction_of_us_is_not_counted_as_hostile() -> None:
    a = fresh()
    a.receive(B, update((A, 9, INFINITY, 0)), 0.1)  # a neighbour that lost the route to us
    assert not a.drops


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x01", "truncated"),
        (b"\x01\x01\x00\x01\x00\x64" + bytes(10), "truncated"),
        (update((C, 1, 1, 1)) + b"\x00", "oversize"),
        (b"\x07\x01\x00\x01\x00\x64" + cell(3) + bytes(6), "version"),
        (b"\x01\x05\x00\x01\x00\x64" + cell(3) + bytes(6), "malformed"),
        (b"\xff" * 40, "version"),
    ],
)
def test_undecodable_messages_are_counted_by_reason(data: bytes, reason: str) -> None:
    a = fresh()
    a.receive(B, data, 0.1)
    assert a.drops == {reason: 1}


def test_a_request_flood_cannot_race_our_seqno_around() -> None:
    a = fresh()
    flood = encode_message(
        SeqnoRequest(tuple(SeqnoRequestRecord(A, (5 + 1000 * i) & 0xFFFF, 9) for i in range(1, 30)))
    )
    for k in range(10):
        a.receive(B, flood, 0.1 * k)
        a.handle_timer(0.1 * k)
    # One bump per bump interval (0.5 s: at 0 and at 0.5), however many requests arrive.
    assert a.statistics().seqno_bumps == 2
    assert seqno_newer(a.seqno, 5)


def test_unknown_destinations_in_retractions_are_ignored() -> None:
    a = fresh()
    a.receive(B, update((C, 1, INFINITY, 0)), 0.1)
    assert C not in a.destinations()
    assert not a.drops


# ---------------------------------------------------------------------------- fuzz


@given(st.lists(st.binary(max_size=200), max_size=20))
@settings(max_examples=300)
def test_arbitrary_bytes_never_raise(blobs: list[bytes]) -> None:
    a = fresh()
    for i, blob in enumerate(blobs):
        a.receive(B, blob, 0.01 * i)
    check_invariants(a)


cells = st.sampled_from([A, B, C, D, *(cell(0x40 + i) for i in range(12))])
records = st.tuples(
    cells,
    st.sampled_from([0, 1, 2, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]),
    st.sampled_from([0, 1, 20, 100, 5000, INFINITY - 31, INFINITY - 1, INFINITY]),
    st.sampled_from([0, 1, 2, 63, 64, 255]),
)
neighbours = st.sampled_from([B, C, D, cell(9)])
ops = st.one_of(
    st.tuples(st.just("update"), neighbours, st.lists(records, min_size=1, max_size=8)),
    st.tuples(
        st.just("request"),
        neighbours,
        st.lists(st.tuples(cells, st.integers(0, 0xFFFF), st.integers(1, 255)), min_size=1),
    ),
    st.tuples(st.just("up"), neighbours, st.floats(0.0, 0.5)),
    st.tuples(st.just("down"), neighbours, st.just(0.0)),
    st.tuples(st.just("metric"), neighbours, st.floats(0.0, 1.0)),
    st.tuples(st.just("time"), st.just(B), st.floats(0.0, 40.0)),
)


@given(st.lists(ops, max_size=40))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_random_sessions_keep_the_tables_consistent(steps: list[tuple[object, ...]]) -> None:
    settings_ = RoutingSettings(
        update_interval=5.0,
        source_gc_time=30.0,
        max_routes=6,
        max_alternates=2,
        max_pending_requests=3,
        max_message_size=200,
    )
    a = RoutingCore(A, settings_, 0.0, random.Random(3), seqno=0xFFFE)
    now = 0.0
    for step in steps:
        kind, who = step[0], step[1]
        assert isinstance(who, bytes)
        if kind == "update":
            recs = step[2]
            assert isinstance(recs, list)
            a.receive(who, update(*recs), now)
        elif kind == "request":
            reqs = step[2]
            assert isinstance(reqs, list)
            a.receive(
                who, encode_message(SeqnoRequest(tuple(SeqnoRequestRecord(*q) for q in reqs))), now
            )
        elif kind == "up":
            assert isinstance(step[2], float)
            a.neighbour_up(who, now, step[2])
        elif kind == "down":
            a.neighbour_down(who, now)
        elif kind == "metric":
            assert isinstance(step[2], float)
            a.neighbour_metric(who, 0.02, step[2], now)
        else:
            assert isinstance(step[2], float)
            now += step[2]
            timer = a.get_timer()
            while timer is not None and timer <= now:
                a.handle_timer(timer)
                a.updates_to_send(timer)
                timer = a.get_timer()
        for to, msg in a.updates_to_send(now):
            assert len(msg) <= settings_.max_message_size
            assert to is None or to in a._neighbours
            decode_message(msg)  # everything we send decodes
        while a.next_event() is not None:
            pass
        check_invariants(a)
