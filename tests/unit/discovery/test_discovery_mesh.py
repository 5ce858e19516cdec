"""Mesh names and keys, the mesh MAC, and membership certificates."""

from __future__ import annotations

import pytest

from cellmesh.discovery.mesh import (
    AdmissionError,
    Mesh,
    issue_membership_cert,
    membership_message,
    pull_cert,
    push_cert,
    verify_cert,
)
from cellmesh.errors import AuthenticationError, MalformedError, TruncatedError
from cellmesh.identity.keys import Identity

NODE = Identity.from_secret(bytes(range(64)))
AUTHORITY = Identity.from_secret(bytes(range(5, 69)))
ROGUE = Identity.from_secret(bytes(range(9, 73)))
NOW_MS = 1_800_000_000_000


def test_mesh_tag_and_mac_key_derivation() -> None:
    a, b = Mesh("lab"), Mesh("lab2")
    assert len(a.tag) == 8
    assert a.tag != b.tag
    assert a.mac_key is None
    assert not a.keyed
    k1, k2 = Mesh("lab", b"1" * 16), Mesh("lab", b"2" * 16)
    assert k1.tag == a.tag  # the tag depends on the name only
    assert k1.mac_key is not None
    assert k2.mac_key is not None
    assert k1.mac_key != k2.mac_key
    assert Mesh("lab2", b"1" * 16).mac_key != k1.mac_key  # ... the MAC key on both
    mac = k1.mac(b"abc", b"def")
    assert len(mac) == 16
    assert k1.mac(b"abcdef") == mac  # parts are concatenated
    assert k1.check_mac(mac, b"abcdef")
    assert not k2.check_mac(mac, b"abcdef")
    with pytest.raises(ValueError, match="open mesh"):
        a.mac(b"x")


def test_mesh_key_is_not_in_the_repr() -> None:
    assert "k" * 16 not in repr(Mesh("lab", b"k" * 16))


@pytest.mark.parametrize(
    ("name", "key", "match"),
    [
        ("", None, "empty"),
        ("x" * 65, None, "limit"),
        ("bad\nname", None, "control"),
        ("lab", b"short", "16 to 32"),
        ("lab", b"k" * 33, "16 to 32"),
    ],
)
def test_mesh_validation(name: str, key: bytes | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mesh(name, key)


def test_certificate_round_trip_and_verify() -> None:
    cert = issue_membership_cert(AUTHORITY, NODE.cell_id, "lab", NOW_MS + 1000)
    raw = push_cert(cert)
    assert pull_cert(raw) == (cert, len(raw))
    assert pull_cert(b"xx" + raw + b"yy", 2) == (cert, 2 + len(raw))
    verify_cert(
        cert,
        cell_id=NODE.cell_id,
        mesh_name="lab",
        authority_keys=frozenset({AUTHORITY.public_key}),
        wall_ms=NOW_MS,
    )
    assert membership_message(NODE.cell_id, "lab", 5).startswith(b"cellmesh/v1 mesh-membership\0")


def _reason(cert_kw: dict[str, object], **check: object) -> str:
    cert = issue_membership_cert(AUTHORITY, NODE.cell_id, "lab", NOW_MS)
    for k, v in cert_kw.items():
        object.__setattr__(cert, k, v)
    args: dict[str, object] = {
        "cell_id": NODE.cell_id,
        "mesh_name": "lab",
        "authority_keys": frozenset({AUTHORITY.public_key}),
        "wall_ms": NOW_MS,
    }
    args.update(check)
    with pytest.raises(AdmissionError) as e:
        verify_cert(cert, **args)  # type: ignore[arg-type]
    assert isinstance(e.value, AuthenticationError)
    return e.value.reason


def test_certificate_rejections() -> None:
    assert _reason({}, wall_ms=NOW_MS + 1) == "cert_expired"
    assert _reason({}, authority_keys=frozenset({ROGUE.public_key})) == "cert_authority"
    assert _reason({}, cell_id=ROGUE.cell_id) == "cert_invalid"
    assert _reason({}, mesh_name="other") == "cert_invalid"
    assert _reason({"not_after_ms": NOW_MS + 10**9}) == "cert_invalid"  # signature no longer fits
    forged = issue_membership_cert(ROGUE, NODE.cell_id, "lab", NOW_MS)
    assert _reason({"signature": forged.signature}) == "cert_invalid"


def test_certificate_decode_errors() -> None:
    raw = push_cert(issue_membership_cert(AUTHORITY, NODE.cell_id, "lab", NOW_MS))
    for n in range(len(raw)):
        with pytest.raises((TruncatedError, MalformedError)):
            pull_cert(raw[:n])
    name_len_at = 16 + 8 + 32
    for bad in (b"\x00", b"\x41"):
        with pytest.raises((MalformedError, TruncatedError)):
            pull_cert(raw[:name_len_at] + bad + raw[name_len_at + 1 :])
    with pytest.raises(MalformedError):
        pull_cert(raw[: name_len_at + 1] + b"\xff\xfe\x00" + raw[name_len_at + 4 :])


def test_issue_validation() -> None:
    with pytest.raises(ValueError, match="CellID"):
        issue_membership_cert(AUTHORITY, b"short", "lab", 0)
    with pytest.raises(ValueError, match="empty"):
        issue_membership_cert(AUTHORITY, NODE.cell_id, "", 0)
    with pytest.raises(ValueError, match="64 bits"):
        issue_membership_cert(AUTHORITY, NODE.cell_id, "lab", 2**64)
