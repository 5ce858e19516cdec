"""File and pipe transfer over cellmesh streams: the stream intent header, `TransferService`.

Stream intent header
--------------------
Every application stream starts with one JSON line: UTF-8, terminated by "\\n", at most
`MAX_HEADER` (4096) bytes including the newline. It says what the rest of the stream is:

```
{"v": 1, "kind": "pipe"}
{"v": 1, "kind": "file", "name": "<basename>", "size": <int>, "blake3": "<64 hex>"}
```

The payload bytes follow the newline. Keys other than these are ignored (room to grow); `v` is
the header version and must be 1. A receiver that gets a header that is not one JSON object line
within 4096 bytes, has another `v`, or an unknown `kind` logs a warning and resets the stream with
`RESET_BAD_HEADER`; it never crashes and keeps serving other streams. A stream that sends no complete
header within `header_timeout` seconds is reset with `RESET_HEADER_TIMEOUT`.

For "file" the receiver answers on its own half of the same stream with one JSON line, then
closes that half:

```
{"ok": true, "path": "/home/me/.cellmesh/inbox/report.pdf", "bytes": 20971520, "name": "report.pdf", "blake3": "..."}
{"ok": false, "error": "BLAKE3 mismatch: the data received is not what the sender announced"}
```

It answers only after the sender finished the stream, except when it refuses early (a bad name or
size, more bytes than announced, a local write error): then it answers at once, closes its half,
waits briefly for that answer to be acknowledged and resets the stream (`RESET_REJECTED`) so the
sender stops. A well-formed "file" header with a bad field (name, size, blake3) gets an error
answer as well as the reset, so the sender can say why. The sender may read the answer while it is
still writing, and stops as soon as one arrives.

For "pipe" the receiver queues the stream for a local reader (`claim_pipe`, the control API's
`recv`). It never writes on its half, and ends it (FIN) only once that reader has taken every byte
up to the sender's end: so a sender that reads the end of the receiver's half knows the bytes were
delivered, not merely buffered by the receiving node. If the reader goes away first the stream is
reset (`RESET_CANCELLED`). At most `pipe_backlog` pipes wait; more are reset with `RESET_BUSY`, and
one that nobody claims within `claim_timeout` seconds with `RESET_UNCLAIMED`.

Stream reset codes used here (u16 on the wire): see the `RESET_*` constants and `describe_reset`.
Code 2 is the node's own "accept backlog full" refusal.

Receiving files
---------------
The name must be a bare file name: not empty, ".", ".." or a partial-file name, without "/", NUL
or control characters, at most 255 bytes of UTF-8. Bytes go to `inbox/.NAME.<16 hex>.partial`
(mode 0600; the inbox is created mode 0700), hashed with BLAKE3 while they are written; more bytes
than announced are refused at once, fewer at the end too, and so is a sender that sends nothing for
`stall_timeout` seconds. At the end the size and the BLAKE3 are
checked, the file is fsynced and appears under its final name atomically: `inbox/NAME`, or
`NAME (1)`, `NAME (2)`, ... if that exists. Existing files are never overwritten: the partial file
is hard-linked to the final name (`link` fails instead of replacing, unlike `rename`) and then
unlinked. On any failure the partial file is deleted and the sender told why; if the peer goes away
mid-transfer the partial file is deleted and the event logged. A node killed mid-transfer leaves
its partial file behind; `TransferService.start` deletes every partial file in the inbox (one
home is served by one node at a time, so none can belong to a live transfer).

Concurrency: each incoming stream is served by its own task, at most `max_concurrent` at once
(more are reset with `RESET_BUSY` before their header is read). File I/O and hashing run in worker
threads in batches of about 1 MiB so the event loop keeps moving packets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import blake3

from cellmesh.errors import CellmeshError, LocalProtocolError, PeerUnreachableError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.node.node import REFUSED, Node
from cellmesh.node.streams import Stream, StreamError

log = logging.getLogger("cellmesh.transfer")
T = TypeVar("T")

HEADER_VERSION: Final = 1
MAX_HEADER: Final = 4096
"""Longest intent header line in bytes, newline included."""
MAX_NAME_BYTES: Final = 255
MAX_VERDICT: Final = 64 * 1024
"""Longest answer line a sender accepts from a receiver."""
CHUNK: Final = 256 * 1024
"""Bytes per file read on the sending side and per stream read on the receiving side."""
WRITE_BATCH: Final = 1024 * 1024
"""Received bytes gathered before one write+hash in a worker thread (amortises the thread hop)."""
_HASH_JOIN_BELOW: Final = 16 * 1024
"""Received pieces shorter than this are hashed joined (see `hash_pieces`)."""


def _iov_max() -> int:
    try:
        limit = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        limit = -1
    return min(512, limit) if limit > 0 else 16  # (16: the POSIX minimum)


_WRITEV_MAX: Final = _iov_max()
"""Pieces per `writev`: the system's IOV_MAX (1024 on Linux), at most 512."""
HASH_STEP: Final = 4 * 1024 * 1024
"""Bytes hashed per worker-thread call in the sender's first pass (one progress step)."""
REFUSE_LINGER: Final = 5.0
"""Seconds a refusing receiver waits for its answer to be acknowledged before resetting."""

