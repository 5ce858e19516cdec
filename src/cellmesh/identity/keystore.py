"""Encode and decode keystore file contents (pure: the file I/O lives in `cellmesh.node.home`).

A keystore is a UTF-8 JSON object::

    {
      "format": "cellmesh-keystore",
      "version": 1,
      "cell_id": "<32 hex>",
      "public_key": "<64 hex>",
      "encryption": "none" | "argon2id-xsalsa20poly1305",
      "kdf": {"salt": "<32 hex>", "opslimit": <int>, "memlimit": <int>},   # encrypted only
      "secret": "<hex>"
    }

`secret` is `Identity.secret_bytes()` (64 bytes) in the clear, or, when encrypted, the
`nacl.secret.SecretBox` output (24-byte nonce || ciphertext || 16-byte tag = 104 bytes) under a
key derived from the passphrase with Argon2id. `cell_id` and `public_key` are kept in the clear
so tools can show who a keystore belongs to without the passphrase; after decoding they are
checked against the secret, so editing them is detected.

Every failure raises `KeystoreError` with a specific one-line message that never contains
secret material.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Final

import nacl.exceptions
import nacl.pwhash.argon2id
import nacl.secret
import nacl.utils

from cellmesh.errors import KeystoreError
from cellmesh.identity.cellid import CELL_ID_LEN, CellId, cell_id_from_public_key
from cellmesh.identity.keys import ED25519_PUBLIC_KEY_LEN, IDENTITY_SECRET_LEN, Identity

__all__ = [
    "DEFAULT_MEMLIMIT",
    "DEFAULT_OPSLIMIT",
    "ENCRYPTION_ARGON2ID",
    "ENCRYPTION_NONE",
    "KEYSTORE_FORMAT",
    "KEYSTORE_VERSION",
    "MAX_KEYSTORE_BYTES",
    "MAX_MEMLIMIT",
    "MAX_OPSLIMIT",
    "MIN_MEMLIMIT",
    "MIN_OPSLIMIT",
    "PASSPHRASE_REQUIRED_MESSAGE",
    "KeystoreInfo",
    "decode_keystore",
    "encode_keystore",
    "keystore_info",
    "keystore_is_encrypted",
]

KEYSTORE_FORMAT: Final = "cellmesh-keystore"
KEYSTORE_VERSION: Final = 1
ENCRYPTION_NONE: Final = "none"
ENCRYPTION_ARGON2ID: Final = "argon2id-xsalsa20poly1305"

DEFAULT_OPSLIMIT: Final[int] = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
"""Argon2id passes for new keystores (libsodium MODERATE)."""
DEFAULT_MEMLIMIT: Final[int] = nacl.pwhash.argon2id.MEMLIMIT_MODERATE
"""Argon2id memory for new keystores (libsodium MODERATE, 256 MiB)."""

MIN_OPSLIMIT: Final[int] = nacl.pwhash.argon2id.OPSLIMIT_MIN
MIN_MEMLIMIT: Final[int] = nacl.pwhash.argon2id.MEMLIMIT_MIN
MAX_OPSLIMIT: Final[int] = 64
"""Largest opslimit a keystore may ask for (bounds the work a hostile file can cause)."""
MAX_MEMLIMIT: Final[int] = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
"""Largest memlimit a keystore may ask for (1 GiB; bounds a hostile file's memory demand)."""

MAX_KEYSTORE_BYTES: Final = 64 * 1024
"""Keystores larger than this are rejected before parsing."""

PASSPHRASE_REQUIRED_MESSAGE: Final = (
    "keystore is encrypted; pass --passphrase-file or set CELLMESH_PASSPHRASE"
)

_SALT_LEN: Final[int] = nacl.pwhash.argon2id.SALTBYTES
_BOX_OVERHEAD: Final[int] = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES
_ENCRYPTED_SECRET_LEN: Final[int] = IDENTITY_SECRET_LEN + _BOX_OVERHEAD
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})*")

_REQUIRED_FIELDS: Final = ("format", "version", "cell_id", "public_key", "encryption", "secret")
_KNOWN_FIELDS: Final = frozenset((*_REQUIRED_FIELDS, "kdf"))
_KDF_FIELDS: Final = frozenset(("salt", "opslimit", "memlimit"))


@dataclass(frozen=True, slots=True)
class KeystoreInfo:
    """What a keystore says about itself without the passphrase (checked for consistency)."""

    cell_id: CellId
    public_key: bytes
    encrypted: bool


