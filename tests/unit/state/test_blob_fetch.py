"""BlobFetcher / BlobServer: multi-peer fetch with verification, driven in virtual time."""

from __future__ import annotations

import heapq
import itertools

import blake3
import pytest

from cellmesh.state.blob_messages import (
    PUT_HEADER_LEN,
    BlockCancel,
    BlockNack,
    BlockPut,
    BlockWant,
    NackReason,
    pull_block_message,
    push_block_message,
)
from cellmesh.state.blobs import (
    BlobFetcher,
    BlobServer,
    BlockFetched,
    BlockRejected,
    ChunkStore,
    FetchComplete,
    FetchEvent,
    FetchFailed,
    FetchSettings,
    FetchState,
    LRUChunkStore,
    Manifest,
    PeerBanned,
    PeerDropped,
    ServeSettings,
    assemble_blob,
    store_blob,
)
from cellmesh.state.chunking import ChunkerParams, chunk_id

SMALL = ChunkerParams(2048, 8192, 32768)
ME = b"fetcher"


def rnd(seed: bytes, n: int) -> bytes:
    return blake3.blake3(seed).digest(length=n)


class CorruptStore:
    """A store that serves every block with one byte flipped (a malicious or broken peer)."""

    def __init__(self, inner: ChunkStore) -> None:
        self.inner = inner

    def has(self, block_id: bytes) -> bool:
        return self.inner.has(block_id)

    def get(self, block_id: bytes) -> bytes | None:
        data = self.inner.get(block_id)
        if data is None:
            return None
        return bytes([data[0] ^ 0x55]) + data[1:]

    def put(self, block_id: bytes, data: bytes) -> bool:
        return self.inner.put(block_id, data)


class Net:
    """The fetcher and some servers on links with per-peer one-way latency, in virtual time.

    `blackhole` peers swallow every message (a peer that went silent). Every message sent is
    checked to decode and to respect the size limits.
    """

    def __init__(
        self,
        fetcher: BlobFetcher,
        servers: dict[bytes, BlobServer],
        latency: dict[bytes, float],
        blackhole: frozenset[bytes] = frozenset(),
    ) -> None:
        self.fetcher = fetcher
        self.servers = servers
        self.latency = latency
        self.blackhole = blackhole
        self.now = 0.0
        self.heap: list[tuple[float, int, bytes, bytes, bytes]] = []
        self.seq = itertools.count()
        self.events: list[FetchEvent] = []
        self.sent_to: dict[bytes, int] = dict.fromkeys(servers, 0)

    def _service(self) -> None:
        for peer, msg in self.fetcher.messages_to_send(self.now):
            assert len(msg) <= 60_000
            pull_block_message(msg)
            self.sent_to[peer] += 1
            if peer not in self.blackhole:
                heapq.heappush(
                    self.heap, (self.now + self.latency[peer], next(self.seq), peer, ME, msg)
                )
        for name, server in self.servers.items():
            for dst, msg in server.messages_to_send(self.now):
                assert dst == ME
                assert len(msg) <= self.fetcher.settings.max_put
                heapq.heappush(
                    self.heap, (self.now + self.latency[name], next(self.seq), ME, name, msg)
                )
        while (ev := self.fetcher.next_event()) is not None:
            self.events.append(ev)

    def run(self, max_time: float = 1000.0, max_steps: int = 200_000) -> None:
        self._service()
        for _ in range(max_steps):
            if self.fetcher.done:
                self._service()
                return
            timers = [t for t in [self.fetcher.get_timer()] if t is not None]
            timers += [t for s in self.servers.values() if (t := s.get_timer()) is not None]
            t_next = min([*timers, self.heap[0][0]] if self.heap else timers, default=None)
            if t_next is None or t_next > max_time:
                return
            self.now = max(self.now, t_next)
            while self.heap and self.heap[0][0] <= self.now:
                _, _, dst, src, msg = heapq.heappop(self.heap)
                if dst == ME:
                    self.fetcher.receive(src, msg, self.now)
                else:
                    self.servers[dst].receive(src, msg, self.now)
            if (t := self.fetcher.get_timer()) is not None and t <= self.now:
                self.fetcher.handle_timer(self.now)
            for s in self.servers.values():
                s.handle_timer(self.now)
            self._service()
        raise AssertionError("fetch did not settle")

    def of(self, kind: type[FetchEvent]) -> list[FetchEvent]:
        return [e for e in self.events if isinstance(e, kind)]


def seeded(data: bytes) -> tuple[Manifest, LRUChunkStore]:
    store = LRUChunkStore(1 << 30)
    return store_blob(data, store, SMALL), store


