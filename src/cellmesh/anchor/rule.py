"""The anchor rule: who should be anchor, as pure functions of what a node knows.

Two orders, both deterministic, neither a vote (docs/anchor.md, "The rule"):

* The **election order** ranks the admitted, anchor-eligible members a node knows by
  ``(ego, seniority level, tie-break)``: higher ego first, then higher seniority, then the lower
  tie-break. It decides who *should start claiming* when nobody is anchor. Seniority is local
  (first-seen time on this node's monotonic clock, never a peer's claim), so two nodes can
  disagree near a level boundary; the election order is only ever used to decide whether to
  promote oneself, so a disagreement at worst makes two members claim at once, which the claim
  order below then settles.
* The **claim order** compares two members that are *claiming* the role, by ``(ego,
  tie-break)`` only. Everything in it is known identically to every member (ego from admission,
  the CellIDs, the claimants' terms carried in their signed messages), so every node that hears
  the same two claimants reaches the same verdict.

The tie-break is ``BLAKE3-derive_key("cellmesh anchor tiebreak v1", CellID || u64 epoch)``,
lower wins. Mixing in an epoch number means no key can be ground to win every election: the
winning CellID changes with the epoch. In the claim order the epoch is the smaller of the two
claimants' terms (the epoch number that opened each one's tenure), which stays fixed for as long
as both keep claiming, so the verdict cannot flip while they are in conflict.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import blake3
import nacl.public

from cellmesh.identity.cellid import CellId

__all__ = [
    "TIEBREAK_CONTEXT",
    "Member",
    "cap_ego",
    "claim_outranks",
    "election_order",
    "election_top",
    "seniority_level",
    "tiebreak",
]

TIEBREAK_CONTEXT = "cellmesh anchor tiebreak v1"
"""BLAKE3 derive_key context of the tie-break hash."""
_U64 = struct.Struct("!Q")


@functools.lru_cache(maxsize=65536)
def tiebreak(cell_id: bytes, epoch: int) -> bytes:
    """The 32-byte tie-break of `cell_id` at `epoch` (lower wins).

    Pure, so memoised process-wide: a simulator running a thousand cores computes each value
    once, which changes how fast it runs, never what it computes.
    """
    material = bytes(cell_id) + _U64.pack(epoch & 0xFFFFFFFFFFFFFFFF)
    return blake3.blake3(material, derive_key_context=TIEBREAK_CONTEXT).digest()


def cap_ego(ego: int, cap: int) -> int:
    """An ego score clamped to ``0..cap``: a claim of a billion counts as `cap`."""
    return max(0, min(int(ego), cap))


def seniority_level(age: float, quantum: float, levels: int) -> int:
    """The seniority level of a member known for `age` seconds: ``floor(age / quantum)``,
    capped at `levels`. Negative or non-finite ages count as 0."""
    if not (age > 0 and math.isfinite(age)):
        return 0
    return min(levels, int(age // quantum))


@dataclass(slots=True)
class Member:
    """An admitted member, as this node knows it. `first_seen` is on our monotonic clock."""

    cell_id: CellId
    public_key: bytes
    x25519_public_key: bytes
    ego: int
    first_seen: float
    eligible: bool = True
    """False for members that may hold keys but must never be anchor (capability bit off)."""
    box: nacl.public.SealedBox[nacl.public.PublicKey] | None = field(default=None, repr=False)
    """Built on first use by an anchor, to seal keys to this member."""


def claim_outranks(
    a_ego: int, a_id: bytes, a_term: int, b_ego: int, b_id: bytes, b_term: int
) -> bool:
    """True when claimant A outranks claimant B in the claim order: higher ego, else the lower
    tie-break at the smaller of the two terms (the CellIDs, which differ, break an exact tie of
    hashes, which never happens in practice)."""
    if a_ego != b_ego:
        return a_ego > b_ego
    if a_id == b_id:
        return False
    e = min(a_term, b_term)
    ta, tb = tiebreak(a_id, e), tiebreak(b_id, e)
    if ta != tb:
        return ta < tb
    return bytes(a_id) < bytes(b_id)


def _sort_key(
    m: Member, now: float, epoch: int, quantum: float, levels: int
) -> tuple[int, int, bytes]:
    level = seniority_level(now - m.first_seen, quantum, levels)
    return (-m.ego, -level, tiebreak(m.cell_id, epoch))


def election_order(
    members: Iterable[Member], now: float, epoch: int, quantum: float, levels: int
) -> list[Member]:
    """`members` best first by the election order at `epoch` (O(n log n); for status)."""
    return sorted(members, key=lambda m: _sort_key(m, now, epoch, quantum, levels))


def election_top(
    members: Iterable[Member], now: float, epoch: int, quantum: float, levels: int
) -> Member | None:
    """The best of `members` by the election order at `epoch`, or None if there are none.

    O(n): the ego and seniority passes narrow the field before any tie-break is hashed.
    """
    best_ego = -1
    top: list[Member] = []
    for m in members:
        if m.ego > best_ego:
            best_ego = m.ego
            top = [m]
        elif m.ego == best_ego:
            top.append(m)
    if len(top) <= 1:
        return top[0] if top else None
    best_level = -1
    narrowed: list[Member] = []
    for m in top:
        level = seniority_level(now - m.first_seen, quantum, levels)
        if level > best_level:
            best_level = level
            narrowed = [m]
        elif level == best_level:
            narrowed.append(m)
    return min(narrowed, key=lambda m: (tiebreak(m.cell_id, epoch), bytes(m.cell_id)))