RESET_BAD_HEADER: Final = 0x101
RESET_BUSY: Final = 0x102
RESET_UNCLAIMED: Final = 0x103
RESET_CANCELLED: Final = 0x104
RESET_SHUTDOWN: Final = 0x105
RESET_REJECTED: Final = 0x106
RESET_HEADER_TIMEOUT: Final = 0x107
RESET_INTERNAL: Final = 0x108

_RESET_TEXT: Final = {
    REFUSED: "the receiving node refused the stream (its accept backlog is full)",
    RESET_BAD_HEADER: "the receiver rejected the stream header",
    RESET_BUSY: "the receiver is busy (too many transfers at once); try again",
    RESET_UNCLAIMED: "nobody on the receiving node ran `cellmesh recv` in time",
    RESET_CANCELLED: "the other side cancelled the transfer",
    RESET_SHUTDOWN: "the receiving node is shutting down",
    RESET_REJECTED: "the receiver refused the transfer",
    RESET_HEADER_TIMEOUT: "the receiver got no stream header in time",
    RESET_INTERNAL: "internal error on the receiving node",
}

# `.NAME.<16 hex>.partial`: what `_new_partial` creates and what `start` cleans up.
_PARTIAL_RE: Final = re.compile(r"^\..*\.[0-9a-f]{16}\.partial$", re.DOTALL)
_HEX64: Final = re.compile(r"^[0-9a-fA-F]{64}$")
_PARTIAL_NAME_BYTES: Final = 200  # leaves room for ".", ".<16 hex>.partial" within NAME_MAX


def describe_reset(code: int) -> str:
    """What a stream reset code means, for humans."""
    return _RESET_TEXT.get(code, f"the stream was reset (code {code})")


class TransferError(CellmeshError):
    """A transfer failed. `kind` says how: file, refused, reset, protocol, timeout, cancelled."""

    def __init__(self, message: str, kind: str = "transfer") -> None:
        super().__init__(message)
        self.kind = kind


class HeaderError(ValueError):
    """An intent header (or answer line) is malformed. `reply`: a file header worth answering."""

    def __init__(self, message: str, reply: bool = False) -> None:
        super().__init__(message)
        self.reply = reply


def stream_error_text(exc: StreamError | PeerUnreachableError) -> str:
    """A one-line reason for a failed stream, naming what the reset code means."""
    if isinstance(exc, StreamError) and exc.code and "by the peer" in str(exc):
        return f"{describe_reset(exc.code)} (stream reset by the peer, code {exc.code})"
    return str(exc)


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True, slots=True)
class PipeHeader:
    """`{"v": 1, "kind": "pipe"}`: raw bytes until the end of the stream."""

    def encode(self) -> bytes:
        """The header line, newline included."""
        return _json_line({"v": HEADER_VERSION, "kind": "pipe"})


@dataclass(frozen=True, slots=True)
class FileHeader:
    """`{"v": 1, "kind": "file", ...}`: exactly `size` bytes whose BLAKE3 is `blake3`."""

    name: str
    size: int
    blake3: str

    def encode(self) -> bytes:
        """The header line, newline included (raises HeaderError if it would be too long)."""
        line = _json_line(
            {
                "v": HEADER_VERSION,
                "kind": "file",
                "name": self.name,
                "size": self.size,
                "blake3": self.blake3,
            }
        )
        if len(line) > MAX_HEADER:
            raise HeaderError(f"header would exceed {MAX_HEADER} bytes")
        return line


Header = PipeHeader | FileHeader


def _json_line(obj: dict[str, Any]) -> bytes:
    # ensure_ascii keeps any name ASCII-safe on the wire and within a predictable length.
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def validate_name(name: object) -> str:
    """Return `name` if it is a safe bare file name for the inbox; else raise HeaderError."""
    if not isinstance(name, str):
        raise HeaderError("name must be a string", reply=True)
    if name in ("", ".", ".."):
        raise HeaderError(f"name {name!r} is not a file name", reply=True)
    if "/" in name:
        raise HeaderError(f"name {name!r} must be a bare file name (no '/')", reply=True)
    if "\x00" in name:
        raise HeaderError("name must not contain NUL", reply=True)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise HeaderError(f"name {name!r} must not contain control characters", reply=True)
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError("name is not valid Unicode text", reply=True) from None
    if len(encoded) > MAX_NAME_BYTES:
        raise HeaderError(f"name is longer than {MAX_NAME_BYTES} bytes", reply=True)
    if _PARTIAL_RE.match(name):
        raise HeaderError(f"name {name!r} is reserved for partial files", reply=True)
    return name


