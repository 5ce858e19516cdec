"""TransferService with in-process Nodes on loopback: headers, refusals, limits, pipes, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import blake3
import pytest

from cellmesh.config import NodeConfig
from cellmesh.errors import ControlError
from cellmesh.identity.keys import Identity
from cellmesh.node.control import ControlClient, ControlServer
from cellmesh.node.node import Node
from cellmesh.node.streams import Stream, StreamError
from cellmesh.node.transfer import (
    MAX_HEADER,
    RESET_BAD_HEADER,
    RESET_BUSY,
    RESET_HEADER_TIMEOUT,
    RESET_UNCLAIMED,
    FileHeader,
    HeaderError,
    PipeHeader,
    TransferError,
    TransferService,
    numbered_name,
    parse_header,
    validate_name,
)

T = TypeVar("T")
LOOPBACK = NodeConfig(listen=("127.0.0.1:0",))


def run(coro: Coroutine[Any, Any, T], limit: float = 15.0) -> T:
    """Run a test coroutine with a deadline, so a bug shows as a failure, not a hang."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())


def b3(data: bytes) -> str:
    digest: str = blake3.blake3(data).hexdigest()
    return digest


def file_header(
    name: str, data: bytes, size: int | None = None, digest: str | None = None
) -> bytes:
    """A file intent header line (size and hash default to the truth about `data`)."""
    size = len(data) if size is None else size
    return FileHeader(name, size, b3(data) if digest is None else digest).encode()


@dataclass
class Pair:
    """Node `a` runs a TransferService on `inbox`; node `b` is connected to it."""

    a: Node
    b: Node
    service: TransferService
    a_cell: bytes
    inbox: Path

    def inbox_entries(self) -> list[str]:
        return sorted(os.listdir(self.inbox))


@asynccontextmanager
async def pair(tmp: Path, **service_args: Any) -> AsyncIterator[Pair]:
    async with Node(Identity.generate(), LOOPBACK) as a, Node(Identity.generate(), LOOPBACK) as b:
        inbox = tmp / "inbox"
        service = TransferService(a, inbox, **service_args)
        await service.start()
        try:
            a_cell = await b.connect(a.local_addresses()[0])
            yield Pair(a, b, service, a_cell, inbox)
        finally:
            await service.stop()


async def raw_stream(p: Pair, payload: bytes, close: bool = True) -> Stream:
    """A stream from b to a carrying exactly `payload` (any header, or none)."""
    st = await p.b.open_stream(p.a_cell)
    await st.write(payload)
    if close:
        await st.close()
    return st


async def read_answer(st: Stream) -> dict[str, Any]:
    """The receiver's one-line answer (it may reset the stream right after)."""
    buf = b""
    while b"\n" not in buf:
        chunk = await st.read()
        assert chunk, f"stream ended without an answer: {buf!r}"
        buf += chunk
    answer: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return answer


async def expect_reset(st: Stream) -> int:
    """Read until the stream fails; returns the reset code."""

    async def drain() -> None:
        while await st.read():
            pass
        await st.wait_acknowledged()

    with pytest.raises(StreamError) as info:
        await drain()
    return info.value.code


async def wait_until(cond: Any, limit: float = 5.0) -> None:
    async with asyncio.timeout(limit):
        while not cond():  # noqa: ASYNC110 - polling service state that has no event to await
            await asyncio.sleep(0.01)


