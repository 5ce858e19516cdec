"""Tests for cellmesh.identity.keys."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cellmesh.errors import AuthenticationError
from cellmesh.identity.cellid import cell_id_from_public_key, format_cell_id, origin_hash
from cellmesh.identity.keys import (
    STATIC_BINDING_CONTEXT,
    Identity,
    static_binding_message,
    verify_signature,
    verify_static_binding,
)

# RFC 8032 section 7.1, TEST 1.
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
X_SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


def test_rfc8032_vector() -> None:
    ident = Identity.from_secret(RFC_SEED + X_SECRET)
    assert ident.public_key == RFC_PUBLIC
    assert ident.sign(b"") == RFC_SIGNATURE
    verify_signature(RFC_PUBLIC, b"", RFC_SIGNATURE)


def test_generate_shapes(ident: Identity) -> None:
    assert len(ident.public_key) == 32
    assert ident.cell_id == cell_id_from_public_key(ident.public_key)
    assert ident.origin_hash == origin_hash(ident.public_key)
    assert isinstance(ident.noise_static, X25519PrivateKey)
    assert ident.noise_static_public == ident.noise_static.public_key().public_bytes_raw()
    assert len(ident.noise_static_public) == 32
    assert len(ident.secret_bytes()) == 64


def test_generate_is_random() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert a.public_key != b.public_key
    assert a.noise_static_public != b.noise_static_public
    assert a != b


def test_noise_key_is_independent_of_signing_key() -> None:
    a = Identity.from_secret(RFC_SEED + bytes(31) + b"\x01")
    b = Identity.from_secret(RFC_SEED + bytes(31) + b"\x02")
    assert a.public_key == b.public_key
    assert a.noise_static_public != b.noise_static_public


def test_secret_round_trip(ident: Identity) -> None:
    again = Identity.from_secret(ident.secret_bytes())
    assert again == ident
    assert hash(again) == hash(ident)
    assert again.public_key == ident.public_key
    assert again.noise_static_public == ident.noise_static_public


@pytest.mark.parametrize("length", [0, 32, 63, 65])
def test_from_secret_wrong_length(length: int) -> None:
    secret = b"\xaa" * length
    with pytest.raises(ValueError, match="64 bytes") as info:
        Identity.from_secret(secret)
    assert "aa" not in str(info.value)


def test_repr_hides_secrets(ident: Identity) -> None:
    text = repr(ident)
    assert format_cell_id(ident.cell_id) in text
    assert str(ident) == text
    secret = ident.secret_bytes()
    for part in (secret[:32], secret[32:]):
        assert part.hex() not in text
        assert part.hex().upper() not in text
    assert repr(secret) not in text


def test_sign_and_verify(ident: Identity) -> None:
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    verify_signature(ident.public_key, b"hello", sig)


def test_verify_rejects_modified_message(ident: Identity) -> None:
    sig = ident.sign(b"hello")
    with pytest.raises(AuthenticationError):
        verify_signature(ident.public_key, b"hellO", sig)


def test_verify_rejects_modified_signature(ident: Identity) -> None:
    sig = bytearray(ident.sign(b"hello"))
    sig[10] ^= 1
    with pytest.raises(AuthenticationError):
        verify_signature(ident.public_key, b"hello", bytes(sig))


def test_verify_rejects_other_key(ident: Identity) -> None:
    other = Identity.generate()
    with pytest.raises(AuthenticationError):
        verify_signature(other.public_key, b"hello", ident.sign(b"hello"))


@pytest.mark.parametrize(
    ("key", "sig"),
    [
        (b"\x00" * 31, b"\x00" * 64),
        (b"\x00" * 33, b"\x00" * 64),
        (b"", b""),
        (RFC_PUBLIC, b"\x00" * 63),
        (RFC_PUBLIC, b"\x00" * 65),
        (b"\xff" * 32, b"\x00" * 64),  # not a valid curve point
        (b"\x00" * 32, b"\x00" * 64),  # small-order point
    ],
)
def test_verify_malformed_inputs_raise_authentication_error(key: bytes, sig: bytes) -> None:
    with pytest.raises(AuthenticationError):
        verify_signature(key, b"", sig)


def test_static_binding(ident: Identity) -> None:
    binding = ident.static_binding()
    assert len(binding) == 64
    assert ident.static_binding() is binding  # cached
    verify_static_binding(ident.public_key, ident.noise_static_public, binding)
    message = STATIC_BINDING_CONTEXT + ident.noise_static_public
    assert static_binding_message(ident.noise_static_public) == message
    assert message.startswith(b"cellmesh/v1 noise-static-binding\x00")
    verify_signature(ident.public_key, message, binding)


def test_static_binding_rejects_other_noise_key(ident: Identity) -> None:
    other = Identity.generate()
    with pytest.raises(AuthenticationError):
        verify_static_binding(ident.public_key, other.noise_static_public, ident.static_binding())


def test_static_binding_rejects_other_identity(ident: Identity) -> None:
    other = Identity.generate()
    with pytest.raises(AuthenticationError):
        verify_static_binding(other.public_key, ident.noise_static_public, ident.static_binding())


def test_static_binding_is_not_a_plain_signature(ident: Identity) -> None:
    plain = ident.sign(ident.noise_static_public)
    with pytest.raises(AuthenticationError):
        verify_static_binding(ident.public_key, ident.noise_static_public, plain)


def test_static_binding_rejects_malformed_noise_key(ident: Identity) -> None:
    with pytest.raises(AuthenticationError, match="X25519"):
        verify_static_binding(ident.public_key, b"\x00" * 31, ident.static_binding())


def test_equality_with_other_types(ident: Identity) -> None:
    assert ident != object()
    assert ident != ident.public_key
