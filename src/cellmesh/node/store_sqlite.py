"""The SQLite engine of channel logs and fold states (RedEX and CortEX on disk).

Every rule (delivery, forks, clocks, retention, verification) is in
`cellmesh.state.log.LogStoreBase`; this module only stores rows. One file holds the events, the
pending-dependency index, per-author bookkeeping, fork evidence, per-channel counters and
retention, and the fold states (`cellmesh.state.folds.FoldStateStore`).

Durability. The database runs in WAL mode with ``synchronous=FULL``: every transaction is one
``BEGIN IMMEDIATE ... COMMIT``, and SQLite writes the transaction's pages to the WAL file and
fsyncs it before COMMIT returns. `append` returns only after COMMIT has returned, so an
acknowledged event is on stable storage: it survives the process being killed (SIGKILL) at any
moment, and an operating-system crash or power loss too, provided the disk honours fsync.
A process killed during a transaction leaves a WAL tail without a commit record, which SQLite
ignores on the next open: the transaction is simply absent (never half-applied). Checkpoints
(copying the WAL back into the main file) run automatically every 1000 pages and fsync the main
file before the WAL is reused. The directory is fsynced once after the file is created (SQLite
itself does it when it creates the WAL). With ``synchronous="NORMAL"`` (a constructor option,
for bulk loads and benchmarks) commits are not fsynced: still safe against SIGKILL, but the last
transactions may be lost on power failure.

The database must have one writer process at a time (the node). Reads by other processes, e.g. a
CLI `log --verify` while the node runs, are fine in WAL mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from cellmesh.identity.cellid import CellId
from cellmesh.state.folds import SavedFold
from cellmesh.state.log import (
    DEFAULT_MAX_PENDING,
    KEEP_ALL,
    WAIT_HORIZON,
    WAIT_PREV,
    AuthorState,
    Fork,
    LogStoreBase,
    ProblemList,
    RawRow,
    Retention,
    Row,
    StoreError,
)

__all__ = ["SCHEMA_VERSION", "SqliteLogStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per stored event, pending (position NULL) or delivered.
CREATE TABLE IF NOT EXISTS events (
    id           BLOB PRIMARY KEY,       -- event id: BLAKE3 of `encoded`
    channel      TEXT NOT NULL,
    author       BLOB NOT NULL,          -- CellID
    seq          INTEGER NOT NULL,
    prev         BLOB NOT NULL,          -- id of the author's previous event on the channel
    clock        INTEGER NOT NULL,
    size         INTEGER NOT NULL,       -- length of `encoded`
    received     INTEGER NOT NULL,       -- arrival order at this store
    position     INTEGER,                -- delivery order (log position); NULL while pending
    delivered_ms INTEGER,                -- local time of delivery (age-based retention)
    encoded      BLOB NOT NULL,          -- the signed canonical encoding
    UNIQUE (channel, author, seq, id)    -- a fork is two ids at one (channel, author, seq)
);
CREATE INDEX IF NOT EXISTS events_by_position
    ON events (channel, position) WHERE position IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_pending
    ON events (channel, author, seq) WHERE position IS NULL;

-- What each pending event waits for: kind 0 = the author's event at exactly dep_seq,
-- kind 1 = dep_author's events up to dep_seq.
CREATE TABLE IF NOT EXISTS waiting (
    channel    TEXT NOT NULL,
    dep_author BLOB NOT NULL,
    kind       INTEGER NOT NULL,
    dep_seq    INTEGER NOT NULL,
    event_id   BLOB NOT NULL,
    PRIMARY KEY (channel, dep_author, kind, dep_seq, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS waiting_by_event ON waiting (event_id);

-- Retention floors: what retention dropped of each author's chain (written by retention only).
CREATE TABLE IF NOT EXISTS authors (
    channel         TEXT NOT NULL,
    author          BLOB NOT NULL,
    floor_seq       INTEGER NOT NULL,
    floor_max_clock INTEGER NOT NULL,
    floor           BLOB NOT NULL,       -- (id 32 bytes, clock u64) per dropped event at floor_seq
    PRIMARY KEY (channel, author)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS forks (
    channel        TEXT NOT NULL,
    author         BLOB NOT NULL,
    seq            INTEGER NOT NULL,
    first_id       BLOB NOT NULL,
    second_id      BLOB NOT NULL,
    first_encoded  BLOB NOT NULL,
    second_encoded BLOB NOT NULL,
    detected       INTEGER NOT NULL,     -- `received` of the second event
    PRIMARY KEY (first_id, second_id)
);
CREATE INDEX IF NOT EXISTS forks_by_channel ON forks (channel, detected);

-- Every channel seen, and its retention policy (NULL limits: keep all).
CREATE TABLE IF NOT EXISTS channels (
    channel    TEXT PRIMARY KEY,
    max_age_ms INTEGER,
    max_bytes  INTEGER
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS folds (
    channel  TEXT NOT NULL,
    name     TEXT NOT NULL,
    version  TEXT NOT NULL,
    position INTEGER NOT NULL,
    events   INTEGER NOT NULL,
    state    TEXT NOT NULL,
    PRIMARY KEY (channel, name)
) WITHOUT ROWID;
"""

