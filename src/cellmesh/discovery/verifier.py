"""A memo of successful Ed25519 verifications, for frames seen more than once.

Ed25519 verification is deterministic: the same (public key, message, signature) always gives
the same answer. `CachedVerifier` remembers, in a bounded LRU, the BLAKE2s-256 digest of triples
that verified, and answers a repeat from memory. Only successes are stored, so an attacker cannot
plant an entry; a forged triple would need a BLAKE2s-256 collision with a valid one.

A node sees repeats when the same beacon arrives over IPv4 and IPv6, or is re-sent unchanged. The
simulator shares one `CachedVerifier` between all its nodes, where each multicast beacon reaches
hundreds of cores in one process; that changes how fast a run goes, never what it computes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from cellmesh.discovery.mesh import Verifier
from cellmesh.identity.keys import ED25519_PUBLIC_KEY_LEN, SIGNATURE_LEN, verify_signature

__all__ = ["CachedVerifier"]


class CachedVerifier:
    """A `Verifier` that remembers up to `capacity` successful verifications (LRU)."""

    __slots__ = ("_cache", "_verify", "capacity", "hits", "misses")

    def __init__(self, capacity: int = 65536, verify: Verifier = verify_signature) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._verify = verify
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, public_key: bytes, message: bytes, signature: bytes) -> None:
        """Verify, or recall that this exact triple verified before. Raises
        `AuthenticationError` like `verify_signature`."""
        if len(public_key) != ED25519_PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
            self._verify(public_key, message, signature)  # raises for the malformed input
            return
        h = hashlib.blake2s(person=b"cm-sigv1")
        h.update(public_key)
        h.update(signature)
        h.update(message)
        key = h.digest()
        cache = self._cache
        if key in cache:
            cache.move_to_end(key)
            self.hits += 1
            return
        self.misses += 1
        self._verify(public_key, message, signature)
        cache[key] = None
        if len(cache) > self.capacity:
            cache.popitem(last=False)
