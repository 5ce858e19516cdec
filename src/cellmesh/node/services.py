"""`StreamServices`: node-internal protocols (sync, blobs, queries) that run on streams.

Theory of operation
-------------------
Every application stream starts with the intent header documented in `cellmesh.node.transfer`:
one JSON object line (UTF-8, at most `MAX_HEADER` bytes with its newline) whose ``kind`` says
what follows. Services of the node itself (anti-entropy sync, blob fetching, federated queries)
register a handler for their kind here; `Node` hands every stream a peer opens to `route`, which
reads the header line and calls the handler registered for the kind. A stream of any other kind,
or one that does not start with ``{``, goes to `Node.accept_stream` unchanged: the bytes read to
look at the header are pushed back (`Stream.unread`), so the application (the transfer service,
or code of its own) reads the stream from its first byte.

`open` is the other half: it opens a stream to a peer and writes the header of `kind`.

Bounds: at most `MAX_ROUTING` streams have their header read at once, `MAX_ROUTING_PER_PEER` of
one peer (more are reset with `REFUSED`); a stream that opens with ``{`` and sends no newline
within `HEADER_TIMEOUT` seconds or 4096 bytes is handed to the application as it is (the
application's own header rules then apply). A handler runs as a task of its own, at most
`MAX_HANDLERS` at once per node and `MAX_HANDLERS_PER_PEER` per peer (more: reset with
`RESET_SERVICE_BUSY`); a handler that raises costs its stream (reset), never the node. Once the
node stops, new streams are refused and every handler is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from cellmesh.errors import CellmeshError

if TYPE_CHECKING:
    from cellmesh.node.node import Node
    from cellmesh.node.streams import Stream

__all__ = [
    "HEADER_TIMEOUT",
    "MAX_HANDLERS",
    "MAX_HEADER",
    "RESET_SERVICE_BUSY",
    "RESET_SERVICE_ERROR",
    "ServiceHandler",
    "StreamServices",
]

log = logging.getLogger("cellmesh.services")

MAX_HEADER: Final = 4096
HEADER_TIMEOUT: Final = 10.0
MAX_ROUTING: Final = 256
MAX_HANDLERS: Final = 256
MAX_ROUTING_PER_PEER: Final = 16
"""Streams of one peer whose header is being read at once: one peer cannot take the node's
`MAX_ROUTING` slots (opening streams that send only "{" costs it nothing)."""
MAX_HANDLERS_PER_PEER: Final = 32
"""Service handlers running for one peer at once (each service has its own, lower limits)."""
RESET_SERVICE_BUSY: Final = 0x201
"""A service stream refused because `MAX_HANDLERS` already run."""
RESET_SERVICE_ERROR: Final = 0x202
"""A service handler failed on this stream (a bug or a broken peer; logged)."""

ServiceHandler = Callable[["Stream", dict[str, Any]], Awaitable[None]]
"""Serves one incoming stream; the header object is passed in, the stream is positioned after it."""


def header_line(kind: str, **fields: Any) -> bytes:
    """The intent header line for a stream of `kind`."""
    obj: dict[str, Any] = {"v": 1, "kind": kind}
    obj.update(fields)
    line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_HEADER:
        raise ValueError(f"stream header of {len(line)} bytes exceeds {MAX_HEADER}")
    return line


class StreamServices:
    """The kinds of stream the node serves itself, and the routing of incoming streams."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._handlers: dict[str, ServiceHandler] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._routing = 0
        self._routing_of: Counter[bytes] = Counter()
        self._handlers_of: Counter[bytes] = Counter()
        self._serving = 0
        self._stopping = False
        self.counters: dict[str, int] = {}

    def register(self, kind: str, handler: ServiceHandler) -> None:
        """Serve streams whose header says `kind` with `handler`."""
        if kind in ("file", "pipe"):
            raise ValueError(f"kind {kind!r} belongs to the transfer service")
        self._handlers[kind] = handler

    def unregister(self, kind: str) -> None:
        self._handlers.pop(kind, None)

    @property
    def active(self) -> bool:
        """True when some service is registered (otherwise streams go straight to the app)."""
        return bool(self._handlers)

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    async def open(
        self,
        peer: bytes | str,
        kind: str,
        timeout: float = 5.0,  # noqa: ASYNC109 - bounds connecting, like Node.open_stream
        **fields: Any,
    ) -> Stream:
        """Open a stream to `peer` and write the header of `kind` (with `fields`)."""
        line = header_line(kind, **fields)
        st = await self._node.open_stream(peer, timeout)
        try:
            await st.write(line)
        except BaseException:
            # Cancelled or failed before the header was out: never leave the stream open (the
            # peer would hold a routing slot for it until its header timeout).
            with contextlib.suppress(CellmeshError):
                st.reset()
            raise
        return st

    def route(self, stream: Stream) -> bool:
        """Take an incoming stream: False if it must be refused (too many being routed, for
        the node or for this peer, or the node is stopping)."""
        peer = stream.cell_id
        if self._stopping:
            self._count("refused_stopping")
            return False
        if self._routing >= MAX_ROUTING or self._routing_of[peer] >= MAX_ROUTING_PER_PEER:
            self._count("refused_routing")
            return False
        self._routing += 1
        self._routing_of[peer] += 1
        self._spawn(self._route(stream), f"route-{stream.stream_id}")
        return True

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _route(self, stream: Stream) -> None:
        peer = stream.cell_id
        try:
            head, header = await self._read_header(stream)
        except CellmeshError as exc:
            log.debug("stream %d ended before its header: %s", stream.stream_id, exc)
            return
        finally:
            self._routing -= 1
            self._routing_of[peer] -= 1
            if self._routing_of[peer] <= 0:
                del self._routing_of[peer]
        handler = None if header is None else self._handlers.get(str(header.get("kind")))
        if handler is None or header is None:
            stream.unread(head)
            self._node._hand_to_application(stream)
            return
        if (
            self._stopping
            or self._serving >= MAX_HANDLERS
            or self._handlers_of[peer] >= MAX_HANDLERS_PER_PEER
        ):
            self._count("refused_busy")
            stream.reset(RESET_SERVICE_BUSY)
            return
        self._count(f"served_{header['kind']}")
        self._serving += 1
        self._handlers_of[peer] += 1
        self._spawn(self._serve(handler, stream, header), f"serve-{header['kind']}")

    async def _serve(self, handler: ServiceHandler, stream: Stream, header: dict[str, Any]) -> None:
        peer = stream.cell_id
        try:
            await handler(stream, header)
        except CellmeshError as exc:
            log.info("%s stream from %s ended: %s", header.get("kind"), stream.cell_id.hex(), exc)
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_SERVICE_ERROR)
        except asyncio.CancelledError:
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_SERVICE_ERROR)
            raise
        except Exception:  # a bug costs one stream, never the node
            log.exception("%s stream: internal error", header.get("kind"))
            self._count("handler_error")
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_SERVICE_ERROR)
        finally:
            self._serving -= 1
            self._handlers_of[peer] -= 1
            if self._handlers_of[peer] <= 0:
                del self._handlers_of[peer]

    async def _read_header(self, stream: Stream) -> tuple[bytes, dict[str, Any] | None]:
        """The bytes read and the header object (None: not a service header)."""
        buf = bytearray()
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                while True:
                    chunk = await stream.read(MAX_HEADER - len(buf))
                    if not chunk:
                        return bytes(buf), None
                    buf += chunk
                    if buf[:1] != b"{":
                        return bytes(buf), None
                    nl = buf.find(b"\n")
                    if nl >= 0:
                        break
                    if len(buf) >= MAX_HEADER:
                        return bytes(buf), None
        except TimeoutError:
            return bytes(buf), None
        line, rest = bytes(buf[: nl + 1]), bytes(buf[nl + 1 :])
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            return bytes(buf), None
        if not isinstance(obj, dict) or obj.get("v") != 1 or obj.get("kind") not in self._handlers:
            return bytes(buf), None
        if rest:
            stream.unread(rest)
        return line, obj

    async def stop(self) -> None:
        """Refuse new streams, then cancel every handler and routing task and wait for them
        (a stream that arrived meanwhile is refused, so none outlives the node)."""
        self._stopping = True
        while self._tasks:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