_COLUMNS = ("id", "channel", "author", "seq", "prev", "clock", "size", "received", "position",
            "delivered_ms")  # fmt: skip
_ROW_COLUMNS = ", ".join(_COLUMNS)
_E_ROW_COLUMNS = ", ".join(f"e.{c}" for c in _COLUMNS)
_FLOOR_ENTRY = struct.Struct("!32sQ")
CACHE_ENTRIES = 4096
"""Each read cache is emptied when it reaches this many entries (bounded memory)."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _fsync_dir(path: Path) -> None:
    """Make a newly created file's directory entry durable (POSIX; a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _row(r: tuple[object, ...]) -> Row:
    """Build a `Row` from a SELECT of `_ROW_COLUMNS`, refusing values of the wrong type (a
    tampered file) with `StoreError` instead of letting them travel on."""
    eid, channel, author, seq, prev, clock, size, received, position, delivered_ms = r
    if not (
        isinstance(eid, bytes)
        and isinstance(channel, str)
        and isinstance(author, bytes)
        and isinstance(seq, int)
        and isinstance(prev, bytes)
        and isinstance(clock, int)
        and isinstance(size, int)
        and isinstance(received, int)
        and (position is None or isinstance(position, int))
        and (delivered_ms is None or isinstance(delivered_ms, int))
    ):
        raise StoreError("an events row holds values of the wrong type (database tampered?)")
    return Row(eid, channel, author, seq, prev, clock, size, received, position, delivered_ms)


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise StoreError("expected an integer column (database tampered?)")
    return value


