"""Blobs between real nodes over loopback: BLOCK_WANT / BLOCK_PUT on "blob" streams.

A node fetches a blob from three peers at once while one of them serves corrupt chunks; an
unknown blob fails naming every peer; a node with serve_blobs off refuses; garbage, oversized
and truncated frames on a raw blob stream are dropped and counted and the node keeps serving; a
fetcher that asks but never reads loses its stream and its serve slot; stopping a node cancels
its fetches, never the tasks that called them.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import blake3
import pytest

from cellmesh.config import MIN_WINDOW, NodeConfig
from cellmesh.identity.cellid import format_cell_id
from cellmesh.identity.keys import Identity
from cellmesh.node.blob_service import (
    BLOB_KIND,
    MAX_FRAME,
    MAX_SERVE_STREAMS_PER_PEER,
    RESET_BLOB_ABANDONED,
    RESET_BLOB_BUSY,
    SERVE_WRITE_TIMEOUT,
    BlobFetchError,
    BlobService,
    encode_frame,
)
from cellmesh.node.blob_store import FileChunkStore
from cellmesh.node.node import Node
from cellmesh.node.streams import Stream, StreamError
from cellmesh.state.blob_manifest import push_manifest
from cellmesh.state.blob_messages import MAX_IDS_PER_MESSAGE, BlockWant, push_block_message
from cellmesh.state.chunking import ChunkerParams

LOCAL = ("127.0.0.1:0",)
# Small chunks: a 400 KB file makes ~100 blocks, so every peer gets work in the first round.
PARAMS = ChunkerParams(min_size=1024, avg_size=4096, max_size=16384)


class CorruptStore(FileChunkStore):
    """Serves every chunk with one byte flipped (the manifest, `spare`, stays intact, so the
    corruption is caught on chunks, after the fetch started trusting this peer)."""

    spare: frozenset[bytes] = frozenset()
    served_corrupt = 0

    def get(self, block_id: bytes) -> bytes | None:
        data = super().get(block_id)
        if data is None or block_id in self.spare:
            return data
        self.served_corrupt += 1
        return bytes([data[0] ^ 0x01]) + data[1:]


def _addr(node: Node) -> str:
    host, port = node.local_addresses()[0]
    return f"{host}:{port}"


def _payload(n: int) -> bytes:
    return blake3.blake3(b"blob fetch test").digest(length=n)


@asynccontextmanager
async def _nodes(
    tmp: Path, count: int, serve_blobs: bool = True, small_windows: bool = False
) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(count):
            blob_dir = str(tmp / f"blobs{i}")
            conf = NodeConfig(listen=LOCAL, blob_dir=blob_dir, serve_blobs=serve_blobs)
            if small_windows:
                # A reader that stops reading stalls the writer after ~128 KB, not ~8 MB (the
                # send buffer may not grow with the congestion window either).
                conf = replace(
                    conf,
                    stream_window=MIN_WINDOW,
                    send_buffer=MIN_WINDOW,
                    send_buffer_max=MIN_WINDOW,
                )
            nodes.append(await stack.enter_async_context(Node(Identity.generate(), conf)))
        yield nodes


def _store(node: Node) -> FileChunkStore:
    store = node.blobs.store
    assert isinstance(store, FileChunkStore)
    return store


def test_fetch_from_three_peers_one_serving_corrupt_chunks(tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(_payload(400_000))

    async def main() -> None:
        async with _nodes(tmp_path, 4) as (good1, bad, good2, me):
            blob_id = b""
            for n in (good1, bad, good2):
                blob_id = _store(n).put_file(src, PARAMS).blob_id
            corrupt = CorruptStore(_store(bad).root, fsync=False)
            corrupt.spare = frozenset({blob_id})
            bad.blobs.store = corrupt
            for n in (good1, bad, good2):
                await me.connect(_addr(n))
            seen: list[int] = []
            out = tmp_path / "copy.bin"
            result = await asyncio.wait_for(
                me.blobs.fetch(
                    blob_id.hex(),
                    [bad.cell_id, good1.cell_id, good2.cell_id],
                    progress=lambda p: seen.append(p.bytes_done),
                    output=out,
                ),
                30,
            )
            assert out.read_bytes() == src.read_bytes()
            assert _store(me).export_blob(blob_id, tmp_path / "again.bin").blob_id == blob_id
            assert result.banned == [bad.cell_id]
            assert result.rejected_blocks >= 1
            assert corrupt.served_corrupt >= 1
            by_cell = {p.cell_id: p for p in result.peers}
            assert by_cell[bad.cell_id].status == "banned"
            assert "does not hash" in by_cell[bad.cell_id].detail
            assert by_cell[bad.cell_id].rejected >= 1
            # The two honest peers shared the chunks (blocks fetched from each, none rejected).
            for good in (good1, good2):
                assert by_cell[good.cell_id].status == "served"
                assert by_cell[good.cell_id].blocks > 0
                assert by_cell[good.cell_id].rejected == 0
            # Every block (chunks and the manifest) came over the network exactly once.
            chunks = result.manifest.unique_chunks()
            manifest_size = len(push_manifest(result.manifest))
            assert result.blocks_fetched == len(chunks) + 1
            assert result.bytes_fetched == sum(chunks.values()) + manifest_size
            assert seen == sorted(seen)
            assert seen[-1] == result.bytes_fetched
            assert me.blobs.counters["blocks_rejected"] == result.rejected_blocks
            assert me.blobs.counters["peers_banned"] == 1
            # A second fetch finds everything stored: nobody is asked.
            again = await me.blobs.fetch(blob_id, [good1.cell_id])
            assert again.blocks_fetched == 0
            assert again.peers == ()

    asyncio.run(main())


def test_unknown_blob_and_refusing_peer_fail_naming_the_peers(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            _nodes(tmp_path, 3) as (a, b, me),
            _nodes(tmp_path / "r", 1, serve_blobs=False) as (refusing,),
        ):
            for n in (a, b, refusing):
                await me.connect(_addr(n))
            unknown = blake3.blake3(b"nobody has this").digest()
            with pytest.raises(BlobFetchError) as info:
                await asyncio.wait_for(me.blobs.fetch(unknown, [a.cell_id, b.cell_id]), 20)
            text = str(info.value)
            assert unknown.hex() in text
            for n in (a, b):
                assert format_cell_id(n.cell_id) in text
            assert {p.status for p in info.value.peers} == {"not_found"}

            # serve_blobs = false: the peer holds the blob but answers REFUSED.
            src = tmp_path / "small.bin"
            src.write_bytes(_payload(50_000))
            blob_id = _store(refusing).put_file(src, PARAMS).blob_id
            with pytest.raises(BlobFetchError) as info:
                await asyncio.wait_for(me.blobs.fetch(blob_id, [refusing.cell_id]), 20)
            assert [p.status for p in info.value.peers] == ["refused"]
            assert refusing.blobs.counters["wants_refused"] >= 1

            # No peers given and none connected to a lone node: a clear error, no hang.
            lone = Node(Identity.generate(), NodeConfig(listen=LOCAL, blob_dir=str(tmp_path / "l")))
            async with lone:
                with pytest.raises(BlobFetchError, match="no peer is connected"):
                    await lone.blobs.fetch(blob_id)

    asyncio.run(main())


def test_node_without_blob_dir_has_no_store(tmp_path: Path) -> None:
    async def main() -> None:
        async with Node(Identity.generate(), NodeConfig(listen=LOCAL)) as node:
            assert node.blobs.store is None
            assert not node.blobs.serving
            with pytest.raises(BlobFetchError, match="relative"):
                await node.blobs.fetch(bytes(32))

    asyncio.run(main())


async def _wait_counter(service: BlobService, name: str, at_least: int = 1) -> None:
    async with asyncio.timeout(10):
        while service.counters.get(name, 0) < at_least:  # noqa: ASYNC110 - plain counters
            await asyncio.sleep(0.02)


def _drops(service: BlobService) -> int:
    return sum(v for k, v in service.counters.items() if k.startswith("dropped_"))


async def _expect_reset(stream: Stream) -> None:
    """The server ends the stream: reading raises (reset) or hits EOF, within a bound."""
    async with asyncio.timeout(10):
        try:
            while await stream.read():
                pass
        except StreamError:
            return


def test_hostile_frames_are_dropped_and_counted_and_the_node_keeps_serving(
    tmp_path: Path,
) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(_payload(120_000))

    async def main() -> None:
        async with _nodes(tmp_path, 2) as (server, client):
            blob_id = _store(server).put_file(src, PARAMS).blob_id
            await client.connect(_addr(server))
            svc = server.blobs

            # A length far over the limit: dropped from its 4 bytes, nothing buffered.
            st = await client.services.open(server.cell_id, BLOB_KIND)
            await st.write(struct.pack(">I", 0xFFFFFFFF) + os.urandom(1000))
            await _wait_counter(svc, "dropped_oversize")
            await _expect_reset(st)

            # A zero length is as bad.
            st = await client.services.open(server.cell_id, BLOB_KIND)
            await st.write(struct.pack(">I", 0))
            await _wait_counter(svc, "dropped_oversize", 2)
            await _expect_reset(st)

            # A well-framed message that is not a block message.
            st = await client.services.open(server.cell_id, BLOB_KIND)
            await st.write(encode_frame(b"\x01\x63garbage garbage"))
            await _wait_counter(svc, "dropped_malformed")
            await _expect_reset(st)

            # A frame cut short by the end of the stream.
            st = await client.services.open(server.cell_id, BLOB_KIND)
            await st.write(struct.pack(">I", 500) + b"short")
            await st.close()
            await _wait_counter(svc, "dropped_truncated")
            await _expect_reset(st)

            # Random bytes after a valid header.
            st = await client.services.open(server.cell_id, BLOB_KIND)
            await st.write(os.urandom(70_000))
            async with asyncio.timeout(10):
                while _drops(svc) < 5:  # noqa: ASYNC110 - plain counters, no event to await
                    await asyncio.sleep(0.02)
            await _expect_reset(st)

            assert svc.statistics()["active_streams"] == 0
            # The node still serves: a real fetch over a new stream completes.
            result = await asyncio.wait_for(
                client.blobs.fetch(blob_id, [server.cell_id], output=tmp_path / "out.bin"), 20
            )
            assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
            assert result.banned == []
            assert svc.counters["blocks_served"] >= len(result.manifest.unique_chunks())

    asyncio.run(main())


def test_a_server_sending_bad_frames_is_banned_and_the_fetch_completes_elsewhere(
    tmp_path: Path,
) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(_payload(60_000))

    async def main() -> None:
        async with _nodes(tmp_path, 3) as (good, evil, me):
            blob_id = _store(good).put_file(src, PARAMS).blob_id

            async def oversized(stream: Stream, header: dict[str, object]) -> None:
                # Announces a 1 GB frame whatever is asked: the fetcher must not buffer it.
                await stream.write(struct.pack(">I", 1_000_000_000) + bytes(100))
                await stream.read_all()

            evil.services.register(BLOB_KIND, oversized)  # replaces the honest handler
            for n in (good, evil):
                await me.connect(_addr(n))
            result = await asyncio.wait_for(
                me.blobs.fetch(blob_id, [evil.cell_id, good.cell_id], output=tmp_path / "o"), 20
            )
            assert (tmp_path / "o").read_bytes() == src.read_bytes()
            assert result.banned == [evil.cell_id]
            by_cell = {p.cell_id: p for p in result.peers}
            assert "frame length 1000000000" in by_cell[evil.cell_id].detail
            assert by_cell[good.cell_id].status == "served"
            assert me.blobs.counters["dropped_oversize"] == 1

    asyncio.run(main())


def _wants(ids: list[bytes], first_request: int = 1) -> bytes:
    """BLOCK_WANT frames asking for `ids` (as many messages as the id limit needs)."""
    out = bytearray()
    for n, i in enumerate(range(0, len(ids), MAX_IDS_PER_MESSAGE)):
        want = BlockWant(first_request + n, MAX_FRAME, tuple(ids[i : i + MAX_IDS_PER_MESSAGE]))
        out += encode_frame(push_block_message(want))
    return bytes(out)


async def _reset_code(stream: Stream) -> int | None:
    """Read until the stream ends, within a bound: the peer's reset code (None: a clean end)."""
    async with asyncio.timeout(10):
        try:
            while await stream.read():
                pass
        except StreamError as exc:
            return exc.code
    return None


