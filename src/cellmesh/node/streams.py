"""`Stream`: an asyncio face on one reliable cellmesh stream (the core lives in transport/).

Reading hands bytes to the application and only then tells the core they were consumed, so the
peer's flow-control window reopens at the speed the application actually reads. Writing waits
while the stream's send buffer is full. Errors (a reset by the peer, the peer disconnecting) are
raised from `read`, `write` and `wait_acknowledged` as `StreamError`/`PeerUnreachableError`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from cellmesh.errors import CellmeshError, LocalProtocolError, PeerUnreachableError

if TYPE_CHECKING:
    from cellmesh.node.node import Node

RESET_BY_APPLICATION = 1
# Pieces shorter than this are gathered into bytearray tails of up to _TAIL_MAX bytes as they
# arrive. A peer sending tiny frames (one or two bytes each, many per packet) would otherwise
# make an unread stream hold a Python object per frame: ~20 B of memory per byte of window.
# Full frames at the 1200-byte path MTU (~1,100 bytes) stay as they are.
_GATHER_BELOW = 1024
_TAIL_MAX = 64 * 1024


class StreamError(CellmeshError):
    """The stream was reset (by the peer, or because the peer went away)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class Stream:
    """One bidirectional byte stream to a peer. Create with `Node.open_stream`/`accept_stream`."""

    def __init__(self, node: Node, cell_id: bytes, stream_id: int) -> None:
        self._node = node
        self.cell_id = cell_id
        self.stream_id = stream_id
        # What arrived and is not read yet: large frames as views of their packets, small ones
        # gathered into bytearray tails (never handed out: reads turn them into bytes).
        self._chunks: deque[bytes | memoryview | bytearray] = deque()
        self._unread: deque[bytes] = deque()
        """Bytes already read (and credited to flow control) that were pushed back."""
        self._eof = False
        self._error: CellmeshError | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._acknowledged = asyncio.Event()
        self._write_closed = False
        self.bytes_read = 0
        self.bytes_written = 0

    # -- fed by the node's event dispatch

    def _feed(self, data: bytes | memoryview, fin: bool) -> None:
        if data:
            chunks = self._chunks
            if len(data) >= _GATHER_BELOW:
                # (a bytearray at the tail must be one of ours: `_feed` appends to those)
                chunks.append(bytes(data) if isinstance(data, bytearray) else data)
            else:
                tail = chunks[-1] if chunks else None
                if type(tail) is bytearray and len(tail) < _TAIL_MAX:
                    tail += data
                else:
                    chunks.append(bytearray(data))
        if fin:
            self._eof = True
        self._readable.set()

    def _fail(self, error: CellmeshError) -> None:
        if self._error is None:
            self._error = error
        # Unread bytes are abandoned (the transport returns their flow credit on the reset),
        # pushed-back ones too: after a reset, reads raise rather than return old bytes.
        self._chunks.clear()
        self._unread.clear()
        self._readable.set()
        self._writable.set()
        self._acknowledged.set()

    def _on_writable(self) -> None:
        self._writable.set()

    def _on_finished(self) -> None:
        self._acknowledged.set()

    # -- application API

    def unread(self, data: bytes) -> None:
        """Push `data` (bytes just read from this stream) back: the next reads return it
        first. Used by the node to look at a stream's header before the application does."""
        if data:
            self._unread.appendleft(bytes(data))
            self.bytes_read -= len(data)

    async def read(self, n: int = 65536) -> bytes:
        """Up to `n` bytes; b"" once the peer has finished the stream."""
        if self._unread:
            chunk = self._unread.popleft()
            if len(chunk) > n:
                self._unread.appendleft(chunk[n:])
                chunk = chunk[:n]
            self.bytes_read += len(chunk)
            return chunk  # its flow credit was returned when it was first read
        if not await self._wait_readable():
            return b""
        chunks = self._chunks
        first = chunks.popleft()
        if len(first) > n:
            chunks.appendleft(first[n:])
            first = first[:n]
        if chunks and len(first) + len(chunks[0]) <= n:
            # Several packets' worth waiting: hand them over together (one await, one flow
            # credit update) rather than one packet-sized piece per read.
            parts = [first]
            size = len(first)
            while chunks and size + len(chunks[0]) <= n:
                nxt = chunks.popleft()
                parts.append(nxt)
                size += len(nxt)
            chunk = b"".join(parts)
        else:
            chunk = first if type(first) is bytes else bytes(first)  # (a view of a packet)
        self.bytes_read += len(chunk)
        self._node._stream_consumed(self, len(chunk))
        return chunk

    async def read_chunks(self, n: int = 1 << 20) -> list[bytes | memoryview]:
        """What has arrived, up to `n` bytes, as the pieces it arrived in, without copying:
        a large packet's data is a read-only view of that decrypted packet (which it keeps in
        memory while referenced); pieces under 1 KiB come gathered into larger bytes (copied
        once as they arrived). An empty list once the peer has finished the stream.

        For bulk consumers that hash or write what they read: `read` joins the pieces into
        one bytes object, a copy of every byte; this hands them over as they are."""
        if n < 1:
            raise ValueError(f"read_chunks needs n >= 1, got {n}")  # ([] means the end)
        if self._unread:
            return [await self.read(n)]
        if not await self._wait_readable():
            return []
        chunks = self._chunks
        out: list[bytes | memoryview] = []
        size = 0
        while chunks and size < n:
            got = chunks.popleft()
            # (a gathered tail is ours, and mutable: it leaves as bytes)
            piece = bytes(got) if isinstance(got, bytearray) else got
            if size + len(piece) > n:
                view = memoryview(piece)  # (a view of a view is still the same packet)
                chunks.appendleft(view[n - size :])
                piece = view[: n - size]
            out.append(piece)
            size += len(piece)
        self.bytes_read += size
        self._node._stream_consumed(self, size)
        return out

    async def _wait_readable(self) -> bool:
        """Wait until unread pieces are buffered (True) or the stream ended (False); raises
        the stream's error if it failed."""
        while not self._chunks:
            if self._eof:
                self._node._stream_eof(self)
                return False
            if self._error is not None:
                raise self._error
            self._readable.clear()
            await self._readable.wait()
        return True

    async def read_all(self, limit: int = 64 * 1024 * 1024) -> bytes:
        """Everything until the peer finishes the stream (at most `limit` bytes)."""
        out = bytearray()
        while True:
            chunk = await self.read()
            if not chunk:
                return bytes(out)
            out += chunk
            if len(out) > limit:
                raise LocalProtocolError(f"stream longer than {limit} bytes")

    async def write(self, data: bytes) -> None:
        """Queue `data`, waiting while the send buffer is full."""
        if self._write_closed:
            raise LocalProtocolError("stream is closed for writing")
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise self._error
            space = self._node._stream_space(self)
            if space <= 0:
                self._writable.clear()
                await self._writable.wait()
                continue
            if space >= len(view) and len(view) == len(data) and type(data) is bytes:
                part = data  # all of it fits (the usual case): no copy before the stream's own
            else:
                part = bytes(view[:space])
            self._node._stream_write(self, part, fin=False)
            self.bytes_written += len(part)
            view = view[space:]

    async def close(self) -> None:
        """Finish our half of the stream (the peer reads EOF after the last byte)."""
        if self._write_closed:
            return
        if self._error is not None:
            raise self._error
        self._write_closed = True
        self._node._stream_write(self, b"", fin=True)

    async def wait_acknowledged(self) -> None:
        """Wait until the peer acknowledged every byte written and the end of the stream."""
        await self._acknowledged.wait()
        if self._error is not None:
            raise self._error

    def reset(self, code: int = RESET_BY_APPLICATION) -> None:
        """Abandon the stream in both directions; the peer sees a reset with `code`."""
        self._node._stream_reset(self, code)
        self._fail(StreamError(f"stream reset locally (code {code})", code))

    @property
    def at_eof(self) -> bool:
        """The peer finished the stream and everything was read."""
        return self._eof and not self._chunks and not self._unread


def peer_gone(cell_hex: str, reason: str) -> PeerUnreachableError:
    """The error streams fail with when their peer disconnects."""
    return PeerUnreachableError(f"peer {cell_hex} disconnected: {reason}")
