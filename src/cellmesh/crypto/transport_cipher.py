"""The per-session data-frame AEAD: ChaCha20-Poly1305 with explicit packet-number nonces.

Unlike a Noise `CipherState`, a `TransportCipher` keeps no counter: the caller passes the packet
number of each frame, which lets frames arrive out of order (pair it with a `ReplayWindow` on the
receive side). The nonce is encoded exactly like Noise's ChaChaPoly (spec section 12.3): 4 zero
bytes followed by the 8-byte little-endian packet number, so a key taken from a Noise
`CipherState` (`TransportCipher.from_cipher_state`) encrypts the same bytes the CipherState would
at the same nonce.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cellmesh.crypto.noise import CHACHAPOLY, CipherState
from cellmesh.errors import AuthenticationError, LocalProtocolError, NonceExhaustedError

__all__ = ["IN_PLACE", "KEY_LEN", "MAX_PN", "TAG_LEN", "TransportCipher"]

KEY_LEN: Final = 32
"""ChaCha20-Poly1305 key length."""
TAG_LEN: Final = 16
"""Bytes `seal` adds to the plaintext."""
MAX_PN: Final = 2**64 - 2
"""The largest usable packet number (2**64-1 is reserved, as in Noise)."""

_NONCE: Final = struct.Struct("<4xQ")
_PACK_NONCE: Final = _NONCE.pack


def _encrypts_in_place() -> bool:
    """Whether `encrypt_into` may write over its own input (OpenSSL's ChaCha20-Poly1305 allows
    it; the library does not promise it). Probed once, against the ordinary `encrypt`: if a
    version ever refuses or gets it wrong, `seal_in_place` falls back to a copy."""
    aead = ChaCha20Poly1305(bytes(range(KEY_LEN)))
    nonce = _PACK_NONCE(1)
    plain = bytes(range(256)) * 5
    want = aead.encrypt(nonce, plain, b"probe")
    buf = bytearray(plain) + bytearray(TAG_LEN)
    view = memoryview(buf)
    try:
        aead.encrypt_into(nonce, view[: len(plain)], b"probe", view)
    except Exception:  # noqa: BLE001 - any refusal means "no": the copying path is always right
        return False
    finally:
        view.release()
    return bytes(buf) == want


IN_PLACE: Final = _encrypts_in_place()
"""True when `seal_in_place` encrypts without copying (see `_encrypts_in_place`)."""


class TransportCipher:
    """ChaCha20-Poly1305 under one key, nonce = 4 zero bytes || little-endian u64 packet number.

    Never seal two frames with the same packet number under one key.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        """Build the cipher once for `key` (32 bytes)."""
        if len(key) != KEY_LEN:
            raise LocalProtocolError(f"transport key must be {KEY_LEN} bytes, got {len(key)}")
        self._aead = ChaCha20Poly1305(bytes(key))

    @classmethod
    def from_cipher_state(cls, cipher_state: CipherState) -> TransportCipher:
        """Build from the key of a Noise ChaChaPoly `CipherState` (e.g. one half of a split)."""
        key = cipher_state.key
        if key is None:
            raise LocalProtocolError("CipherState has no key")
        if cipher_state.cipher is not CHACHAPOLY:
            raise LocalProtocolError(
                f"TransportCipher is ChaChaPoly; the CipherState uses {cipher_state.cipher.name}"
            )
        return cls(key)

    @staticmethod
    def _nonce(pn: int) -> bytes:
        if pn > MAX_PN:
            raise NonceExhaustedError("packet number space exhausted; rekey the session")
        if pn < 0:
            raise LocalProtocolError(f"packet number must be non-negative, got {pn}")
        return _NONCE.pack(pn)

    def seal(self, pn: int, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and authenticate `plaintext` (and `ad`) as packet `pn`; adds `TAG_LEN` bytes."""
        # The range check of _nonce, inline: this runs for every packet sent.
        nonce = _PACK_NONCE(pn) if 0 <= pn <= MAX_PN else self._nonce(pn)
        return self._aead.encrypt(nonce, plaintext, ad)

    def seal_in_place(self, pn: int, ad: bytes, buf: bytearray, start: int) -> None:
        """Seal packet `pn` inside `buf`: the plaintext is `buf[start:-TAG_LEN]`; it is replaced
        by its ciphertext and the last `TAG_LEN` bytes by the tag. What `seal` returns for that
        plaintext equals `buf[start:]` afterwards.

        Saves the bulk sender a copy and an allocation per packet: the datagram is built once
        (header, then plaintext, then room for the tag) and encrypted where it lies."""
        nonce = _PACK_NONCE(pn) if 0 <= pn <= MAX_PN else self._nonce(pn)
        if len(buf) < start + TAG_LEN or start < 0:
            raise LocalProtocolError("seal_in_place: no room for the tag")
        view = memoryview(buf)[start:]
        if IN_PLACE:
            self._aead.encrypt_into(nonce, view[:-TAG_LEN], ad, view)
        else:
            view[:] = self._aead.encrypt(nonce, view[:-TAG_LEN], ad)

    def open(self, pn: int, ad: bytes, ciphertext: bytes | memoryview) -> bytes:
        """Verify and decrypt packet `pn`; raises `AuthenticationError` if it does not verify."""
        nonce = _PACK_NONCE(pn) if 0 <= pn <= MAX_PN else self._nonce(pn)
        try:
            return self._aead.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            raise AuthenticationError("transport frame failed authentication") from None