def parse_header(line: bytes) -> Header:
    """Parse an intent header line (without its newline). Raises HeaderError."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HeaderError("header is not a JSON line") from None
    if not isinstance(obj, dict):
        raise HeaderError("header is not a JSON object")
    v = obj.get("v")
    if type(v) is not int:
        raise HeaderError('header has no integer "v"')
    if v != HEADER_VERSION:
        raise HeaderError(f"unsupported header version {v}")
    kind = obj.get("kind")
    if kind == "pipe":
        return PipeHeader()
    if kind != "file":
        raise HeaderError(f"unknown kind {str(kind)[:40]!r}")
    name = validate_name(obj.get("name"))
    size = obj.get("size")
    if type(size) is not int or not 0 <= size < 1 << 63:
        raise HeaderError('"size" must be a non-negative integer', reply=True)
    digest = obj.get("blake3")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise HeaderError('"blake3" must be 64 hex characters', reply=True)
    return FileHeader(name, size, digest.lower())


def _truncate_utf8(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 form fits in `limit` bytes."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def numbered_name(name: str, n: int) -> str:
    """`NAME (n)` (the name shortened if needed to stay within 255 bytes); `NAME` for n = 0."""
    if n == 0:
        return name
    suffix = f" ({n})"
    return _truncate_utf8(name, MAX_NAME_BYTES - len(suffix)) + suffix


# --------------------------------------------------------------------------- buffered reading


class _BufferedStream:
    """A `Stream` reader that can give back bytes read past a line (header, answer)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._pending = b""

    async def read(self, n: int = CHUNK) -> bytes:
        """Up to `n` bytes; b"" at the end of the stream."""
        if self._pending:
            out, self._pending = self._pending[:n], self._pending[n:]
            return out
        return await self.stream.read(n)

    async def read_chunks(self, n: int = CHUNK) -> list[bytes | memoryview]:
        """Up to `n` bytes as the pieces they arrived in (`Stream.read_chunks`); [] at the end."""
        if self._pending:
            out, self._pending = self._pending[:n], self._pending[n:]
            return [out]
        return await self.stream.read_chunks(n)

    async def read_line(self, limit: int) -> bytes:
        """One line without its newline; HeaderError if longer than `limit` or cut short."""
        buf = bytearray(self._pending)
        self._pending = b""
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                if nl + 1 > limit:
                    raise HeaderError(f"line longer than {limit} bytes")
                self._pending = bytes(buf[nl + 1 :])
                return bytes(buf[:nl])
            if len(buf) >= limit:
                raise HeaderError(f"line longer than {limit} bytes")
            chunk = await self.stream.read(limit)
            if not chunk:
                raise HeaderError("the stream ended before the end of the line")
            buf += chunk

    async def discard(self) -> None:
        """Read and drop everything until the end (keeps flow-control windows open)."""
        self._pending = b""
        while await self.stream.read(CHUNK):
            pass


async def _abandon(stream: Stream, code: int) -> None:
    """Reset `stream`, first consuming whatever it has already buffered.

    Bytes a stream buffered but the application never read are never reported consumed, and a
    reset does not give them back: they would shrink the connection's flow-control window for
    good (up to a whole stream window per abandoned stream). Reading buffered bytes completes
    without suspending, so under a zero timeout the loop takes exactly those and stops at the
    first read that would have to wait for the network.
    """
    try:
        async with asyncio.timeout(0):
            while await stream.read(CHUNK):
                pass
    except (TimeoutError, CellmeshError):
        pass
    finally:
        with contextlib.suppress(CellmeshError):
            stream.reset(code)


# --------------------------------------------------------------------------- bookkeeping


@dataclass(slots=True)
class TransferInfo:
    """One transfer in progress, for progress reports (`TransferService.transfers`)."""

    id: int
    direction: Literal["in", "out"]
    kind: Literal["file", "pipe"]
    cell_id: bytes
    name: str | None = None
    total: int | None = None
    phase: str = "starting"
    done: int = 0
    stream_id: int | None = None
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {
            "id": self.id,
            "direction": self.direction,
            "kind": self.kind,
            "cell_id": format_cell_id(self.cell_id),
            "name": self.name,
            "total": self.total,
            "phase": self.phase,
            "bytes": self.done,
            "stream_id": self.stream_id,
            "seconds": round(time.monotonic() - self.started, 3),
        }


ProgressCallback = Callable[[TransferInfo], None]


