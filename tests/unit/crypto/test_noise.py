"""Unit tests for `cellmesh.crypto.noise` beyond the published vectors."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cellmesh.crypto.noise import (
    HASHES,
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    CipherState,
    HandshakeState,
    SymmetricState,
    hkdf,
    parse_protocol_name,
)
from cellmesh.errors import (
    AuthenticationError,
    DecodeError,
    LocalProtocolError,
    NonceExhaustedError,
    OversizeError,
    TruncatedError,
)

XX = "Noise_XX_25519_ChaChaPoly_BLAKE2s"
IK = "Noise_IK_25519_ChaChaPoly_BLAKE2s"
NN = "Noise_NN_25519_ChaChaPoly_BLAKE2s"
PSK_A = bytes(range(32))
PSK_B = bytes(range(32, 64))


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _xx_pair(
    prologue_i: bytes = b"", prologue_r: bytes = b""
) -> tuple[HandshakeState, HandshakeState, X25519PrivateKey, X25519PrivateKey]:
    si, sr = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    init = HandshakeState.initialize(XX, initiator=True, prologue=prologue_i, s=si)
    resp = HandshakeState.initialize(XX, initiator=False, prologue=prologue_r, s=sr)
    return init, resp, si, sr


def _run(init: HandshakeState, resp: HandshakeState) -> None:
    """Drive a handshake to completion with distinct payloads; check each payload arrives."""
    i = 0
    while not (init.is_complete and resp.is_complete):
        sender, receiver = (init, resp) if init.is_my_turn else (resp, init)
        payload = f"payload {i}".encode()
        assert receiver.read_message(sender.write_message(payload)) == payload
        i += 1


def _check_transport(init: HandshakeState, resp: HandshakeState) -> None:
    for n in range(3):
        msg = f"i->r {n}".encode()
        assert (
            resp.recv_cipher.decrypt_with_ad(b"ad", init.send_cipher.encrypt_with_ad(b"ad", msg))
            == msg
        )
        if not init.pattern.one_way:
            msg = f"r->i {n}".encode()
            ct = resp.send_cipher.encrypt_with_ad(b"", msg)
            assert init.recv_cipher.decrypt_with_ad(b"", ct) == msg


# ---- round trips ---------------------------------------------------------------------------


def test_xx_round_trip_learns_remote_static() -> None:
    init, resp, si, sr = _xx_pair(b"cellmesh", b"cellmesh")
    assert init.remote_static is None
    assert resp.remote_static is None

    m1 = init.write_message(b"hello")
    assert len(m1) == 32 + 5  # e, then the payload in clear (no key yet)
    assert resp.read_message(m1) == b"hello"
    m2 = resp.write_message(b"hi there")
    assert init.read_message(m2) == b"hi there"
    assert init.remote_static == _pub(sr)
    assert not init.is_complete
    m3 = init.write_message(b"")
    assert resp.read_message(m3) == b""
    assert resp.remote_static == _pub(si)

    assert init.is_complete
    assert resp.is_complete
    assert init.handshake_hash == resp.handshake_hash
    assert len(init.handshake_hash) == 32
    c1, c2 = init.split()
    assert init.send_cipher is c1
    assert init.recv_cipher is c2
    assert resp.recv_cipher is resp.split()[0]
    _check_transport(init, resp)


def test_ik_round_trip() -> None:
    si, sr = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    init = HandshakeState.initialize(IK, True, s=si, rs=_pub(sr))
    resp = HandshakeState.initialize(IK, False, s=sr)
    m1 = init.write_message(b"0-RTT data")
    assert resp.read_message(m1) == b"0-RTT data"
    assert resp.remote_static == _pub(si)
    m2 = resp.write_message(b"welcome")
    assert init.read_message(m2) == b"welcome"
    assert init.remote_static == _pub(sr)
    assert init.handshake_hash == resp.handshake_hash
    _check_transport(init, resp)


@pytest.mark.parametrize(
    "name",
    [
        "Noise_NN_25519_AESGCM_SHA256",
        "Noise_NK_25519_ChaChaPoly_SHA512",
        "Noise_XK_25519_AESGCM_BLAKE2b",
        "Noise_KK_25519_ChaChaPoly_BLAKE2s",
        "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s",
        "Noise_IKpsk2_25519_AESGCM_SHA256",
        "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2b",
        "Noise_XXpsk0+psk3_25519_ChaChaPoly_SHA512",
        "Noise_N_25519_ChaChaPoly_BLAKE2s",
        "Noise_Kpsk0_25519_AESGCM_BLAKE2s",
    ],
)
def test_round_trip_patterns(name: str) -> None:
    pattern = parse_protocol_name(name).pattern
    si, sr = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    psks = [PSK_A, PSK_B][: pattern.psk_count]
    init = HandshakeState.initialize(
        name,
        True,
        b"p",
        s=si,
        rs=_pub(sr) if "s" in pattern.responder_pre else None,
        psks=psks,
    )
    resp = HandshakeState.initialize(
        name,
        False,
        b"p",
        s=sr,
        rs=_pub(si) if "s" in pattern.initiator_pre else None,
        psks=psks,
    )
    _run(init, resp)
    assert init.handshake_hash == resp.handshake_hash
    assert len(init.handshake_hash) == parse_protocol_name(name).hash.hashlen
    _check_transport(init, resp)


def test_fresh_ephemeral_by_default() -> None:
    a = HandshakeState.initialize(NN, True).write_message()
    b = HandshakeState.initialize(NN, True).write_message()
    assert a != b


def test_injected_ephemeral_is_used() -> None:
    e = X25519PrivateKey.generate()
    assert HandshakeState.initialize(NN, True, e=e).write_message()[:32] == _pub(e)


# ---- API misuse ----------------------------------------------------------------------------


def test_out_of_turn() -> None:
    init, resp, _, _ = _xx_pair()
    assert init.is_my_turn
    assert not resp.is_my_turn
    with pytest.raises(LocalProtocolError):
        resp.write_message(b"")
    with pytest.raises(LocalProtocolError):
        init.read_message(bytes(48))
    resp.read_message(init.write_message(b""))
    with pytest.raises(LocalProtocolError):
        init.write_message(b"")


def test_use_after_complete_and_before_complete() -> None:
    init, resp, _, _ = _xx_pair()
    for attr in ("handshake_hash", "send_cipher", "recv_cipher"):
        with pytest.raises(LocalProtocolError):
            getattr(init, attr)
    with pytest.raises(LocalProtocolError):
        init.split()
    _run(init, resp)
    assert not init.is_my_turn
    with pytest.raises(LocalProtocolError):
        init.write_message(b"")
    with pytest.raises(LocalProtocolError):
        resp.read_message(bytes(64))


def test_one_way_roles() -> None:
    sr = X25519PrivateKey.generate()
    name = "Noise_N_25519_ChaChaPoly_BLAKE2s"
    init = HandshakeState.initialize(name, True, rs=_pub(sr))
    resp = HandshakeState.initialize(name, False, s=sr)
    _run(init, resp)
    with pytest.raises(LocalProtocolError):
        _ = resp.send_cipher
    with pytest.raises(LocalProtocolError):
        _ = init.recv_cipher


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol_name": XX, "initiator": True}, "static key s"),
        ({"protocol_name": IK, "initiator": True, "s": "gen"}, "remote key rs"),
        (
            {"protocol_name": XX, "initiator": True, "s": "gen", "rs": bytes(32)},
            "does not pre-know",
        ),
        ({"protocol_name": IK, "initiator": True, "s": "gen", "rs": bytes(31)}, "32-byte"),
        ({"protocol_name": "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s", "initiator": True}, "PSK"),
        (
            {
                "protocol_name": "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s",
                "initiator": True,
                "psks": [bytes(31)],
            },
            "32 bytes",
        ),
        ({"protocol_name": NN, "initiator": True, "psks": [PSK_A]}, "PSK"),
    ],
)
def test_initialize_validation(kwargs: dict[str, object], match: str) -> None:
    if kwargs.get("s") == "gen":
        kwargs["s"] = X25519PrivateKey.generate()
    with pytest.raises(LocalProtocolError, match=match):
        HandshakeState.initialize(**kwargs)  # type: ignore[arg-type]


def test_static_key_not_needed_is_ignored() -> None:
    init = HandshakeState.initialize(NN, True, s=X25519PrivateKey.generate())
    resp = HandshakeState.initialize(NN, False)
    _run(init, resp)
    assert resp.remote_static is None


@pytest.mark.parametrize(
    "name",
    [
        "Noise_XX_448_ChaChaPoly_BLAKE2s",
        "Noise_XX_25519_AESGCM_BLAKE3",
        "Noise_XX_25519_Salsa_SHA256",
        "Noise_XXfallback_25519_ChaChaPoly_BLAKE2s",
        "Noise_XXhfs_25519+Kyber1024_ChaChaPoly_BLAKE2s",
        "Noise_NNpsk3_25519_ChaChaPoly_BLAKE2s",
        "Noise_NNpsk0+psk0_25519_ChaChaPoly_BLAKE2s",
        "Noise_NNpsk01_25519_ChaChaPoly_BLAKE2s",
        "Noise_ZZ_25519_ChaChaPoly_BLAKE2s",
        "Noisy_XX_25519_ChaChaPoly_BLAKE2s",
        "Noise_XX_25519_ChaChaPoly",
    ],
)
def test_unsupported_protocol_names(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        parse_protocol_name(name)


def test_psk_modifier_positions() -> None:
    msgs = parse_protocol_name("Noise_XXpsk0+psk3_25519_ChaChaPoly_BLAKE2s").pattern.messages
    assert msgs == (("psk", "e"), ("e", "ee", "s", "es"), ("s", "se", "psk"))
    ik = parse_protocol_name("Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s").pattern.messages
    assert ik == (("e", "es", "s", "ss"), ("e", "ee", "se", "psk"))


# ---- hostile input -------------------------------------------------------------------------


def test_tampered_message_is_rejected_and_state_rolls_back() -> None:
    init, resp, _, sr = _xx_pair()
    resp.read_message(init.write_message(b""))
    m2 = resp.write_message(b"secret")
    for index in (40, len(m2) - 1):  # inside the encrypted static key, inside the payload tag
        bad = bytearray(m2)
        bad[index] ^= 0x01
        with pytest.raises(AuthenticationError):
            init.read_message(bytes(bad))
        assert init.remote_static is None
        assert not init.is_my_turn
    # The genuine message still works: the failed reads left no trace.
    assert init.read_message(m2) == b"secret"
    assert init.remote_static == _pub(sr)
    _run(init, resp)


def test_truncated_messages() -> None:
    init, resp, _, _ = _xx_pair()
    with pytest.raises(TruncatedError):
        resp.read_message(bytes(31))
    resp.read_message(init.write_message(b""))
    m2 = resp.write_message(b"")
    for cut in (20, 32 + 40, len(m2) - 1):
        with pytest.raises(DecodeError) as info:
            init.read_message(m2[:cut])
        assert isinstance(info.value, TruncatedError)
    assert init.read_message(m2) == b""


def test_oversize() -> None:
    init, resp, _, _ = _xx_pair()
    with pytest.raises(OversizeError):
        resp.read_message(bytes(MAX_MESSAGE_LEN + 1))
    with pytest.raises(LocalProtocolError):
        init.write_message(bytes(MAX_MESSAGE_LEN - 31))
    assert init.is_my_turn  # rolled back
    assert len(init.write_message(bytes(MAX_MESSAGE_LEN - 32))) == MAX_MESSAGE_LEN


def test_prologue_mismatch_fails() -> None:
    init, resp, _, _ = _xx_pair(b"v1", b"v2")
    resp.read_message(init.write_message(b""))  # cleartext: nothing to authenticate yet
    with pytest.raises(AuthenticationError):
        init.read_message(resp.write_message(b""))


def test_psk_mismatch_fails() -> None:
    name = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"
    init = HandshakeState.initialize(name, True, psks=[PSK_A])
    resp = HandshakeState.initialize(name, False, psks=[PSK_B])
    with pytest.raises(AuthenticationError):
        resp.read_message(init.write_message(b"x"))


def test_low_order_ephemeral_rejected() -> None:
    init, resp, _, _ = _xx_pair()
    resp.read_message(init.write_message(b""))
    m2 = resp.write_message(b"")
    forged = bytes(32) + m2[32:]  # all-zero (low-order) ephemeral: the "ee" DH must fail
    with pytest.raises(AuthenticationError):
        init.read_message(forged)
    assert init.read_message(m2) == b""


# ---- CipherState / SymmetricState ----------------------------------------------------------


def test_cipher_state_without_key_passes_through() -> None:
    cs = CipherState()
    assert not cs.has_key()
    assert cs.key is None
    assert cs.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.decrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.nonce == 0
    with pytest.raises(LocalProtocolError):
        cs.rekey()


def test_nonce_exhaustion_via_set_nonce() -> None:
    enc, dec = CipherState(key=PSK_A), CipherState(key=PSK_A)
    enc.set_nonce(MAX_NONCE - 1)
    dec.set_nonce(MAX_NONCE - 1)
    ct = enc.encrypt_with_ad(b"", b"last")
    assert dec.decrypt_with_ad(b"", ct) == b"last"
    assert enc.nonce == MAX_NONCE
    with pytest.raises(NonceExhaustedError):
        enc.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(NonceExhaustedError):
        dec.decrypt_with_ad(b"", ct)
    with pytest.raises(LocalProtocolError):
        enc.set_nonce(MAX_NONCE + 1)
    with pytest.raises(LocalProtocolError):
        enc.set_nonce(-1)


def test_failed_decrypt_does_not_advance_nonce() -> None:
    enc, dec = CipherState(key=PSK_A), CipherState(key=PSK_A)
    ct = enc.encrypt_with_ad(b"ad", b"msg")
    with pytest.raises(AuthenticationError):
        dec.decrypt_with_ad(b"other ad", ct)
    assert dec.nonce == 0
    assert dec.decrypt_with_ad(b"ad", ct) == b"msg"
    assert dec.nonce == 1


def test_rekey_keeps_nonce_and_both_sides_agree() -> None:
    enc, dec = CipherState(key=PSK_A), CipherState(key=PSK_A)
    dec.decrypt_with_ad(b"", enc.encrypt_with_ad(b"", b"a"))
    enc.rekey()
    dec.rekey()
    assert enc.key != PSK_A
    assert enc.key == dec.key
    assert enc.nonce == 1
    assert dec.decrypt_with_ad(b"", enc.encrypt_with_ad(b"", b"b")) == b"b"


def test_cipher_state_key_is_read_only_and_checked() -> None:
    cs = CipherState(key=PSK_A)
    assert cs.key == PSK_A
    with pytest.raises(AttributeError):
        cs.key = PSK_B  # type: ignore[misc]
    with pytest.raises(LocalProtocolError):
        CipherState(key=bytes(16))


def test_cipher_state_nonce_encoding() -> None:
    """ChaChaPoly's nonce is little-endian, AESGCM's big-endian (sections 12.3, 12.4)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from cellmesh.crypto.noise import AES_GCM

    n = 0x0102030405060708
    cs = CipherState(key=PSK_A)
    cs.set_nonce(n)
    expected = ChaCha20Poly1305(PSK_A).encrypt(bytes(4) + n.to_bytes(8, "little"), b"m", b"a")
    assert cs.encrypt_with_ad(b"a", b"m") == expected
    gcm = CipherState(AES_GCM, PSK_A)
    gcm.set_nonce(n)
    expected = AESGCM(PSK_A).encrypt(bytes(4) + n.to_bytes(8, "big"), b"m", b"a")
    assert gcm.encrypt_with_ad(b"a", b"m") == expected


