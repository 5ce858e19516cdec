"""Noise handshakes bound to Ed25519 identities.

Theory of operation: cellmesh runs standard Noise (`Noise_XX_25519_ChaChaPoly_BLAKE2s` for first
contact, `Noise_IK_25519_ChaChaPoly_BLAKE2s` when the peer's static key is already known). Noise
authenticates X25519 static keys; a node *is* its Ed25519 key, so each side also sends, inside its
encrypted handshake payload, its Ed25519 public key and a signature by that key over its Noise static
public key (the "static binding"). After reading a message that carries the peer's static key, we
verify the binding against `remote_static`, derive the CellID from the Ed25519 key and compare it with
the CellID the frame header claimed. Transport keys come from Noise `Split()` (section 5.2), never
from the handshake hash.

Message flow and payloads (see docs/wire.md):

    XX:  -> e                      payload {sender_index}
         <- e, ee, s, es           payload {sender_index, identity, binding}
         -> s, se                  payload {sender_index, identity, binding}
    IK:  <- s (known)
         -> e, es, s, ss           payload {sender_index, identity, binding}
         <- e, ee, se              payload {sender_index, identity, binding}

This module is pure: it holds no sockets and reads no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cellmesh.crypto.noise import HandshakeState
from cellmesh.crypto.transport_cipher import TransportCipher
from cellmesh.errors import AuthenticationError, MalformedError, RemoteProtocolError
from cellmesh.identity.cellid import cell_id_from_public_key
from cellmesh.identity.keys import Identity, verify_static_binding
from cellmesh.wire.messages import (
    HandshakePattern,
    HandshakePayload,
    pull_handshake_payload,
    pull_timestamp_ext,
    push_handshake_payload,
    push_timestamp_ext,
)

PROTOCOL_XX = "Noise_XX_25519_ChaChaPoly_BLAKE2s"
PROTOCOL_IK = "Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"cellmesh/v1"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who the peer proved to be: Ed25519 key, its CellID and its Noise static key."""

    public_key: bytes
    cell_id: bytes
    noise_static: bytes


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The result of a completed handshake: directional ciphers and the handshake hash."""

    send: TransportCipher
    recv: TransportCipher
    handshake_hash: bytes


def _identity_payload(identity: Identity, sender_index: int, ext: bytes = b"") -> bytes:
    return push_handshake_payload(
        HandshakePayload(sender_index, identity.public_key, identity.static_binding(), ext)
    )


def _authenticate_peer(payload: HandshakePayload, remote_static: bytes | None) -> PeerIdentity:
    """Check the static binding carried in `payload` against the Noise-authenticated key."""
    if payload.identity is None or payload.binding is None or remote_static is None:
        raise MalformedError("handshake message lacks the peer identity")
    verify_static_binding(payload.identity, remote_static, payload.binding)
    return PeerIdentity(payload.identity, cell_id_from_public_key(payload.identity), remote_static)


def _split(hs: HandshakeState, initiator: bool) -> SessionKeys:
    c1, c2 = hs.split()
    k1 = TransportCipher.from_cipher_state(c1)
    k2 = TransportCipher.from_cipher_state(c2)
    send, recv = (k1, k2) if initiator else (k2, k1)
    return SessionKeys(send, recv, hs.handshake_hash)


class InitiatorHandshake:
    """Our side of a handshake we started. Drive with `first_message` then `read_response`."""

    def __init__(
        self,
        identity: Identity,
        sender_index: int,
        remote_static: bytes | None = None,
        ephemeral: X25519PrivateKey | None = None,
        timestamp_ns: int = 0,
        ext: bytes = b"",
    ) -> None:
        self.identity = identity
        self.sender_index = sender_index
        self.timestamp_ns = timestamp_ns
        """IK only: strictly increasing per initiator, so a responder refuses a replay."""
        self.ext = ext
        """Extensions sent with our identity (a membership certificate): never in clear."""
        self.peer_ext = b""
        """The responder's extensions, once `read_response` authenticated it."""
        self.pattern = HandshakePattern.IK if remote_static is not None else HandshakePattern.XX
        self._hs = HandshakeState.initialize(
            PROTOCOL_IK if remote_static is not None else PROTOCOL_XX,
            initiator=True,
            prologue=PROLOGUE,
            s=identity.noise_static,
            e=ephemeral,
            rs=remote_static,
        )

    def first_message(self) -> bytes:
        """The Noise bytes of message 1."""
        if self.pattern is HandshakePattern.IK:
            ext = push_timestamp_ext(self.timestamp_ns) + self.ext
            return self._hs.write_message(_identity_payload(self.identity, self.sender_index, ext))
        return self._hs.write_message(push_handshake_payload(HandshakePayload(self.sender_index)))

    def read_response(self, message: bytes) -> tuple[PeerIdentity, int, bytes | None, SessionKeys]:
        """Read message 2. Returns (peer, peer's sender index, message 3 or None for IK, keys).

        Raises `AuthenticationError` or a `DecodeError` subclass if message 2 is not genuine.
        """
        payload = pull_handshake_payload(self._hs.read_message(message))
        peer = _authenticate_peer(payload, self._hs.remote_static)
        self.peer_ext = payload.ext
        third: bytes | None = None
        if self.pattern is HandshakePattern.XX:
            third = self._hs.write_message(
                _identity_payload(self.identity, self.sender_index, self.ext)
            )
        if not self._hs.is_complete:
            raise RemoteProtocolError("handshake did not complete")
        return peer, payload.sender_index, third, _split(self._hs, initiator=True)


