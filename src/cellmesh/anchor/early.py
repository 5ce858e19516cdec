"""A small holding pen for messages that arrive from a sender not yet admitted.

The driver admits members from discovery, and an anchor's EPOCH (or a joiner's REQ_EPOCH) can
overtake the discovery beacon that would have admitted its sender: a joiner's discovery learns
the anchor from a beacon answer sent up to 200 ms after the anchor already heard the joiner and
pushed it the key. Refusing such a message outright would cost the joiner a pulse interval.

So the bytes are kept, unverified and unparsed beyond the header, for a few seconds, and handed
back when the sender is admitted. Nothing in here is trusted: it is bounded per sender and in
total (oldest senders evicted first), and what comes back goes through every check again.
"""

from __future__ import annotations

from collections import OrderedDict

from cellmesh.identity.cellid import CellId

__all__ = ["EarlyMessages"]


class EarlyMessages:
    """Bounded, time-limited storage of raw messages by claimed sender."""

    __slots__ = ("_count", "_held", "max_per_sender", "max_total", "ttl")

    def __init__(self, ttl: float = 5.0, max_total: int = 64, max_per_sender: int = 4) -> None:
        self.ttl = ttl
        self.max_total = max_total
        self.max_per_sender = max_per_sender
        self._held: OrderedDict[CellId, list[tuple[bytes, float]]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def keep(self, sender: CellId, data: bytes, now: float) -> None:
        """Hold `data` from `sender` (silently not, past the per-sender limit)."""
        queue = self._held.get(sender)
        if queue is None:
            queue = self._held[sender] = []
        if len(queue) >= self.max_per_sender:
            return
        queue.append((data, now))
        self._count += 1
        while self._count > self.max_total:
            _, evicted = self._held.popitem(last=False)
            self._count -= len(evicted)

    def release(self, sender: CellId, now: float) -> list[bytes]:
        """Everything held from `sender` that is younger than `ttl`, oldest first."""
        queue = self._held.pop(sender, None)
        if not queue:
            return []
        self._count -= len(queue)
        return [data for data, at in queue if now - at <= self.ttl]
