"""Multi-hop and NAT traversal between real hosts in network namespaces.

- A line A - B - C - D on three separate links: A has no IP route to D at all, yet pings it by
  CellID and copies a file to it through B and C, which relay without holding A-D keys.
- Two hosts behind nftables masquerading NATs meet through a public node: their session starts
  relayed, hole punching moves it onto a direct path; with punching blocked by the NAT, it stays
  relayed and says why.

Needs root, iproute2 and nftables (make test installs them); fails, never skips, without them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from cellmesh.testing.netns import Host, Topology

CLI = [sys.executable, "-m", "cellmesh"]
PORT = 19541


def _identity(home: Path) -> str:
    r = subprocess.run(
        [*CLI, "--home", str(home), "id", "new"], capture_output=True, text=True, check=True
    )
    return r.stdout.strip().splitlines()[-1]


def _start(host: Host, home: Path, *peers: str) -> None:
    args = ["--home", str(home), "node", "--listen", f"0.0.0.0:{PORT}", "--no-discovery"]
    for p in peers:
        args += ["--peer", f"{p}:{PORT}"]
    with open(home / "node.log", "w") as log:  # the child keeps its own copy of the descriptor
        host.popen([*CLI, *args], stdout=log, stderr=subprocess.STDOUT)


def _cli(host: Host, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run([*CLI, "--home", str(home), *args])


def _wait_json(host: Host, home: Path, args: list[str], ok: object, timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while True:
        r = _cli(host, home, *args)
        if r.returncode == 0:
            value = json.loads(r.stdout)
            if ok(value):  # type: ignore[operator]
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{args} never satisfied the test: {r.stdout} {r.stderr}")
        time.sleep(0.3)


def test_line_topology_relays_ping_and_file_without_end_to_end_keys(
    tmp_path: Path, topology: Topology
) -> None:
    a = topology.add_host("a", "l1", "198.18.1.1/24")
    b = topology.add_host("b", "l1", "198.18.1.2/24")
    topology.attach(b, "l2", "198.18.2.2/24")
    c = topology.add_host("c", "l2", "198.18.2.3/24")
    topology.attach(c, "l3", "198.18.3.3/24")
    d = topology.add_host("d", "l3", "198.18.3.4/24")
    homes = {n: tmp_path / n for n in "abcd"}
    cells = {n: _identity(h) for n, h in homes.items()}
    # A cannot reach D's network at all.
    assert a.run(["ip", "route", "get", "198.18.3.4"]).returncode != 0
    _start(d, homes["d"])
    _start(c, homes["c"], "198.18.3.4")
    _start(b, homes["b"], "198.18.2.3")
    _start(a, homes["a"], "198.18.1.2")
    _wait_json(
        a,
        homes["a"],
        ["routes", "--json"],
        lambda v: any(r["destination"] == cells["d"] for r in v["routes"]),
    )
    r = _cli(a, homes["a"], "ping", cells["d"], "-c", "3", "-W", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    hops = json.loads(_cli(a, homes["a"], "trace", cells["d"], "--json").stdout)
    assert [h["cell_id"] for h in hops] == [cells["b"], cells["c"], cells["d"]]
    src = tmp_path / "file.bin"
    src.write_bytes(bytes(range(256)) * 2048)
    r = _cli(a, homes["a"], "cp", str(src), cells["d"])
    assert r.returncode == 0, r.stdout + r.stderr
    got = (homes["d"] / "inbox" / "file.bin").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(src.read_bytes()).digest()
    # B and C relayed (their counters moved) and hold sessions only with their neighbours.
    for name, neighbours in (("b", {"a", "c"}), ("c", {"b", "d"})):
        host = b if name == "b" else c
        status = json.loads(_cli(host, homes[name], "routes", "--json").stdout)
        assert status["routing"]["relayed"]["total"] > 0
        peers = json.loads(_cli(host, homes[name], "peers", "--json").stdout)
        assert {p["cell_id"] for p in peers} == {cells[n] for n in neighbours}


def _nat_world(
    tmp_path: Path, topology: Topology, block_punching: bool
) -> tuple[Host, Path, str, str]:
    pub = topology.add_host("pub", "wan", "198.18.0.10/24")
    topology.add_nat_router("nata", "lana", "10.1.0.1/24", "wan", "198.18.0.1/24")
    topology.add_nat_router("natb", "lanb", "10.2.0.1/24", "wan", "198.18.0.2/24")
    a = topology.add_host("a", "lana", "10.1.0.2/24")
    b = topology.add_host("b", "lanb", "10.2.0.2/24")
    topology.default_route(a, "10.1.0.1")
    topology.default_route(b, "10.2.0.1")
    if block_punching:
        # NAT A lets nothing in from NAT B's public address: no direct path can open.
        nata = topology.hosts["nata"]
        rules = (
            "table ip block {\n  chain inbound {\n    type filter hook forward priority 0;\n"
            "    ip saddr 198.18.0.2 drop\n  }\n}\n"
        )
        r = subprocess.run(
            nata.exec_argv(["nft", "-f", "-"]), input=rules, capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    homes = {n: tmp_path / n for n in ("pub", "a", "b")}
    cells = {n: _identity(h) for n, h in homes.items()}
    _start(pub, homes["pub"])
    _start(a, homes["a"], "198.18.0.10")
    _start(b, homes["b"], "198.18.0.10")
    _wait_json(
        a,
        homes["a"],
        ["routes", "--json"],
        lambda v: any(r["destination"] == cells["b"] for r in v["routes"]),
    )
    return a, homes["a"], cells["b"], cells["pub"]


def test_nat_hole_punching_gives_a_direct_path(tmp_path: Path, topology: Topology) -> None:
    a, home, b_cell, _ = _nat_world(tmp_path, topology, block_punching=False)
    r = _cli(a, home, "ping", b_cell, "-c", "1", "-W", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    peer = _wait_json(
        a,
        home,
        ["peers", "--json"],
        lambda v: any(p["cell_id"] == b_cell and p["path"] == "direct" for p in v),
    )
    row = next(p for p in peer if p["cell_id"] == b_cell)  # type: ignore[attr-defined]
    assert row["address"].startswith("198.18.0.2:")  # B's NAT, not the rendezvous node
    assert "hole punched" in row["path_note"] or "came to us" in row["path_note"]
    nat = json.loads(_cli(a, home, "routes", "--json").stdout)["routing"]["nat"]
    assert nat["type"] in ("nat", "endpoint-independent")
    assert nat["reflexive"][0].startswith("198.18.0.1:")
    r = _cli(a, home, "ping", b_cell, "-c", "2", "-W", "3")
    assert r.returncode == 0, r.stdout + r.stderr


def test_nat_with_punching_blocked_stays_relayed_and_says_why(
    tmp_path: Path, topology: Topology
) -> None:
    a, home, b_cell, _ = _nat_world(tmp_path, topology, block_punching=True)
    r = _cli(a, home, "ping", b_cell, "-c", "1", "-W", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    peer = _wait_json(
        a,
        home,
        ["peers", "--json"],
        lambda v: any(
            p["cell_id"] == b_cell and "hole punching failed" in p["path_note"] for p in v
        ),
        timeout=20,
    )
    row = next(p for p in peer if p["cell_id"] == b_cell)  # type: ignore[attr-defined]
    assert row["path"] == "relayed"
    r = _cli(a, home, "ping", b_cell, "-c", "2", "-W", "3")  # still works, through the relay
    assert r.returncode == 0, r.stdout + r.stderr
