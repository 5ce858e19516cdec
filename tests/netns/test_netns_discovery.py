"""Zero-configuration discovery on a real link: five hosts in network namespaces on one bridge,
no peers configured. Every node finds every other by signed IPv6 link-local multicast beacons,
opens Noise IK sessions from the beaconed keys and pings by CellID; a node with the wrong mesh key
is invisible and learns nothing; a killed node leaves the others' tables. Needs root; fails (never
skips) with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cellmesh.testing.netns import Host, Topology

CLI = [sys.executable, "-m", "cellmesh"]
KEY = "11" * 32
WRONG_KEY = "22" * 32


def _peers(host: Host, home: Path) -> list[dict[str, object]]:
    r = host.run([*CLI, "--home", str(home), "peers", "--json"])
    if r.returncode != 0:
        return []
    rows: list[dict[str, object]] = json.loads(r.stdout)
    return rows


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.25)
    return cond()


def test_five_hosts_discover_each_other_and_outsiders_stay_invisible(
    tmp_path: Path, topology: Topology
) -> None:
    n = 5
    hosts = [topology.add_host(f"h{i}") for i in range(n + 1)]
    homes = [tmp_path / f"h{i}" for i in range(n + 1)]
    cells = []
    for home in homes:
        r = subprocess.run(
            [*CLI, "--home", str(home), "id", "new"], capture_output=True, text=True, check=True
        )
        cells.append(r.stdout.strip().splitlines()[-1])
    procs = []
    for i, (h, home) in enumerate(zip(hosts, homes, strict=True)):
        env = dict(os.environ)
        env["CELLMESH_MESH_KEY"] = WRONG_KEY if i == n else KEY
        env["NX0_NAME"] = f"node-{i}"  # the NEXUS-0 alias for the node name
        env["NX0_ZONE"] = "lab"
        procs.append(
            h.popen(
                [*CLI, "--home", str(home), "node", "--listen", "[::]:19541"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        )
    members = range(n)
    outsider = cells[n]

    def all_connected() -> bool:
        for i in members:
            rows = _peers(hosts[i], homes[i])
            got = {r["cell_id"] for r in rows if r.get("state") == "alive"}
            if got != {cells[j] for j in members if j != i}:
                return False
        return True

    assert _wait(all_connected, 20.0), [
        sorted(str(r["cell_id"])[:8] for r in _peers(hosts[i], homes[i])) for i in members
    ]
    # Discovered details are there: name from NX0_NAME, zone, first-seen.
    rows = _peers(hosts[0], homes[0])
    by_cell = {r["cell_id"]: r for r in rows}
    found = by_cell[cells[1]]["discovered"]
    assert isinstance(found, dict)
    assert found["name"] == "node-1"
    assert found["zone"] == "lab"
    # Ping by CellID across the link.
    r = hosts[2].run([*CLI, "--home", str(homes[2]), "ping", cells[4], "-c", "2", "-i", "0.1"])
    assert r.returncode == 0, r.stdout + r.stderr
    # The outsider (wrong mesh key) is in nobody's table and has nobody in its own.
    for i in members:
        assert outsider not in {r["cell_id"] for r in _peers(hosts[i], homes[i])}
    assert _peers(hosts[n], homes[n]) == []
    # Kill node 3: it leaves the others' tables after its announced expiry.
    procs[3].send_signal(signal.SIGKILL)
    procs[3].wait()

    def gone_everywhere() -> bool:
        return all(
            cells[3] not in {r["cell_id"] for r in _peers(hosts[i], homes[i])}
            for i in members
            if i != 3
        )

    assert _wait(gone_everywhere, 90.0), [
        [(r["cell_id"][:8], r.get("state")) for r in _peers(hosts[i], homes[i])]  # type: ignore[index]
        for i in members
    ]
