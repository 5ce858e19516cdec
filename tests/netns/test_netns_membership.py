"""Membership-certificate admission on a real link, configured the way an operator would.

Three hosts in network namespaces on one bridge run `cellmesh node` with `mesh_authorities`
naming the authority's key. The authority issues certificates with `cellmesh mesh cert issue`
(one for itself, one for the holder); the third node has none. The authority and the holder
discover each other; neither admits the node without a certificate, and `cellmesh status --json`
counts its refused beacons as `no_cert`. Needs root; fails (never skips) with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellmesh.testing.netns import Host, Topology

CLI = [sys.executable, "-m", "cellmesh"]


def _cli(home: Path, *args: str) -> str:
    r = subprocess.run([*CLI, "--home", str(home), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _json(host: Host, home: Path, op: str) -> Any:
    r = host.run([*CLI, "--home", str(home), op, "--json"])
    return json.loads(r.stdout) if r.returncode == 0 else None


def _discovered(host: Host, home: Path) -> set[str]:
    rows = _json(host, home, "peers") or []
    return {r["cell_id"] for r in rows if "discovered" in r}


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.25)
    return cond()


def _report(hosts: dict[str, Host], homes: dict[str, Path], logs: Path) -> str:
    """What each node saw, for a failure message."""
    return "\n".join(
        f"{n}: status {json.dumps((_json(h, homes[n], 'status') or {}).get('discovery'))}\n"
        f"  peers {_json(h, homes[n], 'peers')}\n  log {(logs / f'{n}.log').read_text()[-2000:]}"
        for n, h in hosts.items()
    )


def test_certificate_holders_discover_each_other_and_others_are_refused(
    tmp_path: Path, topology: Topology
) -> None:
    names = ("authority", "holder", "outsider")
    homes = {n: tmp_path / n for n in names}
    cells = {}
    for n, home in homes.items():
        _cli(home, "id", "new")
        cells[n] = json.loads(_cli(home, "id", "show", "--json"))
    authority_key = cells["authority"]["public_key"]
    for n, home in homes.items():
        toml = f'mesh_name = "rig"\nmesh_authorities = ["{authority_key}"]\nanchor = false\n'
        if n != "outsider":
            toml += 'membership_cert = "member.cert"\n'
        (home / "config.toml").write_text(toml)
    # Issued after the authority's config names the mesh: the certificate is for "rig".
    for n in ("authority", "holder"):
        _cli(
            homes["authority"], "mesh", "cert", "issue",
            "--subject", cells[n]["cell_id"], "--out", str(homes[n] / "member.cert"),
        )  # fmt: skip
    hosts = {n: topology.add_host(n) for n in names}
    for n in names:
        with (tmp_path / f"{n}.log").open("wb") as log:
            hosts[n].popen(
                [*CLI, "--home", str(homes[n]), "node", "--listen", "[::]:19541"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
    authority, holder, outsider = (cells[n]["cell_id"] for n in names)

    def members_met() -> bool:
        return holder in _discovered(hosts["authority"], homes["authority"]) and authority in (
            _discovered(hosts["holder"], homes["holder"])
        )

    assert _wait(members_met, 20.0), _report(hosts, homes, tmp_path)

    def refusals_counted() -> bool:
        for n in ("authority", "holder"):
            st = _json(hosts[n], homes[n], "status")
            if st is None or st["discovery"]["drops"].get("no_cert", 0) < 1:
                return False
        return True

    # The outsider announces itself from its start (beacon, SOLICIT, repeats): by now both
    # members have refused some of it.
    assert _wait(refusals_counted, 20.0)
    for n in ("authority", "holder"):
        assert outsider not in _discovered(hosts[n], homes[n])
        d = _json(hosts[n], homes[n], "status")["discovery"]
        assert d["admitted"] >= 1
        assert d["admission"]["authorities"] == [authority_key]
        assert d["admission"]["membership_cert"]["subject"] == cells[n]["cell_id"]
    # Admission is each node's own decision: the outsider, which requires certificates too,
    # admits the two certified members.
    assert _wait(
        lambda: {authority, holder} <= _discovered(hosts["outsider"], homes["outsider"]), 20.0
    )
