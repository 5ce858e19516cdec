"""The local control API: newline-delimited JSON over a Unix socket in the node's home (mode 0600).

Request:  {"op": "peers"}                 one JSON object per line, at most 64 KiB
Response: {"ok": true, "result": ...}     or {"ok": false, "error": "one-line message", "kind": "..."}

Operations: `status`, `peers`, `ping` {cell_id, timeout, size}, `connect` {address, timeout},
`transfers` (transfers in progress). Blob operations (`blobs`, and the streaming `blob_fetch`):
node/blob_control.py.

Transfer operations take over the connection and close it after their final line:

* `cp` {cell_id, path, name?}: progress lines `{"phase": ..., "progress": n, "total": N}` (at most
  one per 100 ms), then `{"ok": true, "result": {...}}` or an error line.
* `send` {cell_id}: `{"ok": true, "stream_id": n}`, then the client writes raw bytes and half-closes
  (shutdown SHUT_WR); final line `{"ok": true, "result": {"bytes": N, "seconds": s}}`. A client
  that closes the whole connection instead (it died) gets its stream reset, not finished.
* `recv` {timeout?}: `{"ok": true, "cell_id": hex, "stream_id": n}` once a pipe arrives, then frames:
  u32 big-endian length + data; length 0 ends cleanly; 0xFFFFFFFF is followed by one JSON line
  `{"error": ..., "kind": ...}` (the stream was reset or the peer went away).

Only the owner of the home directory can reach the socket; the API never returns key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from cellmesh.errors import (
    AccessDeniedError,
    CellmeshError,
    ControlError,
    DecodeError,
    PeerUnreachableError,
)
from cellmesh.identity.cellid import format_cell_id, parse_cell_id
from cellmesh.identity.tokens import TokenError
from cellmesh.node.anchor_control import ANCHOR_OPS, anchor_op
from cellmesh.node.blob_control import BLOB_OPS, BLOB_STREAMING_OPS, blob_op, blob_streaming_op
from cellmesh.node.channel_control import CHANNEL_OPS, channel_op
from cellmesh.node.node import Node
from cellmesh.node.state_control import STATE_OPS, state_op
from cellmesh.node.streams import Stream, StreamError
from cellmesh.node.transfer import (
    CHUNK,
    IncomingPipe,
    TransferError,
    TransferInfo,
    TransferService,
    stream_error_text,
)

log = logging.getLogger("cellmesh.control")
MAX_LINE = 64 * 1024
PROGRESS_INTERVAL: Final = 0.1
"""Seconds between `cp` progress lines (at most)."""
FRAME_END: Final = 0
FRAME_ERROR: Final = 0xFFFFFFFF
MAX_FRAME: Final = 16 * 1024 * 1024
STREAMING_OPS: Final = frozenset({"cp", "send", "recv"})
_FRAME = struct.Struct(">I")


class _ClientGone(CellmeshError):
    """The control client closed its whole connection (not just its sending half)."""


def _hung_up(writer: asyncio.StreamWriter) -> bool:
    """True when the peer closed the whole connection, not just its sending half.

    Both look like EOF to a reader. On a Unix socket, POLLHUP is only raised once both directions
    are shut, so it tells an interrupted client (Ctrl-C) from one that finished its input.
    """
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


def _error(exc: BaseException) -> dict[str, Any]:
    """The `{"ok": false, ...}` line for an exception from a transfer."""
    if isinstance(exc, PeerUnreachableError):
        return {"ok": False, "error": str(exc), "kind": "unreachable"}
    if isinstance(exc, StreamError):
        return {"ok": False, "error": stream_error_text(exc), "kind": "reset"}
    if isinstance(exc, TransferError):
        return {"ok": False, "error": str(exc), "kind": exc.kind}
    if isinstance(exc, ValueError | TypeError | KeyError):
        return {"ok": False, "error": f"bad request: {exc}", "kind": "bad_request"}
    if isinstance(exc, OSError):  # reading the file failed midway (EIO, a vanished mount, ...)
        return {"ok": False, "error": f"I/O error: {exc.strerror or exc}", "kind": "file"}
    return {"ok": False, "error": str(exc), "kind": "error"}


def _socket_in_use(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


class ControlServer:
    """Serves the control API of one `Node` (and of its `TransferService`, when given one)."""

    def __init__(self, node: Node, path: Path, transfers: TransferService | None = None) -> None:
        self.node = node
        self.path = path
        self.transfers = transfers
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Create the socket (refusing if another node already serves this home)."""
        if self.path.exists():
            if _socket_in_use(self.path):
                raise ControlError(
                    f"another node is already running with this home ({self.path} is live)"
                )
            self.path.unlink()  # stale socket left by a node that was killed
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """Close the socket, end the connections still open (a waiting `recv`, say), remove it."""
        if self._server is not None:
            self._server.close()
            # Newer Pythons make wait_closed wait for every connection: end them first.
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        stopping = False
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(
                        writer, {"ok": False, "error": "request too long", "kind": "bad_request"}
                    )
                    return
                if not line:
                    return
                req = self._parse(line)
                if "ok" in req:  # not a request: the error to answer
                    await self._reply(writer, req)
                elif req["op"] in BLOB_STREAMING_OPS:
                    await blob_streaming_op(self.node, req, reader, writer)
                    return  # like the transfer operations: it ends with its final line
                elif req["op"] in STREAMING_OPS:
                    await self._streaming(req, reader, writer)
                    return  # these take over the connection; it ends with their final line
                else:
                    await self._reply(writer, await self._serve_request(req))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            stopping = True  # the server is stopping: end this connection quietly
        finally:
            if task is not None:
                self._connections.discard(task)
            # close() first flushes what is buffered, which never ends if the client stopped
            # reading (a stuck `recv`); a stopping server must not wait for that.
            if stopping:
                writer.transport.abort()
            else:
                writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
            except asyncio.CancelledError:
                writer.transport.abort()
                raise

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any]:
        """The request, or (when it has an "ok" key) the error reply for a malformed one."""
        try:
            req = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON", "kind": "bad_request"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "request needs an 'op' string", "kind": "bad_request"}
        req.pop("ok", None)
        return req

    async def _serve_line(self, line: bytes) -> dict[str, Any]:
        """Answer one request line of a non-streaming op."""
        req = self._parse(line)
        if "ok" in req:
            return req
        return await self._serve_request(req)

    async def _serve_request(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"ok": True, "result": await self._op(req)}
        except PeerUnreachableError as exc:
            return {"ok": False, "error": str(exc), "kind": "unreachable"}
        except AccessDeniedError as exc:
            return {"ok": False, "error": str(exc), "kind": "access_denied", "reason": exc.reason}
        except (DecodeError, TokenError) as exc:
            return {"ok": False, "error": f"bad token or revocation: {exc}", "kind": "bad_request"}
        except (ValueError, TypeError, KeyError) as exc:
            return {"ok": False, "error": f"bad request: {exc}", "kind": "bad_request"}

    async def _op(self, req: dict[str, Any]) -> Any:
        op = req["op"]
        node = self.node
        if op == "status":
            return node.status()
        if op == "peers":
            return node.peer_rows()
        if op == "ping":
            timeout = float(req.get("timeout", 2.0))
            size = int(req.get("size", 0))
            if not 0 <= size <= 60000:
                raise ValueError("size must be between 0 and 60000")
            if not 0 < timeout <= 300:
                raise ValueError("timeout must be between 0 and 300 seconds")
            rtt = await node.ping(str(req["cell_id"]), timeout=timeout, data=bytes(size))
            return {"rtt": rtt}
        if op == "connect":
            cell = await node.connect(str(req["address"]), timeout=float(req.get("timeout", 5.0)))
            return {"cell_id": cell.hex()}
        if op == "transfers":
            return [] if self.transfers is None else self.transfers.transfers()
        if op in CHANNEL_OPS:
            return await channel_op(node, req)
        if op in ANCHOR_OPS:
            return anchor_op(node, req)
        if op in BLOB_OPS:
            return blob_op(node, req)
        if op in STATE_OPS:
            return await state_op(node, req)
        if op in ("routes", "routing", "trace"):
            return await _routing_op(node, req)
        raise ValueError(f"unknown op {op!r}")

    # ------------------------------------------------------------------ transfer operations

    async def _streaming(
        self, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.transfers is None:
            await self._reply(
                writer,
                {"ok": False, "error": "this node does not serve transfers", "kind": "bad_request"},
            )
            return
        op = req["op"]
        try:
            if op == "cp":
                await self._cp(self.transfers, req, reader, writer)
            elif op == "send":
                await self._send(self.transfers, req, reader, writer)
            else:
                await self._recv(self.transfers, req, reader, writer)
        except (ConnectionError, _ClientGone):
            return  # nobody left to answer
        except (CellmeshError, ValueError, TypeError, KeyError, OSError) as exc:
            await self._reply(writer, _error(exc))

    async def _cp(
        self,
        service: TransferService,
        req: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        cell = parse_cell_id(str(req["cell_id"]))
        path = Path(str(req["path"]))
        if not path.is_absolute():
            raise ValueError(f"path must be absolute, got {str(path)!r}")
        name = req.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError("name must be a string")
        latest: list[TransferInfo] = []

        def on_progress(info: TransferInfo) -> None:
            latest[:] = [info]

        task = asyncio.create_task(service.send_file(cell, path, name, on_progress))
        # The client sends nothing more; EOF on its side means it went away: cancel then.
        hangup = asyncio.create_task(reader.read(1))
        last: tuple[str, int] | None = None
        try:
            while True:
                done, _ = await asyncio.wait(
                    {task, hangup}, timeout=PROGRESS_INTERVAL, return_when=asyncio.FIRST_COMPLETED
                )
                if task in done:
                    break
                if hangup in done:
                    raise _ClientGone()
                if latest:
                    info = latest[0]
                    now = (info.phase, info.done)
                    if now != last:
                        last = now
                        await self._reply(
                            writer,
                            {"phase": info.phase, "progress": info.done, "total": info.total},
                        )
            await self._reply(writer, {"ok": True, "result": task.result()})
        finally:
            for t in (task, hangup):
                t.cancel()
            await asyncio.gather(task, hangup, return_exceptions=True)

    async def _send(
        self,
        service: TransferService,
        req: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        cell = parse_cell_id(str(req["cell_id"]))

        async def opened(stream: Stream) -> None:
            await self._reply(writer, {"ok": True, "stream_id": stream.stream_id})

        async def chunks() -> AsyncIterator[bytes]:
            while data := await reader.read(CHUNK):
                yield data
            if _hung_up(writer):
                raise TransferError("the sending client went away", "cancelled")

        result = await service.send_pipe(cell, chunks(), opened)
        await self._reply(writer, {"ok": True, "result": result})

    async def _recv(
        self,
        service: TransferService,
        req: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        timeout = req.get("timeout")
        if timeout is not None:
            timeout = float(timeout)
            if not 0 < timeout <= 86400:
                raise ValueError("timeout must be between 0 and 86400 seconds")
        claim = asyncio.create_task(service.claim_pipe())
        hangup = asyncio.create_task(reader.read(1))
        try:
            done, _ = await asyncio.wait(
                {claim, hangup}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if claim not in done:
                claim.cancel()  # a pipe handed over meanwhile goes back to the queue
                await asyncio.gather(claim, return_exceptions=True)
                if hangup in done:
                    raise _ClientGone()
                raise TransferError(f"no incoming pipe within {timeout:g} s", "timeout")
            pipe = claim.result()
        finally:
            hangup.cancel()
            await asyncio.gather(hangup, return_exceptions=True)
        try:
            await self._pump_frames(pipe, writer)
        finally:
            await pipe.finish()

    async def _pump_frames(self, pipe: IncomingPipe, writer: asyncio.StreamWriter) -> None:
        await self._reply(
            writer,
            {"ok": True, "cell_id": format_cell_id(pipe.cell_id), "stream_id": pipe.stream_id},
        )
        t0 = time.monotonic()
        try:
            while data := await pipe.read(CHUNK):
                writer.write(_FRAME.pack(len(data)) + data)
                await writer.drain()
        except (StreamError, PeerUnreachableError) as exc:
            err = _error(exc)
            log.info("pipe from %s failed: %s", format_cell_id(pipe.cell_id), err["error"])
            writer.write(_FRAME.pack(FRAME_ERROR))
            await self._reply(writer, {"error": err["error"], "kind": err["kind"]})
            return
        except ConnectionError:
            # `finish` (in our caller) resets the unfinished pipe: the sender learns of it.
            log.info("recv client went away; pipe from %s reset", format_cell_id(pipe.cell_id))
            raise
        writer.write(_FRAME.pack(FRAME_END))
        await writer.drain()
        log.info(
            "pipe from %s delivered: %d bytes in %.2f s",
            format_cell_id(pipe.cell_id),
            pipe.info.done,
            time.monotonic() - t0,
        )


async def _routing_op(node: Node, req: dict[str, Any]) -> Any:
    routing = node.routing
    if routing is None:
        raise ValueError("routing is off on this node (config routing = false)")
    op = req["op"]
    if op == "routes":
        return routing.routes()
    if op == "routing":
        return routing.status()
    hops = int(req.get("max_hops", 16))
    if not 1 <= hops <= 64:
        raise ValueError("max_hops must be between 1 and 64")
    timeout = float(req.get("timeout", 2.0))
    if not 0 < timeout <= 30:
        raise ValueError("timeout must be between 0 and 30 seconds")
    return await routing.trace(parse_cell_id(str(req["cell_id"])), hops, timeout)


class ControlClient:
    """Talks to a running node's control socket. `async with ControlClient(path) as c: ...`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ControlClient:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                str(self.path), limit=16 * 1024 * 1024
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            home = self.path.parent
            raise ControlError(
                f"no node is running for {home} (nothing answers at {self.path}); "
                f"start one with: cellmesh --home {home} node"
            ) from exc
        except PermissionError as exc:
            raise ControlError(f"permission denied on {self.path}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    async def call(self, op: str, **args: Any) -> Any:
        """Send one request; return its result or raise ControlError/PeerUnreachableError."""
        if self._reader is None or self._writer is None:
            raise ControlError("client is not connected")
        self._writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await self._writer.drain()
        line = await self._reader.readline()
        if not line:
            raise ControlError("the node closed the control connection")
        reply = json.loads(line)
        if reply.get("ok"):
            return reply.get("result")
        if reply.get("kind") == "unreachable":
            raise PeerUnreachableError(str(reply.get("error")))
        if reply.get("kind") == "access_denied":
            raise AccessDeniedError(str(reply.get("error")), str(reply.get("reason")))
        raise ControlError(str(reply.get("error")))

    # ------------------------------------------------------------------ transfer operations
    # Each takes over the connection (the node closes it after the final line): use a fresh
    # client per transfer.

    def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            raise ControlError("client is not connected")
        return self._reader, self._writer

    async def _request(self, op: str, **args: Any) -> None:
        _, writer = self._streams()
        writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await writer.drain()

    async def _read_reply(self) -> dict[str, Any]:
        reader, _ = self._streams()
        line = await reader.readline()
        if not line:
            raise ControlError("the node closed the control connection")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ControlError("the node sent something that is not a JSON object")
        return reply

    @staticmethod
    def _failed(reply: dict[str, Any]) -> CellmeshError:
        if reply.get("kind") == "unreachable":
            return PeerUnreachableError(str(reply.get("error")))
        return ControlError(str(reply.get("error")))

    async def cp(
        self,
        cell_id: str,
        path: str,
        name: str | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Have the node send the file at absolute `path` to `cell_id`'s inbox.

        `on_progress` gets each `{"phase", "progress", "total"}` line. Returns the result: the
        receiver's `path`, `name`, `bytes`, `blake3`, plus `seconds` and `hash_seconds`. Raises
        PeerUnreachableError, or ControlError with the reason (the receiver's own words if it
        refused).
        """
        args: dict[str, Any] = {"cell_id": cell_id, "path": path}
        if name is not None:
            args["name"] = name
        await self._request("cp", **args)
        return await self._result_after_progress(on_progress)

    async def blob_fetch(
        self,
        blob_id: str,
        path: str,
        peers: list[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the node's deadline, sent with the op
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Have the node fetch blob `blob_id` from `peers` (default: every connected peer) and
        write it to absolute `path` (op `blob_fetch`, node/blob_control.py). `on_progress`
        gets each `{"phase", "progress", "total"}` line. Raises ControlError with the reason."""
        args: dict[str, Any] = {"blob_id": blob_id, "path": path}
        if peers:
            args["peers"] = peers
        if timeout is not None:
            args["timeout"] = timeout
        await self._request("blob_fetch", **args)
        return await self._result_after_progress(on_progress)

    async def _result_after_progress(
        self, on_progress: Callable[[dict[str, Any]], None] | None
    ) -> dict[str, Any]:
        """Read progress lines (passed to `on_progress`) until the final answer of a long op."""
        while True:
            reply = await self._read_reply()
            if "ok" not in reply:
                if on_progress is not None:
                    on_progress(reply)
                continue
            if reply["ok"]:
                result: dict[str, Any] = reply["result"]
                return result
            raise self._failed(reply)

    async def send(
        self,
        cell_id: str,
        chunks: AsyncIterator[bytes],
        on_open: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Stream every chunk to `cell_id` as one pipe; returns `{"bytes", "seconds", ...}`.

        If `chunks` raises, the connection is aborted (not half-closed), so the node resets the
        stream instead of ending it: the receiver never mistakes a cut-short input for the whole.
        """
        _, writer = self._streams()
        await self._request("send", cell_id=cell_id)
        first = await self._read_reply()
        if not first.get("ok"):
            raise self._failed(first)
        if on_open is not None:
            on_open(first)

        async def pump() -> None:
            try:
                async for data in chunks:
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                raise
            except BaseException:
                writer.transport.abort()
                raise
            writer.write_eof()

        pump_task = asyncio.create_task(pump())
        final_task = asyncio.create_task(self._read_reply())
        try:
            await asyncio.wait({pump_task, final_task}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task.done() and not isinstance(pump_task.exception(), ConnectionError | None):
                pump_task.result()  # the source failed: raise its error
            final = await final_task  # an early answer is an error; the node stopped reading
        finally:
            for t in (pump_task, final_task):
                t.cancel()
            await asyncio.gather(pump_task, final_task, return_exceptions=True)
        if not final.get("ok"):
            raise self._failed(final)
        result: dict[str, Any] = final["result"]
        return {**result, "cell_id": cell_id}

    async def recv(
        self,
        sink: Callable[[bytes], Awaitable[None]],
        pipe_timeout: float | None = None,
        on_open: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Have the node wait (up to `pipe_timeout` s; None: forever) for one incoming pipe and
        feed its bytes to `sink`.

        `on_open` gets `{"cell_id", "stream_id"}` when a pipe is claimed. Returns those plus
        `bytes` and `seconds` once the sender finished cleanly. Raises PeerUnreachableError if the
        sender went away, ControlError if it reset the stream (or no pipe came in time).
        """
        reader, _ = self._streams()
        args: dict[str, Any] = {} if pipe_timeout is None else {"timeout": pipe_timeout}
        await self._request("recv", **args)
        first = await self._read_reply()
        if not first.get("ok"):
            raise self._failed(first)
        if on_open is not None:
            on_open(first)
        t0 = time.monotonic()
        total = 0
        try:
            while True:
                (length,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                if length == FRAME_END:
                    break
                if length == FRAME_ERROR:
                    raise self._failed(await self._read_reply())
                if length > MAX_FRAME:
                    raise ControlError(f"the node sent a frame of {length} bytes")
                await sink(await reader.readexactly(length))
                total += length
        except asyncio.IncompleteReadError:
            raise ControlError("the node closed the control connection mid-stream") from None
        return {
            "cell_id": first.get("cell_id"),
            "stream_id": first.get("stream_id"),
            "bytes": total,
            "seconds": time.monotonic() - t0,
        }
