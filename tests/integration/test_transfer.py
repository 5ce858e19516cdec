"""`cellmesh cp`, `send` and `recv` between real node processes, driven only through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from conftest import CLI, CliRunner, NodeProcess, cli_env

MB = 1_000_000


def _wait_ready(cli: type[CliRunner], home: Path, timeout: float = 10.0) -> None:
    """Until the node on `home` answers (its control socket may be a stale one at first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cli.run("--home", str(home), "status", "--json").returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the node on {home} never answered")


def _b3(data: bytes) -> str:
    digest: str = blake3.blake3(data).hexdigest()
    return digest


def _pipe(
    m: Mesh, payload: bytes, stdout_file: Path
) -> tuple[bytes, str, subprocess.CompletedProcess[bytes]]:
    """`recv` on A (started first, stdout to a file), then `send` on B with `payload` on stdin.

    Returns what recv wrote on stdout, its stderr, and the finished send. (recv's stdout is a file
    rather than a pipe this process would only read at the end: a full pipe would stall recv.)
    """
    with open(stdout_file, "wb") as sink:
        recv = subprocess.Popen(
            [*CLI, "--home", str(m.a_home), "recv", "--timeout", "30"],
            stdout=sink,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        send = subprocess.run(
            [*CLI, "--home", str(m.b_home), "send", m.a_cell],
            input=payload,
            capture_output=True,
            timeout=60,
            env=cli_env(),
            check=False,
        )
        _, err = recv.communicate(timeout=30)
    assert recv.returncode == 0, err.decode()
    return stdout_file.read_bytes(), err.decode(), send


class Mesh:
    """Node A (receiver) listening on a known port; node B (sender) peered with it (or a relay)."""

    def __init__(
        self,
        tmp: Path,
        cli: type[CliRunner],
        node_factory: type[NodeProcess],
        relay_args: tuple[str, ...] | None = None,
        b_args: tuple[str, ...] = (),
    ) -> None:
        self.cli = cli
        self.a_home, self.b_home = tmp / "a", tmp / "b"
        self.a_cell = cli.identity(self.a_home)
        self.b_cell = cli.identity(self.b_home)
        self.a_port = cli.free_port()
        self.a = node_factory(self.a_home, "--listen", f"127.0.0.1:{self.a_port}")
        self.relay: subprocess.Popen[bytes] | None = None
        target = f"127.0.0.1:{self.a_port}"
        if relay_args is not None:
            self.relay = subprocess.Popen(
                [*CLI, "chaos-relay", "--target", target, "--seed", "7", *relay_args],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=cli_env(),
            )
            assert self.relay.stdout is not None
            target = self.relay.stdout.readline().decode().strip()
            assert target.startswith("127.0.0.1:"), target
        self.b = node_factory(self.b_home, "--listen", "127.0.0.1:0", "--peer", target, *b_args)
        cli.wait_for_peer(self.a_home, self.b_cell)

    @property
    def inbox(self) -> Path:
        return self.a_home / "inbox"

    def b_run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.cli.run("--home", str(self.b_home), *args, timeout=timeout)

    def close(self) -> None:
        if self.relay is not None:
            self.relay.terminate()
            self.relay.wait(10)
            if self.relay.stdout is not None:
                self.relay.stdout.close()


@pytest.fixture
def meshes() -> Iterator[list[Mesh]]:
    made: list[Mesh] = []
    yield made
    for m in made:
        m.close()


def test_cp_copies_a_file_byte_exact_and_never_overwrites(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess], meshes: list[Mesh]
) -> None:
    m = Mesh(tmp_path, cli, node_factory)
    meshes.append(m)
    data = os.urandom(20 * MB)
    src = tmp_path / "payload.bin"
    src.write_bytes(data)

    r = m.b_run("cp", str(src), m.a_cell)
    assert r.returncode == 0, r.stdout + r.stderr
    landed = m.inbox / "payload.bin"
    assert f"remote path  {landed}" in r.stdout
    assert _b3(data) in r.stdout
    assert "MB/s" in r.stdout
    assert landed.read_bytes() == data
    assert landed.stat().st_mode & 0o777 == 0o600
    assert m.inbox.stat().st_mode & 0o777 == 0o700

    # The same name again: a new file next to it, the first one untouched.
    r = m.b_run("cp", str(src), f"{m.a_cell}:payload.bin", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["name"] == "payload.bin (1)"
    assert result["bytes"] == len(data)
    assert result["blake3"] == _b3(data)
    assert Path(result["path"]).read_bytes() == data
    assert sorted(os.listdir(m.inbox)) == ["payload.bin", "payload.bin (1)"]

    # Failures are one line naming the cause.
    r = m.b_run("cp", str(tmp_path / "missing.bin"), m.a_cell)
    assert r.returncode == 1
    assert "no such file" in r.stderr
    r = m.b_run("cp", str(src), f"{m.a_cell}:../escape")
    assert r.returncode == 1
    assert "bare file name" in r.stderr
    r = m.b_run("cp", str(src), "00" * 16)
    assert r.returncode == 2
    assert "unknown CellID" in r.stderr
    assert "Traceback" not in m.a.log_path.read_text() + m.b.log_path.read_text()


def test_send_and_recv_pipe_stdin_to_stdout(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess], meshes: list[Mesh]
) -> None:
    m = Mesh(tmp_path, cli, node_factory)
    meshes.append(m)
    payload = os.urandom(3 * MB + 17)
    out, err, send = _pipe(m, payload, tmp_path / "stdout.bin")
    assert send.returncode == 0, send.stderr.decode()
    assert out == payload
    assert m.b_cell in err
    assert f"{len(payload)} bytes" in err
    assert f"sent {len(payload)} bytes" in send.stderr.decode()

    # FILE in, -o FILE out: written beside the target and renamed into place.
    src = tmp_path / "in.bin"
    src.write_bytes(payload[: MB // 2])
    dest_dir = tmp_path / "out"
    dest_dir.mkdir()
    dest = dest_dir / "got.bin"
    recv = subprocess.Popen(
        [*CLI, "--home", str(m.a_home), "recv", "-o", str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    r = m.b_run("send", m.a_cell, str(src))
    stdout, stderr = recv.communicate(timeout=30)
    assert r.returncode == 0, r.stderr
    assert recv.returncode == 0, stderr.decode()
    assert stdout == b""
    assert dest.read_bytes() == payload[: MB // 2]
    assert os.listdir(dest_dir) == ["got.bin"]

    # Nobody sends: recv gives up, leaving nothing under the target's name.
    gone = dest_dir / "never.bin"
    r = cli.run("--home", str(m.a_home), "recv", "-o", str(gone), "--timeout", "0.3")
    assert r.returncode == 1
    assert "no incoming pipe" in r.stderr
    assert os.listdir(dest_dir) == ["got.bin"]


def test_transfers_through_a_lossy_reordering_relay_are_byte_exact(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess], meshes: list[Mesh]
) -> None:
    impairment = ("--loss", "0.05", "--dup", "0.01", "--reorder", "0.02", "--delay", "5")
    m = Mesh(tmp_path, cli, node_factory, relay_args=impairment)
    meshes.append(m)
    data = os.urandom(4 * MB)
    src = tmp_path / "lossy.bin"
    src.write_bytes(data)
    r = m.b_run("cp", str(src), m.a_cell, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert (m.inbox / "lossy.bin").read_bytes() == data
    assert result["blake3"] == _b3(data)

    payload = os.urandom(MB)
    out, _, send = _pipe(m, payload, tmp_path / "stdout.bin")
    assert send.returncode == 0, send.stderr.decode()
    assert out == payload


def test_receiver_killed_mid_transfer(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess], meshes: list[Mesh]
) -> None:
    # A 2 MB/s bottleneck makes an 8 MB copy last ~4 s: reliably mid-transfer when A is killed.
    # B gives up on a silent peer after 2 s instead of the default 60 s.
    m = Mesh(
        tmp_path,
        cli,
        node_factory,
        relay_args=("--rate", "2M"),
        b_args=("--keepalive-interval", "0.5", "--idle-timeout", "2"),
    )
    meshes.append(m)
    src = tmp_path / "doomed.bin"
    src.write_bytes(os.urandom(8 * MB))
    cp = subprocess.Popen(
        [*CLI, "--home", str(m.b_home), "cp", str(src), m.a_cell],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )

    def partial_size() -> int:
        with os.scandir(m.inbox) as entries:
            return sum(e.stat().st_size for e in entries if e.name.endswith(".partial"))

    try:
        deadline = time.monotonic() + 20
        while partial_size() < MB:
            assert cp.poll() is None, cp.communicate()
            assert time.monotonic() < deadline, "the transfer never got going"
            time.sleep(0.02)
        m.a.proc.kill()  # SIGKILL: no goodbye, the partial file stays behind
        m.a.proc.wait(10)
        killed_at = time.monotonic()
        _, stderr = cp.communicate(timeout=30)
        took = time.monotonic() - killed_at
    finally:
        if cp.poll() is None:
            cp.kill()
            cp.communicate()
    assert cp.returncode == 2, stderr.decode()
    # Plain progress lines (stderr is not a terminal), then one line saying what went wrong.
    message = stderr.decode().strip().splitlines()[-1]
    assert message.startswith("error: ")
    assert m.a_cell in message
    assert "disconnected" in message
    assert took < 10, f"cp took {took:.1f} s to notice"

    # A fresh node on the same home cleans up: nothing named as complete, no partial file.
    fresh = NodeProcess(m.a_home, "--listen", f"127.0.0.1:{m.a_port}")
    try:
        _wait_ready(cli, m.a_home)
        assert os.listdir(m.inbox) == []
    finally:
        fresh.stop()


@pytest.mark.parametrize(
    ("killed", "code", "reason"),
    [
        # The sending node sees its client vanish and resets the stream: exit 1.
        ("send-client", 1, "cancelled the transfer"),
        # The sending node itself dies: A's node gives the silent peer up, exit 2.
        ("sender-node", 2, "disconnected"),
    ],
)
def test_sender_killed_mid_transfer(
    tmp_path: Path,
    cli: type[CliRunner],
    node_factory: type[NodeProcess],
    meshes: list[Mesh],
    killed: str,
    code: int,
    reason: str,
) -> None:
    # `recv -o` on A, `send` on B through a 2 MB/s bottleneck (8 MB: ~4 s), then SIGKILL either
    # the `send` client or B's whole node. A gives up on a silent peer after 2 s, not 60 s.
    a_home = tmp_path / "a"
    a_home.mkdir(mode=0o700)
    (a_home / "config.toml").write_text("keepalive_interval = 0.5\nidle_timeout = 2.0\n")
    m = Mesh(tmp_path, cli, node_factory, relay_args=("--rate", "2M"))
    meshes.append(m)
    src = tmp_path / "doomed.bin"
    src.write_bytes(os.urandom(8 * MB))
    dest_dir = tmp_path / "out"
    dest_dir.mkdir()
    dest = dest_dir / "got.bin"
    recv = subprocess.Popen(
        [*CLI, "--home", str(m.a_home), "recv", "-o", str(dest), "--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    send = subprocess.Popen(
        [*CLI, "--home", str(m.b_home), "send", m.a_cell, str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )

    def partial_size() -> int:
        with os.scandir(dest_dir) as entries:
            return sum(e.stat().st_size for e in entries if e.name.endswith(".partial"))

    try:
        deadline = time.monotonic() + 20
        while partial_size() < MB:
            assert recv.poll() is None, recv.communicate()
            assert send.poll() is None, send.communicate()
            assert time.monotonic() < deadline, "the transfer never got going"
            time.sleep(0.02)
        victim = send if killed == "send-client" else m.b.proc
        victim.kill()  # SIGKILL: no goodbye
        victim.wait(10)
        _, stderr = recv.communicate(timeout=20)
    finally:
        for p in (recv, send):
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert recv.returncode == code, stderr.decode()
    # The "receiving from" line, then exactly one line saying what went wrong.
    lines = stderr.decode().strip().splitlines()
    assert lines[-1].startswith("error: "), lines
    assert reason in lines[-1]
    assert [ln for ln in lines if ln.startswith("error: ")] == [lines[-1]]
    assert "Traceback" not in stderr.decode()
    # Nothing named as complete, and no partial file left behind.
    assert os.listdir(dest_dir) == []
    assert not dest.exists()
