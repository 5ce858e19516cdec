"""SqliteLogStore: persistence, and tampering with the database file (detected, reported, never
a crash)."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from pathlib import Path

import pytest

from cellmesh.errors import CellmeshError
from cellmesh.identity.keys import Identity
from cellmesh.node.store_sqlite import SqliteLogStore
from cellmesh.state.events import (
    Event,
    create_event,
    encode_event,
    event_id,
    event_id_of_encoding,
)
from cellmesh.state.log import AppendStatus, Retention, StoreError

CH = "app/ledger"
MARK = b"MARK-%03d-PAYLOAD"


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


def chain(who: Identity, n: int, start: Event | None = None) -> list[Event]:
    out: list[Event] = []
    prev = start
    for i in range(n):
        prev = create_event(who, CH, MARK % i, prev, (), i)
        out.append(prev)
    return out


def filled(path: Path, alice: Identity, bob: Identity) -> tuple[list[Event], list[Event]]:
    a_events, b_events = chain(alice, 8), chain(bob, 3)
    with SqliteLogStore(path, synchronous="NORMAL") as store:
        store.append_many(a_events + b_events)
        twin = create_event(alice, CH, b"twin", a_events[2], (), 0)
        assert store.append(twin).status is AppendStatus.FORK
        assert store.verify_chain(CH) == []
    return a_events, b_events


def tamper(path: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute(sql, params)
    db.close()


def kinds(path: Path) -> set[str]:
    with SqliteLogStore(path) as store:
        return {p.kind for p in store.verify_chain(CH)}


def test_reopen_keeps_everything(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "log.db"
    a_events, _ = filled(path, alice, bob)
    with SqliteLogStore(path) as store:
        assert store.stats(CH).events == 12
        assert len(store.forks(CH)) == 1
        heads = {bytes(h.author): h.seq for h in store.heads(CH)}
        assert heads == {alice.cell_id: 8, bob.cell_id: 3}
        nxt = create_event(alice, CH, b"", a_events[-1], (), 0)
        assert store.append(nxt).position == 13
        assert store.verify_chain(CH) == []
    assert (tmp_path / "log.db-wal").exists() or path.stat().st_size > 0


def test_failed_transaction_leaves_nothing_behind(
    tmp_path: Path, alice: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = chain(alice, 4)
    with SqliteLogStore(tmp_path / "log.db") as store:
        store.append(events[0])
        real_insert = store._insert
        calls = []

        def failing_insert(row: object, encoded: bytes) -> None:
            calls.append(row)
            if len(calls) == 2:
                raise StoreError("disk full (simulated)")
            real_insert(row, encoded)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "_insert", failing_insert)
        with pytest.raises(StoreError, match="simulated"):
            store.append_many(events[1:])
        monkeypatch.setattr(store, "_insert", real_insert)
        assert store.get(event_id(events[1])) is None  # rolled back with the rest
        assert store.append(events[2]).status is AppendStatus.PENDING  # e2 is not there
        r = store.append(events[1])
        assert (r.position, len(r.delivered)) == (2, 2)  # positions were not consumed
        assert store.verify_chain(CH) == []
        with pytest.raises(TypeError):
            store.append_many([events[3], "junk"])  # type: ignore[list-item]
        assert store.get(event_id(events[3])) is None


def test_wal_and_full_sync_are_in_force(tmp_path: Path) -> None:
    with SqliteLogStore(tmp_path / "log.db") as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(ValueError, match="synchronous"):
        SqliteLogStore(tmp_path / "x.db", synchronous="OFF")  # type: ignore[arg-type]


def test_positions_are_never_reused_after_retention(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    events = chain(alice, 4)
    twin = create_event(alice, CH, b"twin", events[0], (), 0)
    with SqliteLogStore(path) as store:
        store.append_many(events)
        assert store.append(twin).position == 5  # a fork branch, not the author's head
        store.set_retention(CH, Retention(max_bytes=0))
        assert store.apply_retention(CH, 0).events == 4  # twin (position 5) included
    with SqliteLogStore(path) as store:
        more = create_event(alice, CH, b"", events[-1], (), 0)
        assert store.append(more).position == 6
        assert store.retention(CH) == Retention(max_bytes=0)


def test_edited_bytes_are_detected(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "log.db"
    a_events, _ = filled(path, alice, bob)
    victim = event_id(a_events[4])
    raw = bytearray(encode_event(a_events[4]))
    raw[-70] ^= 0x20  # inside the payload
    tamper(path, "UPDATE events SET encoded = ? WHERE id = ?", bytes(raw), victim)
    with SqliteLogStore(path) as store:
        problems = store.verify_chain(CH)
    # The edited row cannot be trusted, so the next event's link has nothing to stand on.
    assert [(p.kind, p.event_id) for p in problems] == [
        ("id_mismatch", victim),
        ("broken_chain", event_id(a_events[5])),
    ]


def test_rewritten_event_with_new_id_breaks_signature_and_chain(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    path = tmp_path / "log.db"
    a_events, _ = filled(path, alice, bob)
    victim = a_events[4]
    forged = encode_event(
        create_event(Identity.generate(), CH, b"x", None, (), 0)
    )  # a valid event, but not alice's seq 5
    tamper(path, "UPDATE events SET encoded = ? WHERE id = ?", forged, event_id(victim))
    assert "id_mismatch" in kinds(path)
    # Now make it self-consistent: id = hash of the forged-but-resigned-by-nobody bytes.
    raw = bytearray(encode_event(victim))
    raw[-70] ^= 0x20
    tamper(
        path,
        "UPDATE events SET encoded = ?, id = ? WHERE id = ?",
        bytes(raw),
        event_id_of_encoding(bytes(raw)),
        event_id(victim),
    )
    assert {"bad_signature", "broken_chain"} <= kinds(path)


def test_deleted_and_edited_rows_are_detected(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    path = tmp_path / "log.db"
    a_events, b_events = filled(path, alice, bob)
    tamper(path, "DELETE FROM events WHERE id = ?", event_id(a_events[5]))
    assert kinds(path) == {"broken_chain"}
    tamper(path, "UPDATE events SET seq = 99 WHERE id = ?", event_id(b_events[1]))
    assert "column_mismatch" in kinds(path)
    tamper(path, "UPDATE events SET channel = 'elsewhere' WHERE id = ?", event_id(b_events[0]))
    assert "broken_chain" in kinds(path)  # b2's prev vanished from the channel


def test_wrong_types_in_columns_are_reported_not_crashed(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    path = tmp_path / "log.db"
    a_events, _ = filled(path, alice, bob)
    tamper(path, "UPDATE events SET encoded = 'text' WHERE id = ?", event_id(a_events[1]))
    tamper(path, "UPDATE events SET seq = 'abc' WHERE id = ?", event_id(a_events[6]))
    tamper(path, "UPDATE events SET position = -5 WHERE id = ?", event_id(a_events[7]))
    with SqliteLogStore(path) as store:
        found = {p.kind for p in store.verify_chain(CH)}
        assert {"undecodable", "column_mismatch"} <= found
        # Other calls fail with a StoreError, not a TypeError or a sqlite3 error.
        for call in (
            lambda: list(store.iter_channel(CH)),
            lambda: list(store.range(CH, alice.cell_id)),
            lambda: store.heads(CH),
        ):
            with contextlib.suppress(StoreError):
                call()
        nxt = create_event(alice, CH, b"", a_events[-1], (), 0)
        with contextlib.suppress(StoreError):
            store.append(nxt)


def test_fork_evidence_tampering_is_detected(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    path = tmp_path / "log.db"
    filled(path, alice, bob)
    tamper(path, "UPDATE forks SET second_encoded = first_encoded")
    assert kinds(path) == {"fork_evidence"}


def _checkpointed(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def test_flipped_bytes_in_the_file_are_detected(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    path = tmp_path / "log.db"
    a_events, _ = filled(path, alice, bob)
    _checkpointed(path)
    data = bytearray(path.read_bytes())
    where = data.find(MARK % 3)
    assert where > 0
    data[where + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with SqliteLogStore(path) as store:
        problems = store.verify_chain(CH)
    assert ("id_mismatch", event_id(a_events[3])) in [(p.kind, p.event_id) for p in problems]


@pytest.mark.parametrize("seed", range(12))
def test_random_damage_never_crashes(
    tmp_path: Path, alice: Identity, bob: Identity, seed: int
) -> None:
    path = tmp_path / "log.db"
    filled(path, alice, bob)
    _checkpointed(path)
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(rng.choice([1, 8, 64])):
        data[rng.randrange(100, len(data))] ^= rng.randrange(1, 256)  # past the file header
    path.write_bytes(bytes(data))
    try:
        store = SqliteLogStore(path)
    except StoreError:
        return  # refused to open: a clear error, not a crash
    try:
        for channel in [CH, *store.channels()]:
            problems = store.verify_chain(channel)
            assert all(isinstance(p.kind, str) for p in problems)
    except StoreError:
        pass  # e.g. listing channels hit a damaged page
    finally:
        store.close()


def test_unusable_files_raise_store_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError):
        SqliteLogStore(junk)
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema', 99)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema"):
        SqliteLogStore(other)
    foreign = tmp_path / "foreign.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a cellmesh log"):
        SqliteLogStore(foreign)
    db = sqlite3.connect(foreign)  # left untouched: no tables of ours were added
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert names == {"photos"}
    with pytest.raises(StoreError):
        SqliteLogStore(tmp_path / "no" / "such" / "dir" / "x.db")
    assert issubclass(StoreError, CellmeshError)