class SqliteLogStore(LogStoreBase):
    """A durable `LogStore` (and `FoldStateStore`) in one SQLite file.

    `path` is created if missing (the node uses ``<home>/cellmesh.db``). `clock_ms` gives the
    local time recorded at delivery (default: the wall clock). Raises `StoreError` if the file
    cannot be opened as a cellmesh database. Use from one thread; close it (or use `with`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock_ms: Callable[[], int] = _wall_ms,
        max_pending: int = DEFAULT_MAX_PENDING,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        super().__init__(clock_ms=clock_ms, max_pending=max_pending)
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = Path(path)
        created = not self.path.exists()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        # A damaged file may hold text that is not UTF-8: keep it (as surrogates, which then
        # fail every comparison and get reported) instead of raising UnicodeDecodeError.
        self._db.text_factory = _lenient_text
        self._in_transaction = False
        self._position = self._received = 0
        self._deleted = False
        # Read caches: an append asks about the same few slots and authors again and again (its
        # prev, the heads its horizon names). Only this object writes the file, so they are kept
        # exact by the writes below; any deletion or rollback simply empties them.
        self._slot_cache: dict[tuple[str, bytes, int], list[Row]] = {}
        self._author_cache: dict[tuple[str, bytes], AuthorState] = {}
        self._pending_cache: dict[str, int] = {}
        self._known_channels: set[str] = set()
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode ({mode!r})")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._check_schema()
            # executescript commits any open transaction first, so the script carries its own.
            self._db.executescript(
                f"BEGIN IMMEDIATE;\n{_SCHEMA}\n"
                f"INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', {SCHEMA_VERSION});\n"
                "COMMIT;"
            )
            self._position = max(self._meta("last_position"), self._max("position"))
            self._received = max(self._meta("last_received"), self._max("received"))
        except (sqlite3.Error, StoreError, UnicodeDecodeError) as exc:
            self._db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open {self.path} as a cellmesh log: {exc}") from exc
        if created:
            _fsync_dir(self.path.absolute().parent)

    # -- plumbing ---------------------------------------------------------------------------

    def _q(
        self, sql: str, params: Iterable[object] | dict[str, object] = ()
    ) -> list[tuple[object, ...]]:
        args = params if isinstance(params, dict) else tuple(params)
        try:
            rows: list[tuple[object, ...]] = self._db.execute(sql, args).fetchall()
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            # UnicodeDecodeError: SQLite's own error message quoting damaged schema text.
            raise StoreError(f"{self.path}: {exc}") from exc
        return rows

    def _meta(self, key: str) -> int:
        rows = self._q("SELECT value FROM meta WHERE key = ?", (key,))
        return _int(rows[0][0]) if rows else 0

    def _max(self, column: str) -> int:
        rows = self._q(f"SELECT MAX({column}) FROM events")
        return 0 if rows[0][0] is None else _int(rows[0][0])

    def _check_schema(self) -> None:
        """Refuse, before writing anything, a file that holds another schema: a database of some
        other program, or of another version of this one."""
        tables = self._q("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not tables:
            return  # a new file
        try:
            rows = self._q("SELECT value FROM meta WHERE key = 'schema'")
        except StoreError:
            rows = []
        if not rows:
            raise StoreError(f"{self.path} is an SQLite database, but not a cellmesh log")
        if rows[0][0] != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {rows[0][0]!r} is not {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._in_transaction:
            yield  # nested: part of the outer transaction
            return
        before = (self._position, self._received)
        self._q("BEGIN IMMEDIATE")
        self._in_transaction = True
        self._deleted = False
        try:
            yield
            if self._deleted:
                # The counters are derived from the rows at open (MAX), so a deletion that may
                # remove the highest ones records them: positions must never be reused.
                self._q(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES "
                    "('last_position', ?), ('last_received', ?)",
                    (self._position, self._received),
                )
            self._q("COMMIT")  # returns once the WAL is fsynced (synchronous=FULL)
        except BaseException:
            self._position, self._received = before
            self._forget()
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False

    def _forget(self) -> None:
        """Empty the read caches (after a rollback or a deletion)."""
        self._slot_cache.clear()
        self._author_cache.clear()
        self._pending_cache.clear()
        self._known_channels.clear()

    def _close_engine(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- primitives -------------------------------------------------------------------------

    def _row(self, event_id: bytes) -> Row | None:
        rows = self._q(f"SELECT {_ROW_COLUMNS} FROM events WHERE id = ?", (event_id,))
        return _row(rows[0]) if rows else None

    def _rows_at(self, channel: str, author: bytes, seq: int) -> list[Row]:
        key = (channel, author, seq)
        cached = self._slot_cache.get(key)
        if cached is not None:
            return list(cached)
        rows = self._q(
            f"SELECT {_ROW_COLUMNS} FROM events WHERE channel = ? AND author = ? AND seq = ? "
            "ORDER BY received",
            (channel, author, seq),
        )
        result = [_row(r) for r in rows]
        if len(self._slot_cache) >= CACHE_ENTRIES:
            self._slot_cache.clear()
        self._slot_cache[key] = result
        return list(result)

    def _encoded(self, event_id: bytes) -> bytes | None:
        rows = self._q("SELECT encoded FROM events WHERE id = ?", (event_id,))
        if not rows:
            return None
        value = rows[0][0]
        if not isinstance(value, bytes):
            raise StoreError("stored event bytes are not a blob (database tampered?)")
        return value

    def _author(self, channel: str, author: bytes) -> AuthorState:
        key = (channel, author)
        cached = self._author_cache.get(key)
        if cached is None:
            cached = self._read_author(channel, author)
            if len(self._author_cache) >= CACHE_ENTRIES:
                self._author_cache.clear()
            self._author_cache[key] = cached
        return cached

    def _read_author(self, channel: str, author: bytes) -> AuthorState:
        # The highest delivered seq is read from the index, walking down from the top past any
        # pending rows; retention keeps each author's head, so it is never lost.
        top = self._q(
            "SELECT seq FROM events WHERE channel = ? AND author = ? AND position IS NOT NULL "
            "AND typeof(seq) = 'integer' ORDER BY seq DESC LIMIT 1",
            (channel, author),
        )
        upto = _int(top[0][0]) if top else 0
        rows = self._q(
            "SELECT floor_seq, floor_max_clock, floor FROM authors "
            "WHERE channel = ? AND author = ?",
            (channel, author),
        )
        if not rows:
            return AuthorState(upto)
        floor_seq, floor_clock, floor = rows[0]
        if not isinstance(floor, bytes) or len(floor) % _FLOOR_ENTRY.size:
            raise StoreError("an authors row is corrupt (database tampered?)")
        entries = tuple(_FLOOR_ENTRY.iter_unpack(floor))
        return AuthorState(max(upto, _int(floor_seq)), _int(floor_seq), _int(floor_clock), entries)

    def _put_floor(self, channel: str, author: bytes, state: AuthorState) -> None:
        floor = b"".join(_FLOOR_ENTRY.pack(i, c) for i, c in state.floor)
        self._q(
            "INSERT OR REPLACE INTO authors (channel, author, floor_seq, floor_max_clock, floor) "
            "VALUES (?, ?, ?, ?, ?)",
            (channel, author, state.floor_seq, state.floor_max_clock, floor),
        )
        self._author_cache.pop((channel, author), None)

    def _pending_count(self, channel: str) -> int:
        cached = self._pending_cache.get(channel)
        if cached is None:
            rows = self._q(
                "SELECT COUNT(*) FROM events WHERE channel = ? AND position IS NULL", (channel,)
            )
            cached = self._pending_cache[channel] = _int(rows[0][0])
        return cached

    def _note_delivered(self, row: Row) -> None:
        key = (row.channel, row.author)
        state = self._author_cache.get(key)
        if state is not None and row.seq > state.delivered_upto:
            self._author_cache[key] = dataclasses.replace(state, delivered_upto=row.seq)

    def _insert(self, row: Row, encoded: bytes) -> None:
        self._q(
            "INSERT INTO events (id, channel, author, seq, prev, clock, size, received, "
            "position, delivered_ms, encoded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.channel, row.author, row.seq, row.prev, row.clock, row.size,
             row.received, row.position, row.delivered_ms, encoded),
        )  # fmt: skip
        if row.channel not in self._known_channels:
            self._q("INSERT OR IGNORE INTO channels (channel) VALUES (?)", (row.channel,))
            self._known_channels.add(row.channel)
        slot = self._slot_cache.get((row.channel, row.author, row.seq))
        if slot is not None:
            slot.append(row)
        if row.position is None:
            if row.channel in self._pending_cache:
                self._pending_cache[row.channel] += 1
        else:
            self._note_delivered(row)

    def _deliver_row(self, row: Row, position: int, delivered_ms: int) -> None:
        self._q(
            "UPDATE events SET position = ?, delivered_ms = ? WHERE id = ?",
            (position, delivered_ms, row.id),
        )
        delivered = dataclasses.replace(row, position=position, delivered_ms=delivered_ms)
        slot = self._slot_cache.get((row.channel, row.author, row.seq))
        if slot is not None:
            slot[:] = [delivered if r.id == row.id else r for r in slot]
        if row.channel in self._pending_cache:
            self._pending_cache[row.channel] -= 1
        self._note_delivered(delivered)

    def _delete(self, event_id: bytes) -> None:
        self._q("DELETE FROM events WHERE id = ?", (event_id,))
        self._clear_waiting(event_id)
        self._deleted = True
        self._forget()  # deletions are rare (retention, dropped pending events)

    def _next_position(self) -> int:
        self._position += 1
        return self._position

    def _next_received(self) -> int:
        self._received += 1
        return self._received

    def _add_fork(self, fork: Fork, first: bytes, second: bytes) -> None:
        self._q(
            "INSERT OR IGNORE INTO forks (channel, author, seq, first_id, second_id, "
            "first_encoded, second_encoded, detected) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (fork.channel, bytes(fork.author), fork.seq, fork.first_id, fork.second_id,
             first, second, self._received),
        )  # fmt: skip

    def _fork_rows(self, channel: str) -> list[tuple[Fork, object, object]]:
        rows = self._q(
            "SELECT author, seq, first_id, second_id, first_encoded, second_encoded FROM forks "
            "WHERE channel = ? ORDER BY detected, first_id, second_id",
            (channel,),
        )
        out: list[tuple[Fork, object, object]] = []
        for author, seq, first_id, second_id, first, second in rows:
            if not (
                isinstance(author, bytes)
                and isinstance(seq, int)
                and isinstance(first_id, bytes)
                and isinstance(second_id, bytes)
            ):
                raise StoreError("a forks row is corrupt (database tampered?)")
            out.append((Fork(channel, CellId(author), seq, first_id, second_id), first, second))
        return out

    def _add_waiting(
        self, channel: str, event_id: bytes, deps: Iterable[tuple[bytes, int, int]]
    ) -> None:
        try:
            self._db.executemany(
                "INSERT OR IGNORE INTO waiting (channel, dep_author, kind, dep_seq, event_id) "
                "VALUES (?, ?, ?, ?, ?)",
                [(channel, author, kind, seq, event_id) for author, kind, seq in deps],
            )
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _clear_waiting(self, event_id: bytes) -> None:
        self._q("DELETE FROM waiting WHERE event_id = ?", (event_id,))

    def _waiters(self, channel: str, author: bytes, seq: int) -> list[bytes]:
        rows = self._q(
            "SELECT DISTINCT w.event_id FROM waiting w JOIN events e ON e.id = w.event_id "
            "WHERE w.channel = ? AND w.dep_author = ? AND ("
            "(w.kind = ? AND w.dep_seq = ?) OR (w.kind = ? AND w.dep_seq <= ?)) "
            "ORDER BY e.received",
            (channel, author, WAIT_PREV, seq, WAIT_HORIZON, seq),
        )
        return [r[0] for r in rows if isinstance(r[0], bytes)]

    def _pending_below(self, channel: str, author: bytes, seq: int) -> list[bytes]:
        rows = self._q(
            "SELECT id FROM events WHERE channel = ? AND author = ? AND seq <= ? "
            "AND position IS NULL",
            (channel, author, seq),
        )
        return [r[0] for r in rows if isinstance(r[0], bytes)]

    def _page_channel(self, channel: str, after: int, limit: int) -> list[tuple[Row, bytes]]:
        rows = self._q(
            f"SELECT {_ROW_COLUMNS}, encoded FROM events WHERE channel = ? "
            "AND position IS NOT NULL AND position > ? ORDER BY position LIMIT ?",
            (channel, after, limit),
        )
        return [self._with_bytes(r) for r in rows]

    def _page_author(
        self, channel: str, author: bytes, after: tuple[int, bytes], limit: int
    ) -> list[tuple[Row, bytes]]:
        rows = self._q(
            f"SELECT {_ROW_COLUMNS}, encoded FROM events WHERE channel = ? AND author = ? "
            "AND (seq, id) > (?, ?) ORDER BY seq, id LIMIT ?",
            (channel, author, after[0], after[1], limit),
        )
        return [self._with_bytes(r) for r in rows]

    @staticmethod
    def _with_bytes(r: tuple[object, ...]) -> tuple[Row, bytes]:
        encoded = r[-1]
        if not isinstance(encoded, bytes):
            raise StoreError("stored event bytes are not a blob (database tampered?)")
        return _row(r[:-1]), encoded

    def _page_raw(self, channel: str, after: tuple[object, ...] | None, limit: int) -> list[RawRow]:
        params: tuple[object, ...]
        if after is None:
            where, params = "channel = ?", (channel,)
        else:
            where, params = "channel = ? AND (author, seq, id) > (?, ?, ?)", (channel, *after)
        rows = self._q(
            "SELECT id, channel, author, seq, prev, clock, position, encoded FROM events "
            f"WHERE {where} ORDER BY author, seq, id LIMIT ?",
            (*params, limit),
        )
        return [RawRow(*r) for r in rows]

    def _head_rows(self, channel: str) -> list[Row]:
        # A skip scan over the (channel, author, seq, id) index finds the distinct authors in
        # O(authors * log n), then each author's top delivered seq is read from the same index.
        rows = self._q(
            "WITH RECURSIVE a(author) AS ("
            " SELECT MIN(author) FROM events WHERE channel = :ch"
            " UNION ALL"
            " SELECT (SELECT MIN(author) FROM events WHERE channel = :ch AND author > a.author)"
            " FROM a WHERE a.author IS NOT NULL)"
            f" SELECT {_E_ROW_COLUMNS} FROM a JOIN events e"
            " ON e.channel = :ch AND e.author = a.author AND e.position IS NOT NULL"
            " AND e.seq = (SELECT d.seq FROM events d WHERE d.channel = :ch"
            " AND d.author = a.author AND d.position IS NOT NULL ORDER BY d.seq DESC LIMIT 1)",
            {"ch": channel},
        )
        return [_row(r) for r in rows]

    def _channel_names(self) -> list[str]:
        rows = self._q(
            "SELECT channel FROM channels c WHERE EXISTS (SELECT 1 FROM events e "
            "WHERE e.channel = c.channel) OR EXISTS (SELECT 1 FROM forks f "
            "WHERE f.channel = c.channel)"
        )
        return [r[0] for r in rows if isinstance(r[0], str)]

    def _totals(self, channel: str) -> tuple[int, int, int, int]:
        # Counted on demand (one pass over the channel) rather than kept in a counter row that
        # every append would have to rewrite: a commit's cost grows with the pages it touches.
        delivered = self._q(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM events "
            "WHERE channel = ? AND position IS NOT NULL",
            (channel,),
        )
        forks = self._q("SELECT COUNT(*) FROM forks WHERE channel = ?", (channel,))
        return (
            _int(delivered[0][0]),
            _int(delivered[0][1]),
            self._pending_count(channel),
            _int(forks[0][0]),
        )

    def _get_retention(self, channel: str) -> Retention:
        rows = self._q("SELECT max_age_ms, max_bytes FROM channels WHERE channel = ?", (channel,))
        if not rows:
            return KEEP_ALL
        age, size = rows[0]
        if not (age is None or isinstance(age, int)) or not (size is None or isinstance(size, int)):
            raise StoreError("a channels row is corrupt (database tampered?)")
        try:
            return Retention(age, size)
        except ValueError as exc:
            raise StoreError(f"a channels row is corrupt: {exc}") from exc

    def _put_retention(self, channel: str, retention: Retention) -> None:
        self._q(
            "INSERT INTO channels (channel, max_age_ms, max_bytes) VALUES (?, ?, ?) "
            "ON CONFLICT (channel) DO UPDATE SET max_age_ms = excluded.max_age_ms, "
            "max_bytes = excluded.max_bytes",
            (channel, retention.max_age_ms, retention.max_bytes),
        )

    def _verify_engine(self, channel: str, problems: ProblemList) -> None:
        """SQLite's own structural check of every page (catches damage outside our rows)."""
        for (message,) in self._q("PRAGMA quick_check(20)"):
            if message != "ok":
                problems.add("storage", f"quick_check: {message}")

    # -- fold states (cellmesh.state.folds.FoldStateStore) ------------------------------------

    def load_fold(self, channel: str, name: str) -> SavedFold | None:
        """The saved state of fold `name` on `channel`, or None."""
        self._check_open()
        rows = self._q(
            "SELECT version, position, events, state FROM folds WHERE channel = ? AND name = ?",
            (channel, name),
        )
        if not rows:
            return None
        version, position, events, state = rows[0]
        if not (isinstance(version, str) and isinstance(state, str)):
            raise StoreError("a folds row is corrupt (database tampered?)")
        return SavedFold(version, _int(position), _int(events), state)

    def save_fold(self, channel: str, name: str, saved: SavedFold) -> None:
        """Replace the saved state of fold `name` on `channel` in one durable transaction."""
        self._check_open()
        with self._transaction():
            self._q(
                "INSERT OR REPLACE INTO folds (channel, name, version, position, events, state) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (channel, name, saved.version, saved.position, saved.events, saved.state),
            )

    def __enter__(self) -> SqliteLogStore:
        return self