def test_three_peers_one_corrupt() -> None:
    data = rnd(b"three peers", 600_000)
    manifest, origin = seeded(data)
    servers = {
        b"A": BlobServer(origin),
        b"B": BlobServer(CorruptStore(origin)),
        b"C": BlobServer(origin),
    }
    local = LRUChunkStore(1 << 30)
    fs = FetchSettings(max_put=4000)  # pieces of 3,954 bytes: every chunk comes in several
    f = BlobFetcher(manifest.blob_id, list(servers), local, now=0.0, settings=fs)
    net = Net(f, servers, {b"A": 0.010, b"B": 0.001, b"C": 0.020})  # the liar is the fastest
    net.run()
    assert f.state is FetchState.COMPLETE, f.failure
    assert f.manifest == manifest
    rebuilt = assemble_blob(manifest, local)  # checks every chunk id and the file hash
    assert rebuilt == data
    assert blake3.blake3(rebuilt).digest() == manifest.file_hash
    p = f.progress()
    assert p.rejected_blocks >= 1
    assert p.banned_peers == 1
    assert p.blocks_done == p.blocks_total == len(manifest.unique_chunks()) + 1
    assert p.bytes_done == p.bytes_total
    assert p.fraction == 1.0
    stats = f.peer_stats()
    assert stats[b"B"].banned
    assert stats[b"B"].blocks == 0
    assert stats[b"B"].rejected >= 1
    assert stats[b"A"].blocks + stats[b"C"].blocks == p.blocks_total
    assert stats[b"A"].blocks > 0
    assert stats[b"C"].blocks > 0
    bans = net.of(PeerBanned)
    assert [b.peer for b in bans] == [b"B"]  # type: ignore[union-attr]
    assert all(r.peer == b"B" for r in net.of(BlockRejected))  # type: ignore[union-attr]
    assert all(e.peer != b"B" for e in net.of(BlockFetched))  # type: ignore[union-attr]
    assert len(net.of(FetchComplete)) == 1
    # Only verified blocks were ever stored.
    for ref in manifest.chunks:
        assert chunk_id(local.get(ref.id) or b"") == ref.id


def test_prefers_the_fast_peer() -> None:
    data = rnd(b"fast", 800_000)
    manifest, origin = seeded(data)
    servers = {p: BlobServer(origin) for p in (b"fast", b"slow1", b"slow2")}
    local = LRUChunkStore(1 << 30)
    f = BlobFetcher(
        manifest.blob_id,
        list(servers),
        local,
        0.0,
        FetchSettings(max_in_flight_per_peer=4, max_in_flight_total=8),
    )
    net = Net(f, servers, {b"fast": 0.002, b"slow1": 0.100, b"slow2": 0.100})
    net.run()
    assert f.state is FetchState.COMPLETE
    st = f.peer_stats()
    assert st[b"fast"].blocks > st[b"slow1"].blocks + st[b"slow2"].blocks
    assert (st[b"fast"].ewma_seconds or 1.0) < (st[b"slow1"].ewma_seconds or 0.0)
    assert assemble_blob(manifest, local) == data


def test_silent_peer_times_out_and_is_dropped() -> None:
    data = rnd(b"silent", 300_000)
    manifest, origin = seeded(data)
    servers = {b"ok": BlobServer(origin), b"mute": BlobServer(origin)}
    local = LRUChunkStore(1 << 30)
    # No endgame: the good peer would finish the mute one's blocks before any timeout.
    fs = FetchSettings(request_timeout=2.0, max_timeouts_per_peer=2, endgame=False)
    f = BlobFetcher(manifest.blob_id, [b"mute", b"ok"], local, 0.0, fs, manifest=manifest)
    net = Net(f, servers, {b"ok": 0.01, b"mute": 0.01}, blackhole=frozenset({b"mute"}))
    net.run()
    assert f.state is FetchState.COMPLETE
    st = f.peer_stats()
    assert st[b"mute"].dropped
    assert st[b"mute"].timeouts >= 2
    assert f.progress().timeouts >= 2
    assert [e.peer for e in net.of(PeerDropped)] == [b"mute"]  # type: ignore[union-attr]
    assert assemble_blob(manifest, local) == data


