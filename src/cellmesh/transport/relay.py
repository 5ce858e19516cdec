"""Relaying: carrying whole frames hop by hop to CellIDs that are not neighbours.

Theory of operation: a frame for a peer we have no direct path to is wrapped in a RELAY record
(destination CellID + the frame) and sent inside the session with the next hop that routing
names. Each relay opens the RELAY record with the key of *its neighbour's* session, so it knows
exactly which authenticated neighbour handed it the frame (rate limits and budgets key on that),
and passes the inner frame on, re-wrapped for the next hop, after decrementing the inner frame's
hop TTL (the one header byte outside the AEAD's associated data). It never holds the end-to-end
keys: the inner frame is a handshake message or a DATA frame sealed for the destination.

A peer reached through relays is addressed by a *virtual address* `("~" + CellID hex, 0)`: the
endpoint treats it like any address (sessions, handshakes and replies use it unchanged) and only
at send time turns it into a RELAY record for the next hop. Replies flow back the same way, since
a frame that arrived through relays is received "from" the sender's virtual address.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Final

from cellmesh.filter.buckets import KeyedBuckets

Addr = tuple[str, int]
VIA_PREFIX: Final = "~"
RELAY_OVERHEAD: Final = 64 + 16 + 3 + 16
"""Outer header, AEAD tag, record header and destination: what one hop adds to a frame."""
DUPLICATE_MEMORY: Final = 8192
QUEUE_PER_NEIGHBOUR: Final = 256
"""Frames from one neighbour waiting to be relayed; more are dropped (relay_queue_full)."""
TURN_BUDGET: Final = 512
"""Frames relayed per turn of the driver, taken round robin across neighbours."""
TTL_OFFSET: Final = 3
DATA_TYPE: Final = 5


def via(cell_id: bytes) -> Addr:
    """The virtual address of `cell_id` reached through the mesh."""
    return (VIA_PREFIX + cell_id.hex(), 0)


def via_cell(addr: Addr) -> bytes | None:
    """The CellID a virtual address names, or None for a real address."""
    host = addr[0]
    if not host.startswith(VIA_PREFIX) or len(host) != 33:
        return None
    try:
        return bytes.fromhex(host[1:])
    except ValueError:
        return None


class RelayGuard:
    """Per-neighbour budgets and duplicate suppression for frames we forward (pure)."""

    def __init__(self, rate: float, burst: float, capacity: int) -> None:
        self._budget: KeyedBuckets[bytes] | None = (
            KeyedBuckets(rate, burst, capacity) if rate > 0 else None
        )
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.relayed: Counter[bytes] = Counter()
        """Frames forwarded, by the neighbour that handed them to us (bounded by `forget`)."""
        self.relayed_total = 0

    def admit(self, neighbour: bytes, now: float) -> bool:
        """The neighbour's relay budget allows one more frame."""
        return self._budget is None or self._budget.take(neighbour, now)

    def duplicate(self, frame: bytes) -> bool:
        """True if this DATA frame went through us recently (a routing loop or a replay).

        Keyed on the inner header's source, session id and packet number: together they name
        one frame (the TTL, the only byte that changes on the way, is not part of it). Senders
        retransmit data under fresh packet numbers, so only copies match. Handshake frames are
        not checked: an initiator re-sends the very same INIT when one is lost further on.
        """
        if frame[1] != DATA_TYPE:
            return False
        key = frame[8:24] + frame[40:56]
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > DUPLICATE_MEMORY:
            self._seen.popitem(last=False)
        return False

    def count(self, neighbour: bytes) -> None:
        self.relayed_total += 1
        self.relayed[neighbour] += 1
        if len(self.relayed) > 4096:
            # Keep the counter table bounded: forget the quietest neighbours.
            for cell, _ in self.relayed.most_common()[2048:]:
                del self.relayed[cell]

    def forget(self, neighbour: bytes) -> None:
        self.relayed.pop(neighbour, None)


class RelayQueues:
    """Fair queuing of frames to relay: one bounded queue per neighbour that handed them to us,
    served round robin, one frame per neighbour per round (deficit round robin with equal,
    one-frame quanta). A neighbour that floods fills only its own queue; every other neighbour
    still gets its turn in every round."""

    def __init__(self) -> None:
        self._queues: OrderedDict[bytes, deque[tuple[bytes, bytes]]] = OrderedDict()
        self.queued = 0

    def push(self, neighbour: bytes, frame: bytes, dst: bytes) -> bool:
        """Queue one frame from `neighbour` for `dst`; False when its queue is full."""
        q = self._queues.get(neighbour)
        if q is None:
            q = deque()
            self._queues[neighbour] = q
        if len(q) >= QUEUE_PER_NEIGHBOUR:
            return False
        q.append((frame, dst))
        self.queued += 1
        return True

    def take(self, budget: int = TURN_BUDGET) -> list[tuple[bytes, bytes, bytes]]:
        """Up to `budget` (neighbour, frame, dst) in round-robin order across neighbours."""
        out: list[tuple[bytes, bytes, bytes]] = []
        while self._queues and len(out) < budget:
            for neighbour in list(self._queues):
                q = self._queues[neighbour]
                frame, dst = q.popleft()
                out.append((neighbour, frame, dst))
                if not q:
                    del self._queues[neighbour]
                if len(out) >= budget:
                    break
        self.queued -= len(out)
        return out

    def drop(self, neighbour: bytes) -> None:
        """Forget what a departed neighbour had queued."""
        q = self._queues.pop(neighbour, None)
        if q is not None:
            self.queued -= len(q)

    def __bool__(self) -> bool:
        return bool(self._queues)
