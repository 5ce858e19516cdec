"""Events the endpoint core reports, and its statistics snapshots. All frozen records."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """A session with `cell_id` was established (or replaced by a fresh one after a rekey)."""

    cell_id: bytes
    addr: tuple[str, int]
    initiator: bool
    rekey: bool


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """The last session with `cell_id` ended."""

    cell_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """A handshake we started gave up. `cell_id` is None when we dialled an address only."""

    addr: tuple[str, int]
    cell_id: bytes | None
    reason: str


@dataclass(frozen=True, slots=True)
class PingReply:
    """An echo reply came back."""

    cell_id: bytes
    ping_id: int
    rtt: float


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    """An application datagram arrived over an authenticated session."""

    cell_id: bytes
    data: bytes


Event = PeerConnected | PeerDisconnected | HandshakeFailed | PingReply | DatagramReceived


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What `peers` shows for one connected peer."""

    cell_id: bytes
    public_key: bytes
    addr: tuple[str, int]
    rtt: float | None
    session_age: float
    last_seen: float
    initiator: bool
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int
    sessions: int


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """A snapshot of the endpoint's counters. `drops` counts discarded datagrams by reason."""

    datagrams_in: int
    datagrams_out: int
    bytes_in: int
    bytes_out: int
    sessions: int
    pending_initiations: int
    pending_responses: int
    handshakes_completed: int
    cookies_sent: int
    drops: dict[str, int] = field(default_factory=dict)