async def _wait_active(service: BlobService, count: int) -> None:
    async with asyncio.timeout(10):
        while service.statistics()["active_streams"] != count:  # noqa: ASYNC110 - plain counts
            await asyncio.sleep(0.02)


def test_a_fetcher_that_never_reads_loses_its_stream_and_its_slot(tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(_payload(400_000))

    async def main() -> None:
        async with (
            _nodes(tmp_path, 2, small_windows=True) as (server, client),
            _nodes(tmp_path / "r", 1, serve_blobs=False, small_windows=True) as (refusing,),
        ):
            manifest = _store(server).put_file(src, PARAMS)
            ids = list(manifest.unique_chunks())
            for n in (server, refusing):
                await client.connect(_addr(n))
            svc = server.blobs
            # Lowered so the test is fast; a stalled write is what it bounds, whatever its length.
            svc.serve_write_timeout = 0.3
            refusing.blobs.serve_write_timeout = 0.3

            # One identity holds at most MAX_SERVE_STREAMS_PER_PEER streams: the next is refused.
            hostile = [
                await client.services.open(server.cell_id, BLOB_KIND)
                for _ in range(MAX_SERVE_STREAMS_PER_PEER)
            ]
            await _wait_active(svc, MAX_SERVE_STREAMS_PER_PEER)
            extra = await client.services.open(server.cell_id, BLOB_KIND)
            assert await _reset_code(extra) == RESET_BLOB_BUSY
            assert svc.counters["refused_busy"] == 1

            # Each asks for every block (~400 KB of answers) and never reads: the answers fill
            # the flow-control window and our send buffer, and the stalled write costs the stream.
            for st in hostile:
                await st.write(_wants(ids))
            await _wait_counter(svc, "write_stalled", MAX_SERVE_STREAMS_PER_PEER)
            for st in hostile:
                assert await _reset_code(st) == RESET_BLOB_ABANDONED
            await _wait_active(svc, 0)

            # serve_blobs = false: NACK REFUSED echoes the ids asked, so enough WANTs fill the
            # window with refusals just as well.
            unknown = [blake3.blake3(i.to_bytes(4, "big")).digest() for i in range(64 * 100)]
            st = await client.services.open(refusing.cell_id, BLOB_KIND)
            flood = asyncio.create_task(st.write(_wants(unknown)))  # may wait: nobody reads
            await _wait_counter(refusing.blobs, "write_stalled")
            assert await _reset_code(st) == RESET_BLOB_ABANDONED
            await asyncio.gather(flood, return_exceptions=True)
            await _wait_active(refusing.blobs, 0)

            # The slots are free: an honest fetch from the same identity completes.
            svc.serve_write_timeout = SERVE_WRITE_TIMEOUT
            result = await asyncio.wait_for(
                client.blobs.fetch(manifest.blob_id, [server.cell_id], output=tmp_path / "o"), 20
            )
            assert (tmp_path / "o").read_bytes() == src.read_bytes()
            assert result.banned == []
            assert svc.counters["write_stalled"] == MAX_SERVE_STREAMS_PER_PEER

    asyncio.run(main())


def test_stop_cancels_the_fetch_not_the_task_that_called_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with _nodes(tmp_path, 1) as (mute,):
            opened = asyncio.Event()
            endings: list[str] = []

            async def silent(stream: Stream, header: dict[str, object]) -> None:
                # Takes the stream and answers nothing: the fetch waits until it is cancelled.
                opened.set()
                try:
                    await stream.read_all()
                    endings.append("eof")
                except StreamError:
                    endings.append("reset")

            mute.services.register(BLOB_KIND, silent)  # replaces the honest handler
            blob_id = blake3.blake3(b"never answered").digest()
            me = Node(Identity.generate(), NodeConfig(listen=LOCAL, blob_dir=str(tmp_path / "m")))
            async with me:
                await me.connect(_addr(mute))

                # Cancelling the caller cancels its fetch, whose stream is reset, not left open.
                caller = asyncio.create_task(me.blobs.fetch(blob_id, [mute.cell_id]))
                async with asyncio.timeout(10):
                    await opened.wait()
                assert me.blobs.statistics()["active_fetches"] == 1
                caller.cancel()
                await asyncio.gather(caller, return_exceptions=True)
                assert caller.cancelled()
                assert me.blobs.statistics()["active_fetches"] == 0
                async with asyncio.timeout(10):
                    while not endings:  # noqa: ASYNC110 - a plain list, no event to await
                        await asyncio.sleep(0.02)
                assert endings == ["reset"]

                # Stopping the node cancels the fetch only: its caller gets an error and goes
                # on with its own work, which stop neither cancels nor waits for.
                opened.clear()
                resume = asyncio.Event()
                outcome: list[str] = []

                async def fetch_then_more() -> None:
                    try:
                        await me.blobs.fetch(blob_id, [mute.cell_id])
                        outcome.append("fetched")
                    except BlobFetchError as exc:
                        outcome.append(str(exc))
                    await resume.wait()
                    outcome.append("went on")

                task = asyncio.create_task(fetch_then_more())
                async with asyncio.timeout(10):
                    await opened.wait()
                    await me.stop()
                assert len(outcome) == 1
                assert "stopping" in outcome[0]
                assert not task.done()
                assert me.blobs.statistics()["active_fetches"] == 0
                async with asyncio.timeout(10):
                    while len(endings) < 2:  # noqa: ASYNC110 - a plain list, no event to await
                        await asyncio.sleep(0.02)
                assert endings == ["reset", "reset"]
                resume.set()
                async with asyncio.timeout(10):
                    await task
                assert outcome[1:] == ["went on"]
                with pytest.raises(BlobFetchError, match="stopping"):
                    await me.blobs.fetch(blob_id, [mute.cell_id])

    asyncio.run(main())
