"""Phi-accrual failure detection (Hayashibara et al., 2004; the Akka variant). Pure.

Theory of operation. Every packet from a peer is a heartbeat. The detector keeps the recent
inter-arrival times and, at any moment, expresses how surprising the current silence is as
phi = -log10(P(a gap at least this long)), assuming gaps are normally distributed with the observed
mean and standard deviation. phi 1 means a 10% chance that the peer is merely slow, phi 8 one in
10^8. An idle peer still sends a keepalive every `keepalive_interval`, so that interval is added to the
expected gap as an acceptable pause (otherwise a transfer's microsecond gaps would make the first idle
second look like death), and the standard deviation has a floor so a perfectly regular peer is not
declared suspect on the first jitter. The node reports a peer suspect when phi crosses the configured
threshold, alive again on the next packet, and gone after `idle_timeout`.

Packets closer together than BURST_GAP count as one heartbeat: during a transfer a peer sends
tens of thousands of packets a second, and recording each gap would cost time on every packet
and fill the window with microsecond intervals that say nothing next to the half-second floor
of the standard deviation.
"""

from __future__ import annotations

import math
from collections import deque

MIN_STD = 0.5
WINDOW = 100
BURST_GAP = 0.005  # seconds; packets closer than this to the last recorded one add no interval


class PhiAccrual:
    """Suspicion level of one peer."""

    __slots__ = ("_intervals", "_last", "_mark", "_sum", "_sum_sq", "acceptable_pause")

    def __init__(self, now: float, acceptable_pause: float) -> None:
        self._last = now
        self._mark = now  # the last heartbeat recorded as the end of an interval
        self._intervals: deque[float] = deque()
        self._sum = 0.0
        self._sum_sq = 0.0
        self.acceptable_pause = acceptable_pause

    def heartbeat(self, now: float) -> None:
        """A packet arrived."""
        self._last = now
        gap = now - self._mark
        if not gap >= BURST_GAP:  # also a clock going backwards (and NaN): no interval
            return
        self._mark = now
        if gap >= 1e9:
            return
        self._intervals.append(gap)
        self._sum += gap
        self._sum_sq += gap * gap
        if len(self._intervals) > WINDOW:
            old = self._intervals.popleft()
            self._sum -= old
            self._sum_sq -= old * old

    def phi(self, now: float) -> float:
        """How suspicious the silence since the last heartbeat is (0 = not at all)."""
        n = len(self._intervals)
        avg = self._sum / n if n else 1.0
        mean = avg + self.acceptable_pause
        var = self._sum_sq / n - avg * avg if n else 0.0
        if not (math.isfinite(mean) and math.isfinite(var)):
            return 0.0 if now - self._last < self.acceptable_pause else float("inf")
        std = max(math.sqrt(max(var, 0.0)), MIN_STD)
        # Clamped: far inside or far beyond the expected gap the answer is 0 or "certain" anyway,
        # and exp() of a large argument would overflow.
        y = min(max((now - self._last - mean) / std, -20.0), 20.0)
        # Logistic approximation of the normal CDF tail (as Akka does), numerically safe.
        e = math.exp(-y * (1.5976 + 0.070566 * y * y))
        p_later = e / (1.0 + e) if y > 0 else 1.0 - 1.0 / (1.0 + e)
        return max(0.0, -math.log10(max(p_later, 1e-300)))

    @property
    def last_heartbeat(self) -> float:
        """When the last packet arrived."""
        return self._last
