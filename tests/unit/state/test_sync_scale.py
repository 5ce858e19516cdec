"""The key claim: reconciliation traffic grows with the difference, not with the set."""

from __future__ import annotations

import random

import blake3

from cellmesh.state.sync import MemorySyncStore, SyncRole, SyncSession, SyncSettings

T0 = 1_700_000_000_000
N = 100_000
EVENT_SIZE = 200  # bytes per encoded event: a small signed event


def events(seed: int, n: int, start: int, keys: list[int] | None = None) -> list[bytes]:
    """`n` events of EVENT_SIZE bytes, keyed `start + 10 * i` (or by `keys`). BLAKE3-XOF
    payloads: reproducible and cheap to make by the 100,000."""
    stream = blake3.blake3(seed.to_bytes(8, "big")).digest(length=n * (EVENT_SIZE - 8))
    step = EVENT_SIZE - 8
    ks = keys if keys is not None else [start + 10 * i for i in range(n)]
    return [k.to_bytes(8, "big") + stream[i * step : (i + 1) * step] for i, k in enumerate(ks)]


def scattered(rng: random.Random, d: int, n: int) -> list[int]:
    """`d` keys spread over the whole key range of `n` base events, between base keys: the
    differences land in different ranges (the expensive case for reconciliation)."""
    return [T0 + 10 * rng.randrange(n) + 5 for _ in range(d)]


def converse(a: MemorySyncStore, b: MemorySyncStore, cfg: SyncSettings) -> tuple[int, int, int]:
    """(bytes exchanged, messages, events moved) of one whole session."""
    ia = SyncSession(a, SyncRole.INITIATOR, 0.0, cfg)
    rb = SyncSession(b, SyncRole.RESPONDER, 0.0, cfg)
    pending = [ia.start()]
    side = [rb, ia]
    n = 0
    while pending:
        msg = pending.pop()
        pending = side[n % 2].receive(msg)
        n += 1
    assert ia.complete
    assert rb.complete
    moved = ia.statistics().events_sent + rb.statistics().events_sent
    return ia.bytes_sent + ia.bytes_received, n, moved


def test_100k_replicas_differing_by_10_exchange_kilobytes() -> None:
    base = events(1, N, T0)
    extra = events(2, 10, 0, scattered(random.Random(11), 10, N))
    a, b = MemorySyncStore(), MemorySyncStore()
    for e in base:
        a.add_encoded(e)
        b.add_encoded(e)
    for e in extra[:5]:
        a.add_encoded(e)
    for e in extra[5:]:
        b.add_encoded(e)
    total, messages, moved = converse(a, b, SyncSettings())
    assert a.ids() == b.ids()
    assert len(a) == N + 10
    assert moved == 10
    naive = N * 32  # the cheapest naive scheme: send every id
    print(
        f"\nsync 100,000 vs 100,000 differing by 10: {total:,} bytes in {messages} messages "
        f"(naive id list: {naive:,} bytes, {naive / total:.0f}x more)"
    )
    assert total < 50_000
    assert messages <= 12


def test_traffic_scales_with_difference_not_size() -> None:
    """Same difference (20) in sets of 2,000 and 100,000: a small log factor, not 50x."""
    cfg = SyncSettings()

    def run(n: int, d: int) -> int:
        base = events(3, n, T0)
        extra = events(4, d, 0, scattered(random.Random(n), d, n))
        a, b = MemorySyncStore(), MemorySyncStore()
        for e in base:
            a.add_encoded(e)
            b.add_encoded(e)
        for i, e in enumerate(extra):
            (a if i % 2 else b).add_encoded(e)
        total, _, moved = converse(a, b, cfg)
        assert moved == d
        return total

    small, large = run(2_000, 20), run(100_000, 20)
    print(f"\n20 differences: {small:,} bytes in 2,000 events, {large:,} bytes in 100,000")
    # log_16 growth: ~2 more levels of splitting for 50x the events, not 50x the bytes.
    assert large < 4 * small


def test_empty_replica_gets_everything_with_little_overhead() -> None:
    n = 20_000
    src = MemorySyncStore()
    for e in events(5, n, T0):
        src.add_encoded(e)
    dst = MemorySyncStore()
    total, messages, moved = converse(dst, src, SyncSettings())
    assert moved == n
    assert dst.ids() == src.ids()
    payload = n * EVENT_SIZE
    assert total < payload * 1.03  # ~1% framing: a varint length per event, headers per message
    assert messages < 2 * payload / 60_000 + 10
