"""The examples shown in docs/api.md and the README run as documented."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import CliRunner, NodeProcess

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_example_runs() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embedded_ping.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "ping " in r.stdout
    assert "b received b'HELLO FROM B'" in r.stdout


def test_control_client_example_runs(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_cell = cli.identity(a_home)
    b_cell = cli.identity(b_home)
    port = cli.free_port()
    node_factory(a_home, "--listen", f"127.0.0.1:{port}")
    node_factory(b_home, "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{port}")
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "control_client.py"),
                "--home",
                str(a_home),
                b_cell,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.returncode == 0, r.stderr
    assert f"node {a_cell}" in r.stdout
    assert f"ping {b_cell}" in r.stdout


def test_channels_example_runs() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "channels.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "stranger refused: token_required" in r.stdout
    assert "viewer got b'rpm=3000' on telemetry/engine-3" in r.stdout


def test_state_example_runs_and_is_the_one_documented() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "state.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("embedded node ")
    assert "live: 'eggs' by " in r.stdout
    assert "log: ['milk', 'eggs']" in lines
    assert "verified 2 events: sound" in lines
    assert "pantry: {'milk': 1} after 2 events" in lines
    assert lines[-1] == "milk: 1 (1 replica(s) merged)"
    # docs/state.md shows the example's main() verbatim.
    doc = (ROOT / "docs" / "state.md").read_text(encoding="utf-8")
    section = doc.split("## Python API: cellmesh.connect", 1)[1]
    shown = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert shown in (ROOT / "examples" / "state.py").read_text(encoding="utf-8")
