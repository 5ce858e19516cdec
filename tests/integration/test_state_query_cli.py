"""`cellmesh fold` and `cellmesh query` through the real command line and two `cellmesh node`
processes: the fold of one node's log, then the value merged with the other node's answer."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import CLI, CliRunner, NodeProcess, cli_env

CH = "app/doc"


def test_fold_and_query_between_two_node_processes(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_cell = cli.identity(a_home)
    b_cell = cli.identity(b_home)
    (a_home / "config.toml").write_text('channels = ["app/** open"]\n')
    port = cli.free_port()
    node_factory(a_home, "--listen", f"127.0.0.1:{port}")
    node_factory(b_home, "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{port}")
    cli.wait_for_peer(b_home, a_cell)

    def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return cli.run("--home", str(home), *args)

    # B subscribes at A and receives A's first event.
    sub = subprocess.Popen(
        [*CLI, "--home", str(b_home), "sub", CH, "--at", a_cell, "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = json.loads(run(a_home, "channels", "--json").stdout)
            if st["subscribers"]:
                break
            time.sleep(0.1)
        r = run(a_home, "pub", CH, '{"set": {"title": "draft", "n": 1}}')
        assert r.returncode == 0, r.stderr
        _, stderr = sub.communicate(timeout=10)
    finally:
        sub.kill()
    assert sub.returncode == 0, stderr
    # B then writes into its own log only (it may not publish into A's channel).
    r = run(b_home, "pub", CH, '{"set": {"title": "final"}}')
    assert r.returncode == 0, r.stderr
    assert "sent to 0 peer(s)" in r.stderr

    # fold: each node's own log.
    r = run(a_home, "fold", CH, "lww")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"n": 1, "title": "draft"}
    assert "1 event(s)" in r.stderr
    r = run(a_home, "fold", CH, "lww", "--key", "title", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["value"] == "draft"
    assert answer["channel"] == CH
    assert answer["fold"] == "lww"
    assert answer["events"] == 1
    assert answer["position"] >= 1

    # query: A merges B's answer (B's later write wins).
    r = run(a_home, "query", CH, "lww", "--json", "--timeout", "5")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)
    assert q["value"] == {"n": 1, "title": "final"}
    assert q["answered"] == [b_cell]
    assert q["timed_out"] == []
    assert q["refused"] == {}
    assert q["replicas"] == 2
    r = run(a_home, "query", CH, "lww", "--key", "title", "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == "final"
    assert "2 replica(s)" in r.stderr
    r = run(a_home, "query", CH, "counter", "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == 0  # object payloads are not counter deltas
    assert f"taken from {b_cell}" in r.stderr  # B holds more events

    # Errors: exit 1 with the node's reason.
    for args, words in (
        (("fold", CH, "nope"), "no fold"),
        (("fold", CH, "counter", "--key", "x"), "no keys"),
    ):
        r = run(a_home, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert words in r.stderr, (args, r.stderr)
