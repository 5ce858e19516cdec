"""Sync sessions against hostile or broken peers: every breach ends in a clear error or a counted
drop, never unbounded work or memory."""

from __future__ import annotations

import random

import pytest

from cellmesh.errors import LocalProtocolError, RemoteProtocolError
from cellmesh.state.sync import (
    MemorySyncStore,
    SyncError,
    SyncRole,
    SyncSession,
    SyncSettings,
)
from cellmesh.state.sync_messages import (
    Mode,
    RangeRecord,
    SyncMessage,
    pull_sync_message,
    push_sync_message,
)
from cellmesh.state.sync_store import INFINITY, SyncItem

T0 = 1_700_000_000_000


def populated(n: int, seed: int = 1) -> MemorySyncStore:
    rng = random.Random(seed)
    s = MemorySyncStore()
    for i in range(n):
        s.add_encoded((T0 + i).to_bytes(8, "big") + rng.randbytes(40))
    return s


def responder(store: MemorySyncStore | None = None, **kw: int) -> SyncSession:
    cfg = SyncSettings(**kw)
    return SyncSession(store if store is not None else populated(500), SyncRole.RESPONDER, 0.0, cfg)


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x02\x00\x00\x00\x00",
        b"\x01\x80\x00\x00\x00",
        b"\x01\x00\x00\x00\x00\xff",
        b"\xff" * 50,
    ],
)
def test_malformed_fails_the_session(junk: bytes) -> None:
    s = responder()
    with pytest.raises(RemoteProtocolError) as info:
        s.receive(junk)
    assert info.value.code == SyncError.MALFORMED
    assert s.failed
    assert s.statistics().malformed == 1
    assert "undecodable" in (s.failure or "")
    with pytest.raises(LocalProtocolError):
        s.receive(push_sync_message(SyncMessage(False)))


def test_oversize_message_refused() -> None:
    s = responder(max_message_size=1024, idlist_threshold=8)
    big = push_sync_message(SyncMessage(False, events=(bytes(2000),)), max_size=4096)
    with pytest.raises(RemoteProtocolError):
        s.receive(big)


def test_huge_counts_cost_nothing() -> None:
    s = responder()
    # Claims 2**62 ranges / ids / events in a few bytes: refused before any allocation.
    for msg in (
        b"\x01\x00\xff\xff\xff\xff\xff\xff\xff\xff\x3f",
        b"\x01\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\x3f",
        b"\x01\x00\x01\x00\x02\xff\xff\xff\xff\xff\xff\xff\xff\x3f\x00\x00",
    ):
        s2 = responder()
        with pytest.raises(RemoteProtocolError):
            s2.receive(msg)
    assert not s.failed


def test_endless_splitting_is_cut_off() -> None:
    """A peer that answers every turn with a fresh mismatching fingerprint of everything."""
    s = responder(max_reconcile_rounds=20)
    rng = random.Random(3)

    def spam() -> bytes:
        msg = SyncMessage(False, (RangeRecord(INFINITY, Mode.FINGERPRINT, rng.randbytes(16)),))
        return push_sync_message(msg)

    for _ in range(20):
        out = s.receive(spam())
        assert len(out) == 1  # each answer is one bounded message
        assert len(out[0]) <= s.settings.max_message_size
    with pytest.raises(RemoteProtocolError) as info:
        s.receive(spam())
    assert info.value.code == SyncError.TOO_MANY_ROUNDS
    assert s.statistics().reconcile_rounds == 21


def test_peer_that_only_says_more_is_cut_off() -> None:
    s = responder(max_idle_turns=5)
    more = push_sync_message(SyncMessage(True))
    for _ in range(5):
        assert len(s.receive(more)) == 1  # MORE obliges an answer...
    with pytest.raises(RemoteProtocolError) as info:
        s.receive(more)  # ...but not forever
    assert info.value.code == SyncError.IDLE


def test_turn_limit() -> None:
    s = responder(max_turns=10, max_idle_turns=100)
    more = push_sync_message(SyncMessage(True))
    for _ in range(10):
        s.receive(more)
    with pytest.raises(RemoteProtocolError) as info:
        s.receive(more)
    assert info.value.code == SyncError.TOO_MANY_TURNS


