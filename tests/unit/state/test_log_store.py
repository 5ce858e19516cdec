"""The LogStore rules, run against both engines (in-memory and SQLite)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_events_dag import make_dag

from cellmesh.errors import LocalProtocolError
from cellmesh.identity.keys import Identity
from cellmesh.node.store_sqlite import SqliteLogStore
from cellmesh.state.events import (
    Event,
    HorizonEntry,
    create_event,
    encode_event,
    event_id,
    event_signing_message,
)
from cellmesh.state.log import (
    AppendStatus,
    InMemoryLogStore,
    LogStoreBase,
    Retention,
)

CH = "app/chat"


class Clock:
    """An injected local clock (ms) the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine: str, tmp_path: Path, clock: Clock) -> Iterator[LogStoreBase]:
    s: LogStoreBase
    if engine == "memory":
        s = InMemoryLogStore(clock_ms=clock, max_pending=50)
    else:
        s = SqliteLogStore(
            tmp_path / "log.db", clock_ms=clock, max_pending=50, synchronous="NORMAL"
        )
    yield s
    s.close()


@pytest.fixture(scope="module")
def ids() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


def chain(who: Identity, n: int, channel: str = CH, start: Event | None = None) -> list[Event]:
    out: list[Event] = []
    prev = start
    for i in range(n):
        prev = create_event(who, channel, f"{who.cell_id.hex()[:4]}-{i}".encode(), prev, (), i)
        out.append(prev)
    return out


