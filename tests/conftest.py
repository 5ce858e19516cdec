"""Shared fixtures: free ports, running the CLI, and node daemons in real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellmesh.testing.netns import NetnsUnavailable, Topology, require_netns

CLI = [sys.executable, "-m", "cellmesh"]


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLMESH_")}
    env["COLUMNS"] = "200"
    return env


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `cellmesh ARGS` to completion and capture its output."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=cli_env(), check=False
    )


class NodeProcess:
    """A `cellmesh node` daemon in its own process."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.log_path = home / "node.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*CLI, "--home", str(home), "node", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
        deadline = time.monotonic() + 20
        sock = home / "control.sock"
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited early: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("node did not start within 20 s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """Resident memory of the node process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait for a clean exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def node_factory() -> Iterator[type[NodeProcess]]:
    started: list[NodeProcess] = []

    class Tracked(NodeProcess):
        def __init__(self, home: Path, *args: str) -> None:
            super().__init__(home, *args)
            started.append(self)

    yield Tracked
    for n in started:
        n.stop()


def new_identity(home: Path) -> str:
    """Create an identity in `home` through the CLI; returns its CellID."""
    r = run_cli("--home", str(home), "id", "new")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture
def cli() -> type[CliRunner]:
    """`cli.run(*args)` runs the CLI; `cli.identity(home)` makes an identity."""
    return CliRunner


def wait_for_peer(home: Path, cell: str, timeout: float = 10.0) -> None:
    """Poll `cellmesh peers` of the node at `home` until `cell` is connected."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = run_cli("--home", str(home), "peers", "--json")
        if r.returncode == 0 and any(p["cell_id"] == cell for p in json.loads(r.stdout)):
            return
        time.sleep(0.1)
    raise AssertionError(f"{cell} never appeared in {home}'s peers")


class CliRunner:
    """Namespace handed to tests by the `cli` fixture."""

    run = staticmethod(run_cli)
    identity = staticmethod(new_identity)
    free_port = staticmethod(free_udp_port)
    wait_for_peer = staticmethod(wait_for_peer)


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh set of network namespaces (tests/netns), torn down after the test. Those tests
    need root, iproute2 and nftables (make test installs them); without them they fail with
    the reason, never skip."""
    try:
        require_netns()
    except NetnsUnavailable as exc:
        pytest.fail(f"cannot run namespace tests: {exc}")
    with Topology() as topo:
        yield topo
