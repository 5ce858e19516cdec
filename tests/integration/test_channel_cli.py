"""Channels, capabilities, policy reload and revocation through the real command line and two
`cellmesh node` processes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import CLI, CliRunner, NodeProcess, cli_env


def test_channel_access_from_the_command_line(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_cell = cli.identity(a_home)
    b_cell = cli.identity(b_home)
    (a_home / "policy.cm").write_text('rule "all": -> pass\ndefault -> drop\n')
    (a_home / "config.toml").write_text(
        'channels = ["telemetry/** token"]\npolicy_file = "policy.cm"\n'
        'capabilities = ["storage", "gpu=a100"]\n'
    )
    port = cli.free_port()
    node_factory(a_home, "--listen", f"127.0.0.1:{port}")
    node_factory(b_home, "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{port}")
    cli.wait_for_peer(b_home, a_cell)

    # No token: refused with exit code 3 and the reason.
    r = cli.run("--home", str(b_home), "channel", "sub", a_cell, "telemetry/e3", "--count", "1")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "token_required" in r.stderr

    # With a token A issued to B: subscribed; A's publication reaches B's subscriber process.
    tok = tmp_path / "b.tok"
    r = cli.run(
        "--home", str(a_home), "token", "issue", b_cell, "telemetry/**",
        "--rights", "subscribe", "-o", str(tok),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    sub = subprocess.Popen(
        [*CLI, "--home", str(b_home), "channel", "sub", a_cell, "telemetry/e3",
         "--token", str(tok), "--count", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = json.loads(cli.run("--home", str(a_home), "channels", "--json").stdout)
            if st["subscribers"]:
                break
            time.sleep(0.1)
        assert st["subscribers"] == [{"channel": "telemetry/e3", "peer": b_cell}]
        r = cli.run("--home", str(a_home), "channel", "pub", "telemetry/e3", "rpm=3000")
        assert r.returncode == 0, r.stderr
        assert "to 1 peer" in r.stderr
        stdout, stderr = sub.communicate(timeout=10)
    finally:
        sub.kill()
    assert sub.returncode == 0, stderr
    msg = json.loads(stdout.strip())
    assert msg["channel"] == "telemetry/e3"
    assert msg["peer"] == a_cell

    # Capabilities: B finds A by the tag A advertises.
    r = cli.run("--home", str(b_home), "caps", "--find", "gpu=a100")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [a_cell]

    # A broken policy is refused with line:column and the old one stays in force.
    (a_home / "policy.cm").write_text("default -> dorp\n")
    r = cli.run("--home", str(a_home), "policy", "reload")
    assert r.returncode != 0
    assert "policy.cm:1:12" in r.stderr
    st = json.loads(cli.run("--home", str(a_home), "channels", "--json").stdout)
    assert st["policy"]["last_error"] is not None
    assert st["subscribers"]  # the grant survived

    # Revoking B's token ends its subscription at A.
    rev = tmp_path / "b.rev"
    r = cli.run("--home", str(a_home), "token", "revoke", str(tok), "-o", str(rev))
    assert r.returncode == 0, r.stderr
    r = cli.run("--home", str(a_home), "token", "announce", str(rev))
    assert r.returncode == 0, r.stderr
    st = json.loads(cli.run("--home", str(a_home), "channels", "--json").stdout)
    assert st["subscribers"] == []
    r = cli.run(
        "--home", str(b_home), "channel", "sub", a_cell, "telemetry/e3",
        "--token", str(tok), "--count", "1",
    )  # fmt: skip
    assert r.returncode == 3
    assert "revoked" in r.stderr
