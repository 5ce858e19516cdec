"""`cellmesh token ...` and `cellmesh policy ...`: permission tokens and the policy language.

Token files hold a delegation chain, one token per line in hex, root first (the leaf is the last
line). Revocation files hold one revocation per line in hex. Nothing here needs a running node.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from cellmesh.errors import CellmeshError, ConfigError, DecodeError
from cellmesh.filter.policy import Context, check_policy, parse_policy
from cellmesh.identity.cellid import cell_id_from_public_key, format_cell_id, parse_cell_id
from cellmesh.identity.tokens import (
    RevocationSet,
    Rights,
    Token,
    TokenError,
    decode_revocation,
    decode_token,
    encode_revocation,
    encode_token,
    issue_token,
    revoke_token,
    token_id,
    verify_chain,
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _rights(text: str) -> Rights:
    out = Rights(0)
    for word in filter(None, (w.strip().lower() for w in text.split(","))):
        try:
            out |= Rights[word.upper()]
        except KeyError:
            _fail(f"unknown right {word!r} (use publish, subscribe, admin, delegate)")
    if not out:
        _fail("give at least one right, e.g. --rights publish,subscribe")
    return out


def _duration(text: str) -> int:
    text = text.strip()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        _fail(f"bad duration {text!r} (examples: 90s, 15m, 12h, 30d)")
    if value <= 0:
        _fail("a duration must be positive")
    return int(value)


def _read_chain(path: str) -> list[Token]:
    try:
        lines = Path(path).read_text().split()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    if not lines:
        _fail(f"{path}: no token in the file")
    chain = []
    for n, line in enumerate(lines, 1):
        try:
            chain.append(decode_token(bytes.fromhex(line)))
        except (ValueError, DecodeError) as exc:
            _fail(f"{path}:{n}: not a token: {exc}")
    return chain


def _write_lines(path: str, lines: list[str]) -> None:
    data = "\n".join(lines) + "\n"
    if path == "-":
        click.echo(data, nl=False)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


@click.group("token")
def token_group() -> None:
    """Issue, show, verify and revoke permission tokens (signed by this node's identity).

    \b
    Examples:
      cellmesh --home A token issue <CellID of B> 'telemetry/**' --rights publish -o b.tok
      cellmesh token show b.tok
      cellmesh token verify b.tok --root <public key of A> --channel telemetry/engine-3 --right publish
      cellmesh --home A token revoke b.tok -o b.rev
    """


@token_group.command("issue")
@click.argument("subject", metavar="CELLID")
@click.argument("pattern")
@click.option(
    "--rights", required=True, help="Comma-separated: publish, subscribe, admin, delegate."
)
@click.option(
    "--valid-for",
    default="30d",
    show_default=True,
    help="Lifetime (s, m, h, d); a delegation is clamped to its parent's window.",
)
@click.option("--parent", type=click.Path(dir_okay=False), help="Chain file to delegate from.")
@click.option("-o", "--output", default="-", help="Chain file to write (default stdout).")
@click.pass_obj
def token_issue(
    obj: object,
    subject: str,
    pattern: str,
    rights: str,
    valid_for: str,
    parent: str | None,
    output: str,
) -> None:
    """Grant CELLID RIGHTS on channels matching PATTERN (a delegation with --parent)."""
    from cellmesh.cli.main import Ctx

    assert isinstance(obj, Ctx)
    try:
        identity = obj.home.load_identity(obj.passphrase())
        cell = parse_cell_id(subject)
        chain = _read_chain(parent) if parent else []
        now = int(time.time())
        not_before, not_after = now, now + _duration(valid_for)
        if chain:
            # A delegation can never outlive its parent, so the window is clamped to the
            # parent's rather than refused: "30d" under a parent issued a second earlier
            # would otherwise always overrun it by that second.
            not_before = max(not_before, chain[-1].not_before)
            not_after = min(not_after, chain[-1].not_after)
            if not_after <= not_before:
                _fail("cannot issue: the parent token has expired")
                return
        tok = issue_token(
            identity,
            cell,
            pattern,
            _rights(rights),
            not_before,
            not_after,
            os.urandom(16),
            chain[-1] if chain else None,
        )
    except TokenError as exc:
        _fail(f"cannot issue ({exc.reason}): {exc}")
        return
    except (CellmeshError, ValueError) as exc:
        _fail(str(exc))
        return
    _write_lines(output, [encode_token(t).hex() for t in [*chain, tok]])
    click.echo(f"token {token_id(tok).hex()[:16]}… for {format_cell_id(cell)}", err=True)


@token_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
def token_show(file: str) -> None:
    """Print every token of a chain file, root first."""
    for t in _read_chain(file):
        rights = ",".join(r.name.lower() for r in Rights if r in t.rights and r.name)
        click.echo(f"token {token_id(t).hex()}")
        click.echo(
            f"  issuer   {format_cell_id(cell_id_from_public_key(t.issuer))} (key {t.issuer.hex()})"
        )
        click.echo(f"  subject  {format_cell_id(t.subject)}")
        click.echo(f"  channels {t.pattern}   rights {rights}   depth {t.depth}")
        click.echo(
            "  valid    "
            + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t.not_before))
            + " .. "
            + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t.not_after))
        )


@token_group.command("verify")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--root", "roots", multiple=True, required=True, help="Trusted issuer public key (hex); repeat."
)
@click.option("--channel", required=True, help="The channel the holder wants to use.")
@click.option("--right", "right", required=True, help="publish, subscribe, admin or delegate.")
@click.option("--revocations", type=click.Path(dir_okay=False), help="File of revocations.")
def token_verify(
    file: str, roots: tuple[str, ...], channel: str, right: str, revocations: str | None
) -> None:
    """Check a chain file: exit 0 and print the holder when valid; exit 1 and the reason if not."""
    chain = _read_chain(file)
    try:
        trusted = {bytes.fromhex(r) for r in roots}
    except ValueError:
        _fail("--root takes an Ed25519 public key in hex (see `cellmesh id show`)")
        return
    revoked = RevocationSet()
    if revocations:
        try:
            for line in Path(revocations).read_text().split():
                revoked.add(decode_revocation(bytes.fromhex(line)))
        except (OSError, ValueError, DecodeError, TokenError) as exc:
            _fail(f"{revocations}: {exc}")
    try:
        leaf = verify_chain(
            chain,
            now=int(time.time()),
            trusted_roots=trusted,
            channel=channel,
            right=_rights(right),
            revoked=revoked,
        )
    except TokenError as exc:
        _fail(f"refused ({exc.reason}): {exc}")
        return
    click.echo(f"valid: {format_cell_id(leaf.subject)} may {right} on {channel}")


@token_group.command("revoke")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default="-", help="Revocation file to write (default stdout).")
@click.pass_obj
def token_revoke(obj: object, file: str, output: str) -> None:
    """Revoke the last token of a chain file (it must have been issued by this identity)."""
    from cellmesh.cli.main import Ctx

    assert isinstance(obj, Ctx)
    leaf = _read_chain(file)[-1]
    try:
        rev = revoke_token(obj.home.load_identity(obj.passphrase()), leaf, int(time.time()))
    except TokenError as exc:
        _fail(f"cannot revoke ({exc.reason}): {exc}")
        return
    except CellmeshError as exc:
        _fail(str(exc))
        return
    _write_lines(output, [encode_revocation(rev).hex()])


@token_group.command("announce")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_obj
def token_announce(obj: object, file: str) -> None:
    """Give a revocation file (from `token revoke`) to the running node: it stops honouring the
    token at once, ends the grants it gave, and passes the revocation to every peer."""
    from cellmesh.cli.channel_cmds import announce_revocation

    announce_revocation(obj, file)


@click.group("policy")
def policy_group() -> None:
    """Check a ring-1 policy file and explain its decisions (language: docs/policy.md)."""


def _load_policy_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {path}: {exc}")
        return ""


@policy_group.command("reload")
@click.pass_obj
def policy_reload(obj: object) -> None:
    """Make the running node reload its policy_file now (it also does so when the file changes).

    A broken file is refused with its line and column, and the node keeps the policy it had.
    """
    from cellmesh.cli.channel_cmds import reload_policy

    reload_policy(obj)


@policy_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def policy_check(file: str) -> None:
    """Validate FILE and summarise its groups and rules; errors name line and column."""
    try:
        click.echo(check_policy(_load_policy_text(file), source=file))
    except ConfigError as exc:
        _fail(str(exc))


@policy_group.command("explain")
@click.argument("cell_id", metavar="CELLID")
@click.argument("channel")
@click.option("--file", "path", help="Policy file (default: HOME/policy.cm).")
@click.option("--right", "rights", multiple=True, help="A right the sender holds; repeat.")
@click.option("--capability", "caps", multiple=True, help="A capability the sender has; repeat.")
@click.option("--trust", default=0.0, show_default=True, help="Trust score of the sender.")
@click.option(
    "--session-age", default=0.0, show_default=True, help="Seconds since the session began."
)
@click.option("--rate", default=0.0, show_default=True, help="Messages per second from the sender.")
@click.pass_obj
def policy_explain(
    obj: object,
    cell_id: str,
    channel: str,
    path: str | None,
    rights: tuple[str, ...],
    caps: tuple[str, ...],
    trust: float,
    session_age: float,
    rate: float,
) -> None:
    """Say which rule decides traffic from CELLID on CHANNEL, and why."""
    from cellmesh.cli.main import Ctx

    assert isinstance(obj, Ctx)
    file = path or str(obj.home.path / "policy.cm")
    try:
        policy = parse_policy(_load_policy_text(file), source=file)
        ctx = Context(
            parse_cell_id(cell_id),
            channel,
            frozenset(caps),
            frozenset(r.lower() for r in rights),
            trust,
            session_age,
            rate,
        )
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
        return
    click.echo(policy.explain(ctx))
