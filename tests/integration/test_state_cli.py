"""`cellmesh pub`, `sub` and `log` through the real command line and two `cellmesh node`
processes: an event published on one node is stored, verified, in the other node's log."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import CLI, CliRunner, NodeProcess, cli_env


def test_pub_sub_log_between_two_node_processes(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_cell = cli.identity(a_home)
    b_cell = cli.identity(b_home)
    (a_home / "config.toml").write_text('channels = ["chat/** open"]\n')
    port = cli.free_port()
    node_factory(a_home, "--listen", f"127.0.0.1:{port}")
    node_factory(b_home, "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{port}")
    cli.wait_for_peer(b_home, a_cell)

    # B subscribes at A (only live events travel: B follows before A publishes) and waits
    # for three events.
    sub = subprocess.Popen(
        [*CLI, "--home", str(b_home), "sub", "chat/room", "--at", a_cell,
         "--count", "3", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = json.loads(cli.run("--home", str(a_home), "channels", "--json").stdout)
            if st["subscribers"]:
                break
            time.sleep(0.1)
        assert st["subscribers"] == [{"channel": "chat/room", "peer": b_cell}]
        ids = []
        for text in ("first", "second", "third"):
            r = cli.run("--home", str(a_home), "pub", "chat/room", text)
            assert r.returncode == 0, r.stderr
            assert "sent to 1 peer(s)" in r.stderr
            ids.append(r.stdout.strip())
        stdout, stderr = sub.communicate(timeout=10)
    finally:
        sub.kill()
    assert sub.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["id"] for e in events] == ids
    assert [e["author"] for e in events] == [a_cell] * 3
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert [e["prev"] for e in events[1:]] == ids[:2]  # the hash chain, as B stored it

    # B's log holds A's events, in order, and they verify from B's database.
    r = cli.run("--home", str(b_home), "log", "chat/room", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == ids
    r = cli.run("--home", str(b_home), "log", "chat/room", "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 event(s)" in r.stderr

    # A's log, human-readable, in order; sub --from-start replays it and stops at --count.
    r = cli.run("--home", str(a_home), "log", "chat/room")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.rsplit(": ", 1)[1] for ln in lines] == ["first", "second", "third"]
    r = cli.run("--home", str(a_home), "sub", "chat/room", "--from-start", "--count", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("chat/room: ") == 3

    # B publishes back into A's channel (open: the publish right is granted on request).
    r = cli.run("--home", str(b_home), "pub", "chat/room", "reply", "--to", a_cell)
    assert r.returncode == 0, r.stderr
    reply_id = r.stdout.strip()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = cli.run("--home", str(a_home), "log", "chat/room", "--json")
        if reply_id in r.stdout:
            break
        time.sleep(0.1)
    assert [json.loads(line)["author"] for line in r.stdout.splitlines()][-1] == b_cell


def test_blob_put_and_get_in_a_home(tmp_path: Path, cli: type[CliRunner]) -> None:
    home = tmp_path / "h"
    src = tmp_path / "data.bin"
    # Incompressible, several chunks; the second half repeats the first at an offset.
    block = bytes((i * 7919 + (i >> 8) * 31) % 251 for i in range(150_000))
    src.write_bytes(block + b"shift" + block)
    r = cli.run("--home", str(home), "blob", "put", str(src))
    assert r.returncode == 0, r.stderr
    blob_id = r.stdout.strip()
    assert len(blob_id) == 64
    again = cli.run("--home", str(home), "blob", "put", str(src))
    assert again.stdout.strip() == blob_id
    assert "0 new block(s)" in again.stderr  # deduplicated
    out = tmp_path / "copy.bin"
    r = cli.run("--home", str(home), "blob", "get", blob_id, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    # A damaged chunk on disk is detected: nothing is written under the output name.
    chunk_files = [p for p in (home / "blobs").rglob("*") if p.is_file()]
    largest = max(chunk_files, key=lambda p: p.stat().st_size)
    largest.write_bytes(b"x" * largest.stat().st_size)
    bad = tmp_path / "bad.bin"
    r = cli.run("--home", str(home), "blob", "get", blob_id, "-o", str(bad))
    assert r.returncode == 1
    assert not bad.exists()
    r = cli.run("--home", str(home), "blob", "get", "ab" * 32, "-o", str(bad))
    assert r.returncode == 1
    assert "not stored" in r.stderr
