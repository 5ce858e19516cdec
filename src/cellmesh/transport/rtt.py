"""Round-trip time estimation (RFC 9002 section 5; RFC 6298 for the smoothing constants)."""

from __future__ import annotations

INITIAL_RTT = 0.1  # before any sample (RFC 9002 uses 333 ms for the internet; a mesh is closer)
GRANULARITY = 0.001


class RttEstimator:
    """latest, smoothed, variance and minimum RTT from acknowledgement samples."""

    __slots__ = ("latest", "min_rtt", "rttvar", "samples", "smoothed")

    def __init__(self, initial: float = INITIAL_RTT) -> None:
        self.latest = initial
        self.smoothed = initial
        self.rttvar = initial / 2
        self.min_rtt = float("inf")
        self.samples = 0

    def update(self, sample: float, ack_delay: float, max_ack_delay: float) -> None:
        """Feed one RTT sample (seconds) with the peer-reported ack delay."""
        if sample <= 0:
            sample = GRANULARITY / 10
        self.latest = sample
        self.min_rtt = min(self.min_rtt, sample)
        if self.samples == 0:
            self.smoothed = sample
            self.rttvar = sample / 2
        else:
            ack_delay = min(ack_delay, max_ack_delay)
            adjusted = sample - ack_delay if sample - ack_delay >= self.min_rtt else sample
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.smoothed - adjusted)
            self.smoothed = 0.875 * self.smoothed + 0.125 * adjusted
        self.samples += 1

    def pto(self, max_ack_delay: float) -> float:
        """Probe timeout base period (before exponential backoff)."""
        return self.smoothed + max(4 * self.rttvar, GRANULARITY) + max_ack_delay

    def loss_delay(self) -> float:
        """Time threshold after which an unacknowledged packet is deemed lost (9/8 RTT)."""
        return max(9 / 8 * max(self.smoothed, self.latest), GRANULARITY)
