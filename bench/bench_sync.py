"""Anti-entropy sync: time and bytes to fill an empty replica, and bytes to reconcile a small
difference in a large set, against naive exchanges measured in the same run.

Layout: one process, no sockets. Both replicas are `MemorySyncStore`s and the sync messages pass
between two `SyncSession`s in a loop, so the figures are protocol cost (bytes on the wire, CPU
time of both sides together), not network time. Events are 200 bytes (an 8-byte key, the rest
BLAKE3-XOF filler), keyed 10 ms apart; the differing events get keys scattered over the whole
range, between shared events (the expensive case: every difference in a different range).

* fill: 100,000 events (`--quick`: 20,000) to an empty replica.
  - ours: one `SyncSession` (the empty side initiates), default settings (60,000-byte messages).
  - baseline ("send everything"): the source frames every event (varint length + bytes) into
    60,000-byte messages, the replica decodes them and adds each event to its store.
* diff D (D = 10, 100, 1,000; `--quick`: 10, 100): two replicas share 100,000 events and each
  has D/2 events the other lacks.
  - ours: one `SyncSession`.
  - baseline ("send every id"): A sends the ids of all its events (32 bytes each); B answers with
    the events A lacks and the ids of those B lacks; A sends those events. This is the cheapest
    exchange that does not summarise: its bytes grow with the set, ours with the difference.

Time includes the store work on both sides (hashing every received event, index updates).
Bytes are whole messages (the sync framing is included; transport headers are not).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import blake3

from _common import Metric, Result, Target, bench_main, print_header, report
from cellmesh.state.sync import MemorySyncStore, SyncRole, SyncSession, SyncSettings
from cellmesh.state.sync_messages import pull_varint, push_varint

BENCH = "bench_sync"
EVENT_SIZE = 200
T0 = 1_700_000_000_000
MESSAGE = 60_000
ID_LEN = 32


def make_events(seed: int, keys: list[int]) -> list[bytes]:
    """One 200-byte event per key: the key (u64 big-endian) and BLAKE3-XOF filler."""
    step = EVENT_SIZE - 8
    stream = blake3.blake3(seed.to_bytes(8, "big")).digest(length=len(keys) * step)
    return [k.to_bytes(8, "big") + stream[i * step : (i + 1) * step] for i, k in enumerate(keys)]


def store_of(events: list[bytes]) -> MemorySyncStore:
    s = MemorySyncStore()
    for e in events:
        s.add_encoded(e)
    # The index sorts and sums lazily, on the first query: that cost lands in the timed sync
    # (a live store pays it once per batch of arrivals too).
    return s


def sync(a: MemorySyncStore, b: MemorySyncStore) -> tuple[float, int, int]:
    """Run one session, `a` initiating: (seconds, bytes, messages)."""
    cfg = SyncSettings(max_message_size=MESSAGE)
    t0 = time.perf_counter()
    ia = SyncSession(a, SyncRole.INITIATOR, 0.0, cfg)
    rb = SyncSession(b, SyncRole.RESPONDER, 0.0, cfg)
    pending = [ia.start()]
    sides = (rb, ia)
    n = 0
    while pending:
        pending = sides[n % 2].receive(pending[0])
        n += 1
    dt = time.perf_counter() - t0
    if not (ia.complete and rb.complete):
        raise RuntimeError("sync session did not complete")
    return dt, ia.bytes_sent + ia.bytes_received, n


def frame_events(events: list[bytes]) -> list[bytes]:
    """Naive framing: events as (varint length, bytes), packed into MESSAGE-byte messages."""
    out: list[bytes] = []
    cur = bytearray()
    for e in events:
        rec = push_varint(len(e)) + e
        if len(cur) + len(rec) > MESSAGE:
            out.append(bytes(cur))
            cur = bytearray()
        cur += rec
    if cur:
        out.append(bytes(cur))
    return out


def unframe_into(msgs: list[bytes], dst: MemorySyncStore) -> None:
    for m in msgs:
        off = 0
        while off < len(m):
            n, off = pull_varint(m, off)
            dst.add_encoded(m[off : off + n])
            off += n


def naive_fill(src: MemorySyncStore, dst: MemorySyncStore) -> tuple[float, int, int]:
    """Send everything: (seconds, bytes, messages)."""
    t0 = time.perf_counter()
    events = [src.get_encoded(i) or b"" for i in src.ids()]
    msgs = frame_events(events)
    unframe_into(msgs, dst)
    return time.perf_counter() - t0, sum(map(len, msgs)), len(msgs)


def naive_diff(a: MemorySyncStore, b: MemorySyncStore) -> tuple[float, int, int]:
    """Send every id, then the events each side lacks: (seconds, bytes, messages)."""
    t0 = time.perf_counter()
    ids_a = b"".join(sorted(a.ids()))  # message 1 (in MESSAGE-sized pieces on a real link)
    theirs = {ids_a[i : i + ID_LEN] for i in range(0, len(ids_a), ID_LEN)}
    mine = b.ids()
    a_lacks = sorted(mine - theirs)
    b_lacks = sorted(theirs - mine)
    reply_events = frame_events([b.get_encoded(i) or b"" for i in a_lacks])
    reply_ids = b"".join(b_lacks)
    unframe_into(reply_events, a)
    wanted = {reply_ids[i : i + ID_LEN] for i in range(0, len(reply_ids), ID_LEN)}
    final = frame_events([a.get_encoded(i) or b"" for i in sorted(wanted)])
    unframe_into(final, b)
    dt = time.perf_counter() - t0
    nbytes = len(ids_a) + sum(map(len, reply_events)) + len(reply_ids) + sum(map(len, final))
    messages = -(-len(ids_a) // MESSAGE) + len(reply_events) + 1 + len(final)
    if a.ids() != b.ids():
        raise RuntimeError("naive exchange did not converge")
    return dt, nbytes, messages


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=None, help="events in the large set")


def run(args: argparse.Namespace) -> int:
    n = args.events or (20_000 if args.quick else 100_000)
    diffs = (10, 100) if args.quick else (10, 100, 1_000)
    print_header(BENCH, f"{n:,} events of {EVENT_SIZE} B, {MESSAGE:,}-byte messages")
    base_keys = [T0 + 10 * i for i in range(n)]
    base = make_events(1, base_keys)

    # ---------------------------------------------------------------- fill an empty replica
    src = store_of(base)
    dst = MemorySyncStore()
    t_ours, b_ours, m_ours = sync(dst, src)
    if dst.ids() != src.ids():
        raise RuntimeError("fill did not copy every event")
    dst2 = MemorySyncStore()
    t_naive, b_naive, m_naive = naive_fill(src, dst2)
    report(
        Result(
            BENCH,
            f"fill an empty replica with {n:,} events",
            "SyncSession, empty side initiates",
            "send everything: framed events in 60,000-byte messages",
            [
                Metric("time", t_ours, t_naive, "s", "lower"),
                Metric("events per second", n / t_ours, n / t_naive, "/s", "higher"),
                Metric("bytes", float(b_ours), float(b_naive), "B", "lower"),
                Metric("messages", float(m_ours), float(m_naive), "", "lower"),
            ],
            targets=[Target("bytes within 3% of sending everything", b_ours < 1.03 * b_naive)],
            notes=[f"payload: {n * EVENT_SIZE:,} B of events"],
        ),
        args.json,
        args.quick,
    )

    # ---------------------------------------------------------------- small differences
    summary: list[tuple[int, int, int, float, float]] = []
    for d in diffs:
        rng = random.Random(d)
        extra = make_events(1000 + d, [T0 + 10 * rng.randrange(n) + 5 for _ in range(d)])

        def pair(
            base: list[bytes] = base, extra: list[bytes] = extra
        ) -> tuple[MemorySyncStore, MemorySyncStore]:
            a, b = store_of(base), store_of(base)
            for i, e in enumerate(extra):
                (a if i % 2 else b).add_encoded(e)
            return a, b

        a, b = pair()
        t_o, b_o, m_o = sync(a, b)
        a, b = pair()
        t_n, b_n, m_n = naive_diff(a, b)
        summary.append((d, b_o, b_n, t_o, t_n))
        targets = [Target("under 50,000 bytes", b_o < 50_000)] if d == 10 else []
        report(
            Result(
                BENCH,
                f"reconcile {d:,} differences in {n:,} events",
                "SyncSession (fingerprints of ranges, then the missing events)",
                "send every id, then the missing events",
                [
                    Metric("bytes", float(b_o), float(b_n), "B", "lower"),
                    Metric("time", t_o, t_n, "s", "lower"),
                    Metric("messages", float(m_o), float(m_n), "", "lower"),
                ],
                targets=targets,
                notes=[
                    f"ours: {b_o / d:,.0f} B per difference "
                    f"({b_o / d / EVENT_SIZE:.1f}x the event itself)",
                ],
            ),
            args.json,
            args.quick,
        )
    print(f"\n{BENCH} summary: bytes to reconcile D differences in {n:,} events")
    print(f"  {'D':>6}  {'ours':>10}  {'send every id':>14}  {'ratio':>7}")
    for d, bo, bn, _, _ in summary:
        print(f"  {d:>6,}  {bo:>10,}  {bn:>14,}  {bn / bo:>6.0f}x")
    return 0


def main() -> int:
    return bench_main(BENCH, __doc__, options, run)


if __name__ == "__main__":
    sys.exit(main())
