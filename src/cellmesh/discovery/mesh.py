"""Mesh admission: mesh names, mesh keys, the beacon MAC, and membership certificates.

Theory of operation
-------------------
Discovery frames (BEACON, SOLICIT) travel in clear on a shared link, so anyone there can read them
and anyone can send them. Three independent gates decide who may *join* our peer table:

1. **Mesh name and key.** Every mesh has a name (``"cellmesh"`` unless configured). Each frame
   carries an 8-byte *mesh tag*, an unkeyed, domain-separated BLAKE2s hash of the name, so nodes of
   different meshes on one link ignore each other cheaply. A mesh may also have a secret *mesh key*
   (16 to 32 bytes). Then every frame carries a 16-byte keyed BLAKE2s MAC under
   ``mac_key = BLAKE2s(key = mesh key, person = "cm-mkey1", data = context || mesh name)``, checked
   (in constant time) before the far more expensive Ed25519 signature. A node without the key
   cannot produce a frame that a keyed node accepts. A keyed node drops unkeyed frames
   (``unkeyed``) and an open node (no key) drops keyed ones (``keyed``): the two never mix.
2. **Allowlist.** An optional set of CellIDs.
3. **Membership certificates.** An optional set of *authority* Ed25519 public keys. A member
   carries a certificate ``(cell_id, mesh name, not_after, authority key, authority signature)``
   in every frame it sends.

The name and key gate is a network-level filter (it is either configured or not). The allowlist
and the authorities are both *membership* proofs: when either is configured, a peer is admitted
if its CellID is on the allowlist **or** it carries a valid certificate from a configured
authority. Configure only one of them to require exactly that one.

The mesh name itself is not secret: its tag is sent in clear and a name can be guessed from it by
trying candidates. Secrecy, where wanted, lives in the mesh key.

Everything here is pure (no I/O, no clocks): expiry is checked against a wall-clock time in
milliseconds that the caller passes in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cellmesh.errors import AuthenticationError, MalformedError, OversizeError, TruncatedError
from cellmesh.identity.cellid import CELL_ID_LEN
from cellmesh.identity.keys import (
    ED25519_PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    Identity,
    verify_signature,
)

__all__ = [
    "DEFAULT_MESH_NAME",
    "MAC_LEN",
    "MAX_MESH_KEY",
    "MAX_MESH_NAME",
    "MEMBERSHIP_CONTEXT",
    "MESH_TAG_LEN",
    "MIN_MESH_KEY",
    "AdmissionError",
    "MembershipCert",
    "Mesh",
    "Verifier",
    "check_cert",
    "decode_text",
    "issue_membership_cert",
    "membership_message",
    "pull_cert",
    "push_cert",
    "validate_text",
    "verify_cert",
]

DEFAULT_MESH_NAME = "cellmesh"
"""The name of the mesh a node joins unless configured otherwise."""
MAX_MESH_NAME = 64
"""Largest mesh name, in bytes of UTF-8."""
MIN_MESH_KEY = 16
MAX_MESH_KEY = 32
"""A mesh key is 16 to 32 bytes (the BLAKE2s key size limit is 32)."""
MESH_TAG_LEN = 8
MAC_LEN = 16
MEMBERSHIP_CONTEXT = b"cellmesh/v1 mesh-membership\x00"
"""Domain-separation prefix of the message an authority signs in a membership certificate."""
_MAC_KEY_CONTEXT = b"cellmesh/v1 discovery mesh key\x00"

Verifier = Callable[[bytes, bytes, bytes], None]
"""``verify(public_key, message, signature)``: returns None or raises `AuthenticationError`."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CERT_HEAD = struct.Struct("!16sQ32sB")  # cell id, not_after ms, authority key, name length
U64_MAX = 2**64 - 1


