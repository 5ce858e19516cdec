"""`cellmesh cp`, `send` and `recv`: files and pipes between nodes (node/transfer.py does the work).

Defined here and registered on the main group by cli/main.py. Like cli/chaos_cmd.py it does not
import cli/main.py at run time (main imports this module), so it has its own one-line `fail` and
`run`; they behave exactly like main's.

The running node does the transfer; these commands only talk to its control socket. `cp` hands the
node a path (the node reads the file itself); `send` and `recv` move the bytes over the control
socket, so stdin and stdout work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cellmesh.errors import CellmeshError, PeerUnreachableError
from cellmesh.identity.cellid import format_cell_id, parse_cell_id
from cellmesh.node.control import ControlClient
from cellmesh.node.transfer import CHUNK, HeaderError, validate_name

if TYPE_CHECKING:
    from cellmesh.cli.main import Ctx

T = TypeVar("T")
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
PLAIN_PROGRESS_INTERVAL = 1.0
"""Seconds between progress lines when stderr is not a terminal."""

out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one line to stderr and exit."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine, turning cellmesh errors into one-line failures (2: peer unreachable)."""
    try:
        return asyncio.run(coro_fn())
    except PeerUnreachableError as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    except CellmeshError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(str(exc))


def _cell(text: str) -> str:
    try:
        return format_cell_id(parse_cell_id(text))
    except ValueError as exc:
        fail(str(exc))


def _size(n: float) -> str:
    """Bytes in decimal units, e.g. '20.97 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds / 1e6:.2f} MB/s" if seconds > 0 else "-"


async def _chunks_from(fd: int) -> AsyncIterator[bytes]:
    """Chunks read from `fd` (stdin or a file) until its end, read by a daemon thread.

    A thread because stdin may be a terminal or a pipe that blocks indefinitely; a daemon thread
    (not the default executor) so that leaving early never waits for a read that may never end.
    The small queue makes the reader wait for the socket: memory stays bounded.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | OSError] = asyncio.Queue(4)

    def reader() -> None:
        while True:
            try:
                item: bytes | OSError = os.read(fd, CHUNK)
            except OSError as exc:
                item = exc
            try:
                asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()
            except (RuntimeError, asyncio.CancelledError, concurrent.futures.CancelledError):
                return  # the event loop is gone or going: nobody wants the rest
            if not isinstance(item, bytes) or not item:
                return

    threading.Thread(target=reader, name="cellmesh-send-input", daemon=True).start()
    while True:
        item = await queue.get()
        if isinstance(item, OSError):
            raise item
        if not item:
            return
        yield item


# --------------------------------------------------------------------------- send


@click.command("send")
@click.argument("cell_id", metavar="CELLID")
@click.argument("file", required=False, default="-", metavar="[FILE]")
@click.pass_obj
def send_cmd(obj: Ctx, cell_id: str, file: str) -> None:
    """Stream FILE (or stdin) to CELLID, where `cellmesh recv` writes it out.

    The bytes go as one reliable, encrypted stream; the receiving node must be running
    `cellmesh recv` (or run it within 60 s). Ends when the input ends and the peer has
    acknowledged every byte; prints the byte count and rate to stderr.

    \b
    Examples:
      cellmesh --home /tmp/b recv -o backup.tar          # on B first (or: recv > backup.tar)
      tar c ./photos | cellmesh --home /tmp/a send <CellID of B>
      cellmesh --home /tmp/a send <CellID of B> notes.txt

    Exit status: 0 when the receiver got everything; 2 when the peer is unknown or went away;
    1 for any other failure (the stream was reset, nobody ran `recv` in time, ...).
    """
    cell = _cell(cell_id)
    if file == "-":
        fd = sys.stdin.fileno()
    else:
        if os.path.isdir(file):
            fail(f"{file} is a directory")
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            fail(f"cannot read {file}: {exc.strerror}")

    async def go() -> dict[str, Any]:
        async with ControlClient(obj.home.control_socket_path) as c:
            return await c.send(cell, _chunks_from(fd))

    r = run(go)
    n, seconds = int(r["bytes"]), float(r["seconds"])
    err.print(f"sent {n} bytes ({_size(n)}) to {cell} in {seconds:.2f} s, {_rate(n, seconds)}")


# --------------------------------------------------------------------------- recv


@click.command("recv")
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    help="Write to FILE (mode 0600; replaced only once everything arrived) instead of stdout.",
)
@click.option(
    "--timeout",
    type=float,
    metavar="SECONDS",
    help="Give up if no pipe arrives within SECONDS. Default: wait until one does.",
)
@click.pass_obj
def recv_cmd(obj: Ctx, output: str | None, timeout: float | None) -> None:
    """Receive one pipe stream sent with `cellmesh send` and write it to stdout or FILE.

    Takes the oldest pipe waiting on the running node, or waits for the next one. With -o the
    bytes go to a temporary file next to FILE that is renamed to FILE only when the sender
    finished cleanly; on failure it is removed and FILE is left as it was. The sender's CellID
    and the byte count are printed to stderr.

    \b
    Examples:
      cellmesh --home /tmp/b recv > data.bin
      cellmesh --home /tmp/b recv -o backup.tar --timeout 60
      cellmesh --home /tmp/b recv | tar x

    Exit status: 0 when the sender finished cleanly; 2 when it went away mid-stream; 1 for any
    other failure (it reset the stream, no pipe within --timeout, ...).
    """
    if timeout is not None and not 0 < timeout <= 86400:
        fail("--timeout must be between 0 and 86400 seconds")
    target = None if output in (None, "-") else Path(output)
    if target is not None and target.is_dir():
        fail(f"{target} is a directory")

    def opened(info: dict[str, Any]) -> None:
        err.print(f"receiving from {info.get('cell_id')} (stream {info.get('stream_id')})")

    def receive_into(sink_file: BinaryIO) -> dict[str, Any]:
        async def sink(data: bytes) -> None:
            sink_file.write(data)

        async def go() -> dict[str, Any]:
            async with ControlClient(obj.home.control_socket_path) as c:
                return await c.recv(sink, timeout, opened)

        return run(go)

    if target is None:
        try:
            r = receive_into(sys.stdout.buffer)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # Whoever read our stdout stopped; keep Python from complaining about it at exit.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            fail("stdout was closed before the end of the stream")
    else:
        r = _receive_to_file(target, receive_into)
    n, seconds = int(r["bytes"]), float(r["seconds"])
    where = "stdout" if target is None else str(target)
    err.print(
        f"received {n} bytes ({_size(n)}) from {r['cell_id']} into {where} "
        f"in {seconds:.2f} s, {_rate(n, seconds)}"
    )


