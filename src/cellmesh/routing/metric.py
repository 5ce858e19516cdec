"""Metric and sequence-number arithmetic for the routing core. Pure functions, no state.

Metric
------
A metric is a u16; `INFINITY` (0xFFFF) means "unreachable" and is what a retraction carries.
Metrics are additive: a route's metric is the metric its neighbour advertised plus the cost of
the link to that neighbour, saturating at `INFINITY` (a sum that reaches it is unreachable, never
a wrapped small number). The cost of one link is an ETX-weighted RTT:

    cost = ceil((hop_cost + 1000 * rtt) / (1 - loss))      clamped to [1, max_link_cost]
    cost = INFINITY                                         when loss >= max_loss

`rtt` is the link's smoothed round-trip time in seconds (`default_rtt` when the driver has no
sample yet; clamped to `MAX_RTT`), so one metric unit is one millisecond of round trip. `loss`
is the fraction of round trips that fail (a probe or its answer lost), so ``1 / (1 - loss)`` is
the link's expected transmission count (ETX, De Couto et al. 2003): a lossy link costs what its
retransmissions cost. `hop_cost` is a fixed charge per hop, so among equally fast paths the
shorter wins and a zero-RTT link still costs something. With the defaults (hop_cost 10) a clean
LAN hop costs about 11, a 40 ms WAN hop 50, and a path of 64 such WAN hops stays far below
INFINITY; `max_hops` in the settings bounds paths anyway.

Sequence numbers
----------------
Sequence numbers are u16 compared modulo 2**16 (RFC 8966 section 3.2.1): `a` is newer than `b`
when ``0 < (a - b) mod 2**16 < 2**15``. Two numbers exactly 2**15 apart are neither newer than
the other, which the feasibility test treats as "not newer" (the safe answer).
"""

from __future__ import annotations

import math

__all__ = [
    "INFINITY",
    "MAX_RTT",
    "SEQNO_MASK",
    "add_metric",
    "feasible",
    "link_cost",
    "seqno_add",
    "seqno_newer",
    "seqno_not_older",
]

INFINITY = 0xFFFF
"""The unreachable metric (what a retraction carries)."""
SEQNO_MASK = 0xFFFF
"""Sequence numbers are u16."""
_SEQNO_HALF = 0x8000
MAX_RTT = 10.0
"""RTT samples above this many seconds are clamped: no real mesh link is slower, and the clamp
keeps an absurd sample from the driver from producing an absurd cost."""


def seqno_newer(a: int, b: int) -> bool:
    """True when sequence number `a` is strictly newer than `b` (modulo 2**16)."""
    return 0 < ((a - b) & SEQNO_MASK) < _SEQNO_HALF


def seqno_not_older(a: int, b: int) -> bool:
    """True when `a` equals `b` or is newer."""
    return a == b or 0 < ((a - b) & SEQNO_MASK) < _SEQNO_HALF


def seqno_add(a: int, n: int) -> int:
    """`a + n` modulo 2**16."""
    return (a + n) & SEQNO_MASK


def add_metric(advertised: int, cost: int) -> int:
    """A neighbour's advertised metric plus our link cost to it, saturating at INFINITY."""
    total = advertised + cost
    return total if total < INFINITY else INFINITY


def feasible(seqno: int, metric: int, fd_seqno: int | None, fd_metric: int) -> bool:
    """The feasibility condition (RFC 8966 section 3.5.1).

    An advertisement (seqno, metric), `metric` being what the neighbour advertised (before our
    link cost), is feasible when we have no feasibility distance for the destination yet, or
    when it is strictly better than the feasibility distance (fd_seqno, fd_metric): a newer
    sequence number, or the same one with a strictly smaller metric. Retractions (INFINITY)
    are always feasible: they can only remove routes.
    """
    if fd_seqno is None or metric >= INFINITY:
        return True
    if seqno == fd_seqno:
        return metric < fd_metric
    return seqno_newer(seqno, fd_seqno)


def link_cost(
    rtt: float | None,
    loss: float,
    *,
    hop_cost: int,
    default_rtt: float,
    max_link_cost: int,
    max_loss: float,
) -> int:
    """The cost of one link (module docstring): ETX-weighted RTT plus a per-hop charge.

    Raises ValueError for a NaN or negative `rtt`, or a `loss` outside [0, 1] (driver bugs).
    """
    if rtt is None:
        rtt = default_rtt
    if math.isnan(rtt) or rtt < 0:
        raise ValueError(f"rtt must be a number of seconds >= 0, got {rtt!r}")
    if not 0.0 <= loss <= 1.0:  # also rejects NaN
        raise ValueError(f"loss must be a fraction in [0, 1], got {loss!r}")
    if loss >= max_loss:
        return INFINITY
    base = hop_cost + 1000.0 * min(rtt, MAX_RTT)
    cost = math.ceil(base / (1.0 - loss))
    return max(1, min(cost, max_link_cost))