def resign(ev: Event, signer: Identity, **changes: object) -> Event:
    changed = dataclasses.replace(ev, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(changed, signature=signer.sign(event_signing_message(changed)))


# ---------------------------------------------------------------------------------- appending


def test_new_duplicate_and_positions(store: LogStoreBase, ids: list[Identity]) -> None:
    events = chain(ids[0], 3)
    results = [store.append(e) for e in events]
    assert [r.status for r in results] == [AppendStatus.NEW] * 3
    assert [r.position for r in results] == [1, 2, 3]
    assert all(r.accepted for r in results)
    again = store.append(encode_event(events[1]))
    assert again.status is AppendStatus.DUPLICATE
    assert again.position == 2
    got = store.get(event_id(events[2]))
    assert got is not None
    assert got.event == events[2]
    assert not got.pending
    assert got.encoded == encode_event(events[2])
    assert store.get(b"\x00" * 32) is None
    assert [s.event for s in store.iter_channel(CH)] == events
    assert [s.event for s in store.iter_channel(CH, after_position=2)] == events[2:]
    assert store.channels() == [CH]
    assert store.verify_chain(CH) == []


def test_refusals(store: LogStoreBase, ids: list[Identity]) -> None:
    a, b = ids[0], ids[1]
    e1, e2 = chain(a, 2)
    assert store.append(e1).status is AppendStatus.NEW
    forged = dataclasses.replace(e2, payload=b"forged")
    r = store.append(forged)
    assert (r.status, r.reason) == (AppendStatus.REFUSED, "bad_signature")
    r = store.append(b"\x01garbage")
    assert (r.status, r.reason, r.event_id) == (AppendStatus.REFUSED, "malformed", None)
    # prev names an event that is not the author's held seq 1.
    broken = resign(e2, a, prev=b"\x07" * 32)
    r = store.append(broken)
    assert (r.status, r.reason) == (AppendStatus.REFUSED, "broken_chain")
    # the clock must be exactly 1 + max(prev, horizon): neither inflated nor stale.
    r = store.append(resign(e2, a, clock=50))
    assert (r.status, r.reason) == (AppendStatus.REFUSED, "bad_clock")
    # an author key that does not match the claimed CellID.
    r = store.append(resign(e1, b, author=b.cell_id, author_key=a.public_key))
    assert (r.status, r.reason) == (AppendStatus.REFUSED, "author_mismatch")
    with pytest.raises(TypeError):
        store.append("not an event")  # type: ignore[arg-type]
    assert store.append(e2).status is AppendStatus.NEW
    assert store.stats(CH).events == 2


def test_horizon_clock_check(store: LogStoreBase, ids: list[Identity]) -> None:
    a, b = ids[0], ids[1]
    b_events = chain(b, 3)
    for e in b_events:
        store.append(e)
    e1 = create_event(a, CH, b"", None, [b_events[2]], 0)
    assert e1.clock == 4
    for wrong in (3, 5, 90):
        r = store.append(resign(e1, a, clock=wrong))
        assert (r.status, r.reason) == (AppendStatus.REFUSED, "bad_clock"), wrong
    assert store.append(e1).status is AppendStatus.NEW


def test_out_of_order_arrival_is_pending_then_cascades(
    store: LogStoreBase, ids: list[Identity]
) -> None:
    a, b = ids[0], ids[1]
    a_events = chain(a, 4)
    b1 = create_event(b, CH, b"saw a3", None, [a_events[2]], 0)
    r = store.append(b1)
    assert r.status is AppendStatus.PENDING
    assert r.position is None
    for e in reversed(a_events[1:]):
        assert store.append(e).status is AppendStatus.PENDING
    stored = store.get(event_id(b1))
    assert stored is not None
    assert stored.pending
    assert store.stats(CH).pending == 4
    assert list(store.iter_channel(CH)) == []
    r = store.append(a_events[0])
    assert r.status is AppendStatus.NEW
    assert set(r.delivered) == {event_id(e) for e in [*a_events, b1]}
    assert r.delivered[0] == event_id(a_events[0])
    order = [s.event for s in store.iter_channel(CH)]
    assert order.index(b1) > order.index(a_events[2])  # causal order respected
    assert [order.index(e) for e in a_events] == sorted(order.index(e) for e in a_events)
    assert store.stats(CH).pending == 0
    assert store.verify_chain(CH) == []


def test_pending_is_bounded(store: LogStoreBase, ids: list[Identity]) -> None:
    events = chain(ids[0], 53)
    for e in events[1:51]:
        assert store.append(e).status is AppendStatus.PENDING
    r = store.append(events[51])
    assert (r.status, r.reason) == (AppendStatus.REFUSED, "too_many_pending")
    assert store.append(events[0]).delivered[-1] == event_id(events[50])
    assert store.append(events[51]).status is AppendStatus.NEW


def test_pending_with_wrong_clock_is_dropped_on_delivery(
    store: LogStoreBase, ids: list[Identity]
) -> None:
    a, b = ids[0], ids[1]
    b1 = create_event(b, CH, b"", None, (), 0)
    liar = resign(create_event(a, CH, b"", None, [b1], 0), a, clock=1000)
    assert store.append(liar).status is AppendStatus.PENDING
    r = store.append(b1)
    assert r.delivered == (event_id(b1),)
    assert r.dropped == ((event_id(liar), "bad_clock"),)
    assert store.get(event_id(liar)) is None
    assert store.stats(CH).pending == 0


def test_forks_are_kept_reported_and_verified(store: LogStoreBase, ids: list[Identity]) -> None:
    a = ids[0]
    e1, e2 = chain(a, 2)
    twin = create_event(a, CH, b"the other story", e1, (), 99)
    store.append(e1)
    store.append(e2)
    r = store.append(twin)
    assert r.status is AppendStatus.FORK
    assert r.position is not None
    assert r.fork is not None
    assert (r.fork.first_id, r.fork.second_id, r.fork.seq) == (event_id(e2), event_id(twin), 2)
    assert store.forks(CH) == [r.fork]
    assert store.fork_evidence(r.fork) == (encode_event(e2), encode_event(twin))
    assert {s.event for s in store.range(CH, a.cell_id, 2)} == {e2, twin}
    assert store.append(twin).status is AppendStatus.DUPLICATE  # never re-reported
    assert store.stats(CH).forks == 1
    # A continuation of either branch is accepted.
    after_twin = create_event(a, CH, b"", twin, (), 0)
    assert store.append(after_twin).status is AppendStatus.NEW
    heads = store.heads(CH)
    assert [(h.seq, h.id) for h in heads] == [(3, event_id(after_twin))]
    assert store.verify_chain(CH) == []


def test_pending_fork_branch_waits_for_its_own_prev(
    store: LogStoreBase, ids: list[Identity]
) -> None:
    a = ids[0]
    e1, e2, e3 = chain(a, 3)
    twin2 = create_event(a, CH, b"twin", e1, (), 0)
    twin3 = create_event(a, CH, b"after twin", twin2, (), 0)
    store.append(e1)
    assert store.append(twin3).status is AppendStatus.PENDING
    store.append(e2)  # a seq-2 event, but not twin3's prev: twin3 keeps waiting
    assert store.get(event_id(twin3)).pending  # type: ignore[union-attr]
    r = store.append(twin2)
    assert r.status is AppendStatus.FORK
    assert r.delivered == (event_id(twin2), event_id(twin3))
    r = store.append(e3)
    assert r.status is AppendStatus.FORK  # e3 and twin3 share seq 3
    assert store.verify_chain(CH) == []
    assert len(store.forks(CH)) == 2


def test_heads_range_lookup(store: LogStoreBase, ids: list[Identity]) -> None:
    a, b = ids[0], ids[1]
    for e in chain(a, 5) + chain(b, 2):
        store.append(e)
    heads = {bytes(h.author): h for h in store.heads(CH)}
    assert heads[a.cell_id].seq == 5
    assert heads[b.cell_id].seq == 2
    assert [s.event.seq for s in store.range(CH, a.cell_id, 3)] == [3, 4, 5]
    assert list(store.range(CH, a.cell_id, 6)) == []
    assert list(store.range("other/chan", a.cell_id)) == []
    found = store.lookup(CH)(a.cell_id, 4)
    assert found is not None
    assert found.seq == 4
    assert store.lookup(CH)(a.cell_id, 9) is None
    # Heads work as horizon entries.
    c1 = create_event(ids[2], CH, b"", None, store.heads(CH), 0)
    assert {h.author for h in c1.horizon} == {a.cell_id, b.cell_id}
    assert store.append(c1).status is AppendStatus.NEW


def test_streaming_spans_pages(store: LogStoreBase, ids: list[Identity]) -> None:
    events = chain(ids[0], 600)
    assert all(r.status is AppendStatus.NEW for r in store.append_many(events))
    assert sum(1 for _ in store.iter_channel(CH)) == 600
    assert [s.event.seq for s in store.range(CH, ids[0].cell_id, 250)] == list(range(250, 601))
    assert store.verify_chain(CH) == []


def test_channels_are_separate(store: LogStoreBase, ids: list[Identity]) -> None:
    a = ids[0]
    store.append_many(chain(a, 2, "one") + chain(a, 3, "two"))
    assert store.channels() == ["one", "two"]
    assert store.stats("one").events == 2
    assert store.stats("two").events == 3
    assert store.stats("none").events == 0


# ---------------------------------------------------------------------------------- retention


def test_retention_by_size_keeps_heads_and_floors(
    store: LogStoreBase, ids: list[Identity], clock: Clock
) -> None:
    a, b = ids[0], ids[1]
    a_events, b_events = chain(a, 10), chain(b, 2)
    store.append_many(a_events + b_events)
    size = len(encode_event(a_events[0]))
    assert store.retention(CH).keeps_all
    assert store.apply_retention(CH, 0).events == 0
    store.set_retention(CH, Retention(max_bytes=4 * size))
    report = store.apply_retention(CH, clock.now)
    assert (report.events, report.bytes) == (8, 8 * size)  # oldest first: a1..a8
    assert store.stats(CH).bytes == 4 * size
    assert [s.event.seq for s in store.range(CH, a.cell_id)] == [9, 10]
    assert store.verify_chain(CH) == []
    store.set_retention(CH, Retention(max_bytes=0))
    assert store.apply_retention(CH, clock.now).events == 2  # a9 and b1; heads a10, b2 stay
    assert [s.event.seq for s in store.range(CH, a.cell_id)] == [10]
    assert [s.event.seq for s in store.range(CH, b.cell_id)] == [2]
    assert store.verify_chain(CH) == []
    # Chains continue above the floor; history below it is refused.
    assert store.append(create_event(a, CH, b"", a_events[-1], (), 0)).status is AppendStatus.NEW
    r = store.append(a_events[3])
    assert (r.status, r.reason) == (AppendStatus.REFUSED, "below_retention_floor")
    # Another author's horizon may name a dropped position.
    c1 = create_event(ids[2], CH, b"", None, [a_events[4]], 0)
    assert store.append(c1).status is AppendStatus.NEW


def test_retention_by_age(store: LogStoreBase, ids: list[Identity], clock: Clock) -> None:
    a = ids[0]
    events = chain(a, 6)
    for i, e in enumerate(events):
        clock.now = 1000 + i * 100
        store.append(e)
    store.set_retention(CH, Retention(max_age_ms=250))
    assert store.retention(CH) == Retention(max_age_ms=250)
    report = store.apply_retention(CH, 1550)
    assert report.events == 3  # delivered at 1000, 1100, 1200 (< 1300)
    assert [s.event.seq for s in store.range(CH, a.cell_id)] == [4, 5, 6]
    assert store.apply_retention(CH, 10**9).events == 2  # the head stays
    assert store.verify_chain(CH) == []


def test_retention_drops_pending_below_floor(
    store: LogStoreBase, ids: list[Identity], clock: Clock
) -> None:
    a = ids[0]
    events = chain(a, 5)
    fork3 = create_event(a, CH, b"fork", events[1], (), 0)
    stray = create_event(a, CH, b"", fork3, (), 0)  # seq 4, waits for fork3 which never comes
    store.append_many(events[:2])
    assert store.append(stray).status is AppendStatus.PENDING  # nothing at seq 3 yet
    store.append_many(events[2:])  # a seq 3, but not stray's prev: stray keeps waiting
    assert store.stats(CH).pending == 1
    store.set_retention(CH, Retention(max_bytes=0))
    report = store.apply_retention(CH, clock.now)
    assert (report.events, report.pending) == (4, 1)
    assert store.stats(CH).pending == 0


def test_retention_validation() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        Retention(max_bytes=-1)
    with pytest.raises(ValueError, match="max_age_ms"):
        Retention(max_age_ms=True)


# ---------------------------------------------------------------------------------- misc


def test_random_orders_converge_to_same_set(
    engine: str, tmp_path: Path, ids: list[Identity]
) -> None:
    events = make_dag(random.Random(3), ids, 60, channel=CH)
    rng = random.Random(4)
    seen: list[set[bytes]] = []
    for i in range(3):
        order = events[:] + rng.sample(events, 10)  # with duplicates
        rng.shuffle(order)
        s: LogStoreBase = (
            InMemoryLogStore()
            if engine == "memory"
            else SqliteLogStore(tmp_path / f"{i}.db", synchronous="NORMAL")
        )
        for e in order:
            assert s.append(e).accepted
        assert s.stats(CH).pending == 0
        held = [x.id for x in s.iter_channel(CH)]
        assert len(held) == 60
        seen.append(set(held))
        assert s.verify_chain(CH) == []
        s.close()
    assert seen[0] == seen[1] == seen[2]


def test_closed_store_refuses(store: LogStoreBase, ids: list[Identity]) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(LocalProtocolError):
        store.append(chain(ids[0], 1)[0])
    with pytest.raises(LocalProtocolError):
        store.heads(CH)


def test_horizon_entry_is_the_wire_form(ids: list[Identity]) -> None:
    b1 = create_event(ids[1], CH, b"", None, (), 0)
    ev = create_event(ids[0], CH, b"", None, [b1], 0)
    assert ev.horizon == (HorizonEntry(ids[1].cell_id, 1),)
