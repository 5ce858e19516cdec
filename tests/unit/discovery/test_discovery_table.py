"""The peer table: freshness, replay, updates, expiry after missed intervals, bounded size."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cellmesh.discovery.beacon import Beacon, BeaconFields, Capabilities
from cellmesh.discovery.table import PeerState, PeerTable
from cellmesh.identity.keys import Identity

WALL_MS = 1_800_000_000_000
ADDR = ("198.18.0.1", 19541)
IDS = [Identity.from_secret(bytes([i]) * 64) for i in range(1, 9)]


def beacon(i: int = 0, seq: int = 1, interval_ms: int = 5000, **kw: object) -> Beacon:
    ident = IDS[i]
    f = BeaconFields(seq=seq, timestamp_ms=WALL_MS, interval_ms=interval_ms, name=f"n{i}")
    f = replace(f, **kw)  # type: ignore[arg-type]
    return Beacon(ident.cell_id, ident.public_key, ident.noise_static_public, f)


def add(t: PeerTable, b: Beacon, now: float, addr: tuple[str, int] = ADDR) -> str:
    assert t.check(b.cell_id, b.fields.seq, b.fields.timestamp_ms, WALL_MS)
    return t.apply(b, now, addr, b"static", 0).kind


def test_new_refresh_changed() -> None:
    t = PeerTable()
    assert add(t, beacon(seq=1), 10.0) == "new"
    rec = t.get(IDS[0].cell_id)
    assert rec is not None
    assert (rec.first_seen, rec.last_seen, rec.seq, rec.state) == (10.0, 10.0, 1, PeerState.ALIVE)
    assert rec.interval == 5.0
    assert rec.expires_at == 25.0
    assert add(t, beacon(seq=2), 12.0, ("198.18.0.9", 1)) == "refresh"
    rec = t.get(IDS[0].cell_id)
    assert rec is not None
    assert (rec.first_seen, rec.last_seen, rec.seq) == (10.0, 12.0, 2)
    assert rec.observed_addr == ("198.18.0.9", 1)  # observed address changes silently
    assert rec.seniority(20.0) == 10.0
    b3 = beacon(seq=3, name="renamed", caps=Capabilities(relay=True))
    assert t.check(b3.cell_id, 3, WALL_MS, WALL_MS)
    upd = t.apply(b3, 13.0, ADDR, b"static2", 0)
    assert upd.kind == "changed"
    assert upd.changed == frozenset({"name", "caps"})
    assert upd.previous is not None
    assert upd.previous.name == "n0"
    assert upd.record is not None
    assert upd.record.name == "renamed"
    assert upd.record.first_seen == 10.0
    assert len(t) == 1
    assert IDS[0].cell_id in t


def test_replay_duplicate_stale_future() -> None:
    t = PeerTable(skew=120.0)
    add(t, beacon(seq=5), 0.0)
    cell = IDS[0].cell_id
    assert not t.check(cell, 5, WALL_MS, WALL_MS)
    assert not t.check(cell, 4, WALL_MS, WALL_MS)
    assert t.check(cell, 6, WALL_MS, WALL_MS)
    assert not t.check(cell, 6, WALL_MS - 120_001, WALL_MS)
    assert t.check(cell, 6, WALL_MS - 120_000, WALL_MS)
    assert not t.check(cell, 6, WALL_MS + 120_001, WALL_MS)
    assert t.check(IDS[1].cell_id, 0, WALL_MS, WALL_MS)  # unknown peer: any seq
    assert dict(t.drops) == {"duplicate": 1, "replay": 1, "stale": 1, "future": 1}


def test_expiry_after_three_announced_intervals() -> None:
    t = PeerTable(expiry_multiplier=3.0)
    add(t, beacon(0, interval_ms=5000), 0.0)
    add(t, beacon(1, interval_ms=20000), 0.0)
    assert t.next_expiry() == 15.0
    add(t, beacon(0, seq=2, interval_ms=5000), 4.0)  # a beacon pushes the deadline
    assert t.next_expiry() == 19.0
    assert t.expire(18.999) == []
    (gone,) = t.expire(19.0)
    assert gone.cell_id == IDS[0].cell_id
    assert gone.state is PeerState.EXPIRED
    assert t.next_expiry() == 60.0
    assert [r.cell_id for r in t.expire(1000.0)] == [IDS[1].cell_id]
    assert t.next_expiry() is None
    assert len(t) == 0


def test_announced_intervals_are_clamped() -> None:
    t = PeerTable(min_interval=0.1, max_interval=100.0)
    add(t, beacon(0, interval_ms=1), 0.0)
    add(t, beacon(1, interval_ms=2**32 - 1), 0.0)
    r0, r1 = t.get(IDS[0].cell_id), t.get(IDS[1].cell_id)
    assert r0 is not None
    assert r1 is not None
    assert (r0.interval, r1.interval) == (0.1, 100.0)


def test_tombstones_stop_replays_but_let_a_restarted_peer_back() -> None:
    t = PeerTable()
    add(t, beacon(seq=100), 0.0)
    t.expire(100.0)
    cell = IDS[0].cell_id
    assert not t.check(cell, 100, WALL_MS, WALL_MS)  # the old beacon replayed after expiry
    assert not t.check(cell, 50, WALL_MS - 1, WALL_MS)
    assert t.check(cell, 101, WALL_MS, WALL_MS)  # newer seq
    assert t.check(cell, 1, WALL_MS + 1, WALL_MS)  # restarted with a lower seq, later clock
    assert add(t, beacon(seq=1, timestamp_ms=WALL_MS + 1), 200.0) == "new"
    rec = t.get(cell)
    assert rec is not None
    assert rec.first_seen == 200.0  # seniority restarts
    assert t.remove(cell) is not None
    assert t.remove(cell) is None


def test_eviction_keeps_the_table_bounded_and_drops_the_least_recently_seen() -> None:
    t = PeerTable(max_peers=3)
    for i in range(3):
        add(t, beacon(i), float(i))
    add(t, beacon(0, seq=2), 5.0)  # peer 0 heard again: peer 1 is now the stalest
    upd = t.apply(beacon(3), 6.0, ADDR, b"s", 0)
    assert upd.kind == "new"
    assert upd.evicted is not None
    assert upd.evicted.cell_id == IDS[1].cell_id
    assert upd.evicted.state is PeerState.EVICTED
    assert len(t) == 3
    assert [r.cell_id for r in t.records()] == [IDS[0].cell_id, IDS[2].cell_id, IDS[3].cell_id]
    # the evicted peer's old beacon cannot come back as a replay
    assert not t.check(IDS[1].cell_id, 1, WALL_MS, WALL_MS)
    for i in range(4, 8):
        t.apply(beacon(i), 10.0 + i, ADDR, b"s", 0)
    assert len(t) == 3


def test_heap_stays_bounded_under_many_refreshes() -> None:
    t = PeerTable()
    add(t, beacon(0), 0.0)
    for seq in range(2, 2000):
        t.apply(beacon(0, seq=seq), float(seq), ADDR, b"static", 0)
    assert len(t._heap) <= 4 * len(t) + 65
    assert t.next_expiry() == 1999.0 + 15.0


def test_validation() -> None:
    with pytest.raises(ValueError, match="max_peers"):
        PeerTable(max_peers=0)
    with pytest.raises(ValueError, match="expiry_multiplier"):
        PeerTable(expiry_multiplier=0.5)
