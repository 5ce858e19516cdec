"""Unit tests for `cellmesh.crypto.transport_cipher`."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cellmesh.crypto import transport_cipher
from cellmesh.crypto.noise import AES_GCM, CipherState
from cellmesh.crypto.transport_cipher import MAX_PN, TAG_LEN, TransportCipher
from cellmesh.errors import AuthenticationError, LocalProtocolError, NonceExhaustedError

KEY = bytes(range(32))


def test_round_trip() -> None:
    tc = TransportCipher(KEY)
    ct = tc.seal(7, b"header", b"frame body")
    assert len(ct) == len(b"frame body") + TAG_LEN
    assert tc.open(7, b"header", ct) == b"frame body"
    # Stateless: packets can be opened in any order, and more than once (replay is not its job).
    ct0 = tc.seal(0, b"", b"")
    assert tc.open(0, b"", ct0) == b""
    assert tc.open(7, b"header", ct) == b"frame body"


def test_nonce_layout_is_noise_chachapoly() -> None:
    pn = 0x0102030405060708
    nonce = b"\x00\x00\x00\x00" + bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert TransportCipher(KEY).seal(pn, b"a", b"p") == ChaCha20Poly1305(KEY).encrypt(
        nonce, b"p", b"a"
    )


def test_from_cipher_state_matches_noise_encryption() -> None:
    cs = CipherState(key=KEY)
    tc = TransportCipher.from_cipher_state(cs)
    cs.set_nonce(41)
    assert tc.seal(41, b"ad", b"same bytes") == cs.encrypt_with_ad(b"ad", b"same bytes")


def test_from_cipher_state_rejects_empty_or_other_cipher() -> None:
    with pytest.raises(LocalProtocolError):
        TransportCipher.from_cipher_state(CipherState())
    with pytest.raises(LocalProtocolError):
        TransportCipher.from_cipher_state(CipherState(AES_GCM, KEY))


@pytest.mark.parametrize(
    ("key", "pn", "ad", "flip"),
    [
        (KEY, 5, b"ad", True),  # ciphertext modified
        (KEY, 5, b"ae", False),  # associated data differs
        (KEY, 6, b"ad", False),  # packet number differs
        (bytes(32), 5, b"ad", False),  # wrong key
    ],
)
def test_tampering_fails_authentication(key: bytes, pn: int, ad: bytes, flip: bool) -> None:
    ct = TransportCipher(KEY).seal(5, b"ad", b"payload")
    if flip:
        ct = ct[:-1] + bytes([ct[-1] ^ 1])
    opener = TransportCipher(key)
    with pytest.raises(AuthenticationError):
        opener.open(pn, ad, ct)


@pytest.mark.parametrize("length", [0, 1, TAG_LEN - 1])
def test_short_ciphertext_fails_authentication(length: int) -> None:
    with pytest.raises(AuthenticationError):
        TransportCipher(KEY).open(0, b"", bytes(length))


def test_packet_number_limits() -> None:
    tc = TransportCipher(KEY)
    assert MAX_PN == 2**64 - 2
    assert tc.open(MAX_PN, b"", tc.seal(MAX_PN, b"", b"x")) == b"x"
    for pn in (2**64 - 1, 2**64, 2**70):
        with pytest.raises(NonceExhaustedError):
            tc.seal(pn, b"", b"x")
        with pytest.raises(NonceExhaustedError):
            tc.open(pn, b"", bytes(TAG_LEN))
    with pytest.raises(LocalProtocolError):
        tc.seal(-1, b"", b"x")
    with pytest.raises(LocalProtocolError):
        tc.open(-1, b"", bytes(TAG_LEN))


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_key_length_checked(length: int) -> None:
    with pytest.raises(LocalProtocolError):
        TransportCipher(bytes(length))


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("size", [0, 1, 63, 64, 1200, 65_000])
def test_seal_in_place_is_seal_where_the_plaintext_lies(
    size: int, in_place: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways `seal_in_place` can work (in place, or the copying fallback for a library
    that would refuse) give exactly `seal`'s bytes after whatever precedes the plaintext."""
    monkeypatch.setattr(transport_cipher, "IN_PLACE", in_place)
    tc = TransportCipher(KEY)
    plain = bytes((i * 7) & 0xFF for i in range(size))
    buf = bytearray(b"HEADER--") + bytearray(plain) + bytearray(TAG_LEN)
    tc.seal_in_place(99, b"ad", buf, 8)
    assert buf[:8] == b"HEADER--"
    assert bytes(buf[8:]) == tc.seal(99, b"ad", plain)
    assert tc.open(99, b"ad", bytes(buf[8:])) == plain


def test_this_library_encrypts_in_place() -> None:
    """The probe found in-place encryption working (if a future version of the library
    breaks it, sealing falls back to a copy and this test says so)."""
    assert transport_cipher.IN_PLACE


def test_seal_in_place_needs_room_for_the_tag() -> None:
    tc = TransportCipher(KEY)
    with pytest.raises(LocalProtocolError, match="room for the tag"):
        tc.seal_in_place(1, b"", bytearray(10), 0)
    with pytest.raises(NonceExhaustedError):
        tc.seal_in_place(MAX_PN + 1, b"", bytearray(TAG_LEN), 0)
