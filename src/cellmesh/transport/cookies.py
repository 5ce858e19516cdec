"""Stateless cookies: make a handshake flood from spoofed addresses cost almost nothing.

Theory of operation (after WireGuard's cookie reply, section 5.4.7 of its paper): while the node is
under load, a HANDSHAKE_INIT without a valid cookie gets a COOKIE_REPLY instead of any Diffie-Hellman
work, and no state is kept. The cookie is a keyed BLAKE2s MAC of the sender's address under a secret
that rotates every `rotate_every` seconds (the previous secret is still accepted). Only a sender that
really receives at that address can retry with the cookie, so spoofed floods die at the gate, and
genuine initiators pay one extra round trip only while the node is busy.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

COOKIE_LEN = 16


def _mac(secret: bytes, addr: tuple[str, int]) -> bytes:
    h = hashlib.blake2s(key=secret, digest_size=COOKIE_LEN, person=b"cm-cook1")
    h.update(addr[0].encode("ascii", "replace"))
    h.update(b"|")
    h.update(addr[1].to_bytes(2, "big"))
    return h.digest()


class CookieJar:
    """Issues and checks address cookies. `random_bytes` must be a CSPRNG (os.urandom)."""

    def __init__(
        self, random_bytes: Callable[[int], bytes], now: float, rotate_every: float = 120.0
    ) -> None:
        self._random = random_bytes
        self.rotate_every = rotate_every
        self._secret = random_bytes(32)
        self._previous = random_bytes(32)
        self._rotated_at = now

    def _maybe_rotate(self, now: float) -> None:
        if now - self._rotated_at >= self.rotate_every:
            self._previous, self._secret = self._secret, self._random(32)
            self._rotated_at = now

    def make(self, addr: tuple[str, int], now: float) -> bytes:
        """The cookie the holder of `addr` must present."""
        self._maybe_rotate(now)
        return _mac(self._secret, addr)

    def check(self, cookie: bytes, addr: tuple[str, int], now: float) -> bool:
        """Constant-time check against the current and the previous secret."""
        self._maybe_rotate(now)
        ok_now = hmac.compare_digest(cookie, _mac(self._secret, addr))
        ok_prev = hmac.compare_digest(cookie, _mac(self._previous, addr))
        return ok_now or ok_prev
