"""The IPv4 fallback of zero-configuration discovery on a real link: hosts in network namespaces
on one bridge, IPv6 disabled inside each, an IPv4 address on eth0 and no multicast or default
route. Nodes run with default discovery settings (no peers, no group flags); they must notice
that eth0 has no IPv6 link-local address, say so, announce on IPv4 multicast instead, find each
other, open Noise IK sessions on the data port and ping by CellID. A dual-stack node on the same
link must find the IPv4-only nodes and be found by them. Needs root; fails (never skips) with
the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_netns_discovery import _peers, _wait

from cellmesh.testing.netns import Host, Topology

CLI = [sys.executable, "-m", "cellmesh"]


def _env(name: str) -> dict[str, str]:
    # Defaults only: no CELLMESH_* setting of the caller's may leak into the nodes.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLMESH_", "NX0_"))}
    env["CELLMESH_NAME"] = name
    return env


def _disable_ipv6(host: Host) -> None:
    for key in ("all", "default", host.ifname):
        r = host.run(["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])
        assert r.returncode == 0, r.stderr
    # The point of the test: no IPv6 address at all, and no route a multicast could follow.
    assert host.run(["ip", "-6", "addr", "show", "dev", host.ifname]).stdout.strip() == ""
    routes = host.run(["ip", "-4", "route", "show"]).stdout
    assert "default" not in routes, routes
    assert "224.0.0.0" not in routes, routes


def _new_identity(home: Path) -> str:
    r = subprocess.run(
        [*CLI, "--home", str(home), "id", "new"], capture_output=True, text=True, check=True
    )
    return r.stdout.strip().splitlines()[-1]


def _start(
    host: Host, home: Path, name: str, listen: str | None, *extra: str
) -> subprocess.Popen[bytes]:
    args = [*CLI, "--home", str(home), "node", "--log-level", "info", *extra]
    if listen is not None:
        args += ["--listen", listen]
    log = (home / "node.log").open("wb")
    try:
        return host.popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(name))
    finally:
        log.close()  # the child holds its own descriptor


def _mesh_formed(hosts: list[Host], homes: list[Path], cells: list[str]) -> Callable[[], bool]:
    def formed() -> bool:
        for i, (h, home) in enumerate(zip(hosts, homes, strict=True)):
            # Alive: a session is up. Discovered: heard in a beacon, not only through a session
            # the other side opened.
            rows = _peers(h, home)
            alive = {
                r["cell_id"] for r in rows if r.get("state") == "alive" and r.get("discovered")
            }
            if alive != {c for j, c in enumerate(cells) if j != i}:
                return False
        return True

    return formed


def _tables(hosts: list[Host], homes: list[Path]) -> list[list[tuple[str, object]]]:
    return [
        [(str(r["cell_id"])[:8], r.get("state")) for r in _peers(h, home)]
        for h, home in zip(hosts, homes, strict=True)
    ]


FALLBACK = "eth0 (IPv4 224.0.0.1 fallback: no usable IPv6 link-local address)"


# default: the default listen address, the dual-stack [::]:19541 (IPv6 sockets still work with
# IPv6 disabled on every interface), shared with discovery. ipv4-listen: an IPv4-only data socket
# on the discovery port, which an IPv4 discovery socket of its own used to share the port with
# (SO_REUSEPORT) and steal handshakes from. configured-group: the IPv4 group configured
# explicitly, on a port of its own, so discovery needs its own socket and IP_MULTICAST_IF.
@pytest.mark.parametrize(
    ("listen", "extra", "announces"),
    [
        (None, [], FALLBACK),
        ("0.0.0.0:19541", [], FALLBACK),
        (
            "0.0.0.0:19541",
            ["--discovery-group", "224.0.0.1", "--discovery-port", "19542"],
            "eth0 (IPv4 224.0.0.1) port 19542",
        ),
    ],
    ids=["default", "ipv4-listen", "configured-group"],
)
def test_ipv4_only_hosts_discover_each_other_by_the_fallback(
    tmp_path: Path, topology: Topology, listen: str | None, extra: list[str], announces: str
) -> None:
    n = 3
    hosts = [topology.add_host(f"h{i}", ipv4=f"198.18.0.{i + 1}/24") for i in range(n)]
    for h in hosts:
        _disable_ipv6(h)
    homes = [tmp_path / f"h{i}" for i in range(n)]
    cells = [_new_identity(home) for home in homes]
    for i, (h, home) in enumerate(zip(hosts, homes, strict=True)):
        _start(h, home, f"v4-{i}", listen, *extra)

    assert _wait(_mesh_formed(hosts, homes, cells), 30.0), _tables(hosts, homes)
    # Discovered over IPv4, with the announced name, and dialled at the IPv4 address.
    found = {r["cell_id"]: r for r in _peers(hosts[0], homes[0])}[cells[1]]
    assert isinstance(found["discovered"], dict)
    assert found["discovered"]["name"] == "v4-1"
    assert str(found["address"]).startswith("198.18.0.2:"), found
    # Sessions carry traffic on the data port: ping by CellID across the link.
    r = hosts[2].run([*CLI, "--home", str(homes[2]), "ping", cells[0], "-c", "2", "-i", "0.1"])
    assert r.returncode == 0, r.stdout + r.stderr
    # The node said where it announces, and why on IPv4.
    log = (homes[0] / "node.log").read_text()
    assert announces in log, log


def test_a_dual_stack_node_and_ipv4_only_nodes_find_each_other(
    tmp_path: Path, topology: Topology
) -> None:
    n = 3
    hosts = [topology.add_host(f"h{i}", ipv4=f"198.18.0.{i + 1}/24") for i in range(n)]
    for h in hosts[1:]:
        _disable_ipv6(h)  # h0 keeps IPv6 and announces on ff02::1 as usual
    homes = [tmp_path / f"h{i}" for i in range(n)]
    cells = [_new_identity(home) for home in homes]
    for i, (h, home) in enumerate(zip(hosts, homes, strict=True)):
        _start(h, home, f"n{i}", None)

    assert _wait(_mesh_formed(hosts, homes, cells), 30.0), _tables(hosts, homes)
    r = hosts[1].run([*CLI, "--home", str(homes[1]), "ping", cells[0], "-c", "2", "-i", "0.1"])
    assert r.returncode == 0, r.stdout + r.stderr
    # The dual-stack node announces on IPv4 too for its IPv4-only neighbours (else they would
    # hear it only through answers to their SOLICITs, and let it expire), and says so.
    log_path = homes[0] / "node.log"
    line = "eth0 (IPv6 ff02::1; IPv4 224.0.0.1 for IPv4-only neighbours)"
    assert _wait(lambda: line in log_path.read_text(), 20.0), log_path.read_text()
