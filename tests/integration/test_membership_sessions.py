"""Membership certificates gate sessions, not only discovery: a node whose mesh trusts an
authority makes no session with a peer that cannot show a certificate from it, whichever side
dials (the certificate travels inside the handshake, encrypted, next to the identity)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from cellmesh.config import NodeConfig
from cellmesh.discovery.mesh import issue_membership_cert
from cellmesh.errors import PeerUnreachableError
from cellmesh.identity.keys import Identity
from cellmesh.node.membership import encode_cert_file
from cellmesh.node.node import Node

LOCAL = ("127.0.0.1:0",)
MESH = "site-7"
FOREVER = 2**63


def _addr(node: Node) -> str:
    host, port = node.local_addresses()[0]
    return f"{host}:{port}"


def _member(
    tmp: Path, name: str, authority: Identity, ident: Identity, *trusts: Identity
) -> NodeConfig:
    cert = issue_membership_cert(authority, ident.cell_id, MESH, FOREVER)
    path = tmp / f"{name}.cert"
    path.write_text(encode_cert_file(cert))
    return NodeConfig(
        listen=LOCAL,
        mesh_name=MESH,
        mesh_authorities=tuple(a.public_key.hex() for a in (authority, *trusts)),
        membership_cert=str(path),
        handshake_timeout=1.5,
    )


def test_sessions_need_a_certificate_from_a_trusted_authority(tmp_path: Path) -> None:
    authority, rogue_authority = Identity.generate(), Identity.generate()
    ids = {n: Identity.generate() for n in ("m1", "m2", "outsider", "forged")}

    async def go() -> None:
        m1 = Node(ids["m1"], _member(tmp_path, "m1", authority, ids["m1"]))
        m2 = Node(ids["m2"], _member(tmp_path, "m2", authority, ids["m2"]))
        # No certificate at all, and no authorities of its own: it would accept anyone.
        outsider = Node(ids["outsider"], NodeConfig(listen=LOCAL, handshake_timeout=1.5))
        # A certificate, but signed by an authority the members do not trust (it trusts theirs,
        # so it is the members who must refuse it).
        forged = Node(
            ids["forged"],
            _member(tmp_path, "forged", rogue_authority, ids["forged"], authority),
        )
        nodes = (m1, m2, outsider, forged)
        for n in nodes:
            await n.start()
        try:
            assert await m1.connect(_addr(m2)) == m2.cell_id  # members: admitted
            await m1.ping(m2.cell_id)
            # The outsider dials a member. Over XX it learns the member's identity from message
            # 2 and may believe it connected; the member refuses its message 3 and keeps no
            # session, so nothing it sends gets through.
            with contextlib.suppress(PeerUnreachableError):
                await outsider.connect(_addr(m1), timeout=3.0)
            with pytest.raises((PeerUnreachableError, TimeoutError)):
                await outsider.ping(m1.cell_id, timeout=1.0)
            with pytest.raises(PeerUnreachableError):  # a member dials the outsider
                await m2.connect(_addr(outsider), timeout=3.0)
            with contextlib.suppress(PeerUnreachableError):  # a rogue authority's certificate
                await forged.connect(_addr(m1), timeout=3.0)
            with pytest.raises((PeerUnreachableError, TimeoutError)):
                await forged.ping(m1.cell_id, timeout=1.0)
            # m1 refused the outsider's and the forged node's message 3; m2 refused the
            # outsider's answer.
            assert m1.endpoint.statistics().drops["not_member"] >= 2
            assert m2.endpoint.statistics().drops["not_member"] >= 1
            assert {p.cell_id for p in m1.peers()} == {m2.cell_id}
            assert {p.cell_id for p in m2.peers()} == {m1.cell_id}
        finally:
            for n in nodes:
                await n.stop()

    asyncio.run(go())