def test_rejected_events_limit() -> None:
    s = responder(max_rejected_events=3)
    bad = push_sync_message(SyncMessage(False, events=(b"short",) * 3))
    s.receive(bad)
    assert s.statistics().events_rejected == 3
    with pytest.raises(RemoteProtocolError) as info:
        s.receive(push_sync_message(SyncMessage(False, events=(b"x",))))
    assert info.value.code == SyncError.REJECTED_EVENTS


def test_want_flood_is_bounded_and_counted() -> None:
    store = populated(50)
    s = responder(store, max_pending_wants=100, max_message_size=4096)
    rng = random.Random(7)
    ids = [rng.randbytes(32) for _ in range(120)]
    out = s.receive(push_sync_message(SyncMessage(True, wants=tuple(ids))))
    st = s.statistics()
    assert st.wants_received == 120
    assert st.wants_dropped == 20
    assert st.unavailable == 100  # none of them exist here
    assert len(out) == 1
    assert not s.complete


def test_idlist_flood_bounds_our_wants() -> None:
    """A peer listing many ids we lack: at most max_pending_wants are wanted, the rest dropped;
    the session can still end, but not `complete`."""
    s = responder(MemorySyncStore(), max_pending_wants=40, max_message_size=8192)
    rng = random.Random(8)
    ids = tuple(sorted(rng.randbytes(32) for _ in range(100)))
    out = s.receive(
        push_sync_message(SyncMessage(False, (RangeRecord(INFINITY, Mode.IDLIST, ids=ids),)))
    )
    reply = pull_sync_message(out[0])
    assert len(reply.wants) == 40
    assert s.statistics().wants_dropped == 60
    assert len(s.missing_here) == 40
    # The peer answers with nothing (it has none of them after all): we are done, not complete.
    assert s.receive(push_sync_message(SyncMessage(False))) == []
    assert s.done
    assert not s.complete


def test_unsolicited_events_are_just_added_once() -> None:
    s = responder(MemorySyncStore())
    ev = (T0).to_bytes(8, "big") + b"hello"
    s.receive(push_sync_message(SyncMessage(False, events=(ev, ev))))
    st = s.statistics()
    assert (st.events_new, st.events_duplicate) == (1, 1)


def test_ranges_after_fill_are_handed_back_in_bounded_messages() -> None:
    """Thousands of tiny mismatching ranges in one message: the answer stays within the limit."""
    store = populated(5000)
    s = responder(store, max_message_size=2048, idlist_threshold=4)
    rng = random.Random(2)
    keys = sorted(rng.sample(range(T0, T0 + 5000), 1500))
    recs = tuple(RangeRecord(SyncItem(k, bytes(32)), Mode.FINGERPRINT, bytes(16)) for k in keys)
    msg = push_sync_message(SyncMessage(False, recs), max_size=60_000)
    s2 = responder(store, max_message_size=60_000, idlist_threshold=4)
    out = s2.receive(msg)
    assert len(out[0]) <= 60_000
    reply = pull_sync_message(out[0], 60_000)
    assert reply.ranges[-1].upper == INFINITY  # the unanswered rest handed back
    assert reply.ranges[-1].mode is Mode.FINGERPRINT
    with pytest.raises(RemoteProtocolError):
        s.receive(msg)  # and a peer's message above our size limit is refused outright


def test_api_misuse() -> None:
    r = responder()
    with pytest.raises(LocalProtocolError):
        r.start()
    i = SyncSession(MemorySyncStore(), SyncRole.INITIATOR, 0.0)
    with pytest.raises(LocalProtocolError):
        i.receive(push_sync_message(SyncMessage(False)))
    i.start()
    with pytest.raises(LocalProtocolError):
        i.start()


def test_repeated_idlists_cannot_pile_up_push_queues() -> None:
    """A peer repeating big IDLISTs over a range where we hold many events: each would queue a
    push of the whole range with its list to skip; the skip lists count against a budget."""
    s = responder(populated(3000), max_pending_wants=5000, max_message_size=60_000)
    rng = random.Random(4)
    for _ in range(12):
        ids = tuple(rng.randbytes(32) for _ in range(1000))
        msg = SyncMessage(True, (RangeRecord(INFINITY, Mode.IDLIST, ids=ids),))
        out = s.receive(push_sync_message(msg, max_size=60_000))
        assert len(out) == 1
        assert len(out[0]) <= 60_000
    st = s.statistics()
    assert st.push_ranges_dropped >= 1  # queued lists never exceed 5,000 ids at once
    assert st.wants_dropped > 0  # and its 12,000 unknown ids overflow our want budget too
