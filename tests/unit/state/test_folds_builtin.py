"""Folds: built-in semantics, bad payloads, incremental vs rebuild, persistence, and identical
states whatever order the same events arrive in."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_events_dag import make_dag

from cellmesh.identity.keys import Identity
from cellmesh.node.store_sqlite import SqliteLogStore
from cellmesh.state.events import Event, create_event
from cellmesh.state.folds import (
    JSON,
    Counter,
    Fold,
    FoldEngine,
    FoldError,
    FunctionFold,
    InMemoryFoldStates,
    LatestPerKey,
    LwwMap,
    LwwSet,
    dump_state,
)
from cellmesh.state.log import InMemoryLogStore, LogStoreBase, Retention, StoredEvent

CH = "app/doc"


@pytest.fixture(scope="module")
def ids() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


def js(value: object) -> bytes:
    return json.dumps(value).encode()


def builtins() -> list[Fold]:
    return [
        Counter(),
        LwwMap(),
        LwwSet(),
        LatestPerKey(),
        LatestPerKey("by_author", key_field=None),
    ]


def random_payload(rng: random.Random, i: int) -> bytes:
    """A mix of every built-in's payload format, plus junk that folds must ignore."""
    keys = ["a", "b", "c", "d"]
    kind = rng.randrange(7)
    if kind == 0:
        return js({"set": {rng.choice(keys): i, rng.choice(keys): [i, "x"]}})
    if kind == 1:
        return js({"del": [rng.choice(keys)], "set": {rng.choice(keys): {"n": i}}})
    if kind == 2:
        return js({"add": [rng.choice(keys), i % 5], "remove": [rng.choice(keys)]})
    if kind == 3:
        return js({"key": rng.choice(keys), "v": i})
    if kind == 4:
        return js(rng.randrange(-5, 6))
    if kind == 5:
        return b""
    return rng.choice(
        [b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b"{not json", b"1e999999", b"7" * 5000]
    )


def fold_all(store: LogStoreBase, folds: list[Fold]) -> dict[str, str]:
    engine = FoldEngine(store, InMemoryFoldStates())
    for f in folds:
        engine.register(CH, f)
    return {v.name: dump_state(v.state) for v in engine.update_all(CH)}


def stored(ev: Event) -> StoredEvent:
    s = InMemoryLogStore()
    s.append(ev)
    got = s.get(s.heads(ev.channel)[0].id)
    assert got is not None
    return got


# ---------------------------------------------------------------------------------- built-ins


def test_counter(ids: list[Identity]) -> None:
    store = InMemoryLogStore()
    prev = None
    for payload in [b"", b"5", b"-2", b"true", b"1.5", b"x", b"\x00"]:
        prev = create_event(ids[0], CH, payload, prev, (), 0)
        store.append(prev)
    engine = FoldEngine(store, InMemoryFoldStates())
    engine.register(CH, Counter())
    view = engine.update(CH, "counter")
    assert view.state == {"value": 4, "applied": 3, "ignored": 4}
    assert Counter.view(view.state) == 4
    assert view.events == 7


def test_lww_map_causal_order_and_tombstones(ids: list[Identity]) -> None:
    a, b = ids[0], ids[1]
    a1 = create_event(a, CH, js({"set": {"x": 1, "y": 1}}), None, (), 0)
    b1 = create_event(b, CH, js({"set": {"x": 2}}), None, [a1], 0)  # saw a1: wins on x
    a2 = create_event(a, CH, js({"del": ["y"], "set": {"z": 3}}), a1, (), 0)  # concurrent with b1
    fold = LwwMap()
    state = fold.initial()
    for ev in (a2, b1, a1):  # any order
        state = fold.apply(state, stored_in_order(ev, [a1, b1, a2]))
    assert LwwMap.view(state) == {"x": 2, "z": 3}
    # a key in both set and del of one event is deleted
    both = create_event(ids[2], CH, js({"set": {"q": 1}, "del": ["q"]}), None, (), 0)
    state = fold.apply(state, stored(both))
    assert "q" not in LwwMap.view(state)


def stored_in_order(ev: Event, history: list[Event]) -> StoredEvent:
    s = InMemoryLogStore()
    for e in history:
        s.append(e)
    for x in s.iter_channel(ev.channel):
        if x.event == ev:
            return x
    raise AssertionError("not found")


def test_lww_map_concurrent_writes_break_ties_by_clock_then_id(ids: list[Identity]) -> None:
    a, b = ids[0], ids[1]
    a1 = create_event(a, CH, js({"set": {"k": "a"}}), None, (), 0)
    b1 = create_event(b, CH, js({"set": {"k": "b"}}), None, (), 0)
    assert a1.clock == b1.clock == 1
    s = InMemoryLogStore()
    s.append_many([a1, b1])
    winner = max(s.iter_channel(CH), key=lambda x: x.id).event
    fold = LwwMap()
    state = fold.initial()
    for x in s.iter_channel(CH):
        state = fold.apply(state, x)
    assert LwwMap.view(state) == {"k": json.loads(winner.payload)["set"]["k"]}


