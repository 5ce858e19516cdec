"""Range-based set reconciliation: the index, and sessions that end with the union."""

from __future__ import annotations

import random

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.state.sync import (
    MemorySyncStore,
    SortedSyncIndex,
    SyncItem,
    SyncRole,
    SyncSession,
    SyncSettings,
    SyncState,
)
from cellmesh.state.sync_messages import pull_sync_message
from cellmesh.state.sync_store import (
    INFINITY,
    LOWEST,
    Added,
    RangeSummary,
    fingerprint,
    summarize_items,
)

T0 = 1_700_000_000_000


def event(rng: random.Random, key: int, size: int = 60) -> bytes:
    return key.to_bytes(8, "big") + rng.randbytes(size)


def converse(
    a: MemorySyncStore,
    b: MemorySyncStore,
    cfg: SyncSettings | None = None,
    max_messages: int = 100_000,
) -> tuple[SyncSession, SyncSession, int]:
    """Run a whole session, a initiating; return both sides and the number of messages."""
    ia = SyncSession(a, SyncRole.INITIATOR, 0.0, cfg)
    rb = SyncSession(b, SyncRole.RESPONDER, 0.0, cfg)
    limit = (cfg or SyncSettings()).max_message_size
    pending = [ia.start()]
    to_b = True
    n = 0
    while pending:
        n += 1
        assert n <= max_messages, "session does not end"
        msg = pending.pop()
        assert len(msg) <= limit
        pull_sync_message(msg, limit)
        pending = (rb if to_b else ia).receive(msg, float(n))
        to_b = not to_b
    return ia, rb, n


def fill(
    rng: random.Random, shared: int, only_a: int, only_b: int, key_span: int
) -> tuple[MemorySyncStore, MemorySyncStore]:
    a, b = MemorySyncStore(), MemorySyncStore()
    for _ in range(shared):
        e = event(rng, T0 + rng.randrange(key_span), rng.randrange(1, 80))
        a.add_encoded(e)
        b.add_encoded(e)
    for _ in range(only_a):
        a.add_encoded(event(rng, T0 + rng.randrange(key_span), rng.randrange(1, 80)))
    for _ in range(only_b):
        b.add_encoded(event(rng, T0 + rng.randrange(key_span), rng.randrange(1, 80)))
    return a, b


def check_union(a: MemorySyncStore, b: MemorySyncStore, ia: SyncSession, rb: SyncSession) -> None:
    assert ia.done
    assert rb.done
    assert ia.complete
    assert rb.complete
    assert a.ids() == b.ids()


# ------------------------------------------------------------------------------ the index


def test_index_matches_naive_summaries() -> None:
    rng = random.Random(5)
    items = [SyncItem(rng.randrange(50), rng.randbytes(32)) for _ in range(500)]
    idx = SortedSyncIndex(items)
    assert len(idx) == 500
    srt = sorted(items)
    for _ in range(200):
        lo, hi = sorted([SyncItem(rng.randrange(60), rng.randbytes(32)) for _ in range(2)])
        inside = [it for it in srt if lo <= it < hi]
        assert idx.summarize(lo, hi) == summarize_items(inside)
        assert list(idx.items_in_range(lo, hi)) == inside
        assert list(idx.items_in_range(lo, hi, 3)) == inside[:3]
    assert idx.summarize(LOWEST, INFINITY) == summarize_items(srt)
    assert idx.summarize(INFINITY, LOWEST) == RangeSummary(0, 0)
    assert not idx.add(items[0])
    assert idx.discard(items[0])
    assert not idx.discard(items[0])
    assert not idx.has(items[0].id)
    assert idx.summarize(LOWEST, INFINITY) == summarize_items(
        srt[:0] + [i for i in srt if i != items[0]]
    )


