"""Membership certificate files: what `membership_cert` names and `cellmesh mesh cert` writes.

A certificate file is text: ``#`` comment lines saying, for a human, whom it admits to which mesh
until when and who signed it, then the certificate itself as hex of its wire encoding
(docs/wire.md, section 10.5), the exact bytes a beacon carries. The comments are never trusted:
`decode_cert_file` reads only the hex, and `load_membership_cert` checks the decoded certificate
against this node before discovery would send it, so a wrong file is a clear start-up error
instead of beacons that every peer silently drops (``cert_invalid``, ``cert_expired``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cellmesh.discovery.mesh import (
    AdmissionError,
    MembershipCert,
    pull_cert,
    push_cert,
    verify_cert,
)
from cellmesh.discovery.settings import DiscoverySettings
from cellmesh.errors import ConfigError, DecodeError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.wire.messages import EXT_MEMBERSHIP, push_extensions

__all__ = [
    "MAX_CERT_FILE",
    "cert_dict",
    "decode_cert_file",
    "encode_cert_file",
    "load_membership_cert",
    "session_admission",
]

MAX_CERT_FILE = 64 * 1024
"""A certificate is under 200 bytes; anything much larger is the wrong file."""


def _utc(ms: int) -> str:
    # Certificates may be issued "forever" (u64 max), beyond what gmtime can render.
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms after the epoch"


def cert_dict(cert: MembershipCert) -> dict[str, object]:
    """The certificate as plain JSON-able data (for `mesh cert show --json` and status)."""
    return {
        "subject": format_cell_id(cert.cell_id),
        "mesh_name": cert.mesh_name,
        "not_after_ms": cert.not_after_ms,
        "not_after": _utc(cert.not_after_ms),
        "authority_key": cert.authority_key.hex(),
    }


def encode_cert_file(cert: MembershipCert) -> str:
    """The text of a certificate file for `cert` (comments, then one line of hex)."""
    return (
        "# cellmesh membership certificate (docs/discovery.md); only the hex line counts\n"
        f"# subject   {format_cell_id(cert.cell_id)}\n"
        f"# mesh      {cert.mesh_name}\n"
        f"# expires   {_utc(cert.not_after_ms)}\n"
        f"# authority {cert.authority_key.hex()}\n"
        f"{push_cert(cert).hex()}\n"
    )


def decode_cert_file(text: str, source: str) -> MembershipCert:
    """Parse the text of a certificate file; `source` names it in errors (`ConfigError`)."""
    hex_text = "".join(
        line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")
    )
    if not hex_text:
        raise ConfigError(f"{source}: no certificate in the file")
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        raise ConfigError(f"{source}: not a certificate file (expected one line of hex)") from None
    try:
        cert, end = pull_cert(raw)
    except DecodeError as exc:
        raise ConfigError(f"{source}: not a valid certificate: {exc}") from None
    if end != len(raw):
        raise ConfigError(f"{source}: {len(raw) - end} bytes of junk after the certificate")
    return cert


def load_membership_cert(
    path: str, *, cell_id: bytes | None, mesh_name: str, wall: float
) -> MembershipCert:
    """Read the certificate file at `path` and check that discovery can use it.

    Checks that it decodes, is for `cell_id` (skipped when None) and `mesh_name`, has not expired
    at `wall` (Unix seconds) and carries a valid signature of the authority it names. Whether
    that authority is one the peers trust is theirs to say. Raises `ConfigError`.
    """
    where = f"membership_cert {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CERT_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_CERT_FILE:
        raise ConfigError(f"{where}: larger than {MAX_CERT_FILE} bytes, not a certificate file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a certificate file (not text)") from None
    cert = decode_cert_file(text, where)
    if cell_id is not None and cert.cell_id != cell_id:
        raise ConfigError(
            f"{where}: issued for {format_cell_id(cert.cell_id)}, "
            f"not for this node ({format_cell_id(cell_id)})"
        )
    if cert.mesh_name != mesh_name:
        raise ConfigError(
            f"{where}: issued for mesh {cert.mesh_name!r}, but mesh_name is {mesh_name!r}"
        )
    try:
        verify_cert(
            cert,
            cell_id=cert.cell_id,
            mesh_name=cert.mesh_name,
            authority_keys=frozenset({cert.authority_key}),
            wall_ms=max(0, int(wall * 1000)),
        )
    except AdmissionError as exc:
        if exc.reason == "cert_expired":
            raise ConfigError(f"{where}: expired at {_utc(cert.not_after_ms)}") from None
        raise ConfigError(f"{where}: {exc}") from None
    return cert


MemberCheck = Callable[[bytes, dict[int, bytes]], "str | None"]


def session_admission(
    settings: DiscoverySettings, wall: Callable[[], float] = time.time
) -> tuple[bytes, MemberCheck | None]:
    """What the transport needs to admit sessions by certificate (`Endpoint.set_membership`).

    Returns our handshake extensions (our certificate, when we hold one: peers that require
    certificates ask for it) and, when `settings` trusts authorities, the check of a peer's:
    a peer on the allowlist is admitted as discovery admits it (allowlist or certificate);
    anyone else must send a certificate for its own CellID and this mesh, signed by a trusted
    authority and not expired, or gets the reason (`no_cert`, `cert_authority`,
    `cert_invalid`, `cert_expired`).
    """
    own = b""
    if settings.membership_cert is not None:
        own = push_extensions([(EXT_MEMBERSHIP, push_cert(settings.membership_cert))])
    if not settings.authority_keys:
        return own, None
    allow = settings.allowlist
    authorities = settings.authority_keys
    mesh_name = settings.mesh_name

    def check(cell: bytes, exts: dict[int, bytes]) -> str | None:
        if allow is not None and cell in allow:
            return None
        raw = exts.get(EXT_MEMBERSHIP)
        if raw is None:
            return "no_cert"
        try:
            cert, end = pull_cert(raw)
        except DecodeError:
            return "cert_invalid"
        if end != len(raw):
            return "cert_invalid"
        try:
            verify_cert(
                cert,
                cell_id=cell,
                mesh_name=mesh_name,
                authority_keys=authorities,
                wall_ms=max(0, int(wall() * 1000)),
            )
        except AdmissionError as exc:
            return exc.reason
        return None

    return own, check