class IncomingPipe:
    """A pipe stream a peer opened to us, handed to one local reader by `claim_pipe`."""

    def __init__(self, service: TransferService, buf: _BufferedStream, info: TransferInfo) -> None:
        self._service = service
        self._buf = buf
        self.info = info
        self.expiry: asyncio.Task[None] | None = None
        self._ended = False

    @property
    def cell_id(self) -> bytes:
        """Who sent it."""
        return self._buf.stream.cell_id

    @property
    def stream_id(self) -> int:
        """The stream's id on this node."""
        return self._buf.stream.stream_id

    async def read(self, n: int = CHUNK) -> bytes:
        """Up to `n` bytes; b"" when the sender finished. StreamError/PeerUnreachableError."""
        data = await self._buf.read(n)
        if data:
            self.info.done += len(data)
        else:
            self._ended = True
        return data

    def reset(self, code: int) -> None:
        """Abandon the pipe; the sender sees a reset with `code`."""
        self._ended = False
        self._buf.stream.reset(code)

    async def finish(self) -> None:
        """The reader is done with the pipe: confirm a complete one, reset an unfinished one.

        Ending our (empty) half is the confirmation the sender waits for; it also lets both
        nodes forget the stream.
        """
        self._service._forget(self.info)
        if self._ended:
            with contextlib.suppress(CellmeshError):
                await self._buf.stream.close()
            return
        await _abandon(self._buf.stream, RESET_CANCELLED)


# --------------------------------------------------------------------------- file helpers


def _hash_some(fd: int, hasher: Any, limit: int) -> int:
    """Hash up to `limit` more bytes of `fd` (current offset); returns how many were read."""
    done = 0
    while done < limit:
        data = os.read(fd, min(CHUNK, limit - done))
        if not data:
            break
        hasher.update(data)
        done += len(data)
    return done


def hash_pieces(hasher: Any, pieces: Sequence[bytes | memoryview]) -> None:
    """`hasher.update` with each piece in turn, except that runs of small pieces are joined
    first: BLAKE3 hashes a long input several 1 KiB chunks at a time (SIMD), and 1,100-byte
    pieces one by one hash 4-5x slower per byte than the same bytes joined."""
    run: list[bytes | memoryview] = []
    for piece in pieces:
        if len(piece) < _HASH_JOIN_BELOW:
            run.append(piece)
            continue
        if run:
            hasher.update(b"".join(run))
            run = []
        hasher.update(piece)
    if run:
        hasher.update(b"".join(run))


