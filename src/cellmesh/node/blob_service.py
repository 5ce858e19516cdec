"""`BlobService`: blobs between real nodes, BLOCK_WANT / BLOCK_PUT on streams of kind "blob".

Theory of operation
-------------------
The sans-IO cores of `cellmesh.state.blobs` decide everything: `BlobFetcher` which block to ask
whom for and whether what came back is right, `BlobServer` what to answer and how fast. This
module only carries their messages over node streams (node/services.py) and feeds them clocks.

Framing. A fetcher opens one stream per peer with the intent header ``{"v":1,"kind":"blob"}``;
after it, both directions carry *frames*: a u32 big-endian length, then that many bytes of one
block-exchange message (`cellmesh.state.blob_messages`). A length of 0 or over `MAX_FRAME`
(60,000, the largest block message) is a protocol violation detected from the 4 length bytes
alone, before anything is buffered; a stream that ends inside a frame is truncated; a frame that
does not decode as a block message is garbage. Each ends that stream (reset, counted in
`counters`), never the node; the reader holds at most one frame plus one read (~125 KB).

Serving. Every incoming "blob" stream gets a `BlobServer` of its own over the node's chunk store
(its token bucket paces that stream at `SERVE_RATE`; `MAX_SERVE_STREAMS_PER_PEER` and
`MAX_SERVE_STREAMS` bound how many run at once). Frames read are fed to it; what it returns is
written back, so the stream's flow control is the back-pressure. The stream ends when the
fetcher finishes its half (we finish ours), on a bad frame, when one of our writes is not taken
within `SERVE_WRITE_TIMEOUT` seconds (a fetcher that does not read what it asked for; counted
``write_stalled``), or after `SERVE_IDLE_TIMEOUT` seconds without progress (counted
``idle_closed``). Progress is a frame read while none of our writes waits, or a write of ours
taken by the stream: frames read while the fetcher leaves our answers untaken do not keep its
stream alive. With config ``serve_blobs = false`` (or no blob store) every BLOCK_WANT is
answered NACK REFUSED, under the same rules.

Fetching. `fetch` runs in a task of its own, tracked by the service: `stop` cancels it (the
caller then gets `BlobFetchError`, its own task untouched), and cancelling the caller cancels
it. It opens a stream to each peer at once and runs one `BlobFetcher` over all of them: it
spreads blocks over the peers, verifies each block's BLAKE3, and bans a peer whose
block does not hash to its id (or that breaks the protocol); that peer's stream is reset at
once (nothing more from it is trusted in this fetch) and its blocks are fetched from the
others. Verified blocks go straight into the store, so an interrupted fetch resumes where it
stopped. When every block is in, the blob is read back once and its whole-file hash checked
(written to a file atomically if asked). A fetch that cannot finish raises `BlobFetchError`
naming what each peer did (not found, refused, timed out, banned, unreachable). However the
fetch ends (even cancelled while its streams are still being opened), no stream outlives it:
each is finished politely or reset.

Store location: config ``blob_dir`` (the daemon resolves it against the home, default
``<home>/blobs``, the directory `cellmesh blob put` writes). A relative path without a home
means no store: such a node answers REFUSED and `fetch` raises, as with ``blob_dir = ""``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cellmesh.errors import CellmeshError, DecodeError, PeerUnreachableError
from cellmesh.identity.cellid import format_cell_id, parse_cell_id
from cellmesh.node.blob_store import FileChunkStore
from cellmesh.node.services import header_line
from cellmesh.node.streams import StreamError
from cellmesh.state.blob_cache import ChunkMissingError, ChunkStore, IntegrityError
from cellmesh.state.blob_manifest import Manifest, iter_blob
from cellmesh.state.blob_messages import (
    MAX_BLOCK_MESSAGE,
    BlockCancel,
    BlockMsgType,
    BlockNack,
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
    FetchComplete,
    FetchFailed,
    FetchProgress,
    FetchSettings,
    PeerBanned,
    PeerDropped,
    ServeSettings,
)

if TYPE_CHECKING:
    from cellmesh.node.node import Node
    from cellmesh.node.streams import Stream

__all__ = [
    "BLOB_KIND",
    "FRAME_HEADER_LEN",
    "MAX_FRAME",
    "BlobFetchError",
    "BlobFetchResult",
    "BlobService",
    "FrameError",
    "PeerOutcome",
    "encode_frame",
]

log = logging.getLogger("cellmesh.blobs")

BLOB_KIND: Final = "blob"
"""The intent-header kind of block-exchange streams."""
_FRAME = struct.Struct(">I")
FRAME_HEADER_LEN: Final = _FRAME.size
MAX_FRAME: Final = MAX_BLOCK_MESSAGE
"""The largest frame payload: one block message (60,000 bytes)."""
_READ_SIZE: Final = 65536
_WRITE_BATCH: Final = 256 * 1024
"""Frames are joined into writes of about this size (fewer stream calls, bounded memory)."""

RESET_BLOB_PROTOCOL: Final = 0x211
"""Reset code: a bad frame (oversized, truncated, garbage), or a peer banned from a fetch."""
RESET_BLOB_BUSY: Final = 0x212
"""Reset code: too many blob streams are served already (for this peer or in all)."""
RESET_BLOB_ABANDONED: Final = 0x213
"""Reset code: the fetch ended and the peer did not finish its half in time, or a served stream
made no progress (idle, or the fetcher did not take our writes)."""

MAX_SERVE_STREAMS: Final = 64
MAX_SERVE_STREAMS_PER_PEER: Final = 4
SERVE_IDLE_TIMEOUT: Final = 120.0
"""A served stream without progress (see the module doc) for this long is reset."""
SERVE_WRITE_TIMEOUT: Final = 60.0
"""A served stream that does not take one of our writes within this long is reset. A write
waits while the send buffer is full, until half of it drained (2 MB by default): a fetcher must
read at least ~35 KB/s per stream to keep it, and one that does not read at all loses it."""
OPEN_TIMEOUT: Final = 5.0
"""Seconds to connect to one peer and open its stream."""
CLOSE_GRACE: Final = 2.0
"""After a fetch, seconds to wait for each server to finish its half before resetting."""
SERVE_RATE: Final = 64_000_000.0
"""Bytes per second one served stream may take. The core's default (16 MB/s) would cap a
single-peer fetch on a LAN well below what the stream carries (bench_blob_fetch.py)."""
SERVE_BURST: Final = 4_000_000


class FrameError(CellmeshError):
    """A bad frame on a blob stream; `reason` is "oversize", "truncated" or "malformed"."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _WriteStalled(CellmeshError):
    """A served stream did not take our write in time (its fetcher does not read)."""


