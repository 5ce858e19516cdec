"""Three real node processes in network namespaces: a partition, writes on both sides, a heal.

A hosts `room/**`; B and C subscribe to it and may publish into it. B is cut off by an nftables
rule in its namespace long enough for every session with it to die; meanwhile A and C write on
one side and B on the other. After the rule is removed the sessions come back by themselves,
B's grants are renewed, and anti-entropy sync brings every log to the same set of events, with
hash chains and signatures intact, and the same fold state.

Needs root, iproute2 and nftables (make test installs them); fails, never skips, without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cellmesh.testing.netns import Host, Topology

CLI = [sys.executable, "-m", "cellmesh"]
PORT = 19541
CHANNEL = "room/main"
ADDR = {"a": "198.18.7.1", "b": "198.18.7.2", "c": "198.18.7.3"}
DELTA = {"a": "1", "b": "10", "c": "100"}
"""Each node's events carry this counter delta: 4 events each, so the merged counter is 444."""
CONFIG = """\
keepalive_interval = 0.5
idle_timeout = 3.0
sync_interval = 1.0
{extra}
"""


def _cli(host: Host, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run([*CLI, "--home", str(home), *args])


def _ok(host: Host, home: Path, *args: str) -> str:
    r = _cli(host, home, *args)
    assert r.returncode == 0, f"{args}: {r.stdout} {r.stderr}"
    return r.stdout


def _wait(pred: Callable[[], bool], what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _log_ids(host: Host, home: Path) -> set[str]:
    r = _cli(host, home, "log", CHANNEL, "--json")
    if r.returncode != 0:
        return set()
    return {json.loads(line)["id"] for line in r.stdout.splitlines() if line.strip()}


def _partition(host: Host, on: bool) -> None:
    if on:
        rules = (
            "table inet partition {\n"
            '  chain in { type filter hook input priority -10; iifname != "lo" drop; }\n'
            '  chain out { type filter hook output priority -10; oifname != "lo" drop; }\n'
            "}\n"
        )
        r = subprocess.run(
            host.exec_argv(["nft", "-f", "-"]), input=rules, capture_output=True, text=True,
            check=False,
        )  # fmt: skip
    else:
        r = subprocess.run(
            host.exec_argv(["nft", "delete", "table", "inet", "partition"]),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_three_nodes_converge_after_a_partition_heals(tmp_path: Path, topology: Topology) -> None:
    hosts = {n: topology.add_host(n, "lan", f"{ADDR[n]}/24") for n in "abc"}
    homes = {n: tmp_path / n for n in "abc"}
    cells: dict[str, str] = {}
    for n, home in homes.items():
        r = subprocess.run(
            [*CLI, "--home", str(home), "id", "new"], capture_output=True, text=True, check=True
        )
        cells[n] = r.stdout.strip().splitlines()[-1]
        extra = 'channels = ["room/** open"]' if n == "a" else ""
        (home / "config.toml").write_text(CONFIG.format(extra=extra))
    for n in "abc":
        args = ["--home", str(homes[n]), "node", "--listen", f"0.0.0.0:{PORT}", "--no-discovery"]
        if n != "a":
            args += ["--peer", f"{ADDR['a']}:{PORT}"]
        with open(homes[n] / "node.log", "w") as log:
            hosts[n].popen([*CLI, *args], stdout=log, stderr=subprocess.STDOUT)

    a, b = cells["a"], cells["b"]
    _wait(lambda: _cli(hosts["a"], homes["a"], "status").returncode == 0, "node a to start")
    first = _ok(hosts["a"], homes["a"], "pub", CHANNEL, DELTA["a"]).strip()
    for n in "bc":
        _wait(
            lambda n=n: _cli(hosts[n], homes[n], "ping", a, "-c", "1", "-W", "2").returncode == 0,  # type: ignore[misc]
            f"{n} to reach a",
        )
        # Subscribe (catching up on a0 by sync) and obtain the right to publish.
        _ok(hosts[n], homes[n], "sub", CHANNEL, "--at", a, "--from-start", "--count", "1")
        _ok(hosts[n], homes[n], "pub", CHANNEL, DELTA[n], "--to", a)
    _wait(lambda: all(len(_log_ids(hosts[n], homes[n])) == 3 for n in "abc"), "the first 3 events")
    assert first in _log_ids(hosts["b"], homes["b"])

    # Partition B away and keep it away until its sessions are gone on both sides.
    _partition(hosts["b"], True)
    for _ in range(3):
        for n in "acb":
            _ok(hosts[n], homes[n], "pub", CHANNEL, DELTA[n])

    def no_session(n: str, other: str) -> bool:
        peers = json.loads(_ok(hosts[n], homes[n], "peers", "--json"))
        return all(p["cell_id"] != other for p in peers)

    _wait(lambda: no_session("a", b) and no_session("b", a), "the partition to end sessions")
    ids_b = _log_ids(hosts["b"], homes["b"])
    ids_a = _log_ids(hosts["a"], homes["a"])
    assert len(ids_b) == 6
    assert len(ids_a) == 9
    assert len(ids_a | ids_b) == 12

    _partition(hosts["b"], False)
    everything: set[str] = set()

    def converged() -> bool:
        nonlocal everything
        sets = [_log_ids(hosts[n], homes[n]) for n in "abc"]
        everything = sets[0]
        return len(sets[0]) == 12 and sets[0] == sets[1] == sets[2]

    _wait(converged, "the three logs to converge after the heal", timeout=60)
    for n in "abc":
        r = _cli(hosts[n], homes[n], "log", CHANNEL, "--verify")
        assert r.returncode == 0, r.stdout + r.stderr
    # Same events, so the same fold state on every replica.
    folds = [
        json.loads(_ok(hosts[n], homes[n], "fold", CHANNEL, "counter", "--json")) for n in "abc"
    ]
    assert folds[0]["events"] == folds[1]["events"] == folds[2]["events"] == 12
    assert folds[0]["value"] == folds[1]["value"] == folds[2]["value"] == 444
    assert len(everything) == 12
    status = json.loads(
        subprocess.run(
            [sys.executable, "-c", _STATE_SNIPPET, str(homes["b"] / "control.sock")],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert status["sync"]["counters"].get("events_new", 0) >= 6


# The state layer's status over the control API (no CLI command prints all of it).
_STATE_SNIPPET = """
import asyncio, json, sys
from cellmesh.node.control import ControlClient
async def main():
    async with ControlClient(sys.argv[1]) as c:
        print(json.dumps(await c.call("state")))
asyncio.run(main())
"""