def _write_and_hash(fd: int, hasher: Any, pieces: Sequence[bytes | memoryview]) -> None:
    """Hash `pieces` and append them to `fd` (gathered writes: the pieces are never joined)."""
    hash_pieces(hasher, pieces)
    todo = list(pieces)
    i = 0
    while i < len(todo):
        n = os.writev(fd, todo[i : i + _WRITEV_MAX])
        while i < len(todo) and n >= len(todo[i]):
            n -= len(todo[i])  # written whole
            i += 1
        if n:
            todo[i] = memoryview(todo[i])[n:]  # a short write ended inside this one


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread. If we are cancelled, the thread still finishes first.

    The threads here use file descriptors that the caller closes when it unwinds; returning
    before the thread is done could let it touch a closed fd, or a new file reusing its number.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_source(path: Path) -> tuple[int, int]:
    """Open a file to send; (fd, size). TransferError naming the problem."""
    try:
        # O_NONBLOCK so that a FIFO does not block the open; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TransferError(f"no such file: {path}", "file") from None
    except PermissionError:
        raise TransferError(f"cannot read {path}: permission denied", "file") from None
    except OSError as exc:
        raise TransferError(f"cannot open {path}: {exc.strerror}", "file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise TransferError(f"{path} is {what}: only regular files can be copied", "file")
    os.set_blocking(fd, True)
    return fd, st.st_size


# --------------------------------------------------------------------------- the service


class TransferService:
    """Receives files into `inbox` and queues pipes for local readers; sends files and pipes.

    `await start()` cleans partial files left by a killed node and starts accepting the node's
    incoming streams; `await stop()` cancels everything in progress (resetting the streams).
    """

    def __init__(
        self,
        node: Node,
        inbox: Path,
        *,
        max_concurrent: int = 32,
        pipe_backlog: int = 16,
        claim_timeout: float = 60.0,
        header_timeout: float = 30.0,
        stall_timeout: float = 60.0,
        verdict_timeout: float = 300.0,
    ) -> None:
        # stall_timeout: seconds without progress after which a file transfer fails, in either
        # direction (a receiver taking no data, a sender sending none).
        self.node = node
        self.inbox = inbox
        self.max_concurrent = max_concurrent
        self.pipe_backlog = pipe_backlog
        self.claim_timeout = claim_timeout
        self.header_timeout = header_timeout
        self.stall_timeout = stall_timeout
        self.verdict_timeout = verdict_timeout
        self._accept_task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._pipes: deque[IncomingPipe] = deque()
        self._claimers: deque[asyncio.Future[IncomingPipe]] = deque()
        self._active: dict[int, TransferInfo] = {}
        self._next_id = 1
        self.received_files = 0
        self.refused = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the inbox (0700), delete stale partial files, start accepting streams.

        The cleanup runs before the first `await`, so by the time anything else on the event loop
        runs (a control request, say) no stale partial file is left.
        """
        if self._accept_task is not None:
            raise LocalProtocolError("transfer service already started")
        self.inbox.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(self.inbox.stat().st_mode) != 0o700:
            os.chmod(self.inbox, 0o700)  # received files are private to the node's owner
        with os.scandir(self.inbox) as entries:
            stale = [
                e.path
                for e in entries
                if _PARTIAL_RE.match(e.name) and e.is_file(follow_symlinks=False)
            ]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.info("removed partial file %s left by an interrupted transfer", path)
        self._accept_task = asyncio.create_task(self._accept_loop(), name="transfer-accept")

    async def stop(self) -> None:
        """Stop accepting; cancel transfers in progress; reset queued pipes."""
        tasks: list[asyncio.Task[None]] = list(self._handlers)
        if self._accept_task is not None:
            tasks.append(self._accept_task)
            self._accept_task = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._pipes:
            pipe = self._pipes.popleft()
            if pipe.expiry is not None:
                pipe.expiry.cancel()
            with contextlib.suppress(CellmeshError):
                pipe.reset(RESET_SHUTDOWN)
            self._forget(pipe.info)
        while self._claimers:
            self._claimers.popleft().cancel()

    def transfers(self) -> list[dict[str, Any]]:
        """Transfers in progress, both directions."""
        return [i.as_dict() for i in self._active.values()]

    def _track(
        self,
        direction: Literal["in", "out"],
        kind: Literal["file", "pipe"],
        cell_id: bytes,
        name: str | None = None,
        total: int | None = None,
    ) -> TransferInfo:
        info = TransferInfo(self._next_id, direction, kind, cell_id, name, total)
        self._next_id += 1
        self._active[info.id] = info
        return info

    def _forget(self, info: TransferInfo) -> None:
        self._active.pop(info.id, None)

    # ------------------------------------------------------------------ accepting

    async def _accept_loop(self) -> None:
        while True:
            stream = await self.node.accept_stream()
            if len(self._handlers) >= self.max_concurrent:
                log.warning(
                    "stream %d from %s refused: %d transfers already in progress",
                    stream.stream_id,
                    format_cell_id(stream.cell_id),
                    len(self._handlers),
                )
                await _abandon(stream, RESET_BUSY)
                continue
            task = asyncio.create_task(self._serve(stream), name=f"transfer-{stream.stream_id}")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve(self, stream: Stream) -> None:
        """Read the header of one incoming stream and serve it; never raises (but cancellation)."""
        peer = format_cell_id(stream.cell_id)
        buf = _BufferedStream(stream)
        try:
            try:
                async with asyncio.timeout(self.header_timeout):
                    line = await buf.read_line(MAX_HEADER)
                header = parse_header(line)
            except TimeoutError:
                log.warning("stream %d from %s: no header in time; reset", stream.stream_id, peer)
                await _abandon(stream, RESET_HEADER_TIMEOUT)
                return
            except HeaderError as exc:
                if exc.reply:
                    log.warning("file from %s refused: %s", peer, exc)
                    self.refused += 1
                    await self._refuse(buf, str(exc))
                else:
                    log.warning("stream %d from %s: bad header: %s", stream.stream_id, peer, exc)
                    await _abandon(stream, RESET_BAD_HEADER)
                return
            if isinstance(header, PipeHeader):
                await self._accept_pipe(buf)
            else:
                await self._receive_file(buf, header)
        except (StreamError, PeerUnreachableError) as exc:
            log.info("stream %d from %s ended: %s", stream.stream_id, peer, exc)
        except asyncio.CancelledError:
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_SHUTDOWN)
            raise
        except Exception:  # a bug must cost one stream, never the service
            log.exception("stream %d from %s: internal error", stream.stream_id, peer)
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_INTERNAL)

    async def _refuse(self, buf: _BufferedStream, reason: str) -> None:
        """Answer `{"ok": false, ...}`, close our half, and reset once the answer has arrived."""
        stream = buf.stream
        await stream.write(_json_line({"ok": False, "error": reason}))
        await stream.close()
        if stream.at_eof:
            return  # the sender already finished: nothing to stop
        # Reading on meanwhile keeps the windows open (unread bytes would hold flow control).
        drain = asyncio.create_task(buf.discard())
        try:
            async with asyncio.timeout(REFUSE_LINGER):
                await stream.wait_acknowledged()
        except (TimeoutError, StreamError, PeerUnreachableError):
            pass
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        if not stream.at_eof:
            await _abandon(stream, RESET_REJECTED)

    # ------------------------------------------------------------------ receiving pipes

    async def _accept_pipe(self, buf: _BufferedStream) -> None:
        stream = buf.stream
        info = self._track("in", "pipe", stream.cell_id)
        info.stream_id = stream.stream_id
        info.phase = "queued"
        pipe = IncomingPipe(self, buf, info)
        while self._claimers:
            fut = self._claimers.popleft()
            if not fut.done():
                fut.set_result(pipe)
                return
        if len(self._pipes) >= self.pipe_backlog:
            log.warning(
                "pipe from %s refused: %d pipes already wait for `recv`",
                format_cell_id(stream.cell_id),
                len(self._pipes),
            )
            self._forget(info)
            await _abandon(stream, RESET_BUSY)
            return
        self._queue(pipe)

    def _queue(self, pipe: IncomingPipe, front: bool = False) -> None:
        if front:
            self._pipes.appendleft(pipe)
        else:
            self._pipes.append(pipe)
        pipe.expiry = asyncio.create_task(self._expire(pipe), name="transfer-pipe-expiry")

    async def _expire(self, pipe: IncomingPipe) -> None:
        await asyncio.sleep(self.claim_timeout)
        if pipe not in self._pipes:
            return
        self._pipes.remove(pipe)
        pipe.expiry = None  # nothing may cancel us now: the pipe is no longer claimable
        self._forget(pipe.info)
        log.warning(
            "pipe from %s unclaimed for %g s; reset",
            format_cell_id(pipe.cell_id),
            self.claim_timeout,
        )
        await _abandon(pipe._buf.stream, RESET_UNCLAIMED)

    async def claim_pipe(self) -> IncomingPipe:
        """The oldest queued incoming pipe, waiting as long as it takes for one.

        Bound the wait with `asyncio.timeout`: a pipe handed over just as the wait is cancelled
        goes back to the front of the queue. Call `finish()` on the pipe when done with it.
        """
        if self._pipes:
            return self._claimed(self._pipes.popleft())
        fut: asyncio.Future[IncomingPipe] = asyncio.get_running_loop().create_future()
        self._claimers.append(fut)
        try:
            await asyncio.wait({fut})
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._requeue(fut.result())
            fut.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._claimers.remove(fut)
        return self._claimed(fut.result())

    @staticmethod
    def _claimed(pipe: IncomingPipe) -> IncomingPipe:
        if pipe.expiry is not None:
            pipe.expiry.cancel()
            pipe.expiry = None
        pipe.info.phase = "receiving"
        return pipe

    def _requeue(self, pipe: IncomingPipe) -> None:
        self._queue(pipe, front=True)

    # ------------------------------------------------------------------ receiving files

    def _new_partial(self, name: str) -> tuple[int, Path]:
        base = _truncate_utf8(name, _PARTIAL_NAME_BYTES)
        path = self.inbox / f".{base}.{secrets.token_hex(8)}.partial"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(path, flags, 0o600), path

    def _install(self, partial: Path, name: str) -> Path:
        """Give the complete partial file its final name without ever replacing a file."""
        for n in range(10000):
            target = self.inbox / numbered_name(name, n)
            try:
                os.link(partial, target)  # atomic and fails if target exists (rename replaces)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # No hard links on this filesystem: check-then-rename (a racing writer could
                # still win between the two, but only another transfer into this very inbox).
                if os.path.lexists(target):
                    continue
                os.rename(partial, target)
            else:
                os.unlink(partial)
            _fsync_dir(self.inbox)
            return target
        raise OSError(errno.EEXIST, f"too many files named {name!r} in the inbox")

    async def _receive_file(self, buf: _BufferedStream, header: FileHeader) -> None:
        stream = buf.stream
        peer = format_cell_id(stream.cell_id)
        try:
            free = shutil.disk_usage(self.inbox).free
        except OSError:
            free = None
        if free is not None and header.size > free:
            self.refused += 1
            await self._refuse(buf, f"not enough space: {header.size} bytes announced, {free} free")
            return
        info = self._track("in", "file", stream.cell_id, header.name, header.size)
        info.stream_id = stream.stream_id
        info.phase = "receiving"
        try:
            try:
                fd, partial = self._new_partial(header.name)
            except OSError as exc:
                self.refused += 1
                await self._refuse(buf, f"cannot create a file in the inbox: {exc.strerror}")
                return
            outcome: str | Path
            try:
                outcome = await self._store(buf, header, info, fd, partial)
            except (StreamError, PeerUnreachableError) as exc:
                log.warning(
                    "file %r from %s abandoned after %d of %d bytes (partial file removed): %s",
                    header.name,
                    peer,
                    info.done,
                    header.size,
                    exc,
                )
                return
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)  # gone already when the file was installed
            if isinstance(outcome, str):
                log.warning("file %r from %s refused: %s", header.name, peer, outcome)
                self.refused += 1
                await self._refuse(buf, outcome)
                return
            self.received_files += 1
            seconds = time.monotonic() - info.started
            log.info(
                "received %s (%d bytes) from %s in %.2f s", outcome, header.size, peer, seconds
            )
            info.phase = "answering"
            answer = {
                "ok": True,
                "path": str(outcome),
                "name": outcome.name,
                "bytes": header.size,
                "blake3": header.blake3,
            }
            await stream.write(_json_line(answer))
            await stream.close()
        finally:
            self._forget(info)

    async def _store(
        self, buf: _BufferedStream, header: FileHeader, info: TransferInfo, fd: int, partial: Path
    ) -> str | Path:
        """Receive the payload into `fd`; the installed path, or why the file was refused."""
        hasher = blake3.blake3()
        batch: list[bytes | memoryview] = []
        batched = 0
        received = 0
        try:
            while True:
                try:
                    # A sender that goes quiet but keeps its session alive must not hold a
                    # concurrency slot (and a partial file) forever.
                    async with asyncio.timeout(self.stall_timeout):
                        pieces = await buf.read_chunks(CHUNK)
                except TimeoutError:
                    return f"no data for {self.stall_timeout:g} s"
                if not pieces:
                    break
                size = sum(map(len, pieces))
                received += size
                if received > header.size:
                    return f"more bytes than the {header.size} announced"
                # Large pieces (views of received packets) go to the file as they are: no copy.
                # Small ones are joined here, so a batch never holds a million tiny objects.
                batch += pieces if size >= len(pieces) * _HASH_JOIN_BELOW else [b"".join(pieces)]
                batched += size
                if batched >= WRITE_BATCH:
                    await _in_thread(_write_and_hash, fd, hasher, batch)
                    batch, batched = [], 0
                info.done = received
            if batch:
                await _in_thread(_write_and_hash, fd, hasher, batch)
            info.done = received
            if received != header.size:
                return f"the stream ended after {received} of {header.size} announced bytes"
            info.phase = "verifying"
            digest: str = hasher.hexdigest()
            if digest != header.blake3:
                return (
                    f"BLAKE3 mismatch: received data hashes to {digest}, "
                    f"the sender announced {header.blake3}"
                )
            await _in_thread(os.fsync, fd)
            return await _in_thread(self._install, partial, header.name)
        except OSError as exc:
            return f"cannot store the file: {exc.strerror or exc}"

    # ------------------------------------------------------------------ sending

    async def send_file(
        self,
        cell_id: bytes,
        path: Path,
        name: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Send the regular file at `path` to `cell_id`'s inbox (as `name`, default its own).

        Hashes the file first, then streams header and bytes. Returns the receiver's answer plus
        `seconds` (after hashing), `hash_seconds`, `bytes`, `blake3`. Raises TransferError (local
        file problems, the receiver's refusal or reset, a stall) or PeerUnreachableError.
        """
        try:
            name = validate_name(path.name if name is None else name)
        except HeaderError as exc:
            raise TransferError(str(exc), "file") from None
        fd, size = _open_source(path)
        info = self._track("out", "file", cell_id, name, size)

        def report(phase: str, done: int) -> None:
            info.phase = phase
            info.done = done
            if on_progress is not None:
                on_progress(info)

        try:
            # First pass: the header carries the hash, so it must be known before sending.
            report("hashing", 0)
            t0 = time.monotonic()
            hasher = blake3.blake3()
            hashed = 0
            while True:
                n = await _in_thread(_hash_some, fd, hasher, HASH_STEP)
                if n == 0:
                    break
                hashed += n
                report("hashing", hashed)
            if hashed != size:
                raise TransferError(f"{path} changed size while it was read", "file")
            digest: str = hasher.hexdigest()
            hash_seconds = time.monotonic() - t0
            header = FileHeader(name, size, digest).encode()
            report("connecting", 0)
            stream = await self.node.open_stream(cell_id)
            info.stream_id = stream.stream_id
            t1 = time.monotonic()
            answer = await self._push_file(stream, header, fd, size, report)
            seconds = time.monotonic() - t1
            return {
                **answer,
                "bytes": size,
                "blake3": digest,
                "seconds": round(seconds, 6),
                "hash_seconds": round(hash_seconds, 6),
                "cell_id": format_cell_id(cell_id),
            }
        finally:
            os.close(fd)
            self._forget(info)

    async def _push_file(
        self,
        stream: Stream,
        header: bytes,
        fd: int,
        size: int,
        report: Callable[[str, int], None],
    ) -> dict[str, Any]:
        buf = _BufferedStream(stream)
        # The receiver may answer (refuse) before we finish: read concurrently and stop early.
        answer_task = asyncio.create_task(_read_answer(buf))

        async def pump() -> None:
            await self._write_stalled(stream, header)
            sent = 0
            os.lseek(fd, 0, os.SEEK_SET)
            while sent < size:
                data = await _in_thread(os.read, fd, min(CHUNK, size - sent))
                if not data:
                    raise TransferError("the file shrank while it was sent", "file")
                await self._write_stalled(stream, data)
                sent += len(data)
                report("sending", sent)
            await stream.close()
            report("waiting", sent)

        pump_task = asyncio.create_task(pump())
        try:
            await asyncio.wait({pump_task, answer_task}, return_when=asyncio.FIRST_COMPLETED)
            if not pump_task.done():
                # An answer before the end of the file can only be a refusal (or a broken peer).
                pump_task.cancel()
                await asyncio.gather(pump_task, return_exceptions=True)
                with contextlib.suppress(CellmeshError):
                    stream.reset(RESET_CANCELLED)
                answer = await _answer_result(answer_task)
                if answer.get("ok"):
                    raise TransferError("the receiver answered before the end of the file")
                return _check_answer(answer)
            pump_exc = pump_task.exception()
            if isinstance(pump_exc, StreamError | PeerUnreachableError):
                # A refusal is answered before the reset: prefer the receiver's own words.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await asyncio.wait({answer_task})
                if answer_task.done() and not answer_task.exception():
                    return _check_answer(answer_task.result())
                if isinstance(pump_exc, StreamError):
                    raise TransferError(stream_error_text(pump_exc), "reset") from pump_exc
                raise pump_exc
            if pump_exc is not None:
                raise pump_exc
            try:
                async with asyncio.timeout(self.verdict_timeout):
                    answer = await _answer_result(answer_task)
            except TimeoutError:
                raise TransferError(
                    f"no answer from the receiver within {self.verdict_timeout:g} s", "timeout"
                ) from None
            return _check_answer(answer)
        except asyncio.CancelledError:
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_CANCELLED)
            raise
        finally:
            for t in (pump_task, answer_task):
                t.cancel()
            await asyncio.gather(pump_task, answer_task, return_exceptions=True)

    async def _write_stalled(self, stream: Stream, data: bytes) -> None:
        """`stream.write`, failing if the peer takes no data for `stall_timeout` seconds."""
        try:
            async with asyncio.timeout(self.stall_timeout):
                await stream.write(data)
        except TimeoutError:
            raise TransferError(
                f"the receiver took no data for {self.stall_timeout:g} s", "timeout"
            ) from None

    async def send_pipe(
        self,
        cell_id: bytes,
        chunks: AsyncIterator[bytes],
        on_open: Callable[[Stream], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Open a pipe stream to `cell_id`, write every chunk, finish, wait until delivered.

        `on_open` runs once the stream is open (the control API tells its client then). If
        `chunks` raises, the stream is reset (`RESET_CANCELLED`) and the error propagates; a
        failing stream cancels the iteration. Returns `bytes`, `seconds`, `stream_id`.
        """
        stream = await self.node.open_stream(cell_id)
        info = self._track("out", "pipe", cell_id)
        info.stream_id = stream.stream_id
        info.phase = "sending"
        t0 = time.monotonic()
        try:
            await stream.write(PipeHeader().encode())
            if on_open is not None:
                await on_open(stream)

            async def pump() -> None:
                async for data in chunks:
                    await self._write_stalled(stream, data)
                    info.done += len(data)
                await stream.close()
                info.phase = "waiting"

            # Before our FIN, `wait_acknowledged` only returns by raising: a reset or lost peer.
            # Watching it means a failure is noticed even while the source has nothing to give.
            watch = asyncio.create_task(stream.wait_acknowledged())
            pump_task = asyncio.create_task(pump())
            try:
                await asyncio.wait({pump_task, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not pump_task.done():
                    pump_task.cancel()
                    await asyncio.gather(pump_task, return_exceptions=True)
                    await watch  # raises the stream's error
                    raise TransferError("the stream ended early", "reset")
                pump_exc = pump_task.exception()
                if pump_exc is not None:
                    if not isinstance(pump_exc, StreamError | PeerUnreachableError):
                        with contextlib.suppress(CellmeshError):
                            stream.reset(RESET_CANCELLED)
                    raise pump_exc
                await watch
            finally:
                for t in (pump_task, watch):
                    t.cancel()
                await asyncio.gather(pump_task, watch, return_exceptions=True)
            # Acknowledged means buffered by the receiving node. Delivered means its local reader
            # took everything, which the receiver says by ending its (empty) half; a pipe nobody
            # claims is reset instead, after the receiver's claim timeout.
            info.phase = "delivering"
            while await stream.read():
                pass
            return {
                "bytes": info.done,
                "seconds": round(time.monotonic() - t0, 6),
                "stream_id": stream.stream_id,
            }
        except StreamError as exc:
            raise TransferError(stream_error_text(exc), "reset") from exc
        except asyncio.CancelledError:
            with contextlib.suppress(CellmeshError):
                stream.reset(RESET_CANCELLED)
            raise
        finally:
            self._forget(info)


async def _read_answer(buf: _BufferedStream) -> dict[str, Any]:
    line = await buf.read_line(MAX_VERDICT)
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HeaderError("the receiver's answer is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise HeaderError('the receiver\'s answer has no "ok"')
    return obj


async def _answer_result(task: asyncio.Task[dict[str, Any]]) -> dict[str, Any]:
    """The answer task's result, with a stream that ended without an answer made clear."""
    try:
        return await task
    except HeaderError as exc:
        raise TransferError(f"bad answer from the receiver: {exc}", "protocol") from None
    except StreamError as exc:
        raise TransferError(stream_error_text(exc), "reset") from exc


def _check_answer(answer: dict[str, Any]) -> dict[str, Any]:
    if not answer.get("ok"):
        raise TransferError(f"the receiver refused: {answer.get('error')}", "refused")
    return answer