class AdmissionError(AuthenticationError):
    """A discovery frame was refused by an admission or authentication check.

    `reason` is the short drop-counter name (``bad_mac``, ``not_allowed``, ``cert_expired`` ...)
    under which the discovery core counts it.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message if message is not None else reason)
        self.reason = reason


def validate_text(text: str, what: str, limit: int, *, allow_empty: bool = True) -> bytes:
    """Encode `text` as UTF-8 and check it: at most `limit` bytes, no control characters.

    Raises `OversizeError` (too long) or `MalformedError` (empty when not allowed, or a control
    character, which could smuggle terminal escapes into a dashboard or a log).
    """
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise OversizeError(f"{what} is {len(raw)} bytes of UTF-8, the limit is {limit}")
    if not raw and not allow_empty:
        raise MalformedError(f"{what} must not be empty")
    if _CONTROL.search(text):
        raise MalformedError(f"{what} contains a control character")
    return raw


def decode_text(raw: bytes, what: str) -> str:
    """Decode wire bytes as strict UTF-8 without control characters (`MalformedError` if not)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError(f"{what} is not valid UTF-8") from None
    if _CONTROL.search(text):
        raise MalformedError(f"{what} contains a control character")
    return text


def _mesh_tag(name_bytes: bytes) -> bytes:
    return hashlib.blake2s(name_bytes, digest_size=MESH_TAG_LEN, person=b"cm-mtag1").digest()


@dataclass(frozen=True, slots=True)
class Mesh:
    """A mesh as the codec needs it: its name, optional key, and what derives from them.

    `tag` (8 bytes, in clear in every frame) and `mac_key` (None for an open mesh) are computed
    once here. Raises `ValueError` for a name that is empty, longer than 64 bytes or holds control
    characters, and for a key that is not 16 to 32 bytes.
    """

    name: str = DEFAULT_MESH_NAME
    key: bytes | None = field(default=None, repr=False)
    tag: bytes = field(init=False, repr=False, compare=False)
    mac_key: bytes | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            name_bytes = validate_text(self.name, "mesh name", MAX_MESH_NAME, allow_empty=False)
        except (OversizeError, MalformedError) as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(self, "tag", _mesh_tag(name_bytes))
        key = self.key
        if key is None:
            object.__setattr__(self, "mac_key", None)
            return
        if not isinstance(key, bytes) or not MIN_MESH_KEY <= len(key) <= MAX_MESH_KEY:
            raise ValueError(f"a mesh key must be {MIN_MESH_KEY} to {MAX_MESH_KEY} bytes")
        mac_key = hashlib.blake2s(
            _MAC_KEY_CONTEXT + name_bytes, key=key, digest_size=32, person=b"cm-mkey1"
        ).digest()
        object.__setattr__(self, "mac_key", mac_key)

    @property
    def keyed(self) -> bool:
        """True when the mesh has a key (every frame must carry a valid MAC)."""
        return self.mac_key is not None

    def mac(self, *parts: bytes | memoryview) -> bytes:
        """The 16-byte keyed BLAKE2s MAC of the concatenation of `parts` (keyed meshes only)."""
        if self.mac_key is None:
            raise ValueError("an open mesh has no MAC key")
        h = hashlib.blake2s(key=self.mac_key, digest_size=MAC_LEN, person=b"cm-bmac1")
        for p in parts:
            h.update(p)
        return h.digest()

    def check_mac(self, tag: bytes | memoryview, *parts: bytes | memoryview) -> bool:
        """True when `tag` is the MAC of `parts` (compared in constant time)."""
        return hmac.compare_digest(self.mac(*parts), bytes(tag))


# ------------------------------------------------------------------------ membership certificates


@dataclass(frozen=True, slots=True)
class MembershipCert:
    """An authority's statement that `cell_id` is a member of mesh `mesh_name` until
    `not_after_ms` (Unix time, milliseconds). `signature` is the authority's Ed25519 signature
    over `membership_message(cell_id, mesh_name, not_after_ms)`."""

    cell_id: bytes
    mesh_name: str
    not_after_ms: int
    authority_key: bytes
    signature: bytes


def membership_message(cell_id: bytes, mesh_name: str, not_after_ms: int) -> bytes:
    """The exact bytes an authority signs for a membership certificate."""
    name = mesh_name.encode("utf-8")
    return MEMBERSHIP_CONTEXT + bytes(cell_id) + struct.pack("!QB", not_after_ms, len(name)) + name


