"""A generator of realistic causal histories (several authors writing with partial knowledge of
each other), used by the log and fold tests, and the tests of `happened_before` against
vector clocks computed independently from the same history."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import Identity
from cellmesh.state.events import Event, create_event, happened_before
from cellmesh.state.log import InMemoryLogStore

CHANNEL = "app/doc"


def make_dag(
    rng: random.Random,
    authors: Sequence[Identity],
    n: int,
    payload: Callable[[random.Random, int], bytes] = lambda rng, i: b"",
    *,
    channel: str = CHANNEL,
    learn: float = 0.4,
) -> list[Event]:
    """`n` events in creation order. Before each write the author learns, with probability
    `learn` per other author, that author's latest event (as gossip would bring it)."""
    last: list[Event | None] = [None] * len(authors)
    known: list[dict[bytes, Event]] = [{} for _ in authors]
    events: list[Event] = []
    for i in range(n):
        k = rng.randrange(len(authors))
        for j, other in enumerate(last):
            if j != k and other is not None and rng.random() < learn:
                known[k][bytes(other.author)] = other
        ev = create_event(authors[k], channel, payload(rng, i), last[k], known[k].values(), i)
        last[k] = ev
        events.append(ev)
    return events


def vector_clocks(events: Sequence[Event]) -> list[dict[bytes, int]]:
    """Ground truth: for each event (creation order), the highest seq per author in its causal
    past, itself included. Built from the horizons and chains, independently of the library."""
    by_pos: dict[tuple[bytes, int], int] = {}
    clocks: list[dict[bytes, int]] = []
    for i, ev in enumerate(events):
        vc: dict[bytes, int] = {}
        sources = [(bytes(h.author), h.seq) for h in ev.horizon]
        if ev.seq > 1:
            sources.append((bytes(ev.author), ev.seq - 1))
        for pos in sources:
            for a, s in clocks[by_pos[pos]].items():
                vc[a] = max(vc.get(a, 0), s)
        vc[bytes(ev.author)] = ev.seq
        by_pos[(bytes(ev.author), ev.seq)] = i
        clocks.append(vc)
    return clocks


@pytest.fixture(scope="module")
def people() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


def test_dag_clocks_extend_causality(people: list[Identity]) -> None:
    events = make_dag(random.Random(1), people, 120)
    vcs = vector_clocks(events)
    for i, a in enumerate(events):
        for j, b in enumerate(events):
            if vcs[j].get(bytes(a.author), 0) >= a.seq and i != j:
                assert a.clock < b.clock


@pytest.mark.parametrize("learn", [0.1, 0.5, 0.9])
def test_happened_before_matches_vector_clocks(people: list[Identity], learn: float) -> None:
    rng = random.Random(int(learn * 10))
    events = make_dag(rng, people, 80, learn=learn)
    store = InMemoryLogStore()
    for ev in events:
        assert store.append(ev).position is not None
    lookup = store.lookup(CHANNEL)
    vcs = vector_clocks(events)
    for i, a in enumerate(events):
        for j, b in enumerate(events):
            truth = i != j and vcs[j].get(bytes(a.author), 0) >= a.seq
            assert happened_before(a, b, lookup) is truth, (i, j)


def test_happened_before_is_false_across_channels(people: list[Identity]) -> None:
    a = create_event(people[0], "x", b"", None, (), 0)
    b = create_event(people[1], "y", b"", None, [a], 0)
    assert not happened_before(a, b, lambda author, seq: None)


def test_happened_before_with_missing_history_only_loses_edges(people: list[Identity]) -> None:
    events = make_dag(random.Random(7), people, 60, learn=0.3)
    store = InMemoryLogStore()
    for ev in events:
        store.append(ev)
    full = store.lookup(CHANNEL)
    held = set(range(0, 60, 2))

    def partial(author: CellId, seq: int) -> Event | None:
        ev = full(author, seq)
        return ev if ev is not None and events.index(ev) in held else None

    for a in events[:30]:
        for b in events[30:]:
            if happened_before(a, b, partial):
                assert happened_before(a, b, full)