def test_missing_blocks_are_fetched_elsewhere_or_fail() -> None:
    data = rnd(b"partial", 200_000)
    manifest, origin = seeded(data)
    partial = LRUChunkStore(1 << 30)
    for ref in manifest.chunks[::2]:
        partial.put(ref.id, origin.get(ref.id) or b"")
    servers = {b"partial": BlobServer(partial), b"full": BlobServer(origin)}
    local = LRUChunkStore(1 << 30)
    f = BlobFetcher(manifest.blob_id, [b"partial", b"full"], local, 0.0, manifest=manifest)
    Net(f, servers, {b"partial": 0.001, b"full": 0.05}).run()
    assert f.state is FetchState.COMPLETE
    assert f.peer_stats()[b"partial"].blocks > 0
    assert assemble_blob(manifest, local) == data

    # With only the partial peer, the fetch fails: nobody has the odd chunks.
    local2 = LRUChunkStore(1 << 30)
    f2 = BlobFetcher(manifest.blob_id, [b"partial"], local2, 0.0, manifest=manifest)
    net2 = Net(f2, {b"partial": BlobServer(partial)}, {b"partial": 0.001})
    net2.run()
    assert f2.state is FetchState.FAILED
    assert "no peer left has block" in (f2.failure or "")
    assert len(net2.of(FetchFailed)) == 1
    assert f2.get_timer() is None


def test_no_peers_and_all_banned_fail() -> None:
    manifest, origin = seeded(rnd(b"x", 50_000))
    f = BlobFetcher(manifest.blob_id, [], LRUChunkStore(1 << 30), 0.0)
    assert f.messages_to_send(0.0) == []
    assert f.state is FetchState.FAILED
    f2 = BlobFetcher(manifest.blob_id, [b"liar"], LRUChunkStore(1 << 30), 0.0)
    Net(f2, {b"liar": BlobServer(CorruptStore(origin))}, {b"liar": 0.01}).run()
    assert f2.state is FetchState.FAILED
    assert f2.failure == "no usable peer left"


def test_blob_id_that_is_not_a_manifest() -> None:
    origin = LRUChunkStore(1 << 30)
    block = b"just a chunk, not a manifest"
    origin.put(chunk_id(block), block)
    f = BlobFetcher(chunk_id(block), [b"p"], LRUChunkStore(1 << 30), 0.0)
    Net(f, {b"p": BlobServer(origin)}, {b"p": 0.01}).run()
    assert f.state is FetchState.FAILED
    assert "not a blob manifest" in (f.failure or "")
    assert not f.peer_stats()[b"p"].banned  # it sent exactly what was asked for


def test_chunks_already_held_are_not_fetched() -> None:
    data = rnd(b"held", 300_000)
    manifest, origin = seeded(data)
    local = LRUChunkStore(1 << 30)
    store_blob(data[:150_000], local, SMALL)  # the first half's chunks, mostly shared
    held = sum(1 for c in manifest.unique_chunks() if local.has(c))
    assert held > 5
    f = BlobFetcher(manifest.blob_id, [b"p"], local, 0.0)
    Net(f, {b"p": BlobServer(origin)}, {b"p": 0.01}).run()
    assert f.state is FetchState.COMPLETE
    fetched = f.peer_stats()[b"p"].blocks
    assert fetched == len(manifest.unique_chunks()) + 1 - held  # + the manifest
    assert assemble_blob(manifest, local) == data


def test_complete_at_once_when_everything_is_held() -> None:
    manifest, origin = seeded(rnd(b"all", 40_000))
    f = BlobFetcher(manifest.blob_id, [b"p"], origin, 0.0)
    assert f.state is FetchState.COMPLETE
    assert isinstance(f.next_event(), FetchComplete)
    assert f.messages_to_send(0.0) == []


def _one_peer_fetch(data: bytes) -> tuple[BlobFetcher, Manifest, bytes]:
    manifest, _ = seeded(data)
    f = BlobFetcher(manifest.blob_id, [b"p"], LRUChunkStore(1 << 30), 0.0, manifest=manifest)
    out = f.messages_to_send(0.0)
    assert out
    want = pull_block_message(out[0][1])
    assert isinstance(want, BlockWant)
    return f, manifest, push_block_message(want)


