"""The Noise Protocol Framework (revision 34) over X25519, ChaChaPoly/AESGCM and SHA-2/BLAKE2.

Theory of operation
-------------------
The module follows the spec's three layers (section 5) one class each, with the spec's method
names so the code can be read side by side with the document:

* `CipherState` (5.1) holds a key ``k`` and a 64-bit nonce ``n`` and does AEAD with them. The
  AEAD object (`ChaCha20Poly1305` or `AESGCM`) is built once in `CipherState.initialize_key`, so a
  message costs one OpenSSL call plus a `struct` pack of the nonce.
* `SymmetricState` (5.2) holds the chaining key ``ck`` and the handshake hash ``h`` and a
  `CipherState`. Every handshake token is absorbed into ``h`` (`mix_hash`) and every DH output or
  PSK into ``ck`` through HKDF (`mix_key`, `mix_key_and_hash`); `split` derives the two transport
  keys at the end.
* `HandshakeState` (5.3) walks a handshake pattern (section 7) token by token. The pattern, DH,
  cipher and hash are all parsed out of the full protocol name (section 8), for example
  ``Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s``; PSK modifiers (section 9) are applied to the base
  pattern at parse time, so the token walker itself only knows the tokens e, s, ee, es, se, ss
  and psk.

The module is pure: no I/O and no clocks. The only randomness is `X25519PrivateKey.generate()`
(the OS CSPRNG, via OpenSSL) for an ephemeral key the caller did not inject.

`HandshakeState.read_message` is transactional: if a message fails to decode or authenticate,
the state is rolled back to what it was before the call, so a forged or corrupted handshake
message can be dropped without killing the handshake in progress. After the final message,
`HandshakeState.split` returns the spec's ``(c1, c2)`` pair; the initiator sends with ``c1`` and the
responder with ``c2`` (`HandshakeState.send_cipher` / `HandshakeState.recv_cipher` pick the right
one for the local role).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from cellmesh.errors import (
    AuthenticationError,
    LocalProtocolError,
    NonceExhaustedError,
    OversizeError,
    TruncatedError,
)

if TYPE_CHECKING:
    from _hashlib import _HashObject

__all__ = [
    "AES_GCM",
    "CHACHAPOLY",
    "CIPHERS",
    "DHLEN",
    "HASHES",
    "KEYLEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "TAGLEN",
    "CipherFunction",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "HashFunction",
    "NoiseProtocol",
    "SymmetricState",
    "hkdf",
    "parse_protocol_name",
]

DHLEN: Final = 32
"""Length of an X25519 public key and DH output (section 12.1)."""
KEYLEN: Final = 32
"""Length of a cipher key (section 4.2)."""
TAGLEN: Final = 16
"""Length of an AEAD authentication tag (section 4.2)."""
MAX_NONCE: Final = 2**64 - 1
"""The reserved nonce: encrypting with it is forbidden, it is used only by `rekey` (5.1, 11.3)."""
MAX_MESSAGE_LEN: Final = 65535
"""Upper bound on a Noise message (section 3)."""
PSKLEN: Final = 32
"""Length of a pre-shared key (section 9.1)."""

_ZEROS32: Final = bytes(32)


# --------------------------------------------------------------------------------------------
# Crypto functions (sections 4 and 12)
# --------------------------------------------------------------------------------------------


class _AEAD(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


@dataclass(frozen=True, slots=True)
class CipherFunction:
    """A Noise cipher function (section 4.2): an AEAD constructor and its nonce encoding."""

    name: str
    aead: Callable[[bytes], _AEAD]
    nonce: struct.Struct
    """Packs the 64-bit counter into the 96-bit AEAD nonce."""


CHACHAPOLY: Final = CipherFunction(
    # Section 12.3: 32 bits of zeros followed by the little-endian encoding of n.
    "ChaChaPoly",
    ChaCha20Poly1305,
    struct.Struct("<4xQ"),
)
AES_GCM: Final = CipherFunction(
    # Section 12.4: 32 bits of zeros followed by the big-endian encoding of n.
    "AESGCM",
    AESGCM,
    struct.Struct(">4xQ"),
)
CIPHERS: Final[dict[str, CipherFunction]] = {c.name: c for c in (CHACHAPOLY, AES_GCM)}


@dataclass(frozen=True, slots=True)
class HashFunction:
    """A Noise hash function (section 4.3): HASH, HASHLEN, BLOCKLEN and HMAC-HASH."""

    name: str
    new: Callable[..., _HashObject]
    hashlen: int
    blocklen: int

    def hash(self, data: bytes) -> bytes:
        """HASH(data)."""
        return self.new(data).digest()

    def hmac(self, key: bytes, data: bytes) -> bytes:
        """HMAC-HASH(key, data) per RFC 2104, using the stdlib `hmac` module."""
        return hmac.digest(key, data, self.new)


HASHES: Final[dict[str, HashFunction]] = {
    h.name: h
    for h in (
        HashFunction("SHA256", hashlib.sha256, 32, 64),  # section 12.5
        HashFunction("SHA512", hashlib.sha512, 64, 128),  # section 12.6
        HashFunction("BLAKE2s", hashlib.blake2s, 32, 64),  # section 12.7
        HashFunction("BLAKE2b", hashlib.blake2b, 64, 128),  # section 12.8
    )
}


def hkdf(hash_fn: HashFunction, chaining_key: bytes, ikm: bytes, num_outputs: int) -> list[bytes]:
    """HKDF(chaining_key, input_key_material, num_outputs) exactly as section 4.3 defines it.

    Returns `num_outputs` (2 or 3) byte strings of HASHLEN bytes each.
    """
    if num_outputs not in (2, 3):
        raise LocalProtocolError("HKDF num_outputs must be 2 or 3")
    new = hash_fn.new
    temp_key = hmac.digest(chaining_key, ikm, new)
    output1 = hmac.digest(temp_key, b"\x01", new)
    output2 = hmac.digest(temp_key, output1 + b"\x02", new)
    if num_outputs == 2:
        return [output1, output2]
    output3 = hmac.digest(temp_key, output2 + b"\x03", new)
    return [output1, output2, output3]


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """DH(key_pair, public_key) for Curve25519 (section 12.1)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        # OpenSSL refuses a low-order point (all-zero shared secret); section 12.1 allows this.
        raise AuthenticationError("X25519 with an invalid (low-order) public key") from exc


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