def test_set_and_latest_per_key(ids: list[Identity]) -> None:
    a = ids[0]
    s = InMemoryLogStore()
    payloads = [
        {"add": ["x", 1, {"o": 1}]},
        {"remove": ["x"], "add": [2]},
        {"add": ["x"], "remove": ["x"]},  # both: removed
        {"key": "k1", "v": 1},
        {"key": "k1", "v": 2},
        {"key": "k2", "v": 3},
        {"key": 5},
    ]
    prev = None
    for p in payloads:
        prev = create_event(a, CH, js(p), prev, (), 7)
        s.append(prev)
    engine = FoldEngine(s, InMemoryFoldStates())
    engine.register(CH, LwwSet())
    engine.register(CH, LatestPerKey())
    engine.register(CH, LatestPerKey("raw", key_field=None))
    assert LwwSet.view(engine.update(CH, "set").state) == [1, 2, {"o": 1}]
    latest = engine.update(CH, "latest").state
    assert LatestPerKey.view(latest) == {"k1": {"key": "k1", "v": 2}, "k2": {"key": "k2", "v": 3}}
    assert isinstance(latest, dict)
    assert latest["ignored"] == 4  # set payloads and the non-string key
    raw = LatestPerKey.view(engine.update(CH, "raw").state)
    assert raw == {a.cell_id.hex(): {"key": 5}}


def test_latest_per_author_keeps_non_json_as_base64(ids: list[Identity]) -> None:
    ev = create_event(ids[1], CH, b"\x00\xff", None, (), 0)
    fold = LatestPerKey("raw", key_field=None)
    state = fold.apply(fold.initial(), stored(ev))
    assert LatestPerKey.view(state) == {ids[1].cell_id.hex(): {"base64": "AP8="}}


def test_builtins_ignore_any_junk(ids: list[Identity]) -> None:
    rng = random.Random(5)
    prev = None
    s = InMemoryLogStore()
    junk = [b"\xff", b"[" * 100_00, b"nul", b"{}", b"[]", b"null", js({"set": 5}), js({"del": [1]})]
    junk += [js({"add": 3}), js({"set": {}, "x": 1}), js({"key": None}), rng.randbytes(300)]
    junk += [b"NaN", b"-Infinity", b'{"set": {"k": 1e400}}', b'{"key": "k", "v": NaN}']
    for p in junk:
        prev = create_event(ids[0], CH, p, prev, (), 0)
        s.append(prev)
    states = fold_all(s, builtins())
    assert len(states) == 5


# ---------------------------------------------------------------------------------- ordering


@pytest.mark.parametrize("seed", range(3))
def test_same_events_any_order_same_state(ids: list[Identity], seed: int) -> None:
    events = make_dag(random.Random(seed), ids, 120, random_payload, learn=0.3)
    rng = random.Random(100 + seed)
    results = []
    for _ in range(6):
        order = events + rng.sample(events, 15)  # duplicates change nothing
        rng.shuffle(order)
        store = InMemoryLogStore()
        for e in order:
            assert store.append(e).accepted
        assert store.stats(CH).events == 120
        results.append(fold_all(store, builtins()))
    assert all(r == results[0] for r in results)
    assert json.loads(results[0]["lww_map"])["applied"] > 0


def test_same_state_in_sqlite_and_incremental(ids: list[Identity], tmp_path: Path) -> None:
    events = make_dag(random.Random(9), ids, 90, random_payload)
    mem = InMemoryLogStore()
    mem.append_many(events)
    expected = fold_all(mem, builtins())
    rng = random.Random(10)
    order = events[:]
    rng.shuffle(order)
    with SqliteLogStore(tmp_path / "f.db", synchronous="NORMAL") as store:
        engine = FoldEngine(store, store)
        for f in builtins():
            engine.register(CH, f)
        for i in range(0, len(order), 7):  # folds updated between bursts of arrivals
            store.append_many(order[i : i + 7])
            engine.update_all(CH)
        got = {v.name: dump_state(v.state) for v in engine.update_all(CH)}
    assert got == expected


# ---------------------------------------------------------------------------------- engine


