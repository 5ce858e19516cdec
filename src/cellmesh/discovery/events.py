"""What the discovery core reports: peer events and a statistics snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field

from cellmesh.discovery.table import PeerRecord

__all__ = ["DiscoveryEvent", "DiscoveryStats", "PeerDiscovered", "PeerExpired", "PeerUpdated"]


@dataclass(frozen=True, slots=True)
class PeerDiscovered:
    """A peer joined our table (first contact, or back after it expired or was evicted)."""

    peer: PeerRecord


@dataclass(frozen=True, slots=True)
class PeerUpdated:
    """A known peer announced different content: `changed` names the fields (``name``,
    ``addresses``, ``caps``, ``noise_static`` ...); `previous` is the snapshot before."""

    peer: PeerRecord
    previous: PeerRecord
    changed: frozenset[str]


@dataclass(frozen=True, slots=True)
class PeerExpired:
    """A peer left our table: ``expired`` (missed its announcements; also what happens to a
    peer whose membership certificate ran out, as its beacons are refused from then on) or
    ``evicted`` (the table was full and it was the one heard least recently)."""

    peer: PeerRecord
    reason: str = "expired"


DiscoveryEvent = PeerDiscovered | PeerUpdated | PeerExpired


@dataclass(frozen=True, slots=True)
class DiscoveryStats:
    """A snapshot of a discovery core's counters.

    `beacons_sent` and `solicits_sent` count multicast datagrams (one per group), `replies_sent`
    unicast answers to SOLICITs; `suppressed` counts Trickle opportunities skipped because k neighbours
    had already announced, `forced` beacons sent only to keep the liveness promise. `drops`
    counts refused datagrams by reason.
    """

    peers: int
    beacons_sent: int
    replies_sent: int
    solicits_sent: int
    suppressed: int
    forced: int
    datagrams_received: int
    beacons_accepted: int
    solicits_accepted: int
    introductions: int
    """Answers sent unasked, to a peer first heard by its multicast beacon."""
    solicits_known: int
    """Repeated SOLICITs left unanswered because their filter says the sender knows us."""
    asks: int
    """SOLICITs sent back, unicast, to solicitors whose beacon never reached us."""
    trickle_interval: float
    announce_interval: float
    drops: dict[str, int] = field(default_factory=dict)