# --------------------------------------------------------------------------------------------
# CipherState (section 5.1)
# --------------------------------------------------------------------------------------------


class CipherState:
    """A key ``k`` (possibly empty) and a nonce ``n``, per section 5.1.

    With an empty key, `encrypt_with_ad` and `decrypt_with_ad` pass data through unchanged, as the
    spec requires during the early part of a handshake.
    """

    __slots__ = ("_aead", "_cipher", "_k", "_n", "_pack")

    def __init__(self, cipher: CipherFunction = CHACHAPOLY, key: bytes | None = None) -> None:
        """Create a CipherState for `cipher`, then `initialize_key(key)`."""
        self._cipher = cipher
        self._pack = cipher.nonce.pack
        self._k: bytes | None = None
        self._aead: _AEAD | None = None
        self._n = 0
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        """InitializeKey(key): set ``k = key`` (None means empty) and ``n = 0``."""
        if key is None:
            self._k = None
            self._aead = None
        else:
            if len(key) != KEYLEN:
                raise LocalProtocolError(f"cipher key must be {KEYLEN} bytes, got {len(key)}")
            self._k = bytes(key)
            self._aead = self._cipher.aead(self._k)  # built once per key, not per message
        self._n = 0

    def has_key(self) -> bool:
        """HasKey(): True if ``k`` is non-empty."""
        return self._aead is not None

    def set_nonce(self, nonce: int) -> None:
        """SetNonce(nonce): set ``n``, e.g. for out-of-order transport messages (section 11.4)."""
        if not 0 <= nonce <= MAX_NONCE:
            raise LocalProtocolError("nonce must be in [0, 2**64-1]")
        self._n = nonce

    @property
    def nonce(self) -> int:
        """The nonce the next encryption or decryption will use."""
        return self._n

    @property
    def key(self) -> bytes | None:
        """The current key ``k`` (None if empty). Read-only; for building a `TransportCipher`."""
        return self._k

    @property
    def cipher(self) -> CipherFunction:
        """The cipher function this state uses."""
        return self._cipher

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """EncryptWithAd(ad, plaintext): AEAD-encrypt with ``n`` then increment ``n``.

        Raises `NonceExhaustedError` once ``n`` reaches 2**64-1 (section 5.1).
        """
        aead = self._aead
        if aead is None:
            return plaintext
        n = self._n
        if n >= MAX_NONCE:
            raise NonceExhaustedError("CipherState nonce exhausted; rekey or start a new session")
        out = aead.encrypt(self._pack(n), plaintext, ad)
        self._n = n + 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """DecryptWithAd(ad, ciphertext): AEAD-decrypt with ``n`` then increment ``n``.

        Raises `AuthenticationError` on a bad tag, in which case ``n`` is not incremented.
        """
        aead = self._aead
        if aead is None:
            return ciphertext
        n = self._n
        if n >= MAX_NONCE:
            raise NonceExhaustedError("CipherState nonce exhausted; rekey or start a new session")
        try:
            out = aead.decrypt(self._pack(n), ciphertext, ad)
        except InvalidTag:
            raise AuthenticationError("AEAD tag did not verify") from None
        self._n = n + 1
        return out

    def rekey(self) -> None:
        """Rekey(): ``k = REKEY(k)``, the default of section 4.2 / 11.3; ``n`` is unchanged.

        REKEY(k) = ENCRYPT(k, 2**64-1, zerolen, zeros) truncated to 32 bytes.
        """
        aead = self._aead
        if aead is None:
            raise LocalProtocolError("cannot rekey a CipherState without a key")
        n = self._n
        new_key = aead.encrypt(self._pack(MAX_NONCE), _ZEROS32, b"")[:KEYLEN]
        self.initialize_key(new_key)
        self._n = n

    def __repr__(self) -> str:
        return f"CipherState({self._cipher.name}, has_key={self.has_key()}, n={self._n})"


