"""cellmesh.crypto: the Noise handshake, the data-frame AEAD and the anti-replay window.

* `noise` - the Noise Protocol Framework (revision 34) over X25519, ChaChaPoly/AESGCM and
  SHA256/SHA512/BLAKE2s/BLAKE2b: `HandshakeState`, `SymmetricState`, `CipherState`.
* `transport_cipher` - `TransportCipher`, ChaCha20-Poly1305 keyed once per session with explicit
  packet-number nonces.
* `replay` - `ReplayWindow`, a sliding window rejecting duplicate and too-old packet numbers.

Pure code: no I/O, no clocks; randomness only from the OS CSPRNG for ephemeral keys.
"""

from __future__ import annotations

from cellmesh.crypto.noise import (
    CipherState,
    HandshakePattern,
    HandshakeState,
    NoiseProtocol,
    SymmetricState,
    parse_protocol_name,
)
from cellmesh.crypto.replay import ReplayWindow
from cellmesh.crypto.transport_cipher import TransportCipher

__all__ = [
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "NoiseProtocol",
    "ReplayWindow",
    "SymmetricState",
    "TransportCipher",
    "parse_protocol_name",
]
