"""Published Noise test vectors (Cacophony, snow multi-PSK) against `cellmesh.crypto.noise`.

The JSON files under ``tests/vectors/noise/`` are the published files filtered to the protocols
the module implements (25519 with ChaChaPoly/AESGCM and SHA256/SHA512/BLAKE2s/BLAKE2b).

Conventions of the vector files: ``messages`` starts with the handshake messages and continues
with transport messages. For interactive patterns the direction alternates throughout (message
``i`` goes initiator -> responder when ``i`` is even); for one-way patterns every message goes
initiator -> responder. Transport messages use empty associated data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cellmesh.crypto.noise import HandshakeState, parse_protocol_name

VECTOR_DIR = Path(__file__).parent / "noise"
VECTOR_FILES = ("cacophony.json", "snow-multipsk.json")

MUST_RUN = (
    "Noise_XX_25519_ChaChaPoly_BLAKE2s",
    "Noise_IK_25519_ChaChaPoly_BLAKE2s",
    "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s",
)

Vector = dict[str, Any]


def _load() -> list[tuple[str, Vector]]:
    out: list[tuple[str, Vector]] = []
    for name in VECTOR_FILES:
        data = json.loads((VECTOR_DIR / name).read_text())
        vectors = data["vectors"] if isinstance(data, dict) else data
        out.extend((name, v) for v in vectors)
    return out


VECTORS = _load()


def _priv(vector: Vector, key: str) -> X25519PrivateKey | None:
    value = vector.get(key)
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(value)) if value else None


def _pub(vector: Vector, key: str) -> bytes | None:
    value = vector.get(key)
    return bytes.fromhex(value) if value else None


def _psks(vector: Vector, key: str) -> list[bytes]:
    return [bytes.fromhex(p) for p in vector.get(key, [])]


def _parties(vector: Vector) -> tuple[HandshakeState, HandshakeState]:
    name = vector["protocol_name"]
    pattern = parse_protocol_name(name).pattern
    # Pass remote keys only where the pattern's pre-messages use them: HandshakeState rejects a
    # remote static it would silently ignore (some vector files list it for every pattern).
    init = HandshakeState.initialize(
        name,
        initiator=True,
        prologue=bytes.fromhex(vector["init_prologue"]),
        s=_priv(vector, "init_static"),
        e=_priv(vector, "init_ephemeral"),
        rs=_pub(vector, "init_remote_static") if "s" in pattern.responder_pre else None,
        psks=_psks(vector, "init_psks"),
    )
    resp = HandshakeState.initialize(
        name,
        initiator=False,
        prologue=bytes.fromhex(vector["resp_prologue"]),
        s=_priv(vector, "resp_static"),
        e=_priv(vector, "resp_ephemeral"),
        rs=_pub(vector, "resp_remote_static") if "s" in pattern.initiator_pre else None,
        psks=_psks(vector, "resp_psks"),
    )
    return init, resp


@pytest.mark.parametrize(
    "vector",
    [v for _, v in VECTORS],
    ids=[f"{src.split('.')[0]}:{v['protocol_name']}" for src, v in VECTORS],
)
def test_vector(vector: Vector) -> None:
    init, resp = _parties(vector)
    one_way = init.pattern.one_way
    handshake_len = len(init.pattern.messages)
    messages = vector["messages"]
    assert len(messages) >= handshake_len

    for i, message in enumerate(messages):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        from_initiator = one_way or i % 2 == 0
        sender, receiver = (init, resp) if from_initiator else (resp, init)
        if i < handshake_len:
            assert not sender.is_complete
            assert sender.is_my_turn
            assert sender.write_message(payload) == expected, f"handshake message {i}"
            assert receiver.read_message(expected) == payload
        else:
            assert sender.is_complete
            assert receiver.is_complete
            assert sender.send_cipher.encrypt_with_ad(b"", payload) == expected, f"message {i}"
            assert receiver.recv_cipher.decrypt_with_ad(b"", expected) == payload

    assert init.is_complete
    assert resp.is_complete
    assert init.handshake_hash == resp.handshake_hash
    if "handshake_hash" in vector:
        assert init.handshake_hash == bytes.fromhex(vector["handshake_hash"])
    # Each side ends up knowing the other's static key iff the pattern transmits or pre-knows it.
    if init.remote_static is not None:
        assert resp.local_static_public == init.remote_static
    if resp.remote_static is not None:
        assert init.local_static_public == resp.remote_static


def test_required_vectors_present() -> None:
    names = [v["protocol_name"] for _, v in VECTORS]
    for required in MUST_RUN:
        assert required in names, f"{required} was filtered out of the vector files"
    # 36 patterns x 2 ciphers x 4 hashes from Cacophony's 25519 half, plus the snow multi-PSK set.
    assert sum(src == "cacophony.json" for src, _ in VECTORS) == 288
    assert sum(src == "snow-multipsk.json" for src, _ in VECTORS) == 104