def _check_limits(opslimit: int, memlimit: int) -> None:
    if isinstance(opslimit, bool) or not isinstance(opslimit, int):
        raise KeystoreError("kdf opslimit must be an integer")
    if isinstance(memlimit, bool) or not isinstance(memlimit, int):
        raise KeystoreError("kdf memlimit must be an integer")
    if not MIN_OPSLIMIT <= opslimit <= MAX_OPSLIMIT:
        raise KeystoreError(
            f"kdf opslimit must be between {MIN_OPSLIMIT} and {MAX_OPSLIMIT}, got {opslimit}"
        )
    if not MIN_MEMLIMIT <= memlimit <= MAX_MEMLIMIT:
        raise KeystoreError(
            f"kdf memlimit must be between {MIN_MEMLIMIT} and {MAX_MEMLIMIT} bytes, got {memlimit}"
        )


def _derive_key(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit
    )


def encode_keystore(
    identity: Identity,
    passphrase: bytes | None,
    *,
    opslimit: int = DEFAULT_OPSLIMIT,
    memlimit: int = DEFAULT_MEMLIMIT,
) -> bytes:
    """Serialise `identity` as keystore file contents (UTF-8 JSON, trailing newline).

    With a passphrase the secret is sealed with XSalsa20-Poly1305 under an Argon2id key
    (`opslimit`/`memlimit`; tests should pass the INTERACTIVE limits). With `None` the secret
    is stored in the clear. Raises `KeystoreError` for an empty passphrase or limits out of range.
    """
    if not isinstance(identity, Identity):
        raise TypeError("identity must be an Identity")
    doc: dict[str, Any] = {
        "format": KEYSTORE_FORMAT,
        "version": KEYSTORE_VERSION,
        "cell_id": identity.cell_id.hex(),
        "public_key": identity.public_key.hex(),
    }
    secret = identity.secret_bytes()
    if passphrase is None:
        doc["encryption"] = ENCRYPTION_NONE
        doc["secret"] = secret.hex()
    else:
        if not isinstance(passphrase, bytes | bytearray):
            raise TypeError("passphrase must be bytes or None")
        if len(passphrase) == 0:
            raise KeystoreError(
                "passphrase must not be empty (omit it to store the key unencrypted)"
            )
        _check_limits(opslimit, memlimit)
        salt = nacl.utils.random(_SALT_LEN)
        key = _derive_key(bytes(passphrase), salt, opslimit, memlimit)
        sealed = bytes(nacl.secret.SecretBox(key).encrypt(secret))
        doc["encryption"] = ENCRYPTION_ARGON2ID
        doc["kdf"] = {"salt": salt.hex(), "opslimit": opslimit, "memlimit": memlimit}
        doc["secret"] = sealed.hex()
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise KeystoreError(f"keystore has duplicate field {key!r}")
        out[key] = value
    return out


