"""Tests for cellmesh.identity.keystore."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import nacl.pwhash.argon2id as argon2id
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmesh.errors import KeystoreError
from cellmesh.identity.keys import Identity
from cellmesh.identity.keystore import (
    ENCRYPTION_ARGON2ID,
    ENCRYPTION_NONE,
    KEYSTORE_FORMAT,
    PASSPHRASE_REQUIRED_MESSAGE,
    decode_keystore,
    encode_keystore,
    keystore_info,
    keystore_is_encrypted,
)

FAST = {"opslimit": argon2id.OPSLIMIT_INTERACTIVE, "memlimit": argon2id.MEMLIMIT_INTERACTIVE}
PASSPHRASE = b"correct horse battery staple"

IDENT = Identity.from_secret(bytes(range(64)))
OTHER = Identity.from_secret(bytes(range(64, 128)))
PLAIN = encode_keystore(IDENT, None)


@pytest.fixture(scope="module")
def encrypted() -> bytes:
    return encode_keystore(IDENT, PASSPHRASE, **FAST)


def _doc(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    assert isinstance(doc, dict)
    return doc


def _dump(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_plain_round_trip() -> None:
    doc = _doc(PLAIN)
    assert doc == {
        "format": KEYSTORE_FORMAT,
        "version": 1,
        "cell_id": IDENT.cell_id.hex(),
        "public_key": IDENT.public_key.hex(),
        "encryption": ENCRYPTION_NONE,
        "secret": IDENT.secret_bytes().hex(),
    }
    assert PLAIN.endswith(b"\n")
    assert decode_keystore(PLAIN, None) == IDENT
    assert decode_keystore(PLAIN, b"ignored for plain keystores") == IDENT
    assert not keystore_is_encrypted(PLAIN)


def test_encrypted_round_trip(encrypted: bytes) -> None:
    doc = _doc(encrypted)
    assert doc["encryption"] == ENCRYPTION_ARGON2ID
    assert doc["kdf"]["opslimit"] == FAST["opslimit"]
    assert doc["kdf"]["memlimit"] == FAST["memlimit"]
    assert len(bytes.fromhex(doc["kdf"]["salt"])) == 16
    assert len(bytes.fromhex(doc["secret"])) == 24 + 64 + 16
    assert IDENT.secret_bytes().hex() not in encrypted.decode()
    assert IDENT.secret_bytes()[:32].hex() not in encrypted.decode()
    assert keystore_is_encrypted(encrypted)
    assert decode_keystore(encrypted, PASSPHRASE) == IDENT


def test_keystore_info_without_passphrase(encrypted: bytes) -> None:
    info = keystore_info(encrypted)
    assert info.cell_id == IDENT.cell_id
    assert info.public_key == IDENT.public_key
    assert info.encrypted


def test_encryption_uses_fresh_salt_and_nonce() -> None:
    a = _doc(encode_keystore(IDENT, PASSPHRASE, **FAST))
    b = _doc(encode_keystore(IDENT, PASSPHRASE, **FAST))
    assert a["kdf"]["salt"] != b["kdf"]["salt"]
    assert a["secret"] != b["secret"]


def test_wrong_passphrase(encrypted: bytes) -> None:
    with pytest.raises(KeystoreError, match=r"^wrong passphrase"):
        decode_keystore(encrypted, b"not it")


def test_passphrase_required(encrypted: bytes) -> None:
    with pytest.raises(KeystoreError) as info:
        decode_keystore(encrypted, None)
    assert str(info.value) == PASSPHRASE_REQUIRED_MESSAGE
    assert str(info.value) == (
        "keystore is encrypted; pass --passphrase-file or set CELLMESH_PASSPHRASE"
    )


def test_empty_passphrase_refused() -> None:
    with pytest.raises(KeystoreError, match="passphrase must not be empty"):
        encode_keystore(IDENT, b"", **FAST)


@pytest.mark.parametrize(
    ("opslimit", "memlimit", "match"),
    [
        (0, argon2id.MEMLIMIT_INTERACTIVE, "opslimit"),
        (1000, argon2id.MEMLIMIT_INTERACTIVE, "opslimit"),
        (2, 1, "memlimit"),
        (2, 1 << 40, "memlimit"),
    ],
)
def test_encode_rejects_bad_limits(opslimit: int, memlimit: int, match: str) -> None:
    with pytest.raises(KeystoreError, match=match):
        encode_keystore(IDENT, PASSPHRASE, opslimit=opslimit, memlimit=memlimit)


def _set(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc[key] = value

    return mutate


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        del doc[key]

    return mutate


PLAIN_CORRUPTIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("wrong format", _set("format", "something-else"), "not a cellmesh keystore"),
    ("format not str", _set("format", 7), "field 'format' must be a string, got number"),
    ("future version", _set("version", 2), "unsupported keystore version 2"),
    ("version str", _set("version", "1"), "field 'version' must be an integer, got string"),
    ("version bool", _set("version", True), "field 'version' must be an integer, got boolean"),
    ("version float", _set("version", 1.0), "field 'version' must be an integer, got number"),
    ("no format", _delete("format"), "missing field 'format'"),
    ("no version", _delete("version"), "missing field 'version'"),
    ("no cell_id", _delete("cell_id"), "missing field 'cell_id'"),
    ("no public_key", _delete("public_key"), "missing field 'public_key'"),
    ("no encryption", _delete("encryption"), "missing field 'encryption'"),
    ("no secret", _delete("secret"), "missing field 'secret'"),
    ("unknown field", _set("extra", 1), "unknown field 'extra'"),
    ("bad encryption", _set("encryption", "rot13"), "unsupported keystore encryption 'rot13'"),
    ("secret null", _set("secret", None), "field 'secret' must be a string, got null"),
    ("secret not hex", _set("secret", "zz" * 64), "field 'secret' is not valid hex"),
    ("secret odd hex", _set("secret", "a" * 127), "field 'secret' is not valid hex"),
    ("secret spaces", _set("secret", "aa " * 64), "field 'secret' is not valid hex"),
    (
        "secret short",
        _set("secret", "aa" * 63),
        "field 'secret' has the wrong length (63 bytes, expected 64)",
    ),
    (
        "secret long",
        _set("secret", "aa" * 65),
        "field 'secret' has the wrong length (65 bytes, expected 64)",
    ),
    ("cell_id bad hex", _set("cell_id", "xy" * 16), "field 'cell_id' is not valid hex"),
    ("cell_id short", _set("cell_id", "00" * 15), "field 'cell_id' has the wrong length"),
    (
        "cell_id tampered",
        _set("cell_id", OTHER.cell_id.hex()),
        "cell_id does not match its public_key",
    ),
    (
        "public key and cell id swapped",
        lambda d: d.update(cell_id=OTHER.cell_id.hex(), public_key=OTHER.public_key.hex()),
        "public_key does not match its secret",
    ),
    (
        "secret swapped",
        _set("secret", OTHER.secret_bytes().hex()),
        "public_key does not match its secret",
    ),
    (
        "kdf on plain keystore",
        _set("kdf", {"salt": "00" * 16, "opslimit": 2, "memlimit": 8192}),
        "'kdf' is only allowed when the keystore is encrypted",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [pytest.param(m, msg, id=name) for name, m, msg in PLAIN_CORRUPTIONS],
)
def test_plain_corruption(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    doc = _doc(PLAIN)
    mutate(doc)
    with pytest.raises(KeystoreError) as info:
        decode_keystore(_dump(doc), None)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert IDENT.secret_bytes().hex() not in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON (line 1, column 1"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[]", "must be a JSON object, got array"),
        (b"42", "must be a JSON object, got number"),
        (b'"keystore"', "must be a JSON object, got string"),
        (b"null", "must be a JSON object, got null"),
        (b"[" * 50_000, "not valid JSON"),
        (b'{"format": 1, "format": 2}', "duplicate field 'format'"),
        (b" " * 70_000, "too large"),
    ],
)
def test_not_a_keystore(data: bytes, message: str) -> None:
    with pytest.raises(KeystoreError, match="^.*" + message.replace("(", r"\(")):
        decode_keystore(data, None)
    with pytest.raises(KeystoreError):
        keystore_is_encrypted(data)


def _kdf_set(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["kdf"][key] = value

    return mutate


def _flip_last_secret_byte(doc: dict[str, Any]) -> None:
    sealed = bytearray.fromhex(doc["secret"])
    sealed[-1] ^= 1
    doc["secret"] = sealed.hex()


ENCRYPTED_CORRUPTIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("no kdf", _delete("kdf"), "missing field 'kdf'"),
    ("kdf not object", _set("kdf", [1]), "field 'kdf' must be an object, got array"),
    ("kdf no salt", lambda d: d["kdf"].pop("salt"), "missing field 'kdf.salt'"),
    ("kdf unknown", _kdf_set("pepper", 1), "unknown field 'kdf.pepper'"),
    ("salt bad hex", _kdf_set("salt", "nothex"), "field 'kdf.salt' is not valid hex"),
    ("salt short", _kdf_set("salt", "00" * 8), "field 'kdf.salt' has the wrong length"),
    ("ops str", _kdf_set("opslimit", "2"), "field 'kdf.opslimit' must be an integer"),
    ("ops zero", _kdf_set("opslimit", 0), "kdf opslimit must be between"),
    ("ops huge", _kdf_set("opslimit", 10**9), "kdf opslimit must be between"),
    ("mem huge", _kdf_set("memlimit", 1 << 40), "kdf memlimit must be between"),
    ("mem tiny", _kdf_set("memlimit", 1), "kdf memlimit must be between"),
    ("secret plain length", _set("secret", "00" * 64), "field 'secret' has the wrong length"),
    (
        "cell id tampered",
        lambda d: d.update(cell_id=OTHER.cell_id.hex(), public_key=OTHER.public_key.hex()),
        "public_key does not match its secret",
    ),
    ("ciphertext flipped", _flip_last_secret_byte, "wrong passphrase"),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [pytest.param(m, msg, id=name) for name, m, msg in ENCRYPTED_CORRUPTIONS],
)
def test_encrypted_corruption(
    encrypted: bytes, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = _doc(encrypted)
    mutate(doc)
    with pytest.raises(KeystoreError) as info:
        decode_keystore(_dump(doc), PASSPHRASE)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_structure_is_checked_before_asking_for_passphrase(encrypted: bytes) -> None:
    doc = _doc(encrypted)
    doc["version"] = 9
    with pytest.raises(KeystoreError, match="unsupported keystore version 9"):
        decode_keystore(_dump(doc), None)


@given(st.binary(max_size=600))
def test_arbitrary_bytes_give_identity_or_keystore_error(data: bytes) -> None:
    try:
        result = decode_keystore(data, None)
    except KeystoreError as exc:
        message = str(exc)
    else:
        assert isinstance(result, Identity)
        return
    assert "\n" not in message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@given(st.sampled_from(sorted(_doc(PLAIN))), json_values)
def test_fuzzed_field_gives_identity_or_keystore_error(key: str, value: object) -> None:
    doc = _doc(PLAIN)
    doc[key] = value
    try:
        result = decode_keystore(_dump(doc), None)
    except KeystoreError:
        return
    assert result == IDENT
