"""A node's long-term identity: an Ed25519 signing key plus a separate X25519 Noise static key.

The Ed25519 key *is* the node: its public half names the node (via the CellID) and signs
everything the node vouches for. The X25519 key is the Noise static key used in handshakes. It
is generated independently (never derived from the Ed25519 key) and tied to the identity by a
*static binding*: an Ed25519 signature over a fixed context string and the X25519 public key.

Everything here is pure: no file I/O, no clocks. Randomness comes only from the OS CSPRNG
(`Identity.generate`).
"""

from __future__ import annotations

import hmac

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cellmesh.errors import AuthenticationError
from cellmesh.identity.cellid import CellId, cell_id_from_public_key, format_cell_id, origin_hash

__all__ = [
    "ED25519_PUBLIC_KEY_LEN",
    "ED25519_SEED_LEN",
    "IDENTITY_SECRET_LEN",
    "SIGNATURE_LEN",
    "STATIC_BINDING_CONTEXT",
    "X25519_KEY_LEN",
    "Identity",
    "static_binding_message",
    "verify_signature",
    "verify_static_binding",
]

ED25519_SEED_LEN = 32
ED25519_PUBLIC_KEY_LEN = 32
X25519_KEY_LEN = 32
SIGNATURE_LEN = 64
IDENTITY_SECRET_LEN = ED25519_SEED_LEN + X25519_KEY_LEN
"""Length of `Identity.secret_bytes()`: Ed25519 seed (32) || X25519 private key (32)."""

STATIC_BINDING_CONTEXT = b"cellmesh/v1 noise-static-binding\x00"
"""Domain-separation prefix of the message signed by a static binding."""


def static_binding_message(noise_static_public: bytes) -> bytes:
    """Return the exact message an identity signs to bind its Noise static public key."""
    return STATIC_BINDING_CONTEXT + bytes(noise_static_public)


class Identity:
    """A node identity: Ed25519 signing key and X25519 Noise static key.

    Build one with `Identity.generate()` or `Identity.from_secret()`. The secret halves are
    never shown by `repr` or `str`. Two identities compare equal when their secrets are equal
    (compared in constant time).
    """

    __slots__ = (
        "_cell_id",
        "_noise_static",
        "_noise_static_public",
        "_origin_hash",
        "_public_key",
        "_signing_key",
        "_static_binding",
    )

    def __init__(
        self, signing_key: nacl.signing.SigningKey, noise_static: X25519PrivateKey
    ) -> None:
        """Wrap an existing Ed25519 signing key and X25519 private key."""
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise TypeError("signing_key must be a nacl.signing.SigningKey")
        if not isinstance(noise_static, X25519PrivateKey):
            raise TypeError("noise_static must be an X25519PrivateKey")
        self._signing_key = signing_key
        self._noise_static = noise_static
        self._public_key = bytes(signing_key.verify_key)
        self._cell_id = cell_id_from_public_key(self._public_key)
        self._origin_hash = origin_hash(self._public_key)
        self._noise_static_public = noise_static.public_key().public_bytes_raw()
        self._static_binding: bytes | None = None

    @classmethod
    def generate(cls) -> Identity:
        """Create a fresh identity from the OS CSPRNG."""
        return cls(nacl.signing.SigningKey.generate(), X25519PrivateKey.generate())

    @classmethod
    def from_secret(cls, secret: bytes) -> Identity:
        """Rebuild an identity from `secret_bytes()` output (Ed25519 seed || X25519 private).

        Raises `ValueError` (without echoing the secret) if `secret` is not 64 bytes.
        """
        if not isinstance(secret, bytes | bytearray | memoryview):
            raise TypeError(f"identity secret must be bytes, got {type(secret).__name__}")
        secret = bytes(secret)
        if len(secret) != IDENTITY_SECRET_LEN:
            raise ValueError(
                f"identity secret must be {IDENTITY_SECRET_LEN} bytes, got {len(secret)}"
            )
        signing_key = nacl.signing.SigningKey(secret[:ED25519_SEED_LEN])
        noise_static = X25519PrivateKey.from_private_bytes(secret[ED25519_SEED_LEN:])
        return cls(signing_key, noise_static)

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def cell_id(self) -> CellId:
        """The 16-byte CellID derived from `public_key`."""
        return self._cell_id

    @property
    def origin_hash(self) -> bytes:
        """The 8-byte origin hash of `public_key`."""
        return self._origin_hash

    @property
    def noise_static(self) -> X25519PrivateKey:
        """The X25519 Noise static private key."""
        return self._noise_static

    @property
    def noise_static_public(self) -> bytes:
        """The 32-byte X25519 Noise static public key."""
        return self._noise_static_public

    def secret_bytes(self) -> bytes:
        """Return Ed25519 seed || X25519 private key (64 bytes). For the keystore only."""
        return bytes(self._signing_key) + self._noise_static.private_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of `message`."""
        return self._signing_key.sign(bytes(message)).signature

    def static_binding(self) -> bytes:
        """Return the 64-byte signature binding `noise_static_public` to this identity.

        The signed message is `STATIC_BINDING_CONTEXT + noise_static_public`. Ed25519 is
        deterministic, so caching the value changes nothing but speed.
        """
        if self._static_binding is None:
            self._static_binding = self.sign(static_binding_message(self._noise_static_public))
        return self._static_binding

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return hmac.compare_digest(self.secret_bytes(), other.secret_bytes())

    def __hash__(self) -> int:
        return hash(self._public_key)

    def __repr__(self) -> str:
        return f"Identity(cell_id={format_cell_id(self._cell_id)})"

    __str__ = __repr__


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature; return None if valid.

    Raises `AuthenticationError` if the signature does not verify, or if the key or signature
    is malformed (wrong length, not a valid curve point).
    """
    if not isinstance(public_key, bytes | bytearray | memoryview) or (
        len(public_key) != ED25519_PUBLIC_KEY_LEN
    ):
        raise AuthenticationError("malformed Ed25519 public key")
    if not isinstance(signature, bytes | bytearray | memoryview) or (
        len(signature) != SIGNATURE_LEN
    ):
        raise AuthenticationError("malformed Ed25519 signature")
    try:
        nacl.signing.VerifyKey(bytes(public_key)).verify(bytes(message), bytes(signature))
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise AuthenticationError("Ed25519 signature did not verify") from exc


def verify_static_binding(
    ed25519_public: bytes, noise_static_public: bytes, signature: bytes
) -> None:
    """Check that `signature` binds `noise_static_public` to the Ed25519 key `ed25519_public`.

    Raises `AuthenticationError` if it does not (including a malformed X25519 key).
    """
    if not isinstance(noise_static_public, bytes | bytearray | memoryview) or (
        len(noise_static_public) != X25519_KEY_LEN
    ):
        raise AuthenticationError("malformed X25519 static public key")
    try:
        verify_signature(ed25519_public, static_binding_message(noise_static_public), signature)
    except AuthenticationError as exc:
        raise AuthenticationError("Noise static key binding did not verify") from exc