class _Progress:
    """When a served stream last made progress, for the idle rule.

    A frame read counts only while none of our writes waits: a fetcher that keeps sending (a
    cheap frame now and then) but does not take our answers must not keep its slot."""

    def __init__(self, now: float) -> None:
        self.last = now
        self.writing = 0

    def frame_read(self, now: float) -> None:
        if not self.writing:
            self.last = now

    def wrote(self, now: float) -> None:
        self.last = now


def encode_frame(message: bytes) -> bytes:
    """One frame: u32 big-endian length, then the block message."""
    if not 1 <= len(message) <= MAX_FRAME:
        raise ValueError(f"a frame carries 1 to {MAX_FRAME} bytes")
    return _FRAME.pack(len(message)) + message


class _FrameReader:
    """Reads frames from a stream, holding at most one frame plus one read."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def read_frame(self) -> bytes | None:
        """The next frame's payload; None when the stream ended cleanly between frames.
        Raises `FrameError` (bad length, stream ended inside a frame) or stream errors."""
        buf = self._buf
        while True:
            if len(buf) >= FRAME_HEADER_LEN:
                (n,) = _FRAME.unpack_from(buf)
                # Checked before any payload is buffered: a huge length costs 4 bytes, not n.
                if n == 0 or n > MAX_FRAME:
                    raise FrameError(f"frame length {n} outside [1, {MAX_FRAME}]", "oversize")
                end = FRAME_HEADER_LEN + n
                if len(buf) >= end:
                    data = bytes(buf[FRAME_HEADER_LEN:end])
                    del buf[:end]
                    return data
            chunk = await self._stream.read(_READ_SIZE)
            if not chunk:
                if buf:
                    raise FrameError(f"stream ended inside a frame ({len(buf)} bytes)", "truncated")
                return None
            buf += chunk


def _batches(frames: list[bytes]) -> Iterable[bytes]:
    """Join frames into writes of about `_WRITE_BATCH` bytes."""
    part: list[bytes] = []
    size = 0
    for f in frames:
        part.append(f)
        size += len(f)
        if size >= _WRITE_BATCH:
            yield b"".join(part)
            part, size = [], 0
    if part:
        yield b"".join(part)


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class PeerOutcome:
    """What one peer did in a fetch.

    `status`: "served" (sent blocks), "banned" (a corrupt block or a protocol violation: see
    `detail`), "not_found" (answered NACK NOT_FOUND), "refused" (NACK REFUSED: it does not serve
    blobs), "busy", "timed_out", "closed" (ended its stream early), "unreachable", "unused".
    """

    cell_id: bytes
    status: str
    detail: str
    blocks: int
    bytes: int
    rejected: int

    def describe(self) -> str:
        """One line: CellID, status and detail."""
        return f"{format_cell_id(self.cell_id)}: {self.status} ({self.detail})"


@dataclass(frozen=True, slots=True)
class BlobFetchResult:
    """A completed fetch: the blob is in the store, every block and the file hash verified."""

    blob_id: bytes
    manifest: Manifest
    seconds: float
    blocks_fetched: int
    bytes_fetched: int
    """Block bytes that came over the network (blocks already stored are not counted)."""
    rejected_blocks: int
    peers: tuple[PeerOutcome, ...]
    path: Path | None = None

    @property
    def banned(self) -> list[bytes]:
        """CellIDs of the peers banned from this fetch (corrupt blocks, protocol violations)."""
        return [p.cell_id for p in self.peers if p.status == "banned"]

    def as_json(self) -> dict[str, Any]:
        """Plain data for the control API."""
        return {
            "blob_id": self.blob_id.hex(),
            "bytes": self.manifest.total_size,
            "chunks": len(self.manifest.chunks),
            "seconds": self.seconds,
            "blocks_fetched": self.blocks_fetched,
            "bytes_fetched": self.bytes_fetched,
            "rejected_blocks": self.rejected_blocks,
            "path": None if self.path is None else str(self.path),
            "peers": [_outcome_json(p) for p in self.peers],
        }


def _outcome_json(p: PeerOutcome) -> dict[str, Any]:
    return {
        "cell_id": format_cell_id(p.cell_id),
        "status": p.status,
        "detail": p.detail,
        "blocks": p.blocks,
        "bytes": p.bytes,
        "rejected": p.rejected,
    }


class BlobFetchError(CellmeshError):
    """A fetch that could not finish; `peers` says what each peer did."""

    def __init__(self, message: str, peers: tuple[PeerOutcome, ...] = ()) -> None:
        if peers:
            message = f"{message}; " + "; ".join(p.describe() for p in peers)
        super().__init__(message)
        self.peers = peers


ProgressCallback = Callable[[FetchProgress], None]


# ------------------------------------------------------------------------------ one peer of a fetch


@dataclass(eq=False)
class _Session:
    """One peer's stream in a fetch."""

    cell: bytes
    stream: Stream | None = None
    outbox: list[bytes] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    status: str | None = None  # set once the peer is out of the fetch
    detail: str = ""
    blocks: int = 0
    bytes: int = 0
    rejected: int = 0
    nacks: dict[NackReason, int] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    was_reset: bool = False

    def end(self, status: str, detail: str) -> None:
        if self.status is None:
            self.status, self.detail = status, detail

    def reset(self, code: int) -> None:
        if self.stream is not None and not self.was_reset:
            self.was_reset = True
            with contextlib.suppress(CellmeshError):
                self.stream.reset(code)

    def outcome(self) -> PeerOutcome:
        status, detail = self.status, self.detail
        if status is None or (status == "closed" and self.blocks):
            if self.blocks:
                status, detail = "served", f"{self.blocks} block(s)"
            elif self.nacks.get(NackReason.REFUSED):
                status, detail = "refused", "answered REFUSED: it does not serve blobs"
            elif self.nacks.get(NackReason.NOT_FOUND):
                status, detail = "not_found", "answered NOT_FOUND"
            elif self.nacks.get(NackReason.BUSY):
                status, detail = "busy", "answered BUSY"
            elif status is None:
                status, detail = "unused", "no block asked of it was answered"
        return PeerOutcome(self.cell, status, detail, self.blocks, self.bytes, self.rejected)


