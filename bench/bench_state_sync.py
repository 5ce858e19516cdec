"""Sync between two running nodes: time and bytes to fill an empty replica, and to catch up a
replica that misses a few events, against copying the log over TCP+TLS in the same run.

Layout: two embedded `cellmesh.Node`s on loopback in one process (one event loop, so both
sides' CPU is serialised on one core: the figures are a lower bound of what two machines do).
The host's log holds N events (`--events`, default 100,000; `--quick` 20,000) of 4 authors,
each with a 100-byte payload, written before timing starts.

* fill: the replica subscribes to the channel with an empty database; the grant starts a sync
  session (node/state_sync.py) over a cellmesh stream. Timed from the subscription to the
  session's end, when every event is verified (signature, hash chain, clock) and durably stored
  (SQLite WAL, synchronous=FULL, one transaction per sync message).
* baseline ("copy the log over TLS"): asyncio TCP + TLS 1.3 on loopback; the server sends every
  encoded event of the channel, length-prefixed; the client appends them to an empty
  `SqliteLogStore` with the same verification and durability, in transactions of the same size
  (256 KiB of events). This is what a naive replica would do: no reconciliation, every byte.
* catch-up: the host then writes D = 10 more events while the replica is unsubscribed; a
  second session moves those. Bytes are compared with the fill (what "copy the log" would send
  again) and with the D events themselves.

Bytes are stream payload bytes (sync messages with their framing; TLS: the framed events), not
counting packet headers of either transport.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import struct
import sys
import tempfile
import time
from pathlib import Path

from _common import LOOPBACK, Metric, Result, Target, bench_main, print_header, report
from bench_bulk import TLS_NAME, self_signed_pem, tls_client_context, tls_server_context
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.node.state_sync import SyncReport
from cellmesh.node.store_sqlite import SqliteLogStore
from cellmesh.state.events import Event, create_event

BENCH = "bench_state_sync"
CHANNEL = "bench/log"
AUTHORS = 4
PAYLOAD = 100
BATCH_BYTES = 256 * 1024
_LEN = struct.Struct("!I")


def fill_host(path: Path, n: int) -> int:
    """Write `n` events of `AUTHORS` authors into a fresh log at `path`; returns their bytes."""
    authors = [Identity.generate() for _ in range(AUTHORS)]
    last: list[Event | None] = [None] * AUTHORS
    total = 0
    with SqliteLogStore(path) as store:
        batch: list[Event] = []
        for i in range(n):
            a = i % AUTHORS
            ev = create_event(
                authors[a],
                CHANNEL,
                os.urandom(PAYLOAD // 2).hex().encode(),
                last[a],
                [],
                1_700_000_000_000 + i,
            )
            last[a] = ev
            batch.append(ev)
            if len(batch) == 2000 or i == n - 1:
                for r in store.append_many(batch):
                    if not r.accepted:
                        raise RuntimeError(f"setup event refused: {r.reason} {r.detail}")
                batch.clear()
        total = store.stats(CHANNEL).bytes
    return total


def _cfg(db: Path, *channels: str) -> NodeConfig:
    return NodeConfig(
        listen=(f"{LOOPBACK}:0",), channels=channels, database=str(db), sync_interval=0
    )


async def _next_report(
    rep: Node, key: tuple[bytes, str], previous: SyncReport | None
) -> SyncReport:
    """The report of the next session with the host to end (polled: the bench has no hook)."""
    while (r := rep.state.sync.last_reports.get(key)) is None or r is previous:  # noqa: ASYNC110
        await asyncio.sleep(0.002)
    return r


async def ours(tmp: Path, host_db: Path, n: int, extra: int) -> dict[str, float]:
    host_id, rep_id = Identity.generate(), Identity.generate()
    out: dict[str, float] = {}
    async with (
        Node(host_id, _cfg(host_db, "bench/** open")) as host,
        Node(rep_id, _cfg(tmp / "replica.db")) as rep,
    ):
        h, p = host.local_addresses()[0]
        await rep.connect(f"{h}:{p}")
        t0 = time.perf_counter()
        await rep.channels.subscribe(host.cell_id, CHANNEL)
        key = (host.cell_id, CHANNEL)
        r = await _next_report(rep, key, None)
        elapsed = time.perf_counter() - t0
        held = rep.state.store.stats(CHANNEL).events
        if held != n or not r.complete:
            raise RuntimeError(f"fill left the replica with {held} of {n} events ({r})")
        out.update(
            fill_s=elapsed,
            fill_bytes=float(r.bytes_sent + r.bytes_received),
            fill_messages=float(r.messages),
        )
        # Catch-up: the replica stops listening, the host writes `extra` more events.
        rep.channels.unsubscribe(host.cell_id, CHANNEL)
        await asyncio.sleep(0.1)
        for i in range(extra):
            host.state.publish(CHANNEL, f"late {i}".encode())
        extra_bytes = sum(len(s.encoded) for s in host.state.log(CHANNEL)[-extra:])
        # The new grant starts the session (as for the fill): time it to its end.
        t1 = time.perf_counter()
        await rep.channels.subscribe(host.cell_id, CHANNEL)
        r2 = await _next_report(rep, key, r)
        out["catch_s"] = time.perf_counter() - t1
        held = rep.state.store.stats(CHANNEL).events
        if held != n + extra:
            raise RuntimeError(f"catch-up left the replica with {held} of {n + extra} events")
        out["catch_bytes"] = float(r2.bytes_sent + r2.bytes_received)
        out["extra_bytes"] = float(extra_bytes)
    return out


async def baseline(tmp: Path, host_db: Path, n: int) -> dict[str, float]:
    pem = self_signed_pem()
    source = SqliteLogStore(host_db)
    sent = 0

    async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        for eid, _ in source.id_clocks(CHANNEL):
            data = source.get_encoded(eid)
            assert data is not None
            w.write(_LEN.pack(len(data)) + data)
            sent += _LEN.size + len(data)
            if w.transport.get_write_buffer_size() > 1 << 20:
                await w.drain()
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, LOOPBACK, 0, ssl=tls_server_context(pem))
    port = server.sockets[0].getsockname()[1]
    dest = SqliteLogStore(tmp / "tls-replica.db")
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(
        LOOPBACK, port, ssl=tls_client_context(pem[0]), server_hostname=TLS_NAME
    )
    batch: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                head = await reader.readexactly(_LEN.size)
            except asyncio.IncompleteReadError:
                break
            data = await reader.readexactly(_LEN.unpack(head)[0])
            batch.append(data)
            size += len(data)
            if size >= BATCH_BYTES:
                dest.append_many(batch)
                batch, size = [], 0
        if batch:
            dest.append_many(batch)
    except (ssl.SSLError, ConnectionError):
        pass
    elapsed = time.perf_counter() - t0
    writer.close()
    server.close()
    held = dest.stats(CHANNEL).events
    dest.close()
    source.close()
    if held != n:
        raise RuntimeError(f"TLS copy stored {held} of {n} events")
    return {"fill_s": elapsed, "fill_bytes": float(sent)}


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=None, help="events in the host's log")


def run(args: argparse.Namespace) -> int:
    n = args.events or (20_000 if args.quick else 100_000)
    extra = 10
    print_header(BENCH, f"{n:,} events of {AUTHORS} authors, {PAYLOAD}-byte payloads")
    with tempfile.TemporaryDirectory(prefix="cellmesh-bench-") as tmpdir:
        tmp = Path(tmpdir)
        host_db = tmp / "host.db"
        t = time.perf_counter()
        log_bytes = fill_host(host_db, n)
        print(
            f"  (setup: {n:,} events, {log_bytes:,} B written in {time.perf_counter() - t:.1f} s)"
        )
        base = asyncio.run(baseline(tmp, host_db, n))
        mine = asyncio.run(ours(tmp, host_db, n, extra))
    report(
        Result(
            BENCH,
            f"fill an empty replica with {n:,} events between two nodes",
            "subscribe; sync session over a cellmesh stream; verify; store durably",
            "copy every encoded event over asyncio TCP+TLS 1.3; verify; store durably",
            [
                Metric("time", mine["fill_s"], base["fill_s"], "s", "lower"),
                Metric("events per second", n / mine["fill_s"], n / base["fill_s"], "/s", "higher"),
                Metric("bytes", mine["fill_bytes"], base["fill_bytes"], "B", "lower"),
            ],
            targets=[
                Target(
                    "bytes within 5% of copying the log",
                    mine["fill_bytes"] < 1.05 * base["fill_bytes"],
                )
            ],
            notes=[
                f"log: {log_bytes:,} B of encoded events; sync messages: {mine['fill_messages']:.0f}"
            ],
        ),
        args.json,
        args.quick,
    )
    report(
        Result(
            BENCH,
            f"catch up {extra} new events in a log of {n:,}",
            "sync session (range fingerprints, then the missing events)",
            "copy the log again over TLS (the fill above)",
            [
                Metric("bytes", mine["catch_bytes"], base["fill_bytes"], "B", "lower"),
                Metric("time", mine["catch_s"], base["fill_s"], "s", "lower"),
            ],
            targets=[Target("under 50,000 bytes", mine["catch_bytes"] < 50_000)],
            notes=[
                f"the {extra} events themselves: {mine['extra_bytes']:,.0f} B; "
                f"sync moved {mine['catch_bytes'] / max(mine['extra_bytes'], 1):.1f}x that"
            ],
        ),
        args.json,
        args.quick,
    )
    return 0


def main() -> int:
    return bench_main(BENCH, __doc__, options, run)


if __name__ == "__main__":
    sys.exit(main())