@pytest.mark.parametrize(
    "bad",
    ["garbage", "overlap", "wrong_size", "too_big_piece", "tiny_piece", "wrong_block"],
)
def test_hostile_pieces_ban_the_peer(bad: str) -> None:
    data = rnd(b"hostile", 60_000)
    f, manifest, want_bytes = _one_peer_fetch(data)
    want = pull_block_message(want_bytes)
    assert isinstance(want, BlockWant)
    rid, bid = want.request_id, want.ids[0]
    size = manifest.unique_chunks()[bid]
    if bad == "garbage":
        f.receive(b"p", b"\x01\x02junk", 0.1)
    elif bad == "overlap":
        f.receive(b"p", push_block_message(BlockPut(rid, bid, size, 0, b"a" * 1000)), 0.1)
        f.receive(b"p", push_block_message(BlockPut(rid, bid, size, 500, b"a" * 1000)), 0.1)
    elif bad == "tiny_piece":
        f.receive(b"p", push_block_message(BlockPut(rid, bid, size, 100, b"a")), 0.1)
    elif bad == "wrong_size":
        f.receive(b"p", push_block_message(BlockPut(rid, bid, size + 1, 0, b"a")), 0.1)
    elif bad == "too_big_piece":
        f2 = BlobFetcher(
            manifest.blob_id,
            [b"p"],
            LRUChunkStore(1 << 30),
            0.0,
            FetchSettings(max_put=1000),
            manifest=manifest,
        )
        w = pull_block_message(f2.messages_to_send(0.0)[0][1])
        assert isinstance(w, BlockWant)
        f2.receive(
            b"p", push_block_message(BlockPut(w.request_id, w.ids[0], size, 0, bytes(2000))), 0.1
        )
        f = f2
    elif bad == "wrong_block":
        # A piece naming another block of the same request id than the one assigned.
        other = next(i for i in manifest.unique_chunks() if i not in want.ids)
        f.receive(b"p", push_block_message(BlockPut(rid, other, 10, 0, b"a")), 0.1)
        assert not f.peer_stats()[b"p"].banned  # not in flight: a stale piece, just counted
        assert f.progress().stale_pieces == 1
        return
    assert f.peer_stats()[b"p"].banned
    assert f.progress().banned_peers == 1
    assert f.messages_to_send(0.2) == []
    assert f.state is FetchState.FAILED


def test_stale_and_unexpected_messages_are_counted_not_fatal() -> None:
    data = rnd(b"stale", 60_000)
    f, _m, want_bytes = _one_peer_fetch(data)
    want = pull_block_message(want_bytes)
    assert isinstance(want, BlockWant)
    f.receive(
        b"p", push_block_message(BlockPut(want.request_id + 99, want.ids[0], 5, 0, b"x")), 0.1
    )
    f.receive(
        b"p",
        push_block_message(BlockNack(want.request_id + 99, NackReason.BUSY, want.ids[:1])),
        0.1,
    )
    f.receive(b"p", push_block_message(BlockCancel(1, want.ids[:1])), 0.1)
    f.receive(b"stranger", b"junk", 0.1)
    p = f.progress()
    assert p.stale_pieces == 2
    assert p.banned_peers == 0


def test_busy_peer_rests_then_gets_work_again() -> None:
    data = rnd(b"busy", 100_000)
    f, _m, want_bytes = _one_peer_fetch(data)
    want = pull_block_message(want_bytes)
    assert isinstance(want, BlockWant)
    f.receive(b"p", push_block_message(BlockNack(want.request_id, NackReason.BUSY, want.ids)), 0.1)
    assert f.messages_to_send(0.2) == []  # resting
    t = f.get_timer()
    assert t is not None
    assert t == pytest.approx(1.1)
    f.handle_timer(t)
    again = f.messages_to_send(t)
    assert again
    assert set(pull_block_message(again[0][1]).ids) >= set(want.ids)  # type: ignore[union-attr]


def test_endgame_duplicates_then_cancels() -> None:
    data = rnd(b"endgame", 30_000)  # a few chunks
    manifest, origin = seeded(data)
    servers = {b"slow": BlobServer(origin), b"fast": BlobServer(origin)}
    local = LRUChunkStore(1 << 30)
    f = BlobFetcher(
        manifest.blob_id,
        [b"slow", b"fast"],
        local,
        0.0,
        FetchSettings(max_in_flight_per_peer=8, request_timeout=100.0),
        manifest=manifest,
    )
    net = Net(f, servers, {b"slow": 5.0, b"fast": 0.01})
    net.run()
    assert f.state is FetchState.COMPLETE
    assert net.now < 5.0  # did not wait for the slow peer
    assert assemble_blob(manifest, local) == data


def test_small_max_put_many_pieces() -> None:
    data = rnd(b"pieces", 100_000)
    manifest, origin = seeded(data)
    local = LRUChunkStore(1 << 30)
    f = BlobFetcher(manifest.blob_id, [b"p"], local, 0.0, FetchSettings(max_put=512))
    server = BlobServer(origin)
    Net(f, {b"p": server}, {b"p": 0.001}).run()
    assert f.state is FetchState.COMPLETE
    assert server.statistics().pieces_sent >= 100_000 // (512 - PUT_HEADER_LEN)
    assert assemble_blob(manifest, local) == data


# ------------------------------------------------------------------------------ server