def issue_membership_cert(
    authority: Identity, cell_id: bytes, mesh_name: str, not_after_ms: int
) -> MembershipCert:
    """Sign a membership certificate with the authority's identity key.

    Raises `ValueError` for a CellID that is not 16 bytes, an invalid mesh name, or a
    `not_after_ms` outside 0..2**64-1.
    """
    if len(cell_id) != CELL_ID_LEN:
        raise ValueError(f"CellID must be {CELL_ID_LEN} bytes")
    Mesh(mesh_name)  # validates the name
    if not 0 <= not_after_ms <= U64_MAX:
        raise ValueError("not_after_ms must fit in 64 bits")
    sig = authority.sign(membership_message(cell_id, mesh_name, not_after_ms))
    return MembershipCert(bytes(cell_id), mesh_name, not_after_ms, authority.public_key, sig)


def push_cert(cert: MembershipCert) -> bytes:
    """Encode a certificate (layout in docs/wire.md, section 10.5)."""
    name = validate_text(cert.mesh_name, "certificate mesh name", MAX_MESH_NAME, allow_empty=False)
    if len(cert.cell_id) != CELL_ID_LEN or len(cert.authority_key) != ED25519_PUBLIC_KEY_LEN:
        raise MalformedError("certificate CellID or authority key has the wrong length")
    if len(cert.signature) != SIGNATURE_LEN:
        raise MalformedError("certificate signature must be 64 bytes")
    head = _CERT_HEAD.pack(cert.cell_id, cert.not_after_ms, cert.authority_key, len(name))
    return head + name + cert.signature


def pull_cert(buf: bytes, offset: int = 0) -> tuple[MembershipCert, int]:
    """Decode the certificate at `offset`; return it and the offset just past it.

    Raises `TruncatedError` when `buf` ends inside it and `MalformedError` for a bad name.
    """
    end_head = offset + _CERT_HEAD.size
    if end_head > len(buf):
        raise TruncatedError("membership certificate truncated")
    cell, not_after, authority, nlen = _CERT_HEAD.unpack_from(buf, offset)
    if not 1 <= nlen <= MAX_MESH_NAME:
        raise MalformedError(f"certificate mesh name length {nlen} is outside 1..{MAX_MESH_NAME}")
    end_name = end_head + nlen
    end = end_name + SIGNATURE_LEN
    if end > len(buf):
        raise TruncatedError("membership certificate truncated")
    name = decode_text(bytes(buf[end_head:end_name]), "certificate mesh name")
    sig = bytes(buf[end_name:end])
    return MembershipCert(cell, name, not_after, authority, sig), end


def check_cert(
    cert: MembershipCert,
    *,
    cell_id: bytes,
    mesh_name: str,
    authority_keys: frozenset[bytes],
    wall_ms: int,
) -> None:
    """The cheap checks of a certificate (no signature): raise `AdmissionError` on failure.

    Reasons: ``cert_authority`` (signed by a key we do not trust), ``cert_invalid`` (issued for
    another CellID or mesh), ``cert_expired`` (`not_after_ms` is before `wall_ms`).
    """
    if cert.authority_key not in authority_keys:
        raise AdmissionError("cert_authority", "certificate from an unknown authority")
    if cert.cell_id != cell_id or cert.mesh_name != mesh_name:
        raise AdmissionError("cert_invalid", "certificate issued for another node or mesh")
    if cert.not_after_ms < wall_ms:
        raise AdmissionError("cert_expired", "membership certificate has expired")


def verify_cert(
    cert: MembershipCert,
    *,
    cell_id: bytes,
    mesh_name: str,
    authority_keys: frozenset[bytes],
    wall_ms: int,
    verify: Verifier = verify_signature,
) -> None:
    """`check_cert` plus the authority's signature (``cert_invalid`` when it fails)."""
    check_cert(
        cert,
        cell_id=cell_id,
        mesh_name=mesh_name,
        authority_keys=authority_keys,
        wall_ms=wall_ms,
    )
    msg = membership_message(cert.cell_id, cert.mesh_name, cert.not_after_ms)
    try:
        verify(cert.authority_key, msg, cert.signature)
    except AuthenticationError:
        raise AdmissionError("cert_invalid", "certificate signature did not verify") from None
