"""Two real node processes on loopback, driven only through the CLI, as a newcomer would."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import CliRunner, NodeProcess


def test_two_nodes_ping_by_cell_id(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_cell = cli.identity(a_home)
    b_cell = cli.identity(b_home)
    assert len(a_cell) == 32
    shown = json.loads(cli.run("--home", str(a_home), "id", "show", "--json").stdout)
    assert shown["cell_id"] == a_cell
    assert len(shown["public_key"]) == 64
    assert (a_home / "keystore.json").stat().st_mode & 0o777 == 0o600

    a_port = cli.free_port()
    a = node_factory(a_home, "--listen", f"127.0.0.1:{a_port}")
    b = node_factory(b_home, "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{a_port}")
    assert (a_home / "control.sock").stat().st_mode & 0o777 == 0o600
    cli.wait_for_peer(a_home, b_cell)

    r = cli.run("--home", str(a_home), "ping", b_cell, "-c", "3", "-i", "0.05")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("reply from") == 3
    assert "3 received, 0% loss" in r.stdout

    # And the other way round, by CellID only.
    r = cli.run("--home", str(b_home), "ping", a_cell, "-c", "1")
    assert r.returncode == 0, r.stdout + r.stderr

    peers = json.loads(cli.run("--home", str(a_home), "peers", "--json").stdout)
    (row,) = peers
    assert row["cell_id"] == b_cell
    assert row["rtt_ms"] is not None
    assert row["packets_in"] >= 4
    assert row["address"].startswith("127.0.0.1:")

    status = json.loads(cli.run("--home", str(a_home), "status", "--json").stdout)
    assert status["cell_id"] == a_cell
    assert status["stats"]["handshakes_completed"] >= 1

    assert b.stop() == 0
    assert a.stop() == 0
    assert not (a_home / "control.sock").exists()
    log = a.log_path.read_text()
    assert "Traceback" not in log
    assert b_cell in log


def test_ping_unknown_cell_fails_clearly(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    home = tmp_path / "a"
    cli.identity(home)
    node_factory(home, "--listen", "127.0.0.1:0")
    r = cli.run("--home", str(home), "ping", "00" * 16, "-c", "1")
    assert r.returncode == 2
    assert "unknown CellID" in r.stderr
    r = cli.run("--home", str(home), "ping", "not-a-cell-id")
    assert r.returncode == 1
    assert "32 hex characters" in r.stderr


def test_unreachable_static_peer_times_out_clearly(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    cli.identity(a_home)
    b_cell = cli.identity(b_home)
    a_port = cli.free_port()
    a = node_factory(a_home, "--listen", f"127.0.0.1:{a_port}")
    b = node_factory(b_home, "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{a_port}")
    cli.wait_for_peer(a_home, b_cell)
    b.stop()  # B is gone; A still knows its address
    r = cli.run("--home", str(a_home), "ping", b_cell, "-c", "1", "-W", "1")
    assert r.returncode == 2
    assert "no reply" in r.stderr or "failed" in r.stderr
    assert a.proc.poll() is None


def test_commands_without_a_running_node_say_so(tmp_path: Path, cli: type[CliRunner]) -> None:
    home = tmp_path / "idle"
    cli.identity(home)
    r = cli.run("--home", str(home), "peers")
    assert r.returncode == 1
    assert "no node is running" in r.stderr
    assert "Traceback" not in r.stderr


def test_id_new_refuses_to_overwrite(tmp_path: Path, cli: type[CliRunner]) -> None:
    home = tmp_path / "x"
    first = cli.identity(home)
    r = cli.run("--home", str(home), "id", "new")
    assert r.returncode == 1
    assert "--force" in r.stderr
    r = cli.run("--home", str(home), "id", "new", "--force")
    assert r.returncode == 0
    assert r.stdout.strip().splitlines()[-1] != first


def test_corrupt_keystore_is_one_line_naming_the_file(tmp_path: Path, cli: type[CliRunner]) -> None:
    home = tmp_path / "c"
    cli.identity(home)
    ks = home / "keystore.json"
    ks.write_text("{not json")
    r = cli.run("--home", str(home), "node", "--listen", "127.0.0.1:0")
    assert r.returncode == 1
    assert str(ks) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_world_readable_keystore_is_refused(tmp_path: Path, cli: type[CliRunner]) -> None:
    home = tmp_path / "p"
    cli.identity(home)
    os.chmod(home / "keystore.json", 0o644)
    r = cli.run("--home", str(home), "id", "show")
    assert r.returncode == 1
    assert "chmod 600" in r.stderr


def test_broken_config_reports_line_and_column(tmp_path: Path, cli: type[CliRunner]) -> None:
    home = tmp_path / "cfg"
    cli.identity(home)
    (home / "config.toml").write_text('name = "ok"\nlisten = [\n')
    r = cli.run("--home", str(home), "node")
    assert r.returncode == 1
    assert "config.toml:" in r.stderr
    assert "Traceback" not in r.stderr
    (home / "config.toml").write_text('lissten = ["127.0.0.1:0"]\n')
    r = cli.run("--home", str(home), "node")
    assert r.returncode == 1
    assert "did you mean 'listen'" in r.stderr


def test_second_node_on_same_home_is_refused(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    home = tmp_path / "dup"
    cli.identity(home)
    node_factory(home, "--listen", "127.0.0.1:0")
    r = cli.run("--home", str(home), "node", "--listen", "127.0.0.1:0", timeout=20)
    assert r.returncode == 1
    assert "already running" in r.stderr


def test_help_teaches(cli: type[CliRunner]) -> None:
    r = cli.run("--help")
    assert r.returncode == 0
    for word in ("id", "node", "peers", "ping", "demo", "Quick start"):
        assert word in r.stdout
    r = cli.run("node", "--help")
    for flag in ("--listen", "--peer", "--rekey-after-seconds", "CELLMESH_LISTEN"):
        assert flag in r.stdout


def test_demo_runs_and_passes(cli: type[CliRunner]) -> None:
    r = cli.run("demo", "--pings", "2", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
