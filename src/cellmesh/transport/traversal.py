"""NAT traversal: reflexive addresses, NAT classification and hole-punching state (pure).

Theory of operation: every node tells each direct neighbour the address it sees it at (an
OBSERVED record when a session starts). Those reports are the node's *reflexive* addresses, and
comparing them classifies its NAT: reports equal to a local address mean no NAT; the same
address from different observers means an endpoint-independent mapping (a "cone" NAT, which hole
punching gets through); different ports from different observers mean an endpoint-dependent
("symmetric") mapping, which it usually does not.

Two nodes that can only talk through relays exchange their candidate addresses (reflexive and
local) over that relayed session. Each then sends PATH_CHALLENGE records, sealed with the session
it already has, to every candidate of the other, repeatedly for a few seconds: the outgoing
challenges open the mappings in both NATs at the same time (a simultaneous open), and the first
challenge that gets through is answered. A node whose probe is answered, or that itself receives
a probe, validates the new path as for any address change and moves the session onto it. If
nothing answers in time, the session stays on the relays and says why. No new handshake is ever
needed: the session's keys are the proof on both paths.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

Addr = tuple[str, int]
MAX_REPORTS: Final = 64
PUNCH_DURATION: Final = 5.0
PUNCH_INTERVAL: Final = 0.25
PUNCH_RETRY_AFTER: Final = 60.0
"""A failed punch is tried again after this long (the other side's NAT may have changed)."""
MAX_PROBE_ADDRS: Final = 8


def is_ip(host: str) -> bool:
    """Whether `host` is a literal IPv4 or IPv6 address (scope-less)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def usable_candidate(addr: Addr) -> bool:
    """An address worth offering to a peer elsewhere: not a wildcard, loopback or link-local."""
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_loopback or ip.is_link_local) and addr[1] != 0


@dataclass(slots=True)
class Reflexive:
    """What our direct neighbours report seeing us as, newest last, bounded."""

    reports: OrderedDict[bytes, Addr] = field(default_factory=OrderedDict)

    def report(self, reporter: bytes, addr: Addr) -> None:
        self.reports[reporter] = addr
        self.reports.move_to_end(reporter)
        while len(self.reports) > MAX_REPORTS:
            self.reports.popitem(last=False)

    def forget(self, reporter: bytes) -> None:
        self.reports.pop(reporter, None)

    def addresses(self) -> list[Addr]:
        """Distinct reported addresses, most recently reported first."""
        seen: dict[Addr, None] = {}
        for addr in reversed(self.reports.values()):
            seen.setdefault(addr, None)
        return list(seen)

    def classify(self, is_local: Callable[[Addr], bool]) -> tuple[str, str]:
        """(NAT type, why): public, nat, endpoint-independent, endpoint-dependent or unknown.

        `is_local(addr)` says whether an address is one of our own sockets (the driver knows).
        """
        reports = list(self.reports.values())
        if not reports:
            return "unknown", "no direct neighbour has reported our address yet"
        if any(is_local(a) for a in reports):
            return "public", "a neighbour sees us at one of our own addresses: no translation"
        distinct = set(reports)
        observers = len(reports)
        if len(distinct) == 1:
            if observers == 1:
                return "nat", "one neighbour sees us at a translated address (one observer only)"
            return (
                "endpoint-independent",
                f"{observers} neighbours see us at the same translated address: hole punching works",
            )
        ports = {a[1] for a in distinct}
        if len(ports) > 1:
            return (
                "endpoint-dependent",
                f"{observers} neighbours see {len(distinct)} different translated addresses: "
                "a symmetric NAT, hole punching will likely fail",
            )
        return "endpoint-independent", "several public addresses with the same mapped port"


@dataclass(slots=True)
class Punch:
    """Hole punching towards one relayed peer: candidates, challenge data, and the deadline."""

    addrs: tuple[Addr, ...]
    data: bytes
    started: float
    next_send: float
    sent: int = 0

    def due(self, now: float) -> bool:
        return now >= self.next_send and now - self.started < PUNCH_DURATION

    def expired(self, now: float) -> bool:
        return now - self.started >= PUNCH_DURATION
