"""Durable channel-log appends per second (acknowledged: after the durable commit) against raw
SQLite inserts with the same durability, in the same run.

Cases (single process, one file each in a fresh temporary directory on the same filesystem):

* single: `SqliteLogStore.append(event)` one event per call, i.e. one transaction per event:
  decode checks, signature verification, duplicate/fork/chain/clock checks, the insert, and the
  COMMIT, which with WAL + synchronous=FULL returns only once the WAL is fsynced. Baseline: raw
  sqlite3, same journal_mode=WAL and synchronous=FULL, a table (id BLOB PRIMARY KEY, encoded BLOB),
  one `BEGIN IMMEDIATE; INSERT; COMMIT` per row, inserting the same ids and bytes.
* batch: `SqliteLogStore.append_many(64 events)`, one durable commit per batch (group commit);
  baseline: 64 raw inserts per transaction.
* single, synchronous=NORMAL (for information: no fsync per commit, so it shows the CPU cost of
  our checks against a raw insert; not durable against power loss).

The events (one author's chain on one channel, 200-byte random payloads, each naming 4 other
authors in its horizon) are created and signed before the timing: signing is the publisher's
cost, not the log's; its rate is printed apart. The cases are interleaved call by call (one
append of ours, one insert of the baseline, ...), in rounds, so that disk and CPU noise on a
shared machine hits both sides alike (fsync latency on a shared disk moves in phases); rates are
the total over all rounds (acknowledged appends / seconds).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    Metric,
    Result,
    exit_on_sigterm,
    parse_args,
    percentile,
    print_header,
    report,
)
from cellmesh.identity.keys import Identity
from cellmesh.node.store_sqlite import SqliteLogStore
from cellmesh.state.events import Event, create_event, encode_event, event_id
from cellmesh.state.log import AppendStatus

BENCH = "bench_state_append"
CHANNEL = "bench/append"
PAYLOAD = 200
BATCH = 64
OTHERS = 4


def make_events(n: int, seed_byte: int) -> list[Event]:
    """`n` chained events by one author, each with a horizon naming `OTHERS` other authors."""
    me = Identity.from_secret(bytes([seed_byte]) * 64)
    others = [create_event(Identity.generate(), CHANNEL, b"", None, (), 0) for _ in range(OTHERS)]
    out: list[Event] = []
    prev = None
    for i in range(n):
        prev = create_event(me, CHANNEL, os.urandom(PAYLOAD), prev, others, i)
        out.append(prev)
    return [*others, *out]


class Raw:
    """The baseline: plain sqlite3 inserts with the same durability settings."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        if self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise RuntimeError("raw baseline: SQLite refused WAL mode")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("CREATE TABLE events (id BLOB PRIMARY KEY, encoded BLOB NOT NULL)")

    def insert(self, rows: list[tuple[bytes, bytes]]) -> None:
        """One transaction for `rows`; returns after COMMIT (durable with FULL)."""
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO events (id, encoded) VALUES (?, ?)", rows)
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class Case:
    """One side of a comparison: a function appending a chunk of prepared items, timed."""

    def __init__(self, name: str, step: Callable[[int], int]) -> None:
        self.name = name
        self.step = step
        self.seconds = 0.0
        self.count = 0
        self.latencies: list[float] = []

    def once(self) -> None:
        t0 = time.perf_counter()
        n = self.step(self.count)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.count += n
        self.latencies.append(dt)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def ours_single(store: SqliteLogStore, events: list[Event]) -> Callable[[int], int]:
    def step(done: int) -> int:
        r = store.append(events[done])
        if r.status is not AppendStatus.NEW:
            raise RuntimeError(f"append was not NEW: {r}")
        return 1

    return step


def ours_batch(store: SqliteLogStore, events: list[Event]) -> Callable[[int], int]:
    def step(done: int) -> int:
        results = store.append_many(events[done : done + BATCH])
        if any(r.status is not AppendStatus.NEW for r in results):
            raise RuntimeError("a batched append was not NEW")
        return len(results)

    return step


def raw_step(raw: Raw, rows: list[tuple[bytes, bytes]], size: int) -> Callable[[int], int]:
    def step(done: int) -> int:
        raw.insert(rows[done : done + size])
        return size

    return step


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for the database files (default: a temporary directory)",
    )


