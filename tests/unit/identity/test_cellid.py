"""Tests for cellmesh.identity.cellid."""

from __future__ import annotations

import hashlib

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmesh.identity.cellid import (
    CELL_ID_LEN,
    ZERO_CELL_ID,
    CellId,
    cell_id_from_public_key,
    format_cell_id,
    origin_hash,
    parse_cell_id,
)

PUB = bytes(range(32))


def test_cell_id_known_answer() -> None:
    # Pinned so that an accidental change of context string or algorithm is caught.
    assert cell_id_from_public_key(PUB).hex() == "d34468cdf8de3a1f7d821620f741957c"


def test_cell_id_is_blake3_derive_key_truncated() -> None:
    expected = blake3.blake3(PUB, derive_key_context="cellmesh 2026-11 CellID v1").digest()[:16]
    cid = cell_id_from_public_key(PUB)
    assert cid == expected
    assert len(cid) == CELL_ID_LEN == 16


def test_cell_id_is_domain_separated() -> None:
    cid = cell_id_from_public_key(PUB)
    assert cid != blake3.blake3(PUB).digest()[:16]
    assert cid[:8] != origin_hash(PUB)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_cell_id_rejects_wrong_key_length(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        cell_id_from_public_key(bytes(length))


def test_origin_hash_known_answer() -> None:
    expected = hashlib.blake2s(PUB, key=b"cellmesh origin hash v1", digest_size=8).digest()
    assert origin_hash(PUB) == expected
    assert origin_hash(PUB).hex() == "7e15727718a42590"


def test_origin_hash_rejects_wrong_key_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        origin_hash(b"short")


def test_format_is_lowercase_hex() -> None:
    text = format_cell_id(CellId(bytes.fromhex("00ff" * 8)))
    assert text == "00ff" * 8
    assert format_cell_id(ZERO_CELL_ID) == "0" * 32


def test_format_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        format_cell_id(b"\x00" * 15)


def test_parse_accepts_upper_case_and_whitespace() -> None:
    cid = cell_id_from_public_key(PUB)
    assert parse_cell_id("  " + format_cell_id(cid).upper() + "\n") == cid


def test_parse_bad_length_message() -> None:
    with pytest.raises(ValueError, match=r"^CellID must be 32 hex characters, got 7$"):
        parse_cell_id("abcdef0")


def test_parse_bad_character_message() -> None:
    with pytest.raises(ValueError, match=r"only hex digits.*'g'"):
        parse_cell_id("g" + "0" * 31)


def test_zero_cell_id() -> None:
    assert bytes(16) == ZERO_CELL_ID
    assert parse_cell_id("0" * 32) == ZERO_CELL_ID


@given(st.binary(min_size=16, max_size=16))
def test_format_parse_round_trip(raw: bytes) -> None:
    assert parse_cell_id(format_cell_id(CellId(raw))) == raw


@given(st.text(max_size=40))
def test_parse_arbitrary_text_raises_only_value_error(text: str) -> None:
    try:
        cid = parse_cell_id(text)
    except ValueError:
        return
    assert len(cid) == CELL_ID_LEN