def _receive_to_file(
    target: Path, receive_into: Callable[[BinaryIO], dict[str, Any]]
) -> dict[str, Any]:
    """Receive into a partial file next to `target`; rename it into place only on success."""
    parent = target.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as exc:
        fail(f"cannot create a file in {parent}: {exc.strerror}")
    tmp = Path(tmp_name)
    ok = False
    try:
        with os.fdopen(fd, "wb") as f:
            r = receive_into(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        ok = True
        return r
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc}")
    finally:
        # Also on SystemExit from fail() and on Ctrl-C: never leave a partial file behind.
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


# --------------------------------------------------------------------------- cp


def byte_progress() -> Progress:
    """The progress bar of byte transfers on a terminal (stderr, removed when done)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


class _CpProgress:
    """Shows `cp` progress: a rich bar on a terminal, a plain line a second otherwise."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tty = err.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last_plain = 0.0
        self._phase = ""
        self._base = (time.monotonic(), 0)  # (time, bytes) when the phase was first seen

    def __enter__(self) -> _CpProgress:
        if self.tty:
            self._progress = byte_progress()
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, line: dict[str, Any]) -> None:
        phase = str(line.get("phase", ""))
        done = int(line.get("progress") or 0)
        total = line.get("total")
        total_n = int(total) if isinstance(total, int) else None
        if phase != self._phase:
            self._phase = phase
            self._base = (time.monotonic(), done)
        if self._progress is not None:
            # One bar for the hashing pass, one for the copy (connecting, sending, waiting).
            bar = "hashing" if phase == "hashing" else "copy"
            label = {
                "hashing": f"hashing {self.name}",
                "connecting": "connecting",
                "sending": f"sending {self.name}",
                "waiting": "receiver verifying",
            }.get(phase, phase)
            if bar not in self._tasks:
                self._tasks[bar] = self._progress.add_task(label, total=total_n)
            if phase == "waiting":
                done = total_n or done
            self._progress.update(
                self._tasks[bar], description=label, completed=done, total=total_n
            )
            return
        now = time.monotonic()
        if now - self._last_plain < PLAIN_PROGRESS_INTERVAL and phase in ("hashing", "sending"):
            return
        self._last_plain = now
        share = f" ({100 * done / total_n:.0f}%)" if total_n else ""
        t0, done0 = self._base
        rate = f", {_rate(done - done0, now - t0)}" if phase == "sending" and now - t0 > 0.5 else ""
        err.print(f"{phase}: {_size(done)} of {_size(total_n or 0)}{share}{rate}", soft_wrap=True)


@click.command("cp")
@click.argument("file", metavar="FILE")
@click.argument("target", metavar="CELLID[:NAME]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.pass_obj
def cp_cmd(obj: Ctx, file: str, target: str, as_json: bool) -> None:
    """Copy FILE into the inbox of the node CELLID (as NAME, default FILE's own name).

    The running node reads FILE, hashes it (BLAKE3), and sends it over one encrypted stream.
    The receiver checks size and hash, then stores it as INBOX/NAME (its home's inbox/, mode
    0600), or "NAME (1)", "NAME (2)", ... if that exists: nothing is ever overwritten.
    Progress goes to stderr; a summary (remote path, size, BLAKE3, time, rate) to stdout.

    \b
    Examples:
      cellmesh --home /tmp/a cp report.pdf <CellID of B>
      cellmesh --home /tmp/a cp ./build/app.tar.gz <CellID of B>:app-1.2.tar.gz

    Exit status: 0 once the receiver confirmed the file; 2 when the peer is unknown or went
    away; 1 for any other failure (the receiver's reason is printed).
    """
    cell_text, _, name = target.partition(":")
    cell = _cell(cell_text)
    if name:
        try:
            validate_name(name)
        except HeaderError as exc:
            fail(f"bad NAME: {exc}")
    path = os.path.abspath(file)
    shown = name or os.path.basename(path)

    async def go() -> dict[str, Any]:
        with _CpProgress(shown) as progress:
            async with ControlClient(obj.home.control_socket_path) as c:
                return await c.cp(cell, path, name or None, progress.update)

    r = run(go)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    n, seconds = int(r["bytes"]), float(r["seconds"])
    out.print(f"copied {file} to {cell}", soft_wrap=True)
    out.print(f"  remote path  {r['path']}", soft_wrap=True)
    out.print(f"  size         {n} bytes ({_size(n)})")
    out.print(f"  BLAKE3       {r['blake3']}")
    out.print(
        f"  time         {seconds:.2f} s, {_rate(n, seconds)} "
        f"(+ {float(r.get('hash_seconds', 0)):.2f} s hashing)"
    )
