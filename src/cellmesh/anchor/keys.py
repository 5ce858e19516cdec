"""Epoch keys: sealing to a member, opening, and the MACs made with them.

An epoch key is 32 random bytes made by the anchor (from the injected CSPRNG) and delivered to
each member in an EPOCH message, sealed to that member's X25519 public key with libsodium's
sealed box (`nacl.public.SealedBox`: an ephemeral X25519 key, XSalsa20-Poly1305). Nothing here is
hand-rolled: the sealed box is libsodium's, the MACs are keyed BLAKE3.

The epoch key itself never keys anything directly. Each use gets its own subkey, derived with
BLAKE3 in key-derivation mode under a context string, so a MAC made for one purpose can never be
replayed as a MAC for another:

* ``PULSE_MAC_CONTEXT``: the MAC field of PULSE messages;
* ``EPOCH_MAC_CONTEXT``: `AnchorCore.epoch_mac`, for other layers that want to prove "made by a
  member of the current epoch" (e.g. beacons, once discovery carries one).

MAC tags are 16 bytes (128-bit forgery resistance) and always compared with
`hmac.compare_digest`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

import blake3
import nacl.bindings
import nacl.exceptions
import nacl.public

from cellmesh.errors import AuthenticationError
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import X25519_KEY_LEN, Identity

__all__ = [
    "EPOCH_KEY_LEN",
    "EPOCH_MAC_CONTEXT",
    "MAC_LEN",
    "PULSE_MAC_CONTEXT",
    "SEALED_KEY_LEN",
    "EpochKey",
    "KeyOpener",
    "compute_mac",
    "derive_subkey",
    "mac_matches",
    "seal_epoch_key",
    "sealing_box",
]

EPOCH_KEY_LEN = 32
"""Length of an epoch key in bytes."""
MAC_LEN = 16
"""Length of a MAC tag made with an epoch key (keyed BLAKE3, truncated)."""
SEALED_KEY_LEN = int(nacl.bindings.crypto_box_SEALBYTES) + EPOCH_KEY_LEN
"""A sealed epoch key: ephemeral public key (32) + Poly1305 tag (16) + ciphertext (32)."""
PULSE_MAC_CONTEXT = "cellmesh anchor pulse mac v1"
"""BLAKE3 derive_key context of the subkey that MACs PULSE messages."""
EPOCH_MAC_CONTEXT = "cellmesh epoch mac v1"
"""BLAKE3 derive_key context of the subkey other layers MAC with (`AnchorCore.epoch_mac`)."""


def derive_subkey(epoch_key: bytes, context: str) -> bytes:
    """The 32-byte subkey of `epoch_key` for the purpose named by `context`."""
    return blake3.blake3(bytes(epoch_key), derive_key_context=context).digest()


def compute_mac(subkey: bytes, data: bytes) -> bytes:
    """The `MAC_LEN`-byte keyed BLAKE3 tag of `data` under a 32-byte subkey."""
    return blake3.blake3(data, key=subkey).digest(length=MAC_LEN)


def mac_matches(subkey: bytes, data: bytes, tag: bytes) -> bool:
    """True when `tag` is the MAC of `data` under `subkey` (constant-time comparison)."""
    return hmac.compare_digest(compute_mac(subkey, data), bytes(tag))


def seal_epoch_key(
    epoch_key: bytes, recipient: nacl.public.SealedBox[nacl.public.PublicKey]
) -> bytes:
    """Seal `epoch_key` to a recipient (a `SealedBox` built from its X25519 public key)."""
    if len(epoch_key) != EPOCH_KEY_LEN:
        raise ValueError(f"an epoch key is {EPOCH_KEY_LEN} bytes")
    sealed = bytes(recipient.encrypt(bytes(epoch_key)))
    assert len(sealed) == SEALED_KEY_LEN
    return sealed


def sealing_box(x25519_public_key: bytes) -> nacl.public.SealedBox[nacl.public.PublicKey]:
    """A `SealedBox` that seals to `x25519_public_key`. Raises `ValueError` if malformed."""
    if len(x25519_public_key) != X25519_KEY_LEN:
        raise ValueError(f"an X25519 public key is {X25519_KEY_LEN} bytes")
    return nacl.public.SealedBox(nacl.public.PublicKey(bytes(x25519_public_key)))


class KeyOpener:
    """Opens epoch keys sealed to this node's X25519 key (the identity's Noise static key)."""

    __slots__ = ("_box",)

    def __init__(self, identity: Identity) -> None:
        private = nacl.public.PrivateKey(identity.noise_static.private_bytes_raw())
        self._box = nacl.public.SealedBox(private)

    def open(self, sealed: bytes) -> bytes:
        """The epoch key inside `sealed`. Raises `AuthenticationError` if it does not open
        (sealed to someone else, or tampered with) or holds anything but a 32-byte key."""
        try:
            key = bytes(self._box.decrypt(bytes(sealed)))
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise AuthenticationError("sealed epoch key did not open") from exc
        if len(key) != EPOCH_KEY_LEN:
            raise AuthenticationError("sealed box did not hold a 32-byte epoch key")
        return key


@dataclass(slots=True)
class EpochKey:
    """One epoch key as a node holds it. `key` and the subkeys never appear in `repr`.

    `age_at_install` is how old the key already was when we installed it (our wall clock minus
    the anchor's `issued_ms`, clamped at 0), so a late joiner ages a key like everyone else.
    """

    anchor: CellId
    term: int
    epoch: int
    issued_ms: int
    installed_at: float
    age_at_install: float
    key: bytes = field(repr=False)
    pulse_subkey: bytes = field(init=False, repr=False)
    app_subkey: bytes = field(init=False, repr=False)
    superseded_at: float | None = None
    """When a newer key of the same anchor replaced this one (None while it is the newest)."""

    def __post_init__(self) -> None:
        self.pulse_subkey = derive_subkey(self.key, PULSE_MAC_CONTEXT)
        self.app_subkey = derive_subkey(self.key, EPOCH_MAC_CONTEXT)

    def age(self, now: float) -> float:
        """Seconds since the anchor created this key."""
        return self.age_at_install + max(0.0, now - self.installed_at)

    def usable(self, now: float, grace: float) -> bool:
        """True while this key is the newest, or was replaced less than `grace` ago."""
        return self.superseded_at is None or now - self.superseded_at <= grace