# --------------------------------------------------------------------------------------------
# SymmetricState (section 5.2)
# --------------------------------------------------------------------------------------------

_Snapshot = tuple[bytes, bytes, bytes | None, _AEAD | None, int]


class SymmetricState:
    """The chaining key ``ck``, handshake hash ``h`` and a `CipherState` (section 5.2)."""

    __slots__ = ("_ck", "_cs", "_h", "_hash", "_protocol")

    def __init__(self, protocol_name: str) -> None:
        """InitializeSymmetric(protocol_name) for a full Noise protocol name."""
        protocol = parse_protocol_name(protocol_name)
        self._protocol = protocol
        self._hash = protocol.hash
        name = protocol_name.encode("ascii")
        hashlen = self._hash.hashlen
        # If the name fits in HASHLEN bytes, h = name padded with zeros; else h = HASH(name).
        self._h = name.ljust(hashlen, b"\x00") if len(name) <= hashlen else self._hash.hash(name)
        self._ck = self._h
        self._cs = CipherState(protocol.cipher)

    @classmethod
    def initialize_symmetric(cls, protocol_name: str) -> SymmetricState:
        """InitializeSymmetric(protocol_name): a fresh SymmetricState (section 5.2)."""
        return cls(protocol_name)

    @property
    def protocol(self) -> NoiseProtocol:
        """The parsed protocol name."""
        return self._protocol

    @property
    def cipher_state(self) -> CipherState:
        """The embedded CipherState."""
        return self._cs

    def has_key(self) -> bool:
        """HasKey() of the embedded CipherState."""
        return self._cs.has_key()

    def mix_key(self, input_key_material: bytes) -> None:
        """MixKey(ikm): ``ck, temp_k = HKDF(ck, ikm, 2)``; InitializeKey(temp_k[:32])."""
        self._ck, temp_k = hkdf(self._hash, self._ck, input_key_material, 2)
        self._cs.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        """MixHash(data): ``h = HASH(h || data)``."""
        self._h = self._hash.new(self._h + data).digest()

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """MixKeyAndHash(ikm): ``ck, temp_h, temp_k = HKDF(ck, ikm, 3)``; used for PSKs (9.2)."""
        self._ck, temp_h, temp_k = hkdf(self._hash, self._ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self._cs.initialize_key(temp_k[:KEYLEN])

    def get_handshake_hash(self) -> bytes:
        """GetHandshakeHash(): ``h``, for channel binding after the handshake (section 11.2)."""
        return self._h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash(plaintext): encrypt with ``h`` as AD, then MixHash(ciphertext)."""
        ciphertext = self._cs.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash(ciphertext): decrypt with ``h`` as AD, then MixHash(ciphertext)."""
        plaintext = self._cs.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Split(): ``temp_k1, temp_k2 = HKDF(ck, zerolen, 2)``; returns ``(c1, c2)``."""
        temp_k1, temp_k2 = hkdf(self._hash, self._ck, b"", 2)
        cipher = self._protocol.cipher
        return CipherState(cipher, temp_k1[:KEYLEN]), CipherState(cipher, temp_k2[:KEYLEN])

    # Rollback support for HandshakeState (not part of the spec).
    def _save(self) -> _Snapshot:
        cs = self._cs
        return (self._ck, self._h, cs._k, cs._aead, cs._n)

    def _restore(self, snap: _Snapshot) -> None:
        cs = self._cs
        self._ck, self._h, cs._k, cs._aead, cs._n = snap


# --------------------------------------------------------------------------------------------
# Handshake patterns (sections 7 and 9) and protocol names (section 8)
# --------------------------------------------------------------------------------------------

_Tokens = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """A handshake pattern: pre-messages and messages as token tuples (section 7.1).

    Message ``i`` (0-based) is sent by the initiator when ``i`` is even.
    """

    name: str
    initiator_pre: _Tokens
    responder_pre: _Tokens
    messages: tuple[_Tokens, ...]

    @property
    def one_way(self) -> bool:
        """True for the one-way patterns of section 7.4 (a single initiator message)."""
        return len(self.messages) == 1

    @property
    def psk_count(self) -> int:
        """How many "psk" tokens the pattern contains."""
        return sum(m.count("psk") for m in self.messages)

    @property
    def has_psk(self) -> bool:
        """True if the pattern carries PSK modifiers (section 9)."""
        return self.psk_count > 0


def _p(
    initiator_pre: str, responder_pre: str, *messages: str
) -> tuple[_Tokens, _Tokens, tuple[_Tokens, ...]]:
    def toks(s: str) -> _Tokens:
        return tuple(t.strip() for t in s.split(",") if t.strip())

    return toks(initiator_pre), toks(responder_pre), tuple(toks(m) for m in messages)


# Section 7.4 (one-way) and 7.5 (interactive, fundamental). Messages alternate ->, <-, ->.
_BASE_PATTERNS: Final[dict[str, tuple[_Tokens, _Tokens, tuple[_Tokens, ...]]]] = {
    "N": _p("", "s", "e, es"),
    "K": _p("s", "s", "e, es, ss"),
    "X": _p("", "s", "e, es, s, ss"),
    "NN": _p("", "", "e", "e, ee"),
    "NK": _p("", "s", "e, es", "e, ee"),
    "NX": _p("", "", "e", "e, ee, s, es"),
    "XN": _p("", "", "e", "e, ee", "s, se"),
    "XK": _p("", "s", "e, es", "e, ee", "s, se"),
    "XX": _p("", "", "e", "e, ee, s, es", "s, se"),
    "KN": _p("s", "", "e", "e, ee, se"),
    "KK": _p("s", "s", "e, es, ss", "e, ee, se"),
    "KX": _p("s", "", "e", "e, ee, se, s, es"),
    "IN": _p("", "", "e, s", "e, ee, se"),
    "IK": _p("", "s", "e, es, s, ss", "e, ee, se"),
    "IX": _p("", "", "e, s", "e, ee, se, s, es"),
}


_PSK_MODIFIER: Final = re.compile(r"psk(?:0|[1-9][0-9]?)")


def _parse_pattern(name: str) -> HandshakePattern:
    """Parse a pattern name section such as ``XX``, ``IKpsk2`` or ``NNpsk0+psk2`` (8.1, 9.4)."""
    cut = next((i for i, ch in enumerate(name) if ch.islower()), len(name))
    base, modifier_str = name[:cut], name[cut:]
    if base not in _BASE_PATTERNS:
        raise LocalProtocolError(f"unsupported handshake pattern {base!r}")
    initiator_pre, responder_pre, base_messages = _BASE_PATTERNS[base]
    messages = [list(m) for m in base_messages]
    modifiers = modifier_str.split("+") if modifier_str else []
    if len(set(modifiers)) != len(modifiers):
        raise LocalProtocolError(f"repeated modifier in {name!r}")
    for mod in modifiers:
        if _PSK_MODIFIER.fullmatch(mod) is None:
            raise LocalProtocolError(f"unsupported pattern modifier {mod!r}")
        pos = int(mod[3:])
        if pos > len(messages):
            raise LocalProtocolError(f"{mod} is past the last message of {base}")
        # Section 9.4: psk0 goes at the start of the first message, pskN at the end of message N.
        if pos == 0:
            messages[0].insert(0, "psk")
        else:
            messages[pos - 1].append("psk")
    return HandshakePattern(name, initiator_pre, responder_pre, tuple(tuple(m) for m in messages))


@dataclass(frozen=True, slots=True)
class NoiseProtocol:
    """A parsed protocol name: ``Noise_<pattern>_<DH>_<cipher>_<hash>`` (section 8)."""

    name: str
    pattern: HandshakePattern
    dh: str
    cipher: CipherFunction
    hash: HashFunction


@lru_cache(maxsize=128)
def parse_protocol_name(protocol_name: str) -> NoiseProtocol:
    """Parse a full protocol name such as ``Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s``.

    Raises `LocalProtocolError` for anything this module does not implement (448, fallback, hfs,
    deferred patterns, unknown algorithms).
    """
    parts = protocol_name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise LocalProtocolError(f"not a Noise protocol name: {protocol_name!r}")
    _, pattern_name, dh, cipher_name, hash_name = parts
    if dh != "25519":
        raise LocalProtocolError(f"unsupported DH function {dh!r} (only 25519)")
    cipher = CIPHERS.get(cipher_name)
    if cipher is None:
        raise LocalProtocolError(f"unsupported cipher {cipher_name!r}")
    hash_fn = HASHES.get(hash_name)
    if hash_fn is None:
        raise LocalProtocolError(f"unsupported hash {hash_name!r}")
    return NoiseProtocol(protocol_name, _parse_pattern(pattern_name), dh, cipher, hash_fn)


# --------------------------------------------------------------------------------------------
# HandshakeState (section 5.3)
# --------------------------------------------------------------------------------------------


_HandshakeSnapshot = tuple[
    _Snapshot, X25519PrivateKey | None, bytes | None, bytes | None, bytes | None, int
]


class HandshakeState:
    """Runs one Noise handshake for one party (section 5.3).

    Call `write_message` and `read_message` in the order the pattern dictates (`is_my_turn` says
    which); once `is_complete` is true, use `send_cipher` / `recv_cipher` (or `split`) for
    transport messages, and `handshake_hash` for channel binding.
    """

    __slots__ = (
        "_complete",
        "_e",
        "_e_pub",
        "_initiator",
        "_msg_index",
        "_pattern",
        "_psk_index",
        "_psks",
        "_re",
        "_rs",
        "_s",
        "_s_pub",
        "_split",
        "_ss",
    )

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        prologue: bytes = b"",
        s: X25519PrivateKey | None = None,
        e: X25519PrivateKey | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        """Initialize(handshake_pattern, initiator, prologue, s, e, rs, re) of section 5.3.

        `protocol_name` is the full name (it selects pattern, DH, cipher and hash). `s` is the
        local static key, `e` an injected ephemeral key (test vectors only; by default a fresh
        one is generated from the OS CSPRNG when the pattern sends "e"), `rs`/`re` the remote
        public keys known in advance (only those the pattern's pre-messages name), and `psks`
        the pre-shared keys in the order their "psk" tokens occur.
        """
        ss = SymmetricState(protocol_name)
        pattern = ss.protocol.pattern
        self._ss = ss
        self._pattern = pattern
        self._initiator = bool(initiator)
        self._s = s
        self._s_pub = _public_bytes(s) if s is not None else None
        self._e = e
        self._e_pub = _public_bytes(e) if e is not None else None
        self._rs = _check_public(rs, "rs")
        self._re = _check_public(re, "re")
        self._msg_index = 0
        self._complete = False
        self._split: tuple[CipherState, CipherState] | None = None

        # Validate the keys against what the pattern needs (a programming error otherwise).
        local_pre = pattern.initiator_pre if self._initiator else pattern.responder_pre
        remote_pre = pattern.responder_pre if self._initiator else pattern.initiator_pre
        if s is None and _needs_local_static(pattern, self._initiator):
            raise LocalProtocolError(f"{pattern.name} needs a local static key s")
        if "e" in local_pre and e is None:
            raise LocalProtocolError(f"{pattern.name} needs a local ephemeral key e")
        for token, value in (("s", self._rs), ("e", self._re)):
            if token in remote_pre and value is None:
                raise LocalProtocolError(f"{pattern.name} needs the remote key r{token}")
            if token not in remote_pre and value is not None:
                raise LocalProtocolError(
                    f"r{token} was given but {pattern.name} does not pre-know it; "
                    "compare remote_static after the handshake instead"
                )
        psk_list = [bytes(p) for p in psks]
        if len(psk_list) != pattern.psk_count:
            raise LocalProtocolError(
                f"{pattern.name} takes {pattern.psk_count} PSK(s), got {len(psk_list)}"
            )
        if any(len(p) != PSKLEN for p in psk_list):
            raise LocalProtocolError(f"each PSK must be {PSKLEN} bytes")
        self._psks = psk_list
        self._psk_index = 0

        # Section 5.3: MixHash(prologue), then the pre-message public keys, initiator's first.
        ss.mix_hash(bytes(prologue))
        for owner_is_initiator, tokens in (
            (True, pattern.initiator_pre),
            (False, pattern.responder_pre),
        ):
            local = owner_is_initiator == self._initiator
            for token in tokens:
                key = (
                    (self._s_pub if token == "s" else self._e_pub)
                    if local
                    else (self._rs if token == "s" else self._re)
                )
                assert key is not None  # checked above
                ss.mix_hash(key)
                if token == "e" and pattern.has_psk:
                    ss.mix_key(key)  # section 9.2: "e" also calls MixKey when PSKs are in use

    @classmethod
    def initialize(
        cls,
        protocol_name: str,
        initiator: bool,
        prologue: bytes = b"",
        s: X25519PrivateKey | None = None,
        e: X25519PrivateKey | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> HandshakeState:
        """Initialize(...) (section 5.3); same arguments as the constructor."""
        return cls(protocol_name, initiator, prologue, s=s, e=e, rs=rs, re=re, psks=psks)

    # ---- read-only state ------------------------------------------------------------------

    @property
    def protocol_name(self) -> str:
        """The full protocol name this handshake runs."""
        return self._ss.protocol.name

    @property
    def pattern(self) -> HandshakePattern:
        """The parsed handshake pattern, PSK modifiers applied."""
        return self._pattern

    @property
    def initiator(self) -> bool:
        """True for the initiator role."""
        return self._initiator

    @property
    def is_complete(self) -> bool:
        """True once every handshake message has been written or read."""
        return self._complete

    @property
    def is_my_turn(self) -> bool:
        """True if the next call must be `write_message`, False if `read_message` (or done)."""
        if self._complete:
            return False
        return (self._msg_index % 2 == 0) == self._initiator

    @property
    def remote_static(self) -> bytes | None:
        """The remote party's static public key, if known (pre-message or learned)."""
        return self._rs

    @property
    def remote_ephemeral(self) -> bytes | None:
        """The remote party's ephemeral public key, if known."""
        return self._re

    @property
    def local_static_public(self) -> bytes | None:
        """The local static public key, if any."""
        return self._s_pub

    @property
    def handshake_hash(self) -> bytes:
        """GetHandshakeHash() once the handshake is complete (section 11.2, channel binding)."""
        if not self._complete:
            raise LocalProtocolError("handshake hash is only final once the handshake completes")
        return self._ss.get_handshake_hash()

    def split(self) -> tuple[CipherState, CipherState]:
        """The spec's ``(c1, c2)`` from Split(): initiator sends with c1, responder with c2.

        The same two objects are returned on every call (they carry the nonce counters).
        """
        if self._split is None:
            raise LocalProtocolError("handshake is not complete")
        return self._split

    @property
    def send_cipher(self) -> CipherState:
        """The CipherState this party encrypts transport messages with."""
        c1, c2 = self.split()
        if self._initiator:
            return c1
        if self._pattern.one_way:
            raise LocalProtocolError("the responder of a one-way pattern must not send")
        return c2

    @property
    def recv_cipher(self) -> CipherState:
        """The CipherState this party decrypts transport messages with."""
        c1, c2 = self.split()
        if not self._initiator:
            return c1
        if self._pattern.one_way:
            raise LocalProtocolError("the initiator of a one-way pattern never receives")
        return c2

    # ---- message processing ---------------------------------------------------------------

    def _next_pattern(self, writing: bool) -> _Tokens:
        if self._complete:
            raise LocalProtocolError("handshake already complete")
        if self.is_my_turn != writing:
            verb = "write" if writing else "read"
            raise LocalProtocolError(f"not our turn to {verb} a handshake message")
        return self._pattern.messages[self._msg_index]

    def _dh_for(self, token: str) -> bytes:
        # Section 5.3: "es" is DH(e, rs) for the initiator and DH(s, re) for the responder, and
        # symmetrically for "se"; "ee" and "ss" are the same for both roles.
        ini = self._initiator
        if token == "ee":
            local, remote = self._e, self._re
        elif token == "ss":
            local, remote = self._s, self._rs
        elif token == "es":
            local, remote = (self._e, self._rs) if ini else (self._s, self._re)
        else:  # "se"
            local, remote = (self._s, self._re) if ini else (self._e, self._rs)
        if local is None or remote is None:  # unreachable for the built-in patterns
            raise LocalProtocolError(f"missing key for token {token!r}")
        return _dh(local, remote)

    def _save(self) -> _HandshakeSnapshot:
        return (
            self._ss._save(),
            self._e,
            self._e_pub,
            self._re,
            self._rs,
            self._psk_index,
        )

    def _restore(self, snap: _HandshakeSnapshot) -> None:
        ss_snap, self._e, self._e_pub, self._re, self._rs, self._psk_index = snap
        self._ss._restore(ss_snap)

    def _advance(self) -> None:
        self._msg_index += 1
        if self._msg_index == len(self._pattern.messages):
            self._complete = True
            self._split = self._ss.split()

    def write_message(self, payload: bytes = b"") -> bytes:
        """WriteMessage(payload): the next handshake message, to send to the peer (5.3).

        Raises `LocalProtocolError` when called out of turn, after completion, or if the message
        would exceed 65535 bytes (section 3).
        """
        tokens = self._next_pattern(writing=True)
        snap = self._save()
        ss = self._ss
        psk_mode = self._pattern.has_psk
        out: list[bytes] = []
        try:
            for token in tokens:
                if token == "e":
                    if self._e is None:
                        self._e = X25519PrivateKey.generate()
                        self._e_pub = _public_bytes(self._e)
                    e_pub = self._e_pub
                    assert e_pub is not None
                    out.append(e_pub)
                    ss.mix_hash(e_pub)
                    if psk_mode:
                        ss.mix_key(e_pub)  # section 9.2
                elif token == "s":
                    assert self._s_pub is not None  # checked in __init__
                    out.append(ss.encrypt_and_hash(self._s_pub))
                elif token == "psk":
                    ss.mix_key_and_hash(self._psks[self._psk_index])
                    self._psk_index += 1
                else:
                    ss.mix_key(self._dh_for(token))
            out.append(ss.encrypt_and_hash(bytes(payload)))
            message = b"".join(out)
            if len(message) > MAX_MESSAGE_LEN:
                raise LocalProtocolError(
                    f"handshake message would be {len(message)} bytes (max {MAX_MESSAGE_LEN})"
                )
        except BaseException:
            self._restore(snap)
            raise
        self._advance()
        return message

    def read_message(self, message: bytes) -> bytes:
        """ReadMessage(message): process a handshake message from the peer; return its payload.

        Transactional: on any error the state is unchanged, so a bad message can be dropped.
        Raises `TruncatedError` if the message is too short for the pattern, `OversizeError` if
        over 65535 bytes, `AuthenticationError` if a tag does not verify (or a DH input is a
        low-order point), `LocalProtocolError` when called out of turn or after completion.
        """
        tokens = self._next_pattern(writing=False)
        message = bytes(message)
        if len(message) > MAX_MESSAGE_LEN:
            raise OversizeError(
                f"handshake message of {len(message)} bytes (max {MAX_MESSAGE_LEN})"
            )
        snap = self._save()
        ss = self._ss
        psk_mode = self._pattern.has_psk
        pos = 0
        try:
            for token in tokens:
                if token == "e":
                    end = pos + DHLEN
                    if end > len(message):
                        raise TruncatedError("handshake message too short for an ephemeral key")
                    remote_e = message[pos:end]
                    pos = end
                    self._re = remote_e
                    ss.mix_hash(remote_e)
                    if psk_mode:
                        ss.mix_key(remote_e)  # section 9.2
                elif token == "s":
                    end = pos + DHLEN + (TAGLEN if ss.has_key() else 0)
                    if end > len(message):
                        raise TruncatedError("handshake message too short for a static key")
                    self._rs = ss.decrypt_and_hash(message[pos:end])
                    pos = end
                elif token == "psk":
                    ss.mix_key_and_hash(self._psks[self._psk_index])
                    self._psk_index += 1
                else:
                    ss.mix_key(self._dh_for(token))
            rest = message[pos:]
            if ss.has_key() and len(rest) < TAGLEN:
                raise TruncatedError("handshake message too short for the payload tag")
            payload = ss.decrypt_and_hash(rest)
        except BaseException:
            self._restore(snap)
            raise
        self._advance()
        return payload

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "responder"
        return (
            f"HandshakeState({self.protocol_name!r}, {role}, "
            f"message={self._msg_index}/{len(self._pattern.messages)})"
        )


def _needs_local_static(pattern: HandshakePattern, initiator: bool) -> bool:
    """True if this role of `pattern` uses its own static key anywhere."""
    if "s" in (pattern.initiator_pre if initiator else pattern.responder_pre):
        return True
    parity = 0 if initiator else 1
    # "es" uses the local s on the responder side, "se" on the initiator side; "ss" on both.
    own_dh = "se" if initiator else "es"
    for i, tokens in enumerate(pattern.messages):
        for token in tokens:
            if token in ("ss", own_dh) or (token == "s" and i % 2 == parity):
                return True
    return False


def _check_public(key: bytes | None, what: str) -> bytes | None:
    if key is None:
        return None
    key = bytes(key)
    if len(key) != DHLEN:
        raise LocalProtocolError(f"{what} must be a {DHLEN}-byte X25519 public key")
    return key