async def send_ok(p: Pair, tmp: Path, name: str = "ok.bin") -> dict[str, Any]:
    """A good file transfer through the public API: proves the receiver still serves."""
    src = tmp / f"src-{name}"
    src.write_bytes(os.urandom(50_000))
    # The sending side needs no inbox or accept loop: an unstarted service sends fine.
    result = await TransferService(p.b, tmp / "b-inbox").send_file(p.a_cell, src, name)
    assert result["ok"] is True
    got, want = await asyncio.to_thread(
        lambda: (Path(result["path"]).read_bytes(), src.read_bytes())
    )
    assert got == want
    return result


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under ~100 bytes."""
    with tempfile.TemporaryDirectory(prefix="cmx") as d:
        yield Path(d)


# --------------------------------------------------------------------------- pure functions


def test_headers_round_trip() -> None:
    assert parse_header(PipeHeader().encode().rstrip(b"\n")) == PipeHeader()
    h = FileHeader("résumé (final).pdf", 12345, "ab" * 32)
    line = h.encode()
    assert line.endswith(b"\n")
    assert len(line) <= MAX_HEADER
    assert parse_header(line[:-1]) == h
    # Unknown keys are ignored; hex is normalised to lower case.
    obj = {"v": 1, "kind": "file", "name": "x", "size": 0, "blake3": "AB" * 32, "extra": [1]}
    assert parse_header(json.dumps(obj).encode()) == FileHeader("x", 0, "ab" * 32)


@pytest.mark.parametrize(
    ("line", "reply", "words"),
    [
        (b"not json", False, "not a JSON"),
        (b"\xff\xfe", False, "not a JSON"),
        (b"[1, 2]", False, "not a JSON object"),
        (b'{"kind": "pipe"}', False, '"v"'),
        (b'{"v": true, "kind": "pipe"}', False, '"v"'),
        (b'{"v": 2, "kind": "pipe"}', False, "version 2"),
        (b'{"v": 1, "kind": "tarball"}', False, "unknown kind"),
        (b'{"v": 1}', False, "unknown kind"),
        (
            b'{"v": 1, "kind": "file", "name": "../x", "size": 1, "blake3": "' + b"0" * 64 + b'"}',
            True,
            "bare file name",
        ),
        (
            b'{"v": 1, "kind": "file", "name": "x", "size": -1, "blake3": "' + b"0" * 64 + b'"}',
            True,
            "size",
        ),
        (
            b'{"v": 1, "kind": "file", "name": "x", "size": 1.5, "blake3": "' + b"0" * 64 + b'"}',
            True,
            "size",
        ),
        (
            b'{"v": 1, "kind": "file", "name": "x", "size": true, "blake3": "' + b"0" * 64 + b'"}',
            True,
            "size",
        ),
        (b'{"v": 1, "kind": "file", "name": "x", "size": 1, "blake3": "abc"}', True, "blake3"),
        (b'{"v": 1, "kind": "file", "size": 1, "blake3": "' + b"0" * 64 + b'"}', True, "string"),
    ],
)
def test_bad_headers_are_rejected(line: bytes, reply: bool, words: str) -> None:
    with pytest.raises(HeaderError) as info:
        parse_header(line)
    assert info.value.reply is reply
    assert words in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "/",
        "a\x00b",
        "a\nb",
        "x" * 256,
        "é" * 128,  # 256 bytes of UTF-8
        "\ud800",  # a lone surrogate cannot be stored as UTF-8
        ".secret.0123456789abcdef.partial",
    ],
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(HeaderError):
        validate_name(name)


@pytest.mark.parametrize("name", ["report.pdf", ".bashrc", "x" * 255, "é" * 127, "a b (1).txt"])
def test_safe_names_pass(name: str) -> None:
    assert validate_name(name) == name


def test_numbered_names_stay_within_255_bytes() -> None:
    assert numbered_name("a.txt", 0) == "a.txt"
    assert numbered_name("a.txt", 1) == "a.txt (1)"
    long = "é" * 127
    for n in (1, 12, 9999):
        named = numbered_name(long, n)
        assert named.endswith(f" ({n})")
        assert len(named.encode()) <= 255
        named.encode().decode("utf-8")  # never cut inside a character


# --------------------------------------------------------------------------- files


def test_file_arrives_named_safely_and_stale_partials_are_cleaned(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(mode=0o755)
    stale = inbox / ".big.iso.0123456789abcdef.partial"
    stale.write_bytes(b"left by a killed node")
    keep = inbox / ".bashrc"
    keep.write_bytes(b"a real file")

    async def go() -> None:
        async with pair(tmp_path) as p:
            assert not stale.exists()
            assert keep.exists()
            assert inbox.stat().st_mode & 0o777 == 0o700
            first = await send_ok(p, tmp_path, "data.bin")
            second = await send_ok(p, tmp_path, "data.bin")
            assert first["name"] == "data.bin"
            assert second["name"] == "data.bin (1)"
            assert (inbox / "data.bin").stat().st_mode & 0o777 == 0o600
            assert p.service.received_files == 2
            assert p.service.transfers() == []
            assert p.inbox_entries() == [".bashrc", "data.bin", "data.bin (1)"]

    run(go())


@pytest.mark.parametrize(
    "payload",
    [
        b"this is not json\nabc",
        b"x" * (MAX_HEADER + 100),  # no newline within 4096 bytes
        b'{"v": 1, "kind": "tarball"}\nabc',
        b'{"v": 2, "kind": "pipe"}\n',
        b"",
    ],
    ids=["not-json", "too-long", "unknown-kind", "bad-version", "empty"],
)
def test_bad_header_resets_and_receiver_survives(tmp_path: Path, payload: bytes) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:
            st = await raw_stream(p, payload)
            assert await expect_reset(st) == RESET_BAD_HEADER
            await send_ok(p, tmp_path)
            assert [n for n in p.inbox_entries() if n.endswith(".partial")] == []

    run(go())


def test_bad_name_gets_an_answer_then_a_reset(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:
            data = b"abc"
            header = json.dumps(
                {"v": 1, "kind": "file", "name": "../x", "size": 3, "blake3": b3(data)}
            ).encode()
            st = await raw_stream(p, header + b"\n" + data, close=False)
            answer = await read_answer(st)
            assert answer["ok"] is False
            assert "bare file name" in answer["error"]
            await expect_reset(st)
            assert p.inbox_entries() == []
            assert not (tmp_path / "x").exists()
            await send_ok(p, tmp_path)

    run(go())


@pytest.mark.parametrize(
    ("announced", "sent", "words"),
    [
        (10, b"12345", "ended after 5 of 10"),
        (5, b"1234567890", "more bytes than the 5 announced"),
        (0, b"", None),  # an empty file is fine
    ],
)
def test_size_is_enforced(tmp_path: Path, announced: int, sent: bytes, words: str | None) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:
            st = await raw_stream(p, file_header("f.txt", sent, size=announced) + sent)
            answer = await read_answer(st)
            if words is None:
                assert answer["ok"] is True
                assert p.inbox_entries() == ["f.txt"]
                return
            assert answer == {"ok": False, "error": answer["error"]}
            assert words in answer["error"]
            assert p.inbox_entries() == []

    run(go())


def test_blake3_mismatch_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:
            data = os.urandom(3 * 1024 * 1024)
            st = await raw_stream(p, file_header("f.bin", data, digest=b3(b"other")) + data)
            answer = await read_answer(st)
            assert answer["ok"] is False
            assert "BLAKE3 mismatch" in answer["error"]
            assert p.inbox_entries() == []
            assert p.service.refused == 1

    run(go())


def test_sender_disconnect_mid_transfer_removes_the_partial(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:
            data = os.urandom(1024 * 1024)
            await raw_stream(p, file_header("big.bin", data, size=50 * 1024 * 1024) + data, False)
            await wait_until(lambda: any(t["bytes"] == len(data) for t in p.service.transfers()))
            assert [n for n in p.inbox_entries() if n.endswith(".partial")]
            await p.b.stop()  # CLOSE: the receiver sees the peer go away
            await wait_until(lambda: not p.service.transfers() and not p.inbox_entries())

    run(go())


def test_receiver_refusal_stops_a_sender_early(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:

            def no_space(name: str) -> tuple[int, Path]:
                raise OSError(28, "No space left on device")

            p.service._new_partial = no_space  # type: ignore[method-assign]
            src = tmp_path / "big.bin"
            src.write_bytes(os.urandom(16 * 1024 * 1024))
            sender = TransferService(p.b, tmp_path / "b-inbox")
            with pytest.raises(TransferError) as info:
                await sender.send_file(p.a_cell, src)
            assert info.value.kind == "refused"
            assert "No space left on device" in str(info.value)
            assert sender.transfers() == []

    run(go())


def test_send_file_reports_local_problems(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:
            sender = TransferService(p.b, tmp_path / "b-inbox")
            fifo = tmp_path / "fifo"
            os.mkfifo(fifo)
            cases = [
                (tmp_path / "missing", "no such file"),
                (tmp_path, "is a directory"),
                (fifo, "not a regular file"),
            ]
            for path, words in cases:
                with pytest.raises(TransferError) as info:
                    await sender.send_file(p.a_cell, path)
                assert words in str(info.value)
                assert info.value.kind == "file"
            src = tmp_path / "ok.txt"
            src.write_bytes(b"x")
            with pytest.raises(TransferError, match="bare file name"):
                await sender.send_file(p.a_cell, src, "a/b")

    run(go())


# --------------------------------------------------------------------------- limits


def test_too_many_concurrent_streams_are_reset_busy(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path, max_concurrent=1) as p:
            data = b"x" * 1000
            held = await raw_stream(p, file_header("slow.bin", data, size=10_000) + data, False)
            await wait_until(lambda: bool(p.service.transfers()))
            st = await raw_stream(p, file_header("next.bin", data) + data)
            assert await expect_reset(st) == RESET_BUSY
            held.reset()
            await wait_until(lambda: not p.service.transfers())
            await send_ok(p, tmp_path)

    run(go())


def test_a_sender_that_goes_quiet_is_refused_after_the_stall_timeout(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path, stall_timeout=0.3) as p:
            data = b"x" * 1000
            st = await raw_stream(p, file_header("quiet.bin", data, size=5000) + data, False)
            answer = await read_answer(st)
            assert answer["error"] == "no data for 0.3 s"
            await wait_until(lambda: not p.service.transfers() and not p.inbox_entries())

    run(go())


def test_silent_stream_is_reset_after_the_header_timeout(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path, header_timeout=0.2) as p:
            st = await raw_stream(p, b'{"v": 1, ', close=False)
            assert await expect_reset(st) == RESET_HEADER_TIMEOUT

    run(go())


def test_unclaimed_pipe_is_reset_and_backlog_is_bounded(tmp_path: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path, claim_timeout=0.3, pipe_backlog=1) as p:
            first = await raw_stream(p, PipeHeader().encode() + b"waiting", close=False)
            await wait_until(lambda: bool(p.service.transfers()))
            second = await raw_stream(p, PipeHeader().encode() + b"no room")
            assert await expect_reset(second) == RESET_BUSY
            assert await expect_reset(first) == RESET_UNCLAIMED
            assert p.service.transfers() == []

    run(go())


def test_abandoned_streams_do_not_eat_the_connection_window(tmp_path: Path) -> None:
    # Five unclaimed 3 MiB pipes, fully delivered and then reset, would hold 15 of the 16 MiB
    # connection window for good if their buffered bytes were never consumed.
    async def go() -> None:
        async with pair(tmp_path, claim_timeout=0.3) as p:
            for _ in range(5):
                st = await raw_stream(p, PipeHeader().encode() + bytes(3 * 1024 * 1024))
                await st.wait_acknowledged()  # every byte sits in the receiver's buffer
                assert await expect_reset(st) == RESET_UNCLAIMED
            src = tmp_path / "after.bin"
            src.write_bytes(os.urandom(8 * 1024 * 1024))
            result = await TransferService(p.b, tmp_path / "b-inbox").send_file(p.a_cell, src)
            assert result["bytes"] == 8 * 1024 * 1024

    run(go())


# --------------------------------------------------------------------------- the control API


@asynccontextmanager
async def control(p: Pair, where: Path) -> AsyncIterator[Path]:
    path = where / "c.sock"
    server = ControlServer(p.a, path, p.service)
    await server.start()
    try:
        yield path
    finally:
        await server.stop()


def test_pipe_through_the_control_api_is_byte_exact(tmp_path: Path, short_tmp: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 123)

    async def go() -> None:
        async with pair(tmp_path) as p, control(p, short_tmp) as sock:
            b_sock = short_tmp / "b.sock"
            b_server = ControlServer(p.b, b_sock, TransferService(p.b, tmp_path / "b-inbox"))
            await b_server.start()
            got = bytearray()

            async def sink(chunk: bytes) -> None:
                got.extend(chunk)

            async def source() -> AsyncIterator[bytes]:
                for i in range(0, len(data), 100_000):
                    yield data[i : i + 100_000]

            try:
                async with ControlClient(sock) as rc, ControlClient(b_sock) as sc:
                    recv = asyncio.create_task(rc.recv(sink))
                    sent = await sc.send(p.a_cell.hex(), source())
                    received = await recv
            finally:
                await b_server.stop()
            assert bytes(got) == data
            assert sent["bytes"] == received["bytes"] == len(data)
            assert received["cell_id"] == p.b.cell_id.hex()

    run(go())


def test_recv_of_a_stream_reset_by_its_sender_gets_an_error_frame(
    tmp_path: Path, short_tmp: Path
) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p, control(p, short_tmp) as sock:
            got = bytearray()

            async def sink(chunk: bytes) -> None:
                got.extend(chunk)

            async with ControlClient(sock) as c:
                recv = asyncio.create_task(c.recv(sink))
                st = await raw_stream(p, PipeHeader().encode() + b"hello", close=False)
                await wait_until(lambda: bytes(got) == b"hello")
                st.reset(7)
                with pytest.raises(ControlError, match="reset"):
                    await recv
            assert p.service.transfers() == []

    run(go())


def test_recv_timeout_and_cp_errors_are_one_line(tmp_path: Path, short_tmp: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p, control(p, short_tmp) as sock:

            async def sink(chunk: bytes) -> None:
                raise AssertionError("no data expected")

            async with ControlClient(sock) as c:
                with pytest.raises(ControlError, match=r"no incoming pipe within 0\.2 s"):
                    await c.recv(sink, pipe_timeout=0.2)
            async with ControlClient(sock) as c:
                with pytest.raises(ControlError, match="must be absolute"):
                    await c.cp(p.b.cell_id.hex(), "relative.txt")
            # The service keeps going after both.
            async with ControlClient(sock) as c:
                assert await c.call("transfers") == []

    run(go())


def test_stop_cancels_a_waiting_recv(tmp_path: Path, short_tmp: Path) -> None:
    async def go() -> None:
        async with pair(tmp_path) as p:
            path = short_tmp / "c.sock"
            server = ControlServer(p.a, path, p.service)
            await server.start()
            async with ControlClient(path) as c:

                async def sink(chunk: bytes) -> None:
                    return None

                recv = asyncio.create_task(c.recv(sink))
                await asyncio.sleep(0.05)
                await p.service.stop()
                await server.stop()
                with pytest.raises(ControlError):
                    await recv
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    run(go())


# --------------------------------------------------------------------------- gathered writes


def test_write_and_hash_survives_short_writes_and_more_pieces_than_one_writev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver writes the pieces it read (views of packets) with `writev`: a write that
    stops inside a piece, and a batch of more pieces than one call takes, still put every byte
    in the file once, in order, and the hash covers the same bytes."""
    from cellmesh.node import transfer

    data = os.urandom(300_000)
    cuts = sorted(
        {0, len(data), *(int.from_bytes(os.urandom(3), "big") % len(data) for _ in range(1500))}
    )
    pieces: list[bytes | memoryview] = [
        memoryview(data)[a:b] if i % 2 else data[a:b]
        for i, (a, b) in enumerate(itertools.pairwise(cuts))
    ]
    assert len(pieces) > 1000  # more than two writev calls' worth
    real_writev = os.writev
    calls: list[int] = []

    def short_writev(fd: int, bufs: list[memoryview]) -> int:
        calls.append(len(bufs))
        assert len(bufs) <= 512
        budget = 777  # never more than this per call: most calls end inside a piece
        out: list[memoryview] = []
        for b in bufs:
            take = memoryview(b)[:budget]
            out.append(take)
            budget -= len(take)
            if not budget:
                break
        return real_writev(fd, out)

    monkeypatch.setattr(os, "writev", short_writev)  # (the module calls os.writev)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        hasher = blake3.blake3()
        transfer._write_and_hash(fd, hasher, pieces)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert hasher.hexdigest() == blake3.blake3(data).hexdigest()
    assert len(calls) > len(pieces) // 512