def test_persisted_with_position_and_resumed(ids: list[Identity], tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    a = ids[0]
    events: list[Event] = []
    prev = None
    for _ in range(30):
        prev = create_event(a, CH, b"", prev, (), 0)
        events.append(prev)
    seen: list[int] = []

    def count(state: JSON, ev: StoredEvent) -> JSON:
        assert ev.position is not None
        seen.append(ev.position)
        assert isinstance(state, int)
        return state + 1

    with SqliteLogStore(path) as store:
        store.append_many(events[:20])
        engine = FoldEngine(store, store, checkpoint_every=7)
        engine.register(CH, FunctionFold("n", lambda: 0, count))
        engine.register(CH, Counter())
        assert engine.update(CH, "n").state == 20
        saved = store.load_fold(CH, "n")
        assert saved is not None
        assert (saved.position, saved.events, saved.state) == (20, 20, "20")
    with SqliteLogStore(path) as store:
        store.append_many(events[20:])
        engine = FoldEngine(store, store)
        engine.register(CH, FunctionFold("n", lambda: 0, count))
        engine.register(CH, Counter())
        seen.clear()
        view = engine.update(CH, "n")
        assert (view.state, view.position) == (30, 30)
        assert seen == list(range(21, 31))  # only the new events were applied
        assert Counter.view(engine.update(CH, "counter").state) == 30
        seen.clear()
        assert engine.rebuild(CH, "n").state == 30
        assert len(seen) == 30


def test_version_change_rebuilds(ids: list[Identity]) -> None:
    store = InMemoryLogStore()
    store.append(create_event(ids[0], CH, b"", None, (), 0))
    states = InMemoryFoldStates()
    engine = FoldEngine(store, states)
    engine.register(CH, FunctionFold("f", lambda: 0, lambda s, e: 1))
    assert engine.update(CH, "f").state == 1
    engine2 = FoldEngine(store, states)
    engine2.register(CH, FunctionFold("f", lambda: 0, lambda s, e: 100, version="2"))
    assert engine2.update(CH, "f").state == 100
    saved = states.load_fold(CH, "f")
    assert saved is not None
    assert saved.version == "2"


def test_damaged_saved_state_rebuilds(ids: list[Identity], tmp_path: Path) -> None:
    with SqliteLogStore(tmp_path / "f.db") as store:
        store.append(create_event(ids[0], CH, b"", None, (), 0))
        engine = FoldEngine(store, store)
        engine.register(CH, Counter())
        engine.update(CH, "counter")
        store._db.execute("UPDATE folds SET state = '{broken'")
        engine = FoldEngine(store, store)
        engine.register(CH, Counter())
        assert Counter.view(engine.update(CH, "counter").state) == 1


def test_engine_misuse(ids: list[Identity]) -> None:
    store = InMemoryLogStore()
    store.append(create_event(ids[0], CH, b"", None, (), 0))
    engine = FoldEngine(store, InMemoryFoldStates())
    engine.register(CH, Counter())
    with pytest.raises(FoldError, match="already"):
        engine.register(CH, Counter())
    with pytest.raises(FoldError, match="no fold"):
        engine.update(CH, "missing")
    with pytest.raises(ValueError, match="channel"):
        engine.register("bad channel", Counter("c2"))
    engine.register(CH, FunctionFold("bad", lambda: 0, lambda s, e: {1, 2}))  # type: ignore[arg-type,return-value]
    with pytest.raises(FoldError, match="JSON"):
        engine.update(CH, "bad")
    assert engine.folds(CH) == ["bad", "counter"]
    with pytest.raises(ValueError, match="checkpoint"):
        FoldEngine(store, InMemoryFoldStates(), checkpoint_every=0)


def test_retention_through_engine_keeps_fold_effect(ids: list[Identity]) -> None:
    store = InMemoryLogStore()
    prev = None
    for _ in range(10):
        prev = create_event(ids[0], CH, b"", prev, (), 0)
        store.append(prev)
    store.set_retention(CH, Retention(max_bytes=0))
    engine = FoldEngine(store, InMemoryFoldStates())
    engine.register(CH, Counter())
    assert engine.apply_retention(CH, 0).events == 9
    assert Counter.view(engine.update(CH, "counter").state) == 10
    assert Counter.view(engine.rebuild(CH, "counter").state) == 1  # only the head is left


def test_fold_views_are_copies(ids: list[Identity]) -> None:
    store = InMemoryLogStore()
    store.append(create_event(ids[0], CH, js({"set": {"a": 1}}), None, (), 0))
    engine = FoldEngine(store, InMemoryFoldStates())
    engine.register(CH, LwwMap())
    view = engine.update(CH, "lww_map")
    assert isinstance(view.state, dict)
    view.state["entries"] = {}
    assert LwwMap.view(engine.update(CH, "lww_map").state) == {"a": 1}


def iter_fold_names() -> Iterator[str]:
    yield from (f.name for f in builtins())


def test_builtin_names_are_distinct() -> None:
    names = list(iter_fold_names())
    assert len(set(names)) == len(names)
