"""One keyed session with one peer: sealing and opening DATA frames.

Theory of operation: a session is what a completed handshake leaves behind: a send cipher, a receive
cipher, our index (which the peer writes into the header's session id) and the peer's index (which we
write). Every DATA frame uses the next send counter as both the header packet number and the AEAD
nonce; the whole 64-byte header (hop TTL zeroed) is the associated data, so no header field can be
altered unnoticed. On receive, the replay window is checked before decryption (cheap) and updated only
after the tag verified (so forged packets cannot move the window). A session is never used past its
reject-after age or counter: it is replaced by a fresh handshake long before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cellmesh.crypto.replay import ReplayWindow
from cellmesh.crypto.transport_cipher import TransportCipher
from cellmesh.errors import NonceExhaustedError, ReplayError
from cellmesh.transport.handshake import PeerIdentity, SessionKeys
from cellmesh.wire.header import DEFAULT_HOP_TTL, HEADER_LEN, FrameType, pack_header

AEAD_TAG_LEN = 16
# Stop sending well before the 64-bit nonce space ends (WireGuard's REJECT_AFTER_MESSAGES margin).
REJECT_AFTER_PACKETS = 2**64 - 2**13 - 1
_DATA = int(FrameType.DATA)
_TTL_OFFSET = 3  # the hop TTL byte of the header (docs/wire.md)
_WIRE_TTL = bytes([DEFAULT_HOP_TTL])
_TAG_ROOM = bytes(AEAD_TAG_LEN)  # where `seal_parts` has the tag written
_HEADER_ROOM = bytes(HEADER_LEN)  # where `seal_parts` writes the header once it knows the size


@dataclass(slots=True)
class SessionCounters:
    """Traffic counters of one session."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class Session:
    """An established session. Pure: times are passed in."""

    __slots__ = (
        "addr",
        "confirmed",
        "counters",
        "created",
        "finish_digest",
        "handshake_hash",
        "is_initiator",
        "last_recv",
        "last_send",
        "local_cell",
        "local_index",
        "peer",
        "recv",
        "remote_index",
        "replay",
        "send",
        "send_counter",
        "start_counter",
    )

    def __init__(
        self,
        *,
        local_cell: bytes,
        local_index: int,
        remote_index: int,
        peer: PeerIdentity,
        keys: SessionKeys,
        addr: tuple[str, int],
        is_initiator: bool,
        now: float,
        replay_window: int,
        confirmed: bool,
    ) -> None:
        self.local_cell = local_cell
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer = peer
        self.send: TransportCipher = keys.send
        self.recv: TransportCipher = keys.recv
        self.handshake_hash = keys.handshake_hash
        self.replay = ReplayWindow(replay_window)
        self.send_counter = 0
        self.start_counter = 0  # where this key's packet numbers began (rekeys continue the space)
        self.addr = addr
        self.is_initiator = is_initiator
        self.created = now
        self.last_recv = now
        self.last_send = now
        # An initiator's session is confirmed by the first authenticated packet from the responder;
        # until then the initiator keeps retransmitting its last handshake message.
        self.confirmed = confirmed
        self.counters = SessionCounters()
        self.finish_digest = b""

    @property
    def packets_under_key(self) -> int:
        """Packets sealed with this session's key (what rekey-after-packets counts)."""
        return self.send_counter - self.start_counter

    def seal(self, plaintext: bytes, now: float, channel: int = 0) -> bytes:
        """Build a complete DATA datagram carrying `plaintext` (header channel hash `channel`)."""
        pn = self.send_counter
        if pn >= REJECT_AFTER_PACKETS:
            raise NonceExhaustedError("session send counter exhausted; a new handshake is needed")
        self.send_counter = pn + 1
        plen = len(plaintext) + AEAD_TAG_LEN
        ad = pack_header(
            _DATA,
            self.local_cell,
            self.peer.cell_id,
            self.remote_index,
            pn,
            plen,
            0,
            channel,
        )
        ct = self.send.seal(pn, ad, plaintext)
        self.last_send = now
        c = self.counters
        c.packets_out += 1
        c.bytes_out += HEADER_LEN + plen
        # On the wire the hop TTL is set (it is zero in the associated data): one copy.
        return b"".join((ad[:_TTL_OFFSET], _WIRE_TTL, ad[_TTL_OFFSET + 1 :], ct))

    def seal_parts(
        self, parts: Sequence[bytes | memoryview], now: float, channel: int = 0
    ) -> bytearray:
        """`seal` of the concatenation of `parts`, built the bulk sender's way: the parts are
        copied once into the datagram, which is then encrypted where it lies
        (`TransportCipher.seal_in_place`). The same bytes as `seal(b"".join(parts))`."""
        pn = self.send_counter
        if pn >= REJECT_AFTER_PACKETS:
            raise NonceExhaustedError("session send counter exhausted; a new handshake is needed")
        self.send_counter = pn + 1
        datagram = bytearray().join((_HEADER_ROOM, *parts, _TAG_ROOM))
        plen = len(datagram) - HEADER_LEN
        ad = pack_header(
            _DATA, self.local_cell, self.peer.cell_id, self.remote_index, pn, plen, 0, channel
        )
        self.send.seal_in_place(pn, ad, datagram, HEADER_LEN)
        datagram[:HEADER_LEN] = ad
        datagram[_TTL_OFFSET] = DEFAULT_HOP_TTL  # (zero in the associated data, set on the wire)
        self.last_send = now
        c = self.counters
        c.packets_out += 1
        c.bytes_out += HEADER_LEN + plen
        return datagram

    def open_checked(self, pn: int, ad: bytes, ciphertext: bytes | memoryview, now: float) -> bytes:
        """`open` for a caller that has just seen `replay.check(pn)` succeed (the receive path
        checks before it spends anything on a packet): the same, without asking twice."""
        plaintext = self.recv.open(pn, ad, ciphertext)
        self.replay.accept(pn)
        self.last_recv = now
        self.confirmed = True
        c = self.counters
        c.packets_in += 1
        c.bytes_in += HEADER_LEN + len(ciphertext)
        return plaintext

    def open(self, pn: int, ad: bytes, ciphertext: bytes, now: float) -> bytes:
        """Authenticate and decrypt one DATA frame's payload.

        Raises `ReplayError` (seen or too old) or `AuthenticationError` (forged or corrupted).
        """
        if not self.replay.check(pn):
            raise ReplayError("packet number replayed or older than the window")
        return self.open_checked(pn, ad, ciphertext, now)
