"""What the anchor core reports: events, its role, and a statistics snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from cellmesh.identity.cellid import CellId

__all__ = [
    "AnchorChanged",
    "AnchorEvent",
    "AnchorFailed",
    "AnchorStats",
    "EpochKeyInstalled",
    "Role",
]


class Role(Enum):
    """Where a node stands in the election."""

    IDLE = "idle"
    """Not started."""
    LISTENING = "listening"
    """Started, listening for an existing anchor; may follow one, may not promote itself yet."""
    ELECTING = "electing"
    """No anchor: promotes itself if it tops the election, else waits for the one that does."""
    FOLLOWER = "follower"
    """Follows a verified anchor."""
    ANCHOR = "anchor"
    """Claims the role: pulses, rotates and delivers epoch keys."""


@dataclass(frozen=True, slots=True)
class AnchorChanged:
    """The anchor this node follows changed. `anchor` is our own CellID when we promoted
    ourselves, None when the previous one failed and no successor is known yet."""

    anchor: CellId | None
    previous: CellId | None
    term: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class AnchorFailed:
    """The anchor we followed is declared failed: ``silent`` (no verified pulse for the silence
    timeout), ``stale_key`` (its key outlived `stale_epochs` periods) or ``forgotten`` (the
    driver forgot it, e.g. discovery expired it)."""

    anchor: CellId
    reason: str


@dataclass(frozen=True, slots=True)
class EpochKeyInstalled:
    """A new epoch key is current (from our anchor, or made by us as anchor). Never the key."""

    anchor: CellId
    term: int
    epoch: int


AnchorEvent = AnchorChanged | AnchorFailed | EpochKeyInstalled


@dataclass(frozen=True, slots=True)
class AnchorStats:
    """A snapshot of an anchor core's counters.

    `sent` and `bytes_sent` are per message type name (``PULSE``, ``EPOCH``, ``REQ_EPOCH``;
    a broadcast counts once). `drops` counts refused messages by reason.
    """

    role: Role
    members: int
    messages_received: int
    sent: dict[str, int]
    bytes_sent: dict[str, int]
    promotions: int
    step_downs: int
    failovers: int
    keys_installed: int
    requests_answered: int
    requests_ignored: int
    """Broadcast REQ_EPOCHs heard while not anchor (for whichever anchor hears them)."""
    drops: dict[str, int] = field(default_factory=dict)

    @property
    def messages_sent(self) -> int:
        """Messages sent, all types."""
        return sum(self.sent.values())

    @property
    def total_bytes_sent(self) -> int:
        """Bytes sent, all types."""
        return sum(self.bytes_sent.values())
