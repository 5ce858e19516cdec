"""Per-claimant and per-member bookkeeping of the anchor core.

A *claimant* is a member that claims the anchor role: we heard a verified PULSE or EPOCH from
it. For each one the core keeps what replay protection and the hold rule need: the highest pulse
sequence and epoch number verified from it, when it was last heard, since when it has been heard
without a gap (the hold clock), and its two newest epoch keys (the anchor we follow is a
claimant too: its keys are the ones we MAC with).

`Strikes` remembers failovers away from a member: each one makes that member serve a longer
hold before it can displace an incumbent again (flap damping; the count is forgotten after
`strike_memory`), and marks it a *suspect* that elections skip until it has proven itself by
claiming through a full hold, or the driver forgot and re-admitted it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cellmesh.anchor.keys import EpochKey
from cellmesh.identity.cellid import CellId

__all__ = ["Claimant", "Strikes"]

_KEYS_KEPT = 2


@dataclass(slots=True)
class Claimant:
    """What we know of one member that claims the anchor role."""

    cell_id: CellId
    term: int = 0
    """The claimant's current term (the epoch number that opened its tenure)."""
    epoch: int = 0
    """Highest epoch number verified from it (pulse or EPOCH)."""
    seq: int = -1
    """Highest pulse sequence number verified from it."""
    heard_since: float = 0.0
    """Start of the current gap-free run of verified claims (the hold clock)."""
    last_heard: float = -math.inf
    """When its last verified claim arrived."""
    keys: dict[int, EpochKey] = field(default_factory=dict, repr=False)
    """Its newest epoch keys by epoch number (at most two)."""

    def hear(self, now: float, term: int, epoch: int, max_gap: float) -> None:
        """Record a verified claim. A gap longer than `max_gap`, or a new term (it stepped down
        and claimed again), restarts the hold clock."""
        if now - self.last_heard > max_gap or term != self.term:
            self.heard_since = now
        self.last_heard = now
        self.term = term
        self.epoch = max(self.epoch, epoch)

    def heard_for(self, now: float) -> float:
        """Seconds of gap-free claiming up to `now`."""
        return now - self.heard_since

    def fresh(self, now: float, timeout: float) -> bool:
        """True when its last verified claim is less than `timeout` old."""
        return now - self.last_heard < timeout

    def newest_key(self) -> EpochKey | None:
        """Its key with the highest epoch number, if we hold any."""
        if not self.keys:
            return None
        return self.keys[max(self.keys)]

    def add_key(self, key: EpochKey, now: float) -> None:
        """Keep `key`; the previous newest is superseded now, and only two are kept."""
        newest = self.newest_key()
        if newest is not None and newest.epoch < key.epoch and newest.superseded_at is None:
            newest.superseded_at = now
        self.keys[key.epoch] = key
        while len(self.keys) > _KEYS_KEPT:
            del self.keys[min(self.keys)]

    def key_for(self, epoch: int, now: float, grace: float) -> EpochKey | None:
        """Its key for `epoch`, if we hold it and it is still usable (newest, or in grace)."""
        key = self.keys.get(epoch)
        if key is None or not key.usable(now, grace):
            return None
        return key


@dataclass(slots=True)
class Strikes:
    """Failovers away from one member, remembered for `strike_memory` seconds."""

    count: int
    last: float
    suspect: bool = True
    """Skipped by elections until it claims through a full hold, or is admitted afresh."""