def _want(rid: int, ids: tuple[bytes, ...], max_put: int = 60_000) -> bytes:
    return push_block_message(BlockWant(rid, max_put, ids))


def test_server_rate_limit_and_round_robin() -> None:
    manifest, origin = seeded(rnd(b"rate", 400_000))
    ids = tuple(manifest.unique_chunks())
    s = BlobServer(origin, ServeSettings(rate=100_000.0, burst=20_000, max_put=10_000))
    assert len(ids) > 40
    s.receive(b"x", _want(1, ids[:40]), 0.0)
    s.receive(b"y", _want(2, ids[:40]), 0.0)
    sent: dict[bytes, int] = {b"x": 0, b"y": 0}
    now = 0.0
    while now < 2.0:
        for peer, msg in s.messages_to_send(now):
            sent[peer] += len(msg)
        t = s.get_timer()
        assert t is not None
        assert t > now
        now = t
        s.handle_timer(now)
    for peer in (b"x", b"y"):
        # Burst + rate * time, plus at most one piece of overdraft.
        assert sent[peer] <= 20_000 + 100_000 * 2.0 + 10_000
        assert sent[peer] >= 100_000 * 1.5
    assert abs(sent[b"x"] - sent[b"y"]) <= 20_000


def test_server_not_found_busy_cancel_and_malformed() -> None:
    manifest, origin = seeded(rnd(b"srv", 300_000))
    ids = tuple(manifest.unique_chunks())
    s = BlobServer(origin, ServeSettings(max_queued_blocks=3, rate=1.0, burst=1))
    missing = bytes(32)
    s.receive(b"x", _want(1, (missing, *ids[:5])), 0.0)
    out = s.messages_to_send(0.0)
    msgs = [pull_block_message(m) for _, m in out]
    nacks = [m for m in msgs if isinstance(m, BlockNack)]
    assert {(n.reason, n.ids) for n in nacks} == {
        (NackReason.NOT_FOUND, (missing,)),
        (NackReason.BUSY, ids[3:5]),
    }
    assert any(isinstance(m, BlockPut) for m in msgs)  # the burst allows one piece
    s.receive(b"x", push_block_message(BlockCancel(1, ids[:3])), 0.0)
    st = s.statistics()
    assert st.queued_blocks == 0
    assert st.cancelled >= 2
    s.receive(b"x", b"garbage", 0.0)
    s.receive(b"x", push_block_message(BlockNack(1, NackReason.BUSY, ids[:1])), 0.0)
    st = s.statistics()
    assert (st.malformed, st.unexpected, st.not_found, st.busy) == (1, 1, 1, 2)


def test_server_bounds_peers_and_nack_floods() -> None:
    manifest, origin = seeded(rnd(b"peers", 100_000))
    ids = tuple(manifest.unique_chunks())
    s = BlobServer(origin, ServeSettings(max_peers=2, max_queued_blocks=4, rate=1.0, burst=1))
    s.receive(b"a", _want(1, ids[:2]), 0.0)
    s.receive(b"b", _want(1, ids[:2]), 0.0)
    s.receive(b"c", _want(1, ids[:2]), 0.0)  # no room: both a and b have work
    assert s.statistics().peers == 2
    # A peer flooding wants for missing blocks cannot grow the server's answer queue.
    for i in range(1000):
        s.receive(b"a", _want(i, (bytes(32),)), 0.0)
    assert s.statistics().busy >= 990
    out = s.messages_to_send(0.0)
    assert len([m for p, m in out if p == b"a"]) <= 4 + 2
    s.forget_peer(b"a")
    assert s.statistics().peers == 1


def test_server_skips_blocks_that_vanished() -> None:
    manifest, origin = seeded(rnd(b"vanish", 60_000))
    ids = tuple(manifest.unique_chunks())
    s = BlobServer(origin)
    s.receive(b"x", _want(1, ids[:1]), 0.0)
    origin.delete(ids[0])
    msgs = [pull_block_message(m) for _, m in s.messages_to_send(0.0)]
    assert msgs == [BlockNack(1, NackReason.NOT_FOUND, ids[:1])]


def test_settings_validated() -> None:
    with pytest.raises(ValueError, match="max_put"):
        FetchSettings(max_put=100)
    with pytest.raises(ValueError, match="in-flight"):
        FetchSettings(max_in_flight_total=0)
    with pytest.raises(ValueError, match="request_timeout"):
        FetchSettings(request_timeout=0)
    with pytest.raises(ValueError, match="rate"):
        ServeSettings(rate=0)
    with pytest.raises(ValueError, match="max_put"):
        ServeSettings(max_put=70_000)
