"""`cellmesh token` and `cellmesh policy` through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import CliRunner


def test_token_issue_delegate_verify_and_revoke(tmp_path: Path, cli: type[CliRunner]) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cli.identity(a)
    b_cell = cli.identity(b)
    c_cell = cli.identity(c)
    a_key = json.loads(cli.run("--home", str(a), "id", "show", "--json").stdout)["public_key"]
    root = tmp_path / "b.tok"
    r = cli.run(
        "--home",
        str(a),
        "token",
        "issue",
        b_cell,
        "telemetry/**",
        "--rights",
        "publish,subscribe,delegate",
        "-o",
        str(root),
    )
    assert r.returncode == 0, r.stderr
    assert (root.stat().st_mode & 0o777) == 0o600
    # B delegates a narrower token to C.
    chain = tmp_path / "c.tok"
    r = cli.run(
        "--home",
        str(b),
        "token",
        "issue",
        c_cell,
        "telemetry/*",
        "--rights",
        "publish",
        "--parent",
        str(root),
        "-o",
        str(chain),
    )
    assert r.returncode == 0, r.stderr
    show = cli.run("token", "show", str(chain))
    assert show.returncode == 0
    assert show.stdout.count("token ") == 2
    ok = cli.run(
        "token",
        "verify",
        str(chain),
        "--root",
        a_key,
        "--channel",
        "telemetry/engine-3",
        "--right",
        "publish",
    )
    assert ok.returncode == 0, ok.stderr
    assert c_cell in ok.stdout
    # Refusals say why.
    r = cli.run(
        "token",
        "verify",
        str(chain),
        "--root",
        a_key,
        "--channel",
        "telemetry/engine-3",
        "--right",
        "subscribe",
    )
    assert r.returncode == 1
    assert "missing_right" in r.stderr
    r = cli.run(
        "token",
        "verify",
        str(chain),
        "--root",
        "00" * 32,
        "--channel",
        "telemetry/engine-3",
        "--right",
        "publish",
    )
    assert r.returncode == 1
    assert "untrusted_root" in r.stderr
    # Widening is refused at issue time.
    r = cli.run(
        "--home",
        str(b),
        "token",
        "issue",
        c_cell,
        "**",
        "--rights",
        "publish",
        "--parent",
        str(root),
        "-o",
        str(tmp_path / "wide.tok"),
    )
    assert r.returncode == 1
    assert "widened" in r.stderr
    # B revokes what it issued to C; the chain no longer verifies with the revocation.
    rev = tmp_path / "c.rev"
    r = cli.run("--home", str(b), "token", "revoke", str(chain), "-o", str(rev))
    assert r.returncode == 0, r.stderr
    r = cli.run(
        "token",
        "verify",
        str(chain),
        "--root",
        a_key,
        "--channel",
        "telemetry/engine-3",
        "--right",
        "publish",
        "--revocations",
        str(rev),
    )
    assert r.returncode == 1
    assert "revoked" in r.stderr
    # Garbage token files give a one-line error naming the file and line.
    bad = tmp_path / "bad.tok"
    bad.write_text("zz\n")
    r = cli.run("token", "show", str(bad))
    assert r.returncode == 1
    assert f"{bad}:1" in r.stderr


def test_policy_check_and_explain(tmp_path: Path, cli: type[CliRunner]) -> None:
    home = tmp_path / "n"
    cell = cli.identity(home)
    (home / "policy.cm").write_text(
        f"group ops = {cell}\n"
        'rule "ops publish": from @ops channel telemetry/** right publish -> pass\n'
        "default -> drop\n"
    )
    r = cli.run("policy", "check", str(home / "policy.cm"))
    assert r.returncode == 0, r.stderr
    r = cli.run("--home", str(home), "policy", "explain", cell, "telemetry/x", "--right", "publish")
    assert r.returncode == 0, r.stderr
    assert "ops publish" in r.stdout
    r = cli.run("--home", str(home), "policy", "explain", "00" * 16, "telemetry/x")
    assert "drop" in r.stdout
    (home / "broken.cm").write_text("default -> dorp\n")
    r = cli.run("policy", "check", str(home / "broken.cm"))
    assert r.returncode == 1
    assert "broken.cm:1:" in r.stderr


def test_delegation_is_clamped_to_the_parent_window(tmp_path: Path, cli: type[CliRunner]) -> None:
    """A child asking for 30 days under a 1-hour parent gets the parent's expiry, not a refusal."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cli.identity(a)
    b_cell = cli.identity(b)
    c_cell = cli.identity(c)
    root = tmp_path / "b.tok"
    args = ["telemetry/**", "--rights", "publish,delegate", "--valid-for", "1h"]
    r = cli.run("--home", str(a), "token", "issue", b_cell, *args, "-o", str(root))
    assert r.returncode == 0, r.stderr
    chain = tmp_path / "c.tok"
    r = cli.run(
        "--home", str(b), "token", "issue", c_cell, "telemetry/x", "--rights", "publish",
        "--parent", str(root), "-o", str(chain),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shown = cli.run("token", "show", str(chain)).stdout
    windows = [line.split("..")[1].strip() for line in shown.splitlines() if "valid" in line]
    assert len(windows) == 2
    assert windows[0] == windows[1]