def test_fingerprint_depends_on_count_and_members() -> None:
    a = summarize_items([SyncItem(1, bytes(32))])
    assert fingerprint(a) != fingerprint(RangeSummary(2, a.total))
    assert fingerprint(a) != fingerprint(summarize_items([SyncItem(1, b"\x01" * 32)]))
    assert len(fingerprint(a)) == 16
    # Order does not matter: it is a set fingerprint.
    xs = [SyncItem(i, blake3.blake3(bytes([i])).digest()) for i in range(10)]
    assert summarize_items(xs) == summarize_items(reversed(xs))


def test_memory_store() -> None:
    s = MemorySyncStore()
    e = (T0).to_bytes(8, "big") + b"payload"
    added = s.add_encoded(e)
    assert added == Added(SyncItem(T0, blake3.blake3(e).digest()), True)
    assert s.add_encoded(e) == Added(added.item, False)
    assert s.add_encoded(b"short") is None
    assert s.add_encoded(b"") is None
    assert s.get_encoded(added.item.id) == e
    assert s.has(added.item.id)
    assert len(s) == 1


# ------------------------------------------------------------------------------ sessions


def test_identical_sets_take_two_small_messages() -> None:
    a, b = fill(random.Random(1), 5000, 0, 0, 10**6)
    ia, rb, n = converse(a, b)
    assert n == 2
    assert ia.bytes_sent + ia.bytes_received < 60
    check_union(a, b, ia, rb)


def test_empty_sides() -> None:
    a, b = MemorySyncStore(), MemorySyncStore()
    ia, rb, n = converse(a, b)
    assert n == 2
    check_union(a, b, ia, rb)
    a2, b2 = fill(random.Random(2), 0, 0, 3000, 10**6)
    ia, rb, _ = converse(a2, b2, SyncSettings(max_message_size=4096))
    check_union(a2, b2, ia, rb)
    assert ia.statistics().events_new == 3000
    assert len(ia.missing_here) == 3000
    assert len(rb.missing_there) == 3000
    a3, b3 = fill(random.Random(3), 0, 3000, 0, 10**6)
    ia, rb, _ = converse(a3, b3, SyncSettings(max_message_size=4096))
    check_union(a3, b3, ia, rb)


CONFIGS = [
    SyncSettings(),
    SyncSettings(max_message_size=1024, branching=2, idlist_threshold=2),
    SyncSettings(max_message_size=1024, branching=4, idlist_threshold=3),
    SyncSettings(max_message_size=2048, branching=16, idlist_threshold=8),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "b2t2", "b4t3", "b16t8"])
@pytest.mark.parametrize("seed", range(6))
def test_random_sets_end_with_the_union(cfg: SyncSettings, seed: int) -> None:
    rng = random.Random(seed * 1000 + cfg.branching)
    shared = rng.choice([0, 10, 500, 3000])
    only_a = rng.choice([0, 1, 7, 200])
    only_b = rng.choice([0, 1, 13, 400])
    span = rng.choice([5, 1000, 10**9])  # 5: many items share a key (id-prefix bounds)
    a, b = fill(rng, shared, only_a, only_b, span)
    ids_a, ids_b = a.ids(), b.ids()
    ia, rb, _ = converse(a, b, cfg)
    check_union(a, b, ia, rb)
    assert a.ids() == ids_a | ids_b
    # Both sides learn the exact difference, whichever way it was found.
    assert ia.missing_here == ids_b - ids_a
    assert ia.missing_there == ids_a - ids_b
    assert rb.missing_here == ids_a - ids_b
    assert rb.missing_there == ids_b - ids_a
    sa, sb = ia.statistics(), rb.statistics()
    assert sa.bytes_sent == sb.bytes_received
    assert sa.bytes_received == sb.bytes_sent
    assert sa.events_sent + sb.events_sent == len(ids_a ^ ids_b)
    assert sa.events_duplicate == sb.events_duplicate == 0