# ------------------------------------------------------------------------------ the service


class BlobService:
    """The node's blob exchange: serves "blob" streams, and `fetch` gets blobs from peers.

    Created by `Node` (``node.blobs``); `start` opens the store named by ``config.blob_dir``
    (an absolute path) and registers the stream kind. `store` may be set to another
    `ChunkStore` before or while the node runs (each stream uses the store current when it
    opened).
    """

    def __init__(self, node: Node) -> None:
        self._node = node
        self.store: ChunkStore | None = None
        self.store_error: str | None = None
        """Why there is no store (no blob_dir, or opening it failed)."""
        self.fetch_settings = FetchSettings()
        self.serve_settings = ServeSettings(rate=SERVE_RATE, burst=SERVE_BURST)
        self.serve_write_timeout = SERVE_WRITE_TIMEOUT
        self.serve_idle_timeout = SERVE_IDLE_TIMEOUT
        self.counters: dict[str, int] = {}
        self._serving: dict[bytes, int] = {}  # peer -> blob streams being served
        self._fetches: set[asyncio.Task[BlobFetchResult]] = set()
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the store (never fails the node: a broken directory means no store) and
        register the "blob" stream kind."""
        self._stopping = False
        blob_dir = self._node.config.blob_dir
        if self.store is None:
            if not blob_dir:
                self.store_error = "no blob store (config blob_dir is empty)"
            elif not os.path.isabs(blob_dir):
                self.store_error = (
                    f"no blob store: blob_dir {blob_dir!r} is relative and this node has no "
                    "home (give an absolute path)"
                )
            else:
                try:
                    # No fsync per block: every block is verified on every read, so one lost or
                    # torn by a crash is only fetched again, and an fsync per 64 KiB block
                    # would cost more than the network (the file written out is fsynced).
                    self.store = FileChunkStore(Path(blob_dir), fsync=False)
                except OSError as exc:
                    self.store_error = f"cannot open blob store {blob_dir}: {exc}"
                    log.error("%s", self.store_error)
        self._node.services.register(BLOB_KIND, self._serve)

    async def stop(self) -> None:
        """Stop serving; fetches in progress are cancelled (their callers get
        `BlobFetchError`; only the fetch tasks are cancelled and waited for)."""
        self._stopping = True  # no fetch starts after this one's tasks are collected
        self._node.services.unregister(BLOB_KIND)
        tasks = list(self._fetches)
        for t in tasks:
            t.cancel()
        # Each fetch resets its streams when cancelled (no grace wait): this returns promptly.
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def serving(self) -> bool:
        """True when blocks are served (a store and config serve_blobs)."""
        return self.store is not None and self._node.config.serve_blobs

    def _count(self, what: str, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n

    def statistics(self) -> dict[str, Any]:
        """Counters (streams, frames, drops by reason, blocks and bytes served and fetched)."""
        return {
            "serving": self.serving,
            "store": None if not isinstance(self.store, FileChunkStore) else str(self.store.root),
            "store_error": self.store_error,
            "active_streams": sum(self._serving.values()),
            "active_fetches": len(self._fetches),
            "counters": dict(sorted(self.counters.items())),
        }

    # ------------------------------------------------------------------ serving

    async def _serve(self, stream: Stream, header: dict[str, Any]) -> None:
        peer = stream.cell_id
        if (
            sum(self._serving.values()) >= MAX_SERVE_STREAMS
            or self._serving.get(peer, 0) >= MAX_SERVE_STREAMS_PER_PEER
        ):
            self._count("refused_busy")
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_BLOB_BUSY)
            return
        self._serving[peer] = self._serving.get(peer, 0) + 1
        self._count("streams_served")
        try:
            store = self.store
            if store is None or not self._node.config.serve_blobs:
                await self._serve_refusals(stream)
            else:
                await self._serve_blocks(stream, store)
        except FrameError as exc:
            self._count(f"dropped_{exc.reason}")
            log.info("blob stream from %s dropped: %s", format_cell_id(peer), exc)
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_BLOB_PROTOCOL)
        except _WriteStalled as exc:
            self._count("write_stalled")
            log.info("blob stream from %s dropped: %s", format_cell_id(peer), exc)
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_BLOB_ABANDONED)
        except TimeoutError:
            self._count("idle_closed")
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_BLOB_ABANDONED)
        finally:
            left = self._serving.get(peer, 1) - 1
            if left:
                self._serving[peer] = left
            else:
                self._serving.pop(peer, None)

    async def _next_message(self, reader: _FrameReader) -> bytes | None:
        """The next frame, checked to decode as a block message (else `FrameError`)."""
        data = await reader.read_frame()
        if data is None:
            return None
        try:
            pull_block_message(data)
        except DecodeError as exc:
            raise FrameError(f"not a block message: {exc}", "malformed") from exc
        self._count("frames_in")
        return data

    async def _write(self, stream: Stream, data: bytes, progress: _Progress) -> None:
        """Write `data` to a served stream within `serve_write_timeout` (else `_WriteStalled`):
        without a bound, a fetcher that never reads would hold its slot for ever."""
        progress.writing += 1
        try:
            async with asyncio.timeout(self.serve_write_timeout):
                await stream.write(data)
        except TimeoutError:
            raise _WriteStalled(
                f"the fetcher took no write of ours for {self.serve_write_timeout:g} s"
            ) from None
        finally:
            progress.writing -= 1
        progress.wrote(asyncio.get_running_loop().time())

    async def _serve_refusals(self, stream: Stream) -> None:
        """Policy says no: every BLOCK_WANT gets NACK REFUSED."""
        loop = asyncio.get_running_loop()
        progress = _Progress(loop.time())
        reader = _FrameReader(stream)
        while True:
            # Reading and writing alternate here, so the deadline is simply since the last
            # progress (a write bounded by its own timeout counts as one).
            async with asyncio.timeout_at(progress.last + self.serve_idle_timeout):
                data = await self._next_message(reader)
            if data is None:
                break
            progress.frame_read(loop.time())
            msg = pull_block_message(data)
            if isinstance(msg, BlockWant):
                self._count("wants_refused")
                nack = BlockNack(msg.request_id, NackReason.REFUSED, msg.ids)
                await self._write(stream, encode_frame(push_block_message(nack)), progress)
            elif not isinstance(msg, BlockCancel):
                raise FrameError("a fetcher sent a PUT or NACK", "malformed")
        await stream.close()

    async def _serve_blocks(self, stream: Stream, store: ChunkStore) -> None:
        loop = asyncio.get_running_loop()
        peer = stream.cell_id
        server = BlobServer(store, self.serve_settings)
        wake = asyncio.Event()
        reader = _FrameReader(stream)
        progress = _Progress(loop.time())

        async def pump_in() -> None:
            while (data := await self._next_message(reader)) is not None:
                progress.frame_read(loop.time())
                server.receive(peer, data, loop.time())
                wake.set()

        async def pump_out() -> None:
            while True:
                msgs = server.messages_to_send(loop.time())
                if msgs:
                    frames = [encode_frame(m) for _, m in msgs]
                    self._count("frames_out", len(frames))
                    for part in _batches(frames):
                        await self._write(stream, part, progress)
                    continue
                # No await since messages_to_send: a wake set by pump_in cannot be lost here.
                wake.clear()
                due = server.get_timer()
                delay = None if due is None else max(0.0, due - loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
                server.handle_timer(loop.time())

        inp = asyncio.create_task(pump_in())
        out = asyncio.create_task(pump_out())
        try:
            while True:
                if progress.writing:
                    # The write's own timeout bounds it; look again after a full idle period.
                    wait: float = self.serve_idle_timeout
                else:
                    wait = progress.last + self.serve_idle_timeout - loop.time()
                    if wait <= 0:
                        raise TimeoutError  # no progress for serve_idle_timeout: idle_closed
                done, _ = await asyncio.wait(
                    {inp, out}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
            if out.done():
                out.result()  # a write failed: the stream is gone; raise its error
            inp.result()  # raises FrameError / stream errors
            # The fetcher finished its half: it wants nothing more, so neither do we.
            await stream.close()
        finally:
            for t in (inp, out):
                t.cancel()
            await asyncio.gather(inp, out, return_exceptions=True)
            st = server.statistics()
            self._count("blocks_served", st.blocks_served)
            self._count("bytes_served", st.bytes_sent)
            self._count("not_found", st.not_found)
            self._count("busy", st.busy)

    # ------------------------------------------------------------------ fetching

    def _require_store(self) -> ChunkStore:
        if self.store is None:
            raise BlobFetchError(self.store_error or "no blob store")
        return self.store

    async def fetch(
        self,
        blob_id: bytes | str,
        peers: Iterable[bytes | str] | None = None,
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - bounds connects too; reported per peer
        output: Path | None = None,
    ) -> BlobFetchResult:
        """Fetch blob `blob_id` (32 bytes or 64 hex) into the store from `peers` (CellIDs;
        None: every connected peer), all at once; write it to `output` if given.

        `progress` is called with a `FetchProgress` after each verified block. `timeout`
        bounds the whole fetch (None: the fetcher's own per-request timeouts end it when peers
        stop answering). Returns a `BlobFetchResult` once every block and the whole-file hash
        are verified; raises `BlobFetchError` (naming what each peer did) otherwise. A blob
        already complete in the store is returned without asking anyone.

        The work runs in a task of its own: `stop` cancels that task, never the caller's
        (which gets `BlobFetchError`); cancelling the caller cancels the fetch with it.
        """
        if self._stopping:
            raise BlobFetchError("cannot fetch: the node is stopping")
        task = asyncio.create_task(
            self._fetch(blob_id, peers, progress, timeout, output), name="blob-fetch"
        )
        self._fetches.add(task)
        task.add_done_callback(self._fetch_done)
        try:
            # Cancelling the caller here cancels `task` too (awaiting a task forwards the
            # cancellation), and the caller resumes once the fetch has cleaned up.
            return await task
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and (caller is None or not caller.cancelling()):
                # `stop` cancelled the fetch, not our caller: an error for it, not a
                # CancelledError that would end a task nobody cancelled.
                raise BlobFetchError("fetch cancelled: the node is stopping") from None
            raise

    def _fetch_done(self, task: asyncio.Task[BlobFetchResult]) -> None:
        self._fetches.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller re-raises it (if still waiting)

    async def _fetch(
        self,
        blob_id: bytes | str,
        peers: Iterable[bytes | str] | None,
        progress: ProgressCallback | None,
        limit: float | None,
        output: Path | None,
    ) -> BlobFetchResult:
        bid = bytes.fromhex(blob_id) if isinstance(blob_id, str) else bytes(blob_id)
        if len(bid) != 32:
            raise ValueError("a blob id is 32 bytes (64 hex digits)")
        if limit is not None and not limit > 0:
            raise ValueError("timeout must be > 0")
        store = self._require_store()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = None if limit is None else t0 + limit
        fetcher = BlobFetcher(bid, (), store, t0, self.fetch_settings)
        sessions: dict[bytes, _Session] = {}
        if not fetcher.done:
            cells = self._peer_list(peers)
            if not cells:
                raise BlobFetchError(
                    f"blob {bid.hex()} is not stored here and no peer is connected to ask"
                )
            sessions = {c: _Session(c) for c in cells}
        wake = asyncio.Event()
        polite = False
        try:
            if sessions:
                await self._open_all(sessions, fetcher, wake, deadline)
            await self._run(fetcher, sessions, wake, progress, deadline)
            polite = True
        except BlobFetchError:
            polite = True  # the fetch failed, not this code: finish the streams as usual
            raise
        finally:
            # Cancelled (or a bug): reset every stream at once, without the grace wait.
            await self._close_all(sessions, polite)
        outcomes = tuple(s.outcome() for s in sessions.values())
        if fetcher.failure is not None or fetcher.manifest is None:
            self._count("fetches_failed")
            raise BlobFetchError(
                f"cannot fetch blob {bid.hex()}: {fetcher.failure or 'no manifest'}", outcomes
            )
        manifest = fetcher.manifest
        try:
            if output is not None:
                await asyncio.to_thread(_export, manifest, store, Path(output))
            else:
                await asyncio.to_thread(_verify, manifest, store)
        except (ChunkMissingError, IntegrityError) as exc:
            self._count("fetches_failed")
            raise BlobFetchError(f"blob {bid.hex()} does not verify: {exc}", outcomes) from exc
        p = fetcher.progress()
        self._count("fetches_completed")
        self._count("bytes_fetched", sum(s.bytes for s in sessions.values()))
        return BlobFetchResult(
            blob_id=bid,
            manifest=manifest,
            seconds=loop.time() - t0,
            blocks_fetched=sum(s.blocks for s in sessions.values()),
            bytes_fetched=sum(s.bytes for s in sessions.values()),
            rejected_blocks=p.rejected_blocks,
            peers=outcomes,
            path=output,
        )

    def _peer_list(self, peers: Iterable[bytes | str] | None) -> list[bytes]:
        if peers is None:
            cells = [p.cell_id for p in self._node.peers()]
        else:
            cells = [parse_cell_id(p) if isinstance(p, str) else bytes(p) for p in peers]
        me = self._node.cell_id
        return list(dict.fromkeys(c for c in cells if c != me))  # dedup, keep the order

    async def _open_all(
        self,
        sessions: dict[bytes, _Session],
        fetcher: BlobFetcher,
        wake: asyncio.Event,
        deadline: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        budget = (
            OPEN_TIMEOUT
            if deadline is None
            else max(0.1, min(OPEN_TIMEOUT, deadline - loop.time()))
        )

        async def open_one(s: _Session) -> None:
            try:
                s.stream = await self._open_stream(s.cell, budget)
            except (PeerUnreachableError, StreamError, TimeoutError) as exc:
                s.end("unreachable", str(exc) or "no answer")
                return
            except CellmeshError as exc:
                s.end("unreachable", str(exc))
                return
            fetcher.add_peer(s.cell)
            s.tasks.append(asyncio.create_task(self._fetch_reader(s, fetcher, wake)))
            s.tasks.append(asyncio.create_task(self._fetch_writer(s)))

        opening = [asyncio.create_task(open_one(s)) for s in sessions.values()]
        try:
            await asyncio.gather(*opening)
        except BaseException:
            # Cancelled, or one open failed unexpectedly: gather leaves the others running, and
            # one finishing later would open a stream nobody closes. Stop them all first; the
            # caller's `_close_all` then resets every stream already open.
            for t in opening:
                t.cancel()
            await asyncio.gather(*opening, return_exceptions=True)
            raise
        if all(s.stream is None for s in sessions.values()):
            raise BlobFetchError(
                "cannot fetch: no peer could be reached",
                tuple(s.outcome() for s in sessions.values()),
            )

    async def _open_stream(self, cell: bytes, timeout: float) -> Stream:  # noqa: ASYNC109
        """`services.open` for a blob stream, but the stream is reset if writing the header
        fails or is cancelled (it would otherwise be left open, unreachable)."""
        stream = await self._node.open_stream(cell, timeout)
        try:
            await stream.write(header_line(BLOB_KIND))
        except BaseException:
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_BLOB_ABANDONED)
            raise
        return stream

    async def _fetch_reader(self, s: _Session, fetcher: BlobFetcher, wake: asyncio.Event) -> None:
        assert s.stream is not None
        loop = asyncio.get_running_loop()
        reader = _FrameReader(s.stream)
        try:
            while (data := await reader.read_frame()) is not None:
                if len(data) >= 2 and data[1] == BlockMsgType.NACK:
                    with contextlib.suppress(DecodeError):
                        nack = pull_block_message(data)
                        assert isinstance(nack, BlockNack)
                        s.nacks[nack.reason] = s.nacks.get(nack.reason, 0) + 1
                fetcher.receive(s.cell, data, loop.time())
                wake.set()
            if not fetcher.done:  # after the fetch, ending is what we asked for
                s.end("closed", "ended its stream")
        except FrameError as exc:
            # The fetcher never sees the frame: ban here, with the reason, as it would.
            self._count(f"dropped_{exc.reason}")
            s.end("banned", f"bad frame: {exc}")
            s.reset(RESET_BLOB_PROTOCOL)
        except (StreamError, PeerUnreachableError) as exc:
            if not fetcher.done:
                s.end("closed", str(exc))
        if not fetcher.done and s.cell in fetcher.peer_stats():
            fetcher.remove_peer(s.cell, loop.time())
        wake.set()

    async def _fetch_writer(self, s: _Session) -> None:
        assert s.stream is not None
        try:
            while True:
                await s.ready.wait()
                s.ready.clear()
                frames, s.outbox = s.outbox, []
                for part in _batches(frames):
                    await s.stream.write(part)
        except (StreamError, PeerUnreachableError) as exc:
            s.end("closed", str(exc))

    async def _run(
        self,
        fetcher: BlobFetcher,
        sessions: dict[bytes, _Session],
        wake: asyncio.Event,
        progress: ProgressCallback | None,
        deadline: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for peer, msg in fetcher.messages_to_send(now):
                s = sessions.get(peer)
                if s is not None and s.status is None:
                    s.outbox.append(encode_frame(msg))
                    s.ready.set()
            self._drain(fetcher, sessions, progress)
            if fetcher.done:
                return
            # No await since messages_to_send: a wake set by a reader cannot be lost here.
            wake.clear()
            due = fetcher.get_timer()
            if deadline is not None:
                due = deadline if due is None else min(due, deadline)
            delay = None if due is None else max(0.0, due - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
            now = loop.time()
            if deadline is not None and now >= deadline:
                for s in sessions.values():
                    if s.status is None and s.stream is not None:
                        s.end("timed_out", "still connected when the fetch's time ran out")
                p = fetcher.progress()
                raise BlobFetchError(
                    f"cannot fetch blob {fetcher.blob_id.hex()}: timed out with "
                    f"{p.blocks_done} of {p.blocks_total or '?'} block(s)",
                    tuple(s.outcome() for s in sessions.values()),
                )
            fetcher.handle_timer(now)

    def _drain(
        self,
        fetcher: BlobFetcher,
        sessions: dict[bytes, _Session],
        progress: ProgressCallback | None,
    ) -> None:
        fetched = False
        while (ev := fetcher.next_event()) is not None:
            if isinstance(ev, BlockFetched):
                s = sessions[ev.peer]
                s.blocks += 1
                s.bytes += ev.size
                fetched = True
            elif isinstance(ev, BlockRejected):
                sessions[ev.peer].rejected += 1
                self._count("blocks_rejected")
                log.warning(
                    "block %s from %s rejected: %s",
                    ev.block_id.hex()[:16],
                    format_cell_id(ev.peer),
                    ev.reason,
                )
            elif isinstance(ev, PeerBanned | PeerDropped):
                s = sessions[ev.peer]
                banned = isinstance(ev, PeerBanned)
                s.end("banned" if banned else "timed_out", ev.reason)
                self._count("peers_banned" if banned else "peers_dropped")
                # Nothing more from this peer is trusted in this fetch: end its stream now.
                s.reset(RESET_BLOB_PROTOCOL if banned else RESET_BLOB_ABANDONED)
            elif isinstance(ev, FetchComplete | FetchFailed):
                fetched = True
        if fetched and progress is not None:
            progress(fetcher.progress())

    async def _close_all(self, sessions: dict[bytes, _Session], polite: bool) -> None:
        """End every stream of a fetch. `polite`: finish our half and wait briefly for the
        servers to finish theirs; otherwise (cancelled) reset them all at once."""
        try:
            if polite:
                readers: list[asyncio.Task[None]] = []
                for s in sessions.values():
                    if not s.tasks:
                        continue
                    writer = s.tasks[1]
                    writer.cancel()
                    await asyncio.gather(writer, return_exceptions=True)
                    if s.stream is not None and not s.was_reset:
                        with contextlib.suppress(CellmeshError):
                            # Frames still queued (CANCELs) are dropped: the server stops on
                            # EOF anyway.
                            await s.stream.close()
                    readers.append(s.tasks[0])
                if readers:
                    await asyncio.wait(readers, timeout=CLOSE_GRACE)
        finally:
            # Also reached when cancelled during the polite part: whatever is not finished is
            # reset, so no stream outlives the fetch.
            for s in sessions.values():
                unfinished = not s.tasks or any(not t.done() for t in s.tasks)
                if s.stream is not None and (unfinished or not polite):
                    s.reset(RESET_BLOB_ABANDONED)
                for t in s.tasks:
                    t.cancel()
            await asyncio.gather(
                *(t for s in sessions.values() for t in s.tasks), return_exceptions=True
            )


def _verify(manifest: Manifest, store: ChunkStore) -> None:
    """Read the blob back: every chunk against its id, then the whole-file hash."""
    for _ in iter_blob(manifest, store):
        pass


def _export(manifest: Manifest, store: ChunkStore, out: Path) -> None:
    """Write the blob to `out`: a temporary file beside it, fsynced and renamed only once every
    chunk and the whole-file hash verified (so `out` is never a partial or wrong file)."""
    tmp = out.parent / f".{out.name}.{os.getpid()}.{time.monotonic_ns()}.part"
    try:
        with open(tmp, "wb") as f:
            for chunk in iter_blob(manifest, store):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
