"""Anchor settings: one frozen dataclass, validated on construction.

Every field has a docstring so `cellmesh.config` can turn it into a config key and a
``CELLMESH_*`` variable later. The defaults are NEXUS-0's published figures where it gives one
(5 s pulse, 3 missed pulses to fail over, 60 s epoch, one REQ_EPOCH answer per 2 s) and the
reasoning in docs/anchor.md where it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AnchorSettings"]


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class AnchorSettings:
    """How a node takes part in Deterministic Anchor Truth. Raises `ValueError` on construction
    for any value outside its documented range."""

    pulse_interval: float = 5.0
    """Seconds between two PULSEs of the anchor (NEXUS-0: 5 s)."""
    silence_pulses: int = 3
    """Missed pulses after which a follower declares its anchor dead (NEXUS-0: 3, so 15 s)."""
    pulse_slack: float = 0.25
    """How late a pulse may be before it counts as missed (link delay and timer jitter), so
    the silence timeout is ``silence_pulses * pulse_interval + pulse_slack``: without it, two
    lost pulses and a third arriving a millisecond after its due time would count as three."""
    epoch_period: float = 60.0
    """Seconds between two epoch keys (NEXUS-0: 60 s)."""
    key_grace: float = 10.0
    """How long the previous epoch key stays usable after a new one is installed, so pulses and
    MACs made just before a rotation still verify."""
    stale_epochs: float = 3.0
    """A follower treats its anchor as failed once the current key is older than this many
    epoch periods (an anchor that pulses but stopped rotating keys)."""
    hold_time: float = 10.0
    """A claimant that outranks the incumbent must be heard claiming without a gap for this long
    before it displaces it (two pulses: two anchors that hear each other resolve in two)."""
    hold_backoff_max: int = 4
    """Each failover away from a member doubles the hold it must serve when it claims again
    (the first return is not penalised), up to ``hold_time * 2**hold_backoff_max``."""
    strike_memory: float = 600.0
    """Seconds after the last failover away from a member until its strikes are forgotten (its
    hold is back to `hold_time`). A failed member stays out of elections regardless, until it
    claims through a hold again or the driver admits it afresh."""
    succession_wait: float = 2.0
    """With no anchor, once the member that tops our ranking has been passed over (it did not
    claim within the silence timeout), each next one gets this long to claim before it is
    passed over too: live members time out together, so a live successor claims at once."""
    challenge_delay: float = 60.0
    """A follower with a strictly higher ego than its anchor starts claiming after following
    that anchor for this long (it settles before it challenges)."""
    listen_time: float = 15.0
    """After `start`, a node listens this long for an existing anchor before it may promote
    itself (as long as a follower waits before failing over: 3 pulses)."""
    seniority_quantum: float = 60.0
    """Width of one seniority level, seconds. Also the clock-skew tolerance of seniority: first
    seen times that differ by much less than this almost always fall into the same level."""
    seniority_levels: int = 3
    """Highest seniority level. Once every member has been known for `seniority_levels *
    seniority_quantum`, every node computes the same levels."""
    ego_cap: int = 100
    """Largest ego score considered; higher claims are cut to it (NEXUS-0: 0-100)."""
    max_skew: float = 30.0
    """Largest difference between a message's timestamp and our wall clock, seconds."""
    request_interval: float = 2.0
    """Minimum seconds between two REQ_EPOCH answers to one requester (NEXUS-0: 2 s), and
    between two of our own requests to one anchor."""
    request_on_start: bool = True
    """Broadcast a REQ_EPOCH at `start`, so a joining node gets the current key from the
    anchor in one round trip instead of waiting for the next pulse."""
    rotate_on_leave: bool = True
    """An anchor starts a new epoch (at most once per pulse interval) when a member is
    forgotten, so a node that left does not keep the current key for the rest of the epoch."""
    max_members: int = 4096
    """Largest membership the core tracks; `admit` refuses more."""
    max_claimants: int = 8
    """Largest number of claimants tracked at once (each one's keys and hold clock). A record
    is made only once a claim verifies; when full, the one heard least recently goes."""
    sender_rate: float = 2.0
    """Messages per second accepted from one member (pulses, EPOCHs, requests together)."""
    sender_burst: float = 8.0
    """Burst size of the per-member budget above."""

    def __post_init__(self) -> None:
        for name in (
            "pulse_interval",
            "epoch_period",
            "key_grace",
            "stale_epochs",
            "hold_time",
            "strike_memory",
            "challenge_delay",
            "succession_wait",
            "listen_time",
            "seniority_quantum",
            "max_skew",
            "request_interval",
            "sender_rate",
        ):
            _positive(name, getattr(self, name))
        if not (0 <= self.pulse_slack < self.pulse_interval):
            raise ValueError("pulse_slack must be >= 0 and below pulse_interval")
        if self.silence_pulses < 1:
            raise ValueError("silence_pulses must be >= 1")
        if not 0 <= self.hold_backoff_max <= 16:
            raise ValueError("hold_backoff_max must be 0..16")
        if not 0 <= self.seniority_levels <= 1000:
            raise ValueError("seniority_levels must be 0..1000")
        if not 0 <= self.ego_cap <= 255:
            raise ValueError("ego_cap must be 0..255")
        if self.max_members < 1 or self.max_claimants < 2:
            raise ValueError("max_members must be >= 1 and max_claimants >= 2")
        if self.sender_burst < 1:
            raise ValueError("sender_burst must be >= 1")
        if self.stale_epochs * self.epoch_period <= self.silence_timeout:
            raise ValueError("stale_epochs * epoch_period must exceed the silence timeout")

    @property
    def silence_timeout(self) -> float:
        """Seconds without a verified pulse after which the anchor is declared dead."""
        return self.silence_pulses * self.pulse_interval + self.pulse_slack

    @property
    def stale_after(self) -> float:
        """Age of the current epoch key at which the anchor is declared failed."""
        return self.stale_epochs * self.epoch_period

    def hold_for(self, strikes: int) -> float:
        """The hold a claimant with `strikes` recent failovers must serve."""
        doublings = min(max(0, strikes - 1), self.hold_backoff_max)
        return self.hold_time * (1 << doublings)
