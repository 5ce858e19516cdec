"""Federated query merge: replicas holding overlapping, different subsets of a channel's events
merge into exactly the state of one replica holding their union; counters take the most complete
replica; the answer line is bounded, truncated rather than oversized, and garbage is refused."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest
from test_events_dag import make_dag, vector_clocks
from test_folds_builtin import CH, js, random_payload

from cellmesh.errors import DecodeError
from cellmesh.identity.keys import Identity
from cellmesh.state.events import Event, create_event
from cellmesh.state.folds import (
    JSON,
    Counter,
    Fold,
    FoldEngine,
    FoldError,
    InMemoryFoldStates,
    LatestPerKey,
    LwwMap,
    LwwSet,
    dump_state,
)
from cellmesh.state.log import InMemoryLogStore
from cellmesh.state.query import (
    MAX_ANSWER,
    Answer,
    Refusal,
    decode_answer,
    encode_answer,
    encode_refusal,
    fold_kind,
    merge,
    select_key,
    view,
)

STAMPED: list[Fold] = [LwwMap(), LwwSet(), LatestPerKey(), LatestPerKey("mine", key_field=None)]


@pytest.fixture(scope="module")
def authors() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


def replica(events: Sequence[Event | bytes]) -> InMemoryLogStore:
    store = InMemoryLogStore()
    store.append_many(events)
    return store


def answer_of(store: InMemoryLogStore, fold: Fold, key: str | None = None) -> Answer:
    engine = FoldEngine(store, InMemoryFoldStates())
    engine.register(CH, fold)
    v = engine.update(CH, fold.name)
    kind = fold_kind(fold)
    return Answer(kind, fold.version, v.position, v.events, select_key(kind, v.state, key))


def delivered(store: InMemoryLogStore) -> list[bytes]:
    return [s.encoded for s in store.iter_channel(CH)]


def test_merged_replicas_equal_one_replica_holding_the_union(authors: list[Identity]) -> None:
    grew = 0
    for seed in range(12):
        rng = random.Random(seed)
        # Writers rarely hear of each other: their causal pasts diverge.
        events = make_dag(rng, authors, 60, random_payload, channel=CH, learn=0.1)
        clocks = vector_clocks(events)
        # Each replica holds what some writers had seen at some moments (the causal pasts of
        # one or two random events: overlapping, different, causally closed sets, as nodes
        # hold them), plus events it cannot deliver yet; all received in a random order.
        replicas = []
        for _ in range(rng.randrange(2, 5)):
            seen: dict[bytes, int] = {}
            for i in rng.sample(range(len(events)), rng.randrange(1, 3)):
                for a, n in clocks[i].items():
                    seen[a] = max(seen.get(a, 0), n)
            held = [e for e in events if e.seq <= seen.get(bytes(e.author), 0)]
            stray = [e for e in events if e not in held and rng.random() < 0.2]
            subset = held + stray
            rng.shuffle(subset)
            replicas.append(replica(subset))
        union = replica([e for r in replicas for e in delivered(r)])
        sizes = [len(delivered(r)) for r in replicas]
        assert len(delivered(union)) >= max(sizes)
        grew += len(delivered(union)) > max(sizes)  # the merge had real work to do
        for fold in STAMPED:
            kind = fold_kind(fold)
            answers = {f"r{i}": answer_of(r, fold) for i, r in enumerate(replicas)}
            merged = merge(kind, answers, local="r0")
            whole = answer_of(union, fold)
            assert merged.strategy == "stamp"
            # The tables (tombstones included) are identical, not just the visible values.
            table = {"lww_map": "entries", "lww_set": "elements"}.get(kind, "latest")
            assert isinstance(merged.state, dict)
            assert isinstance(whole.state, dict)
            assert dump_state(merged.state[table]) == dump_state(whole.state[table]), (seed, kind)
            assert view(kind, merged.state, None) == view(kind, whole.state, None)
            # Key by key through select_key, as a query for one key does it.
            entries = whole.state[table]
            assert isinstance(entries, dict)
            for k in list(entries)[:5]:
                key = json.loads(k) if kind == "lww_set" else k
                key_text = key if isinstance(key, str) else json.dumps(key)
                per_key = {
                    label: answer_of(r, fold, key_text)
                    for label, r in zip(answers, replicas, strict=True)
                }
                one = merge(kind, per_key)
                assert view(kind, one.state, key_text) == view(kind, whole.state, key_text)
    assert grew >= 6, grew


def test_a_deletion_seen_by_one_replica_beats_an_older_write_seen_by_another(
    authors: list[Identity],
) -> None:
    a, b = authors[0], authors[1]
    write = create_event(a, CH, js({"set": {"k": 1, "j": 2}}), None, [], 1)
    delete = create_event(b, CH, js({"del": ["k"]}), None, [write], 2)  # b saw the write
    only_write, both = replica([write]), replica([write, delete])
    fold = LwwMap()
    answers = {"local": answer_of(only_write, fold), "peer": answer_of(both, fold)}
    merged = merge("lww_map", answers)
    assert view("lww_map", merged.state, None) == {"j": 2}
    assert view("lww_map", merged.state, "k") is None
    assert view("lww_map", answers["local"].state, "k") == 1


def test_counter_takes_the_most_complete_replica(authors: list[Identity]) -> None:
    rng = random.Random(3)
    events = make_dag(rng, authors, 30, lambda r, i: js(1), channel=CH)
    full = replica(events)
    half = replica(events[:15])
    answers = {
        "local": answer_of(half, Counter()),
        "bb": answer_of(full, Counter()),
        "aa": answer_of(replica(events[:10]), Counter()),
    }
    merged = merge("counter", answers)
    assert merged.strategy == "most_events"
    assert merged.chosen == "bb"
    assert view("counter", merged.state, None) == 30  # never 30 + 15 + 10
    # Ties: the local replica first, then the lowest label.
    tie = {"local": answers["bb"], "aa": answers["bb"], "cc": answers["bb"]}
    assert merge("counter", tie).chosen == "local"
    assert merge("counter", {"cc": answers["bb"], "aa": answers["bb"]}).chosen == "aa"


def test_views_of_keys() -> None:
    state: JSON = {
        "elements": {'"a"': [1, "00", 1], "5": [2, "01", 1], '"gone"': [3, "02", 0]},
        "applied": 3,
        "ignored": 0,
    }
    assert view("lww_set", state, None) == ["a", 5]  # sorted by canonical JSON text
    assert view("lww_set", state, "a") is True
    assert view("lww_set", state, '"a"') is True
    assert view("lww_set", state, "5") is True
    assert view("lww_set", state, "gone") is False
    assert view("lww_set", state, "missing") is False
    with pytest.raises(FoldError):
        view("counter", {"value": 1, "applied": 1, "ignored": 0}, "k")
    with pytest.raises(FoldError):
        select_key("counter", {"value": 1}, "k")
    assert view("opaque", {"x": 1}, "x") == 1
    assert view("opaque", [1, 2], None) == [1, 2]


def test_large_answers_are_truncated_to_whole_entries() -> None:
    entries = {f"key-{i:05d}": [i, f"{i:064x}", 1, "v" * 200] for i in range(3000)}
    state: JSON = {"entries": entries, "applied": 3000, "ignored": 0}  # type: ignore[dict-item]
    line = encode_answer("lww", Answer("lww_map", "1", 3000, 3000, state))
    assert len(line) <= MAX_ANSWER
    assert line.endswith(b"\n")
    got = decode_answer(line)
    assert isinstance(got, Answer)
    assert got.truncated
    assert isinstance(got.state, dict)
    kept = got.state["entries"]
    assert isinstance(kept, dict)
    assert 0 < len(kept) < 3000
    assert all(kept[k] == entries[k] for k in kept)  # whole entries, exactly as held
    assert sorted(kept) == sorted(entries)[: len(kept)]
    # A small state travels whole and decodes to what was sent.
    small = Answer("counter", "1", 4, 4, {"value": 4, "applied": 4, "ignored": 0})
    assert decode_answer(encode_answer("counter", small)) == small
    assert decode_answer(encode_refusal("not_entitled", "no")) == Refusal("not_entitled", "no")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"not json\n",
        b"[1, 2]\n",
        b'{"ok": "yes"}\n',
        b'{"ok": false}\n',
        b'{"ok": true, "kind": "counter", "version": "1"}\n',
        b'{"ok": true, "kind": "counter", "version": "1", "position": -1, "events": 0, '
        b'"truncated": false, "state": {"value": 1}}\n',
        b'{"ok": true, "kind": "counter", "version": "1", "position": 1, "events": 1, '
        b'"truncated": false, "state": {"value": "many"}}\n',
        b'{"ok": true, "kind": "lww_map", "version": "1", "position": 1, "events": 1, '
        b'"truncated": false, "state": {"entries": {"k": [true, "x", 1, 2]}}}\n',
        b'{"ok": true, "kind": "lww_set", "version": "1", "position": 1, "events": 1, '
        b'"truncated": false, "state": {"elements": {"k": [1, "x"]}}}\n',
        b'{"ok": true, "kind": "latest:key", "version": "1", "position": 1, "events": 1, '
        b'"truncated": false, "state": {"latest": []}}\n',
        b"[" * 100_000 + b"]" * 100_000,
        b"x" * (MAX_ANSWER + 1),
    ],
)
def test_garbage_answers_are_decode_errors(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_answer(data)


def test_random_bytes_never_escape_as_anything_but_decode_errors() -> None:
    rng = random.Random(11)
    good = encode_answer("lww", Answer("lww_map", "1", 1, 1, {"entries": {"k": [1, "a", 1, 2]}}))
    outcomes = {"answer": 0, "refusal": 0, "error": 0}
    for _ in range(500):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            got = decode_answer(bytes(data))
        except DecodeError:
            outcomes["error"] += 1
            continue
        if isinstance(got, Refusal):
            outcomes["refusal"] += 1
            continue
        # Whatever decodes is structurally sound: it merges and views without raising.
        outcomes["answer"] += 1
        if got.kind == "lww_map":
            view(got.kind, merge(got.kind, {"x": got}).state, None)
    assert outcomes["error"] > 0
    assert sum(outcomes.values()) == 500


def _set_answer(elements: dict[str, list[object]]) -> bytes:
    return (
        json.dumps(
            {
                "ok": True,
                "fold": "set",
                "kind": "lww_set",
                "version": "1",
                "position": 1,
                "events": 1,
                "truncated": False,
                "state": {"elements": elements},
            }
        ).encode()
        + b"\n"
    )


@pytest.mark.parametrize(
    "member",
    [
        "{not json",  # LwwSet.view would fail parsing it back
        "a",  # a bare word: the element "a" is keyed '"a"'
        "[1, 2]",  # JSON, but not canonical: would list [1,2] twice beside "[1,2]"
        '{"b":1,"a":2}',  # keys not sorted
        "1e2",  # canonical form is 100.0
        "NaN",  # parses, but is no JSON value a fold can hold
        "Infinity",
        "1" * 5000,  # beyond the interpreter's integer-string limit
        "[" * 5000 + "]" * 5000,  # too deep to parse
    ],
)
def test_set_answers_with_non_canonical_element_keys_are_decode_errors(member: str) -> None:
    with pytest.raises(DecodeError):
        decode_answer(_set_answer({'"ok"': [1, "aa", 1], member: [2, "bb", 1]}))


def test_set_answers_with_canonical_element_keys_decode_and_view() -> None:
    elements: list[JSON] = ["a", 5, 1.5, [1, 2], {"a": 1, "b": [None, True]}, None]
    members = [dump_state(x) for x in elements]
    got = decode_answer(_set_answer({m: [1, "aa", 1] for m in members}))
    assert isinstance(got, Answer)
    value = view(got.kind, merge(got.kind, {"peer": got}).state, None)
    assert isinstance(value, list)
    assert sorted(dump_state(x) for x in value) == sorted(members)