@pytest.mark.parametrize(
    ("name", "algorithm"),
    [("SHA256", hashes.SHA256()), ("SHA512", hashes.SHA512())],
)
def test_hkdf_matches_rfc5869(name: str, algorithm: hashes.HashAlgorithm) -> None:
    """Noise's HKDF is RFC 5869 with salt=ck, empty info (section 4.3)."""
    hash_fn = HASHES[name]
    ck, ikm = b"c" * hash_fn.hashlen, b"input key material"
    outputs = hkdf(hash_fn, ck, ikm, 3)
    reference = HKDF(algorithm, 3 * hash_fn.hashlen, salt=ck, info=b"").derive(ikm)
    assert b"".join(outputs) == reference
    assert hkdf(hash_fn, ck, ikm, 2) == outputs[:2]
    with pytest.raises(LocalProtocolError):
        hkdf(hash_fn, ck, ikm, 4)


def test_symmetric_state_initialization() -> None:
    short = SymmetricState.initialize_symmetric(XX)  # 33 bytes > 32: hashed
    assert short.get_handshake_hash() == HASHES["BLAKE2s"].hash(XX.encode())
    name = "Noise_NN_25519_AESGCM_SHA512"  # fits in 64 bytes: zero padded
    padded = SymmetricState.initialize_symmetric(name)
    assert padded.get_handshake_hash() == name.encode().ljust(64, b"\x00")
    assert not padded.has_key()


def test_parse_is_cached_and_rejects_non_ascii_digits() -> None:
    assert parse_protocol_name(XX) is parse_protocol_name(XX)
    with pytest.raises(LocalProtocolError):
        parse_protocol_name("Noise_NNpsk\u00b2_25519_ChaChaPoly_BLAKE2s")
