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


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened stream `stream_id`."""

    cell_id: bytes
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamData:
    """In-order bytes of a stream; `fin` is True on the last delivery of the stream."""

    cell_id: bytes
    stream_id: int
    data: bytes
    fin: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream ended abnormally: the peer reset it (`by_peer`) or asked us to stop sending."""

    cell_id: bytes
    stream_id: int
    code: int
    by_peer: bool


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """A stream whose send buffer was full has room again."""

    cell_id: bytes
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamFinished:
    """Everything we wrote on the stream, FIN included, was acknowledged by the peer."""

    cell_id: bytes
    stream_id: int


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A reliable message arrived (each delivered exactly once, in no particular order)."""

    cell_id: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class ChannelMessageReceived:
    """A message on a channel arrived: reliable (CHANNEL_MSG) or not (a channel-tagged frame).

    `channel` is the 32-bit channel hash; the channel layer maps it back to a name it granted.
    """

    cell_id: bytes
    channel: int
    data: bytes
    reliable: bool


@dataclass(frozen=True, slots=True)
class RouteMessageReceived:
    """A routing protocol message from a direct neighbour (cellmesh.routing decodes it)."""

    cell_id: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class TraceReply:
    """A trace probe we sent was answered by `hop` (the node where its TTL ran out, or `dst`)."""

    probe_id: int
    hop: bytes


@dataclass(frozen=True, slots=True)
class PeerMoved:
    """A peer's new address passed path validation: traffic to it goes there from now on."""

    cell_id: bytes
    addr: tuple[str, int]


@dataclass(frozen=True, slots=True)
class PeerStateChanged:
    """The failure detector moved the peer between alive and suspect."""

    cell_id: bytes
    state: str
    phi: float


Event = (
    PeerConnected
    | PeerDisconnected
    | HandshakeFailed
    | PingReply
    | DatagramReceived
    | StreamOpened
    | StreamData
    | StreamReset
    | StreamWritable
    | StreamFinished
    | MessageReceived
    | ChannelMessageReceived
    | PeerMoved
    | RouteMessageReceived
    | TraceReply
    | PeerStateChanged
)


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
    state: str = "alive"
    mtu: int = 0
    cwnd: int = 0
    packets_lost: int = 0
    bytes_retransmitted: int = 0
    open_streams: int = 0
    relayed: bool = False
    """Reached through relays (its address is virtual) rather than directly."""
    path_note: str = ""
    """Why the path is direct or relayed (hole punching outcome, ...)."""


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