def run(args: argparse.Namespace) -> int:
    rounds, singles, batches = (3, 60, 4) if args.quick else (7, 250, 12)
    print_header(
        BENCH,
        f"{rounds} rounds; per round {singles} single appends and {batches} batches of {BATCH}",
    )
    t_start = time.monotonic()
    n_single, n_batch = rounds * singles, rounds * batches * BATCH
    t0 = time.perf_counter()
    single_events = make_events(n_single, 1)
    batch_events = make_events(n_batch, 2)
    normal_events = make_events(n_single, 3)
    sign_rate = (n_single * 2 + n_batch) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-state-") as tmp:
        root = Path(tmp)
        stores = {
            "single": SqliteLogStore(root / "single.db"),
            "batch": SqliteLogStore(root / "batch.db"),
            "normal": SqliteLogStore(root / "normal.db", synchronous="NORMAL"),
        }
        raws = {
            "single": Raw(root / "raw-single.db", "FULL"),
            "batch": Raw(root / "raw-batch.db", "FULL"),
            "normal": Raw(root / "raw-normal.db", "NORMAL"),
        }
        try:
            # The horizon's authors go in first (outside the timing), so every timed event is
            # delivered at once rather than held pending.
            for key, evs in (("single", single_events), ("batch", batch_events),
                             ("normal", normal_events)):  # fmt: skip
                stores[key].append_many(evs[:OTHERS])
            rows = {
                key: [(event_id(e), encode_event(e)) for e in evs[OTHERS:]]
                for key, evs in (("single", single_events), ("batch", batch_events),
                                 ("normal", normal_events))
            }  # fmt: skip
            pairs = {
                "single": (
                    Case("ours", ours_single(stores["single"], single_events[OTHERS:])),
                    Case("raw", raw_step(raws["single"], rows["single"], 1)),
                    singles,
                ),
                "batch": (
                    Case("ours", ours_batch(stores["batch"], batch_events[OTHERS:])),
                    Case("raw", raw_step(raws["batch"], rows["batch"], BATCH)),
                    batches,
                ),
                "normal": (
                    Case("ours", ours_single(stores["normal"], normal_events[OTHERS:])),
                    Case("raw", raw_step(raws["normal"], rows["normal"], 1)),
                    singles,
                ),
            }
            for _ in range(rounds):
                for ours, raw, calls in pairs.values():
                    # Call by call, not block by block: fsync latency on a shared disk moves in
                    # phases, and alternating puts both sides in the same ones.
                    for _ in range(calls):
                        ours.once()
                        raw.once()
            for key in ("single", "normal"):
                if stores[key].verify_chain(CHANNEL):
                    raise RuntimeError(f"{key}: verify_chain found problems after the run")
        finally:
            for s in stores.values():
                s.close()
            for r in raws.values():
                r.close()

    def lat(c: Case, q: float) -> float:
        return percentile(c.latencies, q)

    ours, raw, _ = pairs["single"]
    report(
        Result(
            bench=BENCH,
            case="durable appends, one per transaction (WAL, synchronous=FULL)",
            ours="SqliteLogStore.append(event): verify, chain/fork/clock checks, insert, fsynced COMMIT",
            baseline="raw sqlite3 INSERT (id, bytes), one row per fsynced COMMIT, same settings",
            metrics=[
                Metric("acknowledged appends/s", ours.rate, raw.rate, "/s", "higher"),
                Metric("latency median", lat(ours, 50), lat(raw, 50), "us", "lower"),
                Metric("latency p99", lat(ours, 99), lat(raw, 99), "us", "lower"),
            ],
            notes=[
                f"{ours.count:,} events of {PAYLOAD} B payload, horizon of {OTHERS}; "
                f"signing (not timed) ran at {sign_rate:,.0f} events/s",
            ],
            extra={"ours": ours.rate, "raw": raw.rate, "events": ours.count},
        ),
        args.json,
        args.quick,
    )
    ours_b, raw_b, _ = pairs["batch"]
    report(
        Result(
            bench=BENCH,
            case=f"group commit: batches of {BATCH} per transaction (WAL, synchronous=FULL)",
            ours=f"SqliteLogStore.append_many({BATCH} events), one fsynced COMMIT",
            baseline=f"raw sqlite3, {BATCH} INSERTs per fsynced COMMIT",
            metrics=[
                Metric("acknowledged appends/s", ours_b.rate, raw_b.rate, "/s", "higher"),
                Metric("batch latency median", lat(ours_b, 50), lat(raw_b, 50), "ms", "lower"),
            ],
            notes=[f"single appends ran at {ours.rate:,.0f}/s in the same run"],
            extra={"ours": ours_b.rate, "raw": raw_b.rate, "events": ours_b.count},
        ),
        args.json,
        args.quick,
    )
    ours_n, raw_n, _ = pairs["normal"]
    report(
        Result(
            bench=BENCH,
            case="CPU cost: one per transaction, synchronous=NORMAL (no fsync; information)",
            ours="SqliteLogStore(synchronous='NORMAL').append(event)",
            baseline="raw sqlite3 INSERT, one row per COMMIT, synchronous=NORMAL",
            metrics=[
                Metric("appends/s", ours_n.rate, raw_n.rate, "/s", "higher"),
                Metric("latency median", lat(ours_n, 50), lat(raw_n, 50), "us", "lower"),
            ],
            notes=["not durable against power loss: shows what our checks cost without the fsync"],
            extra={"ours": ours_n.rate, "raw": raw_n.rate, "events": ours_n.count},
        ),
        args.json,
        args.quick,
    )
    print(
        f"\n{BENCH} summary: durable appends {ours.rate:,.0f}/s = {ours.rate / raw.rate:.2f}x raw "
        f"SQLite ({raw.rate:,.0f}/s); batched {ours_b.rate:,.0f}/s = "
        f"{ours_b.rate / raw_b.rate:.2f}x raw batched ({raw_b.rate:,.0f}/s)"
    )
    print(f"({time.monotonic() - t_start:.1f} s)")
    return 0


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH, options)
    try:
        return run(args)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"\n{BENCH}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
