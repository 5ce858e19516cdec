"""`cellmesh mesh cert ...`: membership certificates for discovery admission (docs/discovery.md).

This home's identity acts as the mesh authority: `issue` signs a certificate for another node's
CellID, which that node names in its `membership_cert` setting; nodes that list this home's
public key in `mesh_authorities` then admit it. Nothing here needs a running node.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from cellmesh.discovery.mesh import U64_MAX, issue_membership_cert
from cellmesh.errors import CellmeshError
from cellmesh.identity.cellid import cell_id_from_public_key, format_cell_id, parse_cell_id
from cellmesh.node.membership import cert_dict, decode_cert_file, encode_cert_file

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _subject(text: str) -> bytes:
    """A CellID (32 hex) or an Ed25519 public key (64 hex, turned into its CellID)."""
    t = text.strip()
    try:
        if len(t) == 64:
            return cell_id_from_public_key(bytes.fromhex(t))
        return parse_cell_id(t)
    except (ValueError, CellmeshError) as exc:
        _fail(f"--subject {text[:70]!r}: not a CellID (32 hex) or public key (64 hex): {exc}")
    raise AssertionError("unreachable")


def _lifetime_ms(text: str) -> int:
    t = text.strip().lower()
    if t == "forever":
        return U64_MAX
    unit = _UNITS.get(t[-1:])
    try:
        seconds = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        _fail(f"bad --valid-for {text!r} (examples: 12h, 30d, 365d, forever)")
    if not seconds > 0:
        _fail("--valid-for must be positive")
    return min(U64_MAX, int((time.time() + seconds) * 1000))


@click.group("mesh")
def mesh_group() -> None:
    """Mesh admission: issue and show membership certificates (this home is the authority).

    \b
    On the authority (its public key: cellmesh --home AUTH id show):
      cellmesh --home AUTH mesh cert issue --subject <CellID of B> --out b.cert
    On B: copy b.cert into B's home, then in B's config.toml:
      membership_cert = "b.cert"
    On every node that should admit certificate holders:
      mesh_authorities = ["<public key of AUTH>"]
    """


@mesh_group.group("cert")
def cert_group() -> None:
    """Membership certificates: issue one signed by this home's identity, or show one."""


@cert_group.command("issue")
@click.option("--subject", required=True, metavar="CELLID|PUBKEY", help="The node admitted (hex).")
@click.option(
    "--out",
    "out_path",
    default="-",
    show_default=True,
    metavar="FILE",
    help="Certificate file to write ('-': stdout); the subject names it in membership_cert.",
)
@click.option(
    "--mesh-name",
    default=None,
    help="Mesh the certificate is for [default: mesh_name of this home's config].",
)
@click.option(
    "--valid-for",
    default="365d",
    show_default=True,
    help="Lifetime (s, m, h, d, or 'forever'); holders are refused once it runs out.",
)
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@click.pass_obj
def cert_issue(
    obj: object, subject: str, out_path: str, mesh_name: str | None, valid_for: str, force: bool
) -> None:
    """Sign a membership certificate for --subject with this home's identity."""
    from cellmesh.cli.main import Ctx

    assert isinstance(obj, Ctx)
    cell = _subject(subject)
    not_after_ms = _lifetime_ms(valid_for)
    try:
        if mesh_name is None:
            mesh_name = obj.home.load_config(obj.env).mesh_name
        identity = obj.home.load_identity(obj.passphrase())
        cert = issue_membership_cert(identity, cell, mesh_name, not_after_ms)
    except (CellmeshError, ValueError) as exc:
        _fail(str(exc))
        return
    text = encode_cert_file(cert)
    if out_path == "-":
        click.echo(text, nl=False)
    else:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
        try:
            fd = os.open(out_path, flags, 0o644)
        except FileExistsError:
            _fail(f"{out_path} exists (use --force to replace it)")
            return
        except OSError as exc:
            _fail(f"cannot write {out_path}: {exc.strerror}")
            return
        with os.fdopen(fd, "w") as f:
            f.write(text)
    click.echo(
        f"certificate for {format_cell_id(cell)} in mesh {mesh_name!r}, "
        f"authority {identity.public_key.hex()}",
        err=True,
    )


@cert_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cert_show(file: str, as_json: bool) -> None:
    """Decode a certificate file (this does not say whether anyone trusts its authority)."""
    try:
        with open(file, encoding="ascii") as f:
            text = f.read(64 * 1024)
        cert = decode_cert_file(text, file)
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {file}: {exc}")
        return
    except CellmeshError as exc:
        _fail(str(exc))
        return
    d = cert_dict(cert)
    d["expired"] = cert.not_after_ms < time.time() * 1000
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"subject   {d['subject']}")
    click.echo(f"mesh      {d['mesh_name']}")
    click.echo(f"expires   {d['not_after']}" + ("  (EXPIRED)" if d["expired"] else ""))
    click.echo(f"authority {d['authority_key']}")
