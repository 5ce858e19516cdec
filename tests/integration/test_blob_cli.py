"""`cellmesh blob get --from` through the real command line and `cellmesh node` processes: a
blob put in one home is fetched by another node over the mesh and written out verified."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import blake3

from cellmesh.node.control import ControlClient
from conftest import CliRunner, NodeProcess


async def _blob_stats(home: Path) -> dict[str, Any]:
    async with ControlClient(home / "control.sock") as c:
        result: dict[str, Any] = await c.call("blobs")
        return result


def test_blob_get_fetches_from_peers(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    a_home, b_home, c_home = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a_cell, c_cell = cli.identity(a_home), cli.identity(c_home)
    cli.identity(b_home)
    src = tmp_path / "data.bin"
    src.write_bytes(blake3.blake3(b"cli blob").digest(length=300_000))
    # Stored in A's home before A's node runs (put needs no node); C does not serve blobs.
    r = cli.run("--home", str(a_home), "blob", "put", str(src))
    assert r.returncode == 0, r.stderr
    blob_id = r.stdout.strip()
    r = cli.run("--home", str(c_home), "blob", "put", str(src))
    assert r.returncode == 0, r.stderr
    (c_home / "config.toml").write_text("serve_blobs = false\n")
    a_port, c_port = cli.free_port(), cli.free_port()
    node_factory(a_home, "--listen", f"127.0.0.1:{a_port}")
    node_factory(c_home, "--listen", f"127.0.0.1:{c_port}")
    node_factory(
        b_home, "--listen", "127.0.0.1:0",
        "--peer", f"127.0.0.1:{a_port}", "--peer", f"127.0.0.1:{c_port}",
    )  # fmt: skip
    cli.wait_for_peer(b_home, a_cell)
    cli.wait_for_peer(b_home, c_cell)

    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    r = cli.run(
        "--home", str(b_home), "blob", "get", blob_id, "-o", str(out), "--from", a_cell,
        "--timeout", "20",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    assert "from 1 peer(s)" in r.stderr
    # A served every block over the network; C (not asked) served none.
    stats = asyncio.run(_blob_stats(a_home))
    assert stats["serving"] is True
    assert stats["counters"]["blocks_served"] >= 2  # the manifest and at least one chunk
    assert asyncio.run(_blob_stats(c_home))["serving"] is False
    # Now B holds it: a second get is local (no node needed for that).
    again = tmp_path / "out" / "again.bin"
    r = cli.run("--home", str(b_home), "blob", "get", blob_id, "-o", str(again))
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == src.read_bytes()

    # A blob nobody has, asked of every connected peer: exit 1, each peer named with its answer.
    missing = tmp_path / "out" / "missing.bin"
    r = cli.run("--home", str(b_home), "blob", "get", "ab" * 32, "-o", str(missing))
    assert r.returncode == 1
    assert not missing.exists()
    text = " ".join(r.stderr.split())
    assert f"{a_cell}: not_found" in text
    assert f"{c_cell}: refused" in text