@settings(max_examples=60, deadline=None)
@given(
    st.sets(st.integers(0, 400), max_size=120),
    st.sets(st.integers(0, 400), max_size=120),
    st.sampled_from([2, 3, 16]),
    st.sampled_from([1, 2, 32]),
)
def test_property_union(xs: set[int], ys: set[int], branching: int, threshold: int) -> None:
    def ev(i: int) -> bytes:
        return (T0 + i % 37).to_bytes(8, "big") + i.to_bytes(4, "big")

    a, b = MemorySyncStore(), MemorySyncStore()
    for i in xs:
        a.add_encoded(ev(i))
    for i in ys:
        b.add_encoded(ev(i))
    cfg = SyncSettings(max_message_size=2048, branching=branching, idlist_threshold=threshold)
    ia, rb, _ = converse(a, b, cfg)
    check_union(a, b, ia, rb)
    assert len(a) == len(xs | ys)


def test_small_messages_hand_back_the_rest() -> None:
    """Many scattered differences overflow 1 KiB messages; the overflow is handed back as one
    fingerprint and the session still converges."""
    rng = random.Random(9)
    a, b = fill(rng, 2000, 300, 300, 10**9)
    ia, rb, n = converse(a, b, SyncSettings(max_message_size=1024, idlist_threshold=4))
    check_union(a, b, ia, rb)
    assert n > 20


def test_events_larger_than_a_message_are_counted_not_sent() -> None:
    rng = random.Random(4)
    a, b = MemorySyncStore(), MemorySyncStore()
    big = event(rng, T0, 5000)
    small = event(rng, T0 + 1, 10)
    a.add_encoded(big)
    a.add_encoded(small)
    ia, rb, _ = converse(a, b, SyncSettings(max_message_size=2048))
    assert ia.done
    assert rb.done
    assert b.ids() == {blake3.blake3(small).digest()}
    assert ia.statistics().oversize_events == 1


def test_store_refusals_are_counted() -> None:
    rng = random.Random(6)
    picky = MemorySyncStore(key_of=lambda d: None if d[8] % 2 else int.from_bytes(d[:8], "big"))
    src = MemorySyncStore()
    for i in range(100):
        src.add_encoded(event(rng, T0 + i))
    ia, rb, _ = converse(src, picky)
    st_b = rb.statistics()
    assert st_b.events_rejected + st_b.events_new == 100
    assert st_b.events_rejected > 10
    assert ia.done
    assert rb.done


def test_state_and_timer() -> None:
    s = SyncSession(MemorySyncStore(), SyncRole.RESPONDER, 5.0, SyncSettings(idle_timeout=10.0))
    assert s.state is SyncState.OPEN
    assert s.get_timer() == 15.0
    s.handle_timer(14.0)
    assert s.state is SyncState.OPEN
    s.handle_timer(15.0)
    assert s.failed
    assert "silent" in (s.failure or "")
    assert s.get_timer() is None


def test_settings_validated() -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        SyncSettings(max_message_size=100)
    with pytest.raises(ValueError, match="branching"):
        SyncSettings(branching=1)
    with pytest.raises(ValueError, match="idlist_threshold"):
        SyncSettings(max_message_size=1024, idlist_threshold=25)
    with pytest.raises(ValueError, match="max_turns"):
        SyncSettings(max_turns=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        SyncSettings(idle_timeout=0)


def test_index_interleaved_adds_and_queries_match_a_model() -> None:
    """Pending (unsettled) and settled items answer queries alike, across merges."""
    rng = random.Random(12)
    idx = SortedSyncIndex()
    model: set[SyncItem] = set()
    for step in range(6000):
        it = SyncItem(rng.randrange(3000), rng.randbytes(32))
        idx.add(it)
        model.add(it)
        if step % 97 == 0 and model:
            victim = rng.choice(sorted(model))
            assert idx.discard(victim)
            model.discard(victim)
        if step % 41 == 0:
            lo, hi = sorted([SyncItem(rng.randrange(3100), rng.randbytes(32)) for _ in range(2)])
            inside = sorted(x for x in model if lo <= x < hi)
            assert idx.summarize(lo, hi) == summarize_items(inside)
            assert list(idx.items_in_range(lo, hi, 5)) == inside[:5]
            assert list(idx.items_in_range(lo, hi)) == inside
    assert len(idx) == len(model)
    assert idx.summarize(LOWEST, INFINITY) == summarize_items(model)
