"""Routing settings: one frozen dataclass, validated on construction.

Every field has a docstring so `cellmesh.config` can turn it into a config key later. The timer
defaults follow Babel's proportions (RFC 8966 appendix B: hold time 3.5 update intervals) with a
longer update interval, because a cellmesh full dump carries one 22-byte record per destination
and a mesh may hold thousands of them; triggered updates, not periodic ones, carry changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cellmesh.routing.metric import INFINITY

__all__ = ["MAX_INTERVAL", "MIN_INTERVAL", "RoutingSettings"]

MIN_INTERVAL = 1.0
"""Smallest update interval a neighbour's message may claim for our expiry computation; a
smaller claim is raised to it (a hostile or broken neighbour cannot make routes expire at once)."""
MAX_INTERVAL = 6553.5
"""Largest update interval the wire can carry (u16 deciseconds)."""
_MIN_MESSAGE = 64
_MAX_MESSAGE = 5616  # 6-byte header + 255 route records of 22 bytes (the u8 record count)


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """How a node takes part in the distance-vector protocol (docs/routing.md). Raises
    `ValueError` on construction for any value outside its documented range."""

    update_interval: float = 30.0
    """Seconds between two periodic full dumps of the table to every neighbour (jittered by
    `update_jitter`). Carried in every update (in tenths of a second) so receivers can age our
    routes. At most 6,553.5."""
    update_jitter: float = 0.25
    """Each periodic dump comes a uniform random fraction up to this much *early*, so
    neighbours that started together do not stay synchronised. In [0, 0.9]."""
    hold_factor: float = 3.5
    """A route expires when not refreshed for this many of the advertising neighbour's update
    intervals (RFC 8966: 3.5). Expiry is checked once per update interval, so a route dies
    between `hold_factor` and `hold_factor + 1` intervals after its last refresh."""
    triggered_delay: float = 0.05
    """Seconds a triggered update (a changed route, a retraction, a request answer, a dump for
    a new neighbour) waits so that the changes of a burst leave in one message."""
    trigger_threshold: float = 0.125
    """A change of the selected route's metric triggers an update only when it differs from the
    last advertised metric by more than this fraction of it; smaller drifts wait for the next
    periodic dump. New, lost or re-routed routes always trigger."""
    hysteresis: int = 4
    """A route through another neighbour replaces the selected one only when its metric is
    lower by more than this many units, so RTT noise does not make routes flap."""
    hop_cost: int = 10
    """Fixed cost of one hop, in metric units (one unit = 1 ms of round trip)."""
    default_rtt: float = 0.05
    """RTT assumed for a neighbour the driver has no sample for yet, seconds."""
    max_link_cost: int = 4096
    """Largest cost one usable link may have (a very slow or lossy link saturates here)."""
    max_loss: float = 0.9
    """A link losing at least this fraction of round trips is unusable (cost INFINITY)."""
    cost_noise: float = 1 / 16
    """A new link cost within this fraction of the current one is ignored (SRTT noise), so a
    driver may report every RTT sample without re-evaluating the table each time."""
    max_hops: int = 64
    """Routes longer than this many hops are treated as unreachable. At most 255."""
    split_horizon: bool = True
    """Never advertise a route to the neighbour it goes through, nor one that neighbour has
    advertised back at least as good (certainly unfeasible there); every update is then
    addressed to one neighbour. Without it, updates go to all neighbours at once (None) and
    nothing is left out (loop freedom does not depend on it)."""
    request_hops: int = 64
    """Hop count a seqno request starts with: how far it may be forwarded towards the origin."""
    request_timeout: float = 1.0
    """Seconds before an unanswered seqno request of ours is resent (doubling each time), and
    how long a forwarded request suppresses duplicates."""
    request_retries: int = 3
    """Sends of one seqno request of ours before we give up (until the next unfeasible update)."""
    seqno_bump_interval: float = 0.5
    """Minimum seconds between two increases of our own sequence number, however many requests
    ask for one (a neighbour flooding requests cannot race our seqno around its circle); a
    request that arrives sooner is served when the interval ends."""
    source_gc_time: float = 300.0
    """Seconds a destination with no route keeps its feasibility distance before it is
    forgotten (RFC 8966 uses 3 minutes). Raised to twice the hold time when shorter
    (`source_gc`), so the routes advertised under a feasibility distance have expired
    around us before it is dropped."""
    dump_request_interval: float = 1.0
    """Minimum seconds between two full dumps sent to one neighbour because it asked."""
    max_routes: int = 65_536
    """Destinations the table holds. When full, a new one evicts the oldest unreachable
    destination, else the reachable one with the worst metric if the newcomer is better, else it
    is refused (drop reason ``table_full``)."""
    max_alternates: int = 4
    """Routes kept per destination (one per neighbour; the selected one always among them). A
    route beyond this replaces the worst unselected one if better, else it is ignored until the
    neighbour's next dump. Each held route costs about 250 bytes; the best few by metric are
    the feasible ones in practice, which is what an instant failover needs."""
    max_neighbours: int = 256
    """Neighbours the core accepts; `neighbour_up` refuses more."""
    max_pending_requests: int = 4096
    """Seqno requests (ours and forwarded ones) tracked at once."""
    max_events: int = 65_536
    """Events queued for `next_event` before new ones are dropped (drop reason ``events``)."""
    max_message_size: int = 1100
    """Largest message `updates_to_send` produces, bytes. The default leaves room for the 64-byte
    frame header, a 3-byte record header and the 16-byte AEAD tag in a 1,200-byte datagram."""

    def __post_init__(self) -> None:
        for name in (
            "update_interval",
            "hold_factor",
            "default_rtt",
            "request_timeout",
            "seqno_bump_interval",
            "source_gc_time",
            "dump_request_interval",
        ):
            _positive(name, getattr(self, name))
        if self.update_interval > MAX_INTERVAL:
            raise ValueError(f"update_interval must be <= {MAX_INTERVAL} s")
        if not (0.0 <= self.update_jitter <= 0.9):
            raise ValueError("update_jitter must be in [0, 0.9]")
        if self.hold_factor <= 1.0:
            raise ValueError("hold_factor must exceed 1 (routes would expire between dumps)")
        if not (0.0 <= self.triggered_delay < self.update_interval):
            raise ValueError("triggered_delay must be >= 0 and below update_interval")
        if not (0.0 <= self.trigger_threshold <= 1.0):
            raise ValueError("trigger_threshold must be in [0, 1]")
        if not (0 <= self.hysteresis < INFINITY):
            raise ValueError("hysteresis must be in [0, 65535)")
        if not (0 <= self.hop_cost <= self.max_link_cost):
            raise ValueError("hop_cost must be in [0, max_link_cost]")
        if not (1 <= self.max_link_cost < INFINITY):
            raise ValueError("max_link_cost must be in [1, 65535)")
        if not (0.0 < self.max_loss <= 1.0):
            raise ValueError("max_loss must be in (0, 1]")
        if not (0.0 <= self.cost_noise < 1.0):
            raise ValueError("cost_noise must be in [0, 1)")
        if not (1 <= self.max_hops <= 255):
            raise ValueError("max_hops must be in [1, 255]")
        if not (1 <= self.request_hops <= 255):
            raise ValueError("request_hops must be in [1, 255]")
        if not (1 <= self.request_retries <= 16):
            raise ValueError("request_retries must be in [1, 16]")
        for name in (
            "max_routes",
            "max_alternates",
            "max_neighbours",
            "max_pending_requests",
            "max_events",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not (_MIN_MESSAGE <= self.max_message_size <= _MAX_MESSAGE):
            raise ValueError(f"max_message_size must be in [{_MIN_MESSAGE}, {_MAX_MESSAGE}]")

    @property
    def hold_time(self) -> float:
        """Seconds our own routes live at a neighbour without a refresh."""
        return self.hold_factor * self.update_interval

    @property
    def source_gc(self) -> float:
        """The source GC time in force: `source_gc_time`, at least twice the hold time."""
        return max(self.source_gc_time, 2.0 * self.hold_time)
