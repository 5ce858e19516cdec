"""Four `cellmesh node` processes in a line (each knows only its neighbour): routes form, the
ends ping, trace and copy a file to each other through two relays, and the relays never hold
the end-to-end keys."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from conftest import CliRunner, NodeProcess


def _json(cli: type[CliRunner], home: Path, *args: str) -> object:
    r = cli.run("--home", str(home), *args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_line_of_four_routes_pings_traces_and_copies_through_relays(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    homes = [tmp_path / n for n in "abcd"]
    cells = [cli.identity(h) for h in homes]
    ports = [cli.free_port() for _ in homes]
    for i, home in enumerate(homes):
        args = ["--listen", f"127.0.0.1:{ports[i]}", "--no-discovery"]
        if i:
            args += ["--peer", f"127.0.0.1:{ports[i - 1]}"]
        node_factory(home, *args)
    a, d = homes[0], homes[3]
    # Routes converge: A learns D at three hops through B.
    deadline = time.monotonic() + 20
    while True:
        routes = _json(cli, a, "routes")
        assert isinstance(routes, dict)
        by_dst = {r["destination"]: r for r in routes["routes"]}
        if cells[3] in by_dst or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert by_dst[cells[3]]["next_hop"] == cells[1]
    assert by_dst[cells[3]]["hops"] == 3
    # A pings D by CellID through B and C.
    r = cli.run("--home", str(a), "ping", cells[3], "-c", "2", "-W", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _json(cli, a, "peers")
    assert isinstance(rows, list)
    peers = {p["cell_id"]: p for p in rows}
    assert peers[cells[3]]["path"] == "relayed"
    assert peers[cells[3]]["address"] == "via mesh"
    # Trace names each hop with its RTT.
    hops = _json(cli, a, "trace", cells[3])
    assert isinstance(hops, list)
    assert [h["cell_id"] for h in hops] == [cells[1], cells[2], cells[3]]
    assert all(h["rtt_ms"] > 0 for h in hops)
    # A file crosses intact.
    src = tmp_path / "payload.bin"
    src.write_bytes(bytes(range(256)) * 4000)  # 1 MB
    r = cli.run("--home", str(a), "cp", str(src), cells[3])
    assert r.returncode == 0, r.stdout + r.stderr
    got = d / "inbox" / "payload.bin"
    assert hashlib.blake2b(got.read_bytes()).digest() == hashlib.blake2b(src.read_bytes()).digest()
    # The relays forwarded frames and hold sessions only with their neighbours: no A-D keys.
    for i in (1, 2):
        status = _json(cli, homes[i], "routes", "--nat")
        assert isinstance(status, dict)
        assert status["routing"]["relayed"]["total"] > 0
        rows = _json(cli, homes[i], "peers")
        assert isinstance(rows, list)
        their_peers = {p["cell_id"] for p in rows}
        assert their_peers == {cells[i - 1], cells[i + 1]}
