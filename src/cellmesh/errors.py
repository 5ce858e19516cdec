"""The cellmesh exception tree.

```
CellmeshError
 ├── DecodeError                 bytes that are not a valid record (dropped and counted on receive)
 │    ├── TruncatedError         fewer bytes than the record needs
 │    ├── OversizeError          more bytes than the record allows
 │    ├── VersionError           a version this build does not speak
 │    └── MalformedError         any other structural fault (bad enum, reserved bits, junk)
 ├── CryptoError                 authentication failed (bad tag, bad signature, wrong key)
 │    ├── AuthenticationError    an AEAD tag or signature did not verify
 │    ├── ReplayError            a packet number the replay window has already seen or left behind
 │    └── NonceExhaustedError    a cipher reached its counter limit: it refuses to encrypt again
 ├── ProtocolError
 │    ├── RemoteProtocolError    an authenticated peer broke the protocol; the session closes
 │    └── LocalProtocolError     our own API was misused (a programming error)
 ├── KeystoreError               the keystore file is missing, corrupt, too open or locked
 ├── ConfigError                 config.toml or CELLMESH_* variables are invalid
 ├── ControlError                the local control API failed (no node running, bad request)
 ├── PeerUnreachableError        no session to that CellID could be made
 └── AccessDeniedError           a peer refused a channel request (token, policy, unknown channel)
```

Three tiers (DESIGN.md, conventions 4): undecodable or unauthenticated input is dropped and counted and
never raises out of the receive path; an authenticated peer that breaks the protocol gets
`RemoteProtocolError`; API misuse raises `LocalProtocolError`.
"""

from __future__ import annotations


class CellmeshError(Exception):
    """Base of every error cellmesh raises on purpose."""


class DecodeError(CellmeshError):
    """Input bytes do not form a valid record."""


class TruncatedError(DecodeError):
    """The input ended before the record did."""


class OversizeError(DecodeError):
    """The input is larger than the record may be."""


class VersionError(DecodeError):
    """The record carries a protocol version this build does not speak."""


class MalformedError(DecodeError):
    """The record is structurally invalid (bad type, reserved bits set, inconsistent lengths)."""


class CryptoError(CellmeshError):
    """A cryptographic check failed."""


class AuthenticationError(CryptoError):
    """An AEAD tag, MAC or signature did not verify."""


class ReplayError(CryptoError):
    """The packet number was already received or is older than the replay window."""


class NonceExhaustedError(CryptoError):
    """The cipher's nonce counter is exhausted; the key must not be used again."""


class ProtocolError(CellmeshError):
    """A protocol rule was broken."""


class RemoteProtocolError(ProtocolError):
    """An authenticated peer broke the protocol. `code` says how; the session closes."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """The local API was used wrongly (for example sending on a closed session)."""


class KeystoreError(CellmeshError):
    """The keystore is missing, corrupt, has unsafe permissions, or the passphrase is wrong."""


class ConfigError(CellmeshError):
    """A configuration file or environment variable is invalid."""


class ControlError(CellmeshError):
    """The local control API failed: no node is running, or it rejected the request."""


class PeerUnreachableError(CellmeshError):
    """No session could be established with the requested CellID."""


class AccessDeniedError(CellmeshError):
    """A channel request was refused; `reason` is the stable word (docs/channels.md)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
