"""What the routing core reports: events, table rows and a statistics snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NeighbourInfo", "RouteChanged", "RouteInfo", "RoutingEvent", "RoutingStats"]


@dataclass(frozen=True, slots=True)
class RouteChanged:
    """The next hop towards `destination` changed: a new route (`old_next_hop` None), a lost one
    (`new_next_hop` None, `metric` INFINITY) or a switch. Metric-only changes are not events
    (read `route`); every change of `next_hop(destination)` is."""

    destination: bytes
    old_next_hop: bytes | None
    new_next_hop: bytes | None
    metric: int


RoutingEvent = RouteChanged


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """One selected route, as `cellmesh routes` shows it."""

    destination: bytes
    next_hop: bytes
    metric: int
    """Additive metric (docs/routing.md): our link cost to `next_hop` plus what it advertised."""
    seqno: int
    """The destination's sequence number this route carries."""
    hops: int
    """Hop count to the destination (1 for a direct neighbour)."""
    age: float
    """Seconds since `next_hop` last refreshed the route."""
    expires_in: float
    """Seconds until it expires unless refreshed."""
    alternatives: int
    """Other routes to the destination held (feasible or not), for diagnostics."""


@dataclass(frozen=True, slots=True)
class NeighbourInfo:
    """One neighbour as the driver reported it."""

    cell: bytes
    cost: int
    """Link cost in metric units (INFINITY: unusable)."""
    rtt: float | None
    loss: float
    up_since: float
    last_heard: float | None
    """When a routing message from it last decoded, or None."""
    routes: int
    """Routes learned from it that we hold."""


@dataclass(frozen=True, slots=True)
class RoutingStats:
    """A snapshot of a routing core's counters.

    `sent` and `bytes_sent` are per message type name (``UPDATE``, ``SEQNO_REQUEST``); a message
    returned with destination None counts once. `drops` counts refused input by reason (the
    stable words are listed in docs/routing.md).
    """

    seqno: int
    neighbours: int
    destinations: int
    """Destinations held (with or without a usable route)."""
    routes: int
    """Destinations with a selected route."""
    pending_requests: int
    sent: dict[str, int]
    bytes_sent: dict[str, int]
    received: int
    bytes_received: int
    records_received: int
    full_dumps: int
    """Periodic full dumps started (each reaches every neighbour)."""
    triggered_flushes: int
    """Flushes of triggered updates, request answers and new-neighbour dumps."""
    requests_sent: int
    """Seqno request records we originated (stuck without a feasible route), resends included."""
    requests_forwarded: int
    requests_answered: int
    seqno_bumps: int
    seqno_bumps_deferred: int
    """Requests for a newer seqno of ours that arrived inside `seqno_bump_interval` of the last
    increase; they are served, together, when it ends."""
    route_changes: int
    """Changes of next hop (the RouteChanged events)."""
    evictions: int
    drops: dict[str, int] = field(default_factory=dict)
