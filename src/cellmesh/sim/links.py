"""Link models: what happens to a datagram between two simulated nodes.

A `LinkModel` describes one *directed* link (a -> b). `SimNetwork` applies it to every datagram in
this order (see `cellmesh.sim.network` for where it sits in the event loop):

1. `mtu`: a datagram larger than the link's MTU is dropped (reason ``mtu``), as a router would.
2. bandwidth: the link is a serialising FIFO queue. A datagram leaves when the previous one has
   finished (`departure = max(now, link_free_at) + size / bandwidth`), so a burst queues up and
   congestion shows as real queueing delay. When the bytes already waiting (including the one on
   the wire) plus this datagram exceed `queue_limit`, the datagram is tail-dropped (``queue``).
3. `loss`: with this probability the datagram is lost in transit (``loss``). A lost datagram has
   still used the sender's bandwidth.
4. delay: `latency` plus a uniform draw in [-jitter, +jitter] (never below zero). Jitter alone does
   not reorder: a link is FIFO, so a datagram never arrives before one sent earlier on the same
   link, unless it was picked for reordering.
5. `reorder`: with this probability the datagram is held back a further `reorder_delay` seconds,
   outside the FIFO, so datagrams sent after it overtake it.
6. `duplicate`: with this probability a second copy is delivered too (at the same time plus up to
   one `jitter`).

Every random draw comes from the network's seeded `random.Random`, and only for the features a
model enables, so a run is reproducible from its seed and script.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from dataclasses import dataclass


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class LinkModel:
    """How one directed link treats datagrams. All times in seconds, sizes in bytes.

    The default is an ideal LAN link: 1 ms latency, nothing lost, unlimited bandwidth.
    """

    latency: float = 0.001
    """One-way propagation delay."""
    jitter: float = 0.0
    """Each datagram's delay is `latency` plus a uniform draw in [-jitter, +jitter] (floored at 0)."""
    bandwidth: float | None = None
    """Serialisation rate in bytes per second; None means infinitely fast (no queueing)."""
    loss: float = 0.0
    """Probability that a datagram is lost."""
    duplicate: float = 0.0
    """Probability that a datagram is delivered twice."""
    reorder: float = 0.0
    """Probability that a datagram is held back by `reorder_delay`, letting later ones overtake it."""
    reorder_delay: float = 0.01
    """Extra delay of a reordered datagram."""
    mtu: int | None = None
    """Largest datagram the link carries; larger ones are dropped. None means no limit."""
    queue_limit: int | None = None
    """Bytes the link's send queue holds (bandwidth-limited links only); beyond it, tail drop."""

    def __post_init__(self) -> None:
        _check_non_negative("latency", self.latency)
        _check_non_negative("jitter", self.jitter)
        _check_non_negative("reorder_delay", self.reorder_delay)
        for name in ("loss", "duplicate", "reorder"):
            _check_probability(name, getattr(self, name))
        if self.bandwidth is not None and not (
            self.bandwidth > 0 and math.isfinite(self.bandwidth)
        ):
            raise ValueError(f"bandwidth must be > 0 bytes/s or None, got {self.bandwidth!r}")
        if self.mtu is not None and self.mtu <= 0:
            raise ValueError(f"mtu must be > 0 bytes or None, got {self.mtu!r}")
        if self.queue_limit is not None:
            if self.bandwidth is None:
                raise ValueError(
                    "queue_limit needs a bandwidth: an infinitely fast link never queues"
                )
            if self.queue_limit <= 0:
                raise ValueError(f"queue_limit must be > 0 bytes or None, got {self.queue_limit!r}")


@functools.lru_cache(maxsize=1024)
def is_multicast(host: str) -> bool:
    """True when `host` is an IPv4 or IPv6 multicast address (e.g. ``ff02::1``, ``224.0.0.251``)."""
    try:
        return ipaddress.ip_address(host).is_multicast
    except ValueError:
        return False
