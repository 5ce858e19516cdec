"""`Node.status()` reports discovery: frames received, admitted, and refused by reason.

A node embedded in the test, listening on a wildcard address so that discovery runs, is handed
beacons through its discovery driver (the path the shared UDP socket takes): one from a holder of
a certificate by the configured authority, one from a node without a certificate, and one frame
that is not a beacon at all. Its status must count each where it belongs. A unique mesh name and
port keep it from meeting anything else on the machine's link.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from cellmesh.config import NodeConfig
from cellmesh.discovery.beacon import BeaconFields, Capabilities, push_beacon
from cellmesh.discovery.mesh import Mesh, issue_membership_cert
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from conftest import free_udp_port


def _beacon(who: Identity, mesh: str, **kw: object) -> bytes:
    fields = BeaconFields(
        seq=1,
        timestamp_ms=int(time.time() * 1000),
        interval_ms=5000,
        name="probe",
        caps=Capabilities(relay=True, bandwidth_class=4),
        **kw,  # type: ignore[arg-type]
    )
    return push_beacon(who, fields, Mesh(mesh))


def _config(**kw: object) -> NodeConfig:
    base: dict[str, object] = {
        "listen": ("[::]:0",),
        "database": "",
        "blob_dir": "",
        "anchor": False,
        "discovery_port": free_udp_port(),
    }
    base.update(kw)
    return NodeConfig(**base)  # type: ignore[arg-type]


def test_status_counts_admitted_and_refused_discovery_frames() -> None:
    asyncio.run(_status_counts_admitted_and_refused_discovery_frames())


async def _status_counts_admitted_and_refused_discovery_frames() -> None:
    authority = Identity.generate()
    holder, outsider = Identity.generate(), Identity.generate()
    mesh = "status-" + os.urandom(4).hex()
    cfg = _config(
        mesh_name=mesh,
        mesh_authorities=(authority.public_key.hex(),),
        announce_storage=True,
        bandwidth_class=7,
        beacon_tags=("rack=r3",),
    )
    async with Node(Identity.generate(), cfg) as node:
        disc = node.discovery
        assert disc is not None
        assert node._loop is not None
        cert = issue_membership_cert(
            authority, holder.cell_id, mesh, int((time.time() + 3600) * 1000)
        )
        now = node._loop.time()
        disc.feed(_beacon(holder, mesh, cert=cert), ("2001:db8::2", 19541), now)
        disc.feed(_beacon(outsider, mesh), ("2001:db8::3", 19541), now)
        disc.feed(b"\x01\x06" + bytes(70), ("2001:db8::4", 19541), now)
        st = node.status()
        json.dumps(st)  # what `cellmesh status --json` prints
        d = st["discovery"]
        assert d["mesh_name"] == mesh
        # Our own looped-back beacons may be counted too (as `reflected`), hence >=.
        assert d["received"] >= 3
        assert d["beacons_accepted"] == d["admitted"] - d["solicits_accepted"] == 1
        assert d["peers"] == 1
        assert d["drops"]["no_cert"] == 1
        assert sum(d["drops"].values()) - d["drops"].get("reflected", 0) == 2
        assert d["announced"] == {
            "capabilities": {
                "relay": True,
                "storage": True,
                "anchor_eligible": False,
                "bandwidth_class": 7,
            },
            "tags": {"rack": "r3"},
            "ego": 0,
        }
        assert d["admission"]["authorities"] == [authority.public_key.hex()]
        assert d["admission"]["membership_cert"] is None
        # The admitted peer's announced capabilities are what `cellmesh peers --json` shows.
        (row,) = [r for r in node.peer_rows() if "discovered" in r]
        assert row["discovered"]["capabilities"] == {
            "relay": True,
            "storage": False,
            "anchor_eligible": False,
            "bandwidth_class": 4,
        }


def test_status_says_when_discovery_is_off() -> None:
    async def main() -> None:
        async with Node(Identity.generate(), _config(discovery=False)) as node:
            assert node.status()["discovery"] is None

    asyncio.run(main())