@dataclass(frozen=True, slots=True)
class ResponderResult:
    """What the responder learned from message 1 and what it answers."""

    initiator_index: int
    response: bytes
    # Set for IK, where the initiator is authenticated by message 1 and keys exist after message 2.
    peer: PeerIdentity | None
    keys: SessionKeys | None
    timestamp_ns: int | None = None
    """IK: the initiator's timestamp (the responder refuses one not above the last it saw)."""
    ext: bytes = b""
    """IK: the initiator's extensions (its membership certificate, if it sent one)."""


class ResponderHandshake:
    """Our side of a handshake a peer started. `read_init`, then for XX `read_finish`."""

    def __init__(
        self, identity: Identity, sender_index: int, pattern: HandshakePattern, ext: bytes = b""
    ) -> None:
        self.identity = identity
        self.sender_index = sender_index
        self.pattern = pattern
        self.ext = ext
        """Extensions sent with our identity (message 2)."""
        self.peer_ext = b""
        """The initiator's extensions, once authenticated (IK message 1, XX message 3)."""
        self._hs = HandshakeState.initialize(
            PROTOCOL_IK if pattern is HandshakePattern.IK else PROTOCOL_XX,
            initiator=False,
            prologue=PROLOGUE,
            s=identity.noise_static,
        )
        self.initiator_index = 0

    def read_init(self, message: bytes) -> ResponderResult:
        """Read message 1 and write message 2. Raises on anything not genuine."""
        payload = pull_handshake_payload(self._hs.read_message(message))
        self.initiator_index = payload.sender_index
        peer: PeerIdentity | None = None
        timestamp: int | None = None
        if self.pattern is HandshakePattern.IK:
            peer = _authenticate_peer(payload, self._hs.remote_static)
            timestamp = pull_timestamp_ext(payload.ext)
        elif payload.identity is not None:
            raise MalformedError("XX message 1 must not carry an identity (it is sent in clear)")
        if peer is not None:
            self.peer_ext = payload.ext
        response = self._hs.write_message(
            _identity_payload(self.identity, self.sender_index, self.ext)
        )
        keys = _split(self._hs, initiator=False) if self.pattern is HandshakePattern.IK else None
        return ResponderResult(payload.sender_index, response, peer, keys, timestamp, self.peer_ext)

    def read_finish(self, message: bytes) -> tuple[PeerIdentity, SessionKeys]:
        """Read XX message 3: authenticates the initiator and yields the session keys."""
        if self.pattern is not HandshakePattern.XX:
            raise MalformedError("only XX has a third message")
        payload = pull_handshake_payload(self._hs.read_message(message))
        peer = _authenticate_peer(payload, self._hs.remote_static)
        if payload.sender_index != self.initiator_index:
            raise AuthenticationError("initiator changed its session index mid-handshake")
        self.peer_ext = payload.ext
        return peer, _split(self._hs, initiator=False)
