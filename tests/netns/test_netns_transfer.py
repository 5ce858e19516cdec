"""Real hosts in network namespaces on a bridge: nodes reach each other over IPv6 link-local
addresses by CellID, and a file crosses intact. Needs root; fails (never skips) with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cellmesh.testing.netns import Topology

CLI = [sys.executable, "-m", "cellmesh"]


def test_three_hosts_ping_by_cell_id_over_link_local(tmp_path: Path, topology: Topology) -> None:
    hosts = [topology.add_host(f"h{i}") for i in range(3)]
    cells = []
    for i in range(len(hosts)):
        home = tmp_path / f"h{i}"
        r = subprocess.run(
            [*CLI, "--home", str(home), "id", "new"], capture_output=True, text=True, check=True
        )
        cells.append(r.stdout.strip().splitlines()[-1])
    first = hosts[0].link_local()
    for i, h in enumerate(hosts):
        args = ["--home", str(tmp_path / f"h{i}"), "node", "--listen", "[::]:19541"]
        if i:
            args += ["--peer", f"[{first}%eth0]:19541"]
        h.popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Every node reaches host 0 by CellID; host 0 reaches them back.
    deadline = time.monotonic() + 20
    for i in (1, 2):
        while True:
            r = hosts[i].run(
                [*CLI, "--home", str(tmp_path / f"h{i}"), "ping", cells[0], "-c", "1", "-W", "1"]
            )
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.returncode == 0, r.stdout + r.stderr
    r = hosts[0].run([*CLI, "--home", str(tmp_path / "h0"), "peers", "--json"])
    peers = {p["cell_id"]: p for p in json.loads(r.stdout)}
    assert set(peers) == {cells[1], cells[2]}
    assert all(p["address"].startswith("[fe80::") for p in peers.values())
    for c in (cells[1], cells[2]):
        r = hosts[0].run([*CLI, "--home", str(tmp_path / "h0"), "ping", c, "-c", "2", "-i", "0.1"])
        assert r.returncode == 0, r.stdout + r.stderr