def _parse_json(data: bytes) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("keystore data must be bytes")
    if len(data) > MAX_KEYSTORE_BYTES:
        raise KeystoreError(
            f"keystore is too large ({len(data)} bytes; at most {MAX_KEYSTORE_BYTES})"
        )
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise KeystoreError("keystore is not valid UTF-8") from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise KeystoreError(
            f"keystore is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except (ValueError, RecursionError):
        raise KeystoreError("keystore is not valid JSON") from None
    if not isinstance(doc, dict):
        raise KeystoreError(f"keystore must be a JSON object, got {_json_type(doc)}")
    return doc


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _get_str(doc: dict[str, Any], key: str, where: str = "") -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise KeystoreError(
            f"keystore field {where + key!r} must be a string, got {_json_type(value)}"
        )
    return value


def _get_int(doc: dict[str, Any], key: str, where: str = "") -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise KeystoreError(
            f"keystore field {where + key!r} must be an integer, got {_json_type(value)}"
        )
    return value


def _get_hex(doc: dict[str, Any], key: str, length: int, where: str = "") -> bytes:
    text = _get_str(doc, key, where)
    if not _HEX_RE.fullmatch(text):
        raise KeystoreError(f"keystore field {where + key!r} is not valid hex")
    raw = bytes.fromhex(text)
    if len(raw) != length:
        raise KeystoreError(
            f"keystore field {where + key!r} has the wrong length "
            f"({len(raw)} bytes, expected {length})"
        )
    return raw


@dataclass(frozen=True, slots=True)
class _Parsed:
    info: KeystoreInfo
    secret: bytes
    salt: bytes
    opslimit: int
    memlimit: int


def _parse(data: bytes) -> _Parsed:
    doc = _parse_json(data)
    for key in _REQUIRED_FIELDS:
        if key not in doc:
            raise KeystoreError(f"keystore is missing field {key!r}")
    unknown = sorted(set(doc) - _KNOWN_FIELDS)
    if unknown:
        raise KeystoreError(f"keystore has unknown field {unknown[0]!r}")

    fmt = _get_str(doc, "format")
    if fmt != KEYSTORE_FORMAT:
        raise KeystoreError(
            f"not a cellmesh keystore (format is {fmt[:40]!r}, expected {KEYSTORE_FORMAT!r})"
        )
    version = _get_int(doc, "version")
    if version != KEYSTORE_VERSION:
        raise KeystoreError(
            f"unsupported keystore version {version} (this build reads version {KEYSTORE_VERSION})"
        )
    encryption = _get_str(doc, "encryption")
    if encryption not in (ENCRYPTION_NONE, ENCRYPTION_ARGON2ID):
        raise KeystoreError(
            f"unsupported keystore encryption {encryption[:40]!r} "
            f"(expected {ENCRYPTION_NONE!r} or {ENCRYPTION_ARGON2ID!r})"
        )
    encrypted = encryption == ENCRYPTION_ARGON2ID

    cell_id = CellId(_get_hex(doc, "cell_id", CELL_ID_LEN))
    public_key = _get_hex(doc, "public_key", ED25519_PUBLIC_KEY_LEN)
    if not hmac.compare_digest(cell_id_from_public_key(public_key), cell_id):
        raise KeystoreError("keystore cell_id does not match its public_key (file was modified)")

    salt = b""
    opslimit = memlimit = 0
    if encrypted:
        if "kdf" not in doc:
            raise KeystoreError("keystore is missing field 'kdf'")
        kdf = doc["kdf"]
        if not isinstance(kdf, dict):
            raise KeystoreError(f"keystore field 'kdf' must be an object, got {_json_type(kdf)}")
        for key in sorted(_KDF_FIELDS):
            if key not in kdf:
                raise KeystoreError(f"keystore is missing field 'kdf.{key}'")
        unknown = sorted(set(kdf) - _KDF_FIELDS)
        if unknown:
            raise KeystoreError(f"keystore has unknown field 'kdf.{unknown[0]}'")
        salt = _get_hex(kdf, "salt", _SALT_LEN, "kdf.")
        opslimit = _get_int(kdf, "opslimit", "kdf.")
        memlimit = _get_int(kdf, "memlimit", "kdf.")
        _check_limits(opslimit, memlimit)
        secret = _get_hex(doc, "secret", _ENCRYPTED_SECRET_LEN)
    else:
        if "kdf" in doc:
            raise KeystoreError(
                "keystore field 'kdf' is only allowed when the keystore is encrypted"
            )
        secret = _get_hex(doc, "secret", IDENTITY_SECRET_LEN)

    return _Parsed(KeystoreInfo(cell_id, public_key, encrypted), secret, salt, opslimit, memlimit)


def keystore_info(data: bytes) -> KeystoreInfo:
    """Return the CellID, public key and encryption flag of a keystore without decrypting it.

    The whole structure is validated (as by `decode_keystore`), but the secret is not checked
    against the public key, so treat the result as a claim until `decode_keystore` succeeds.
    Raises `KeystoreError` if the contents are not a well-formed keystore.
    """
    return _parse(data).info


def keystore_is_encrypted(data: bytes) -> bool:
    """True if the keystore needs a passphrase. Raises `KeystoreError` if it is malformed."""
    return _parse(data).info.encrypted


def decode_keystore(data: bytes, passphrase: bytes | None) -> Identity:
    """Parse keystore file contents and return the identity inside.

    `passphrase` is needed only for encrypted keystores (it is ignored for plain ones).
    Raises `KeystoreError` with a specific one-line message if the contents are malformed,
    tampered with, encrypted without a passphrase being given, or the passphrase is wrong.
    """
    parsed = _parse(data)
    secret = parsed.secret
    if parsed.info.encrypted:
        if passphrase is None:
            raise KeystoreError(PASSPHRASE_REQUIRED_MESSAGE)
        if not isinstance(passphrase, bytes | bytearray):
            raise TypeError("passphrase must be bytes or None")
        key = _derive_key(bytes(passphrase), parsed.salt, parsed.opslimit, parsed.memlimit)
        try:
            secret = nacl.secret.SecretBox(key).decrypt(secret)
        except nacl.exceptions.CryptoError:
            raise KeystoreError("wrong passphrase (the keystore could not be decrypted)") from None
    identity = Identity.from_secret(secret)
    if not hmac.compare_digest(identity.public_key, parsed.info.public_key):
        raise KeystoreError("keystore public_key does not match its secret (file was modified)")
    return identity
