"""The node's inbox of received application datagrams: bounded, counted, cheap.

Theory of operation. A peer sending at full speed hands the node one datagram every few
microseconds, so this sits on the hottest path of the receive side. `asyncio.Queue` does more
than needed here (task accounting, putter wake-ups, a `full()` call per put); this is a deque
with a limit and a line of waiting readers. `put` never blocks and never raises: beyond the
limit the datagram is dropped and counted, as unreliable datagrams may be. `get` returns at once
while anything is queued and otherwise waits; readers are served in the order they came, and a
reader cancelled after being woken passes its turn on, so no datagram waits while a reader does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

__all__ = ["DatagramInbox"]


class DatagramInbox:
    """A bounded FIFO of (CellID, data) with an async `get`; `dropped` counts what did not fit."""

    __slots__ = ("_items", "_limit", "_waiters", "dropped")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("inbox limit must be at least 1")
        self._limit = limit
        self._items: deque[tuple[bytes, bytes]] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, cell_id: bytes, data: bytes) -> None:
        """Queue one datagram, or count it as dropped when the inbox is full."""
        if len(self._items) >= self._limit:
            self.dropped += 1
            return
        self._items.append((cell_id, data))
        if self._waiters:
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def get_nowait(self) -> tuple[bytes, bytes] | None:
        """The oldest datagram, or None when the inbox is empty."""
        return self._items.popleft() if self._items else None

    async def get_batch(self, limit: int) -> list[tuple[bytes, bytes]]:
        """Every queued datagram up to `limit` (at least one: waits while the inbox is empty)."""
        if not self._items:
            self._items.appendleft(await self.get())
        items = self._items
        if len(items) <= limit:
            batch = list(items)
            items.clear()
            return batch
        return [items.popleft() for _ in range(limit)]

    async def get(self) -> tuple[bytes, bytes]:
        """The oldest datagram, waiting for one if the inbox is empty."""
        while not self._items:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled() and self._items:
                    self._wake_one()  # we were woken, but will not take it: the next reader may
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
        return self._items.popleft()
