"""`StateDriver`: the state layer (signed events, durable channel logs) inside a running `Node`.

Theory of operation: the event format and the log rules are in `cellmesh.state.events` and
`cellmesh.state.log`; the durable engine is `SqliteLogStore` (``<home>/cellmesh.db`` by
default, the ``database`` config field). This module only connects them to the node:

* `publish` signs a new event by this node (``prev`` = our latest event on the channel,
  ``horizon`` = the heads of the other authors we hold, bounded by `MAX_HORIZON`), appends it
  durably (the call returns only after the event is fsynced), then sends the encoded event to
  the channel's live peers with ``node.channels.publish`` (subscribers of a channel we host,
  and hosts that granted us the right to publish into theirs).
* Every channel message the channel driver delivers (so only traffic that access control
  granted) is offered to `_on_message` first: a payload that decodes as an event *of that
  channel* is verified and appended by the store (signature, author, hash chain, clock) and is
  not queued for ``channels.recv``; anything else goes to the channel queues as before. An event
  whose channel differs from the channel it came on is refused: the channel grant is what
  entitles a peer to write into a log.
* `subscribe` and `next_event` read the log by position, then wait for the next delivery.

Live events flow as they are published; `StateSync` (node/state_sync.py) reconciles the rest:
a subscriber syncs with its host when the subscription is granted (a late subscriber catches
up), when a live event arrives whose predecessors it lacks, and every `sync_interval` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cellmesh.errors import DecodeError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.node.channels import ChannelMessage
from cellmesh.node.state_folds import NodeFolds
from cellmesh.node.state_sync import StateSync
from cellmesh.node.store_sqlite import SqliteLogStore
from cellmesh.state.events import Event, create_event, decode_event, encode_event
from cellmesh.state.log import AppendStatus, Head, Problem, StoredEvent, StoreError

if TYPE_CHECKING:
    from cellmesh.node.node import Node

__all__ = ["MAX_WAITERS", "Published", "StateDriver"]

log = logging.getLogger("cellmesh.state")
MAX_WAITERS: Final = 1024
"""Most channels with someone waiting for their next event at once."""


@dataclass(frozen=True, slots=True)
class Published:
    """What `StateDriver.publish_event` did."""

    id: bytes
    seq: int
    position: int
    sent_to: int
    """How many live peers the event was sent to (0: it is only in our log)."""


class StateDriver:
    """Durable, signed channel logs of a running node. Reach it as `node.state`."""

    def __init__(self, node: Node, path: str | Path) -> None:
        self._node = node
        self.path = Path(path)
        self.store = SqliteLogStore(self.path)
        self.folds = NodeFolds(node, self.store)
        """Folds over the logs and federated fold queries (node/state_folds.py)."""
        self._signals: dict[str, asyncio.Event] = {}
        self._tips: dict[str, tuple[int, list[Head], Event]] = {}
        """Per channel, after our last publish: (store.writes then, the heads, our event)."""
        self.counters: Counter[str] = Counter()
        """received / duplicate / pending / refused_<reason> / wrong_channel / published / synced."""
        self.sync = StateSync(node, self, node.config.sync_interval)
        """Anti-entropy with the hosts of the channels we subscribe to (node/state_sync.py)."""
        self._closed = False

    def start(self) -> None:
        self._node.channels.taps.append(self._on_message)
        self.sync.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.folds.close()  # no query may be served from the store closed below
        self.sync.close()
        channels = self._node._channels
        if channels is not None and self._on_message in channels.taps:
            channels.taps.remove(self._on_message)
        for sig in self._signals.values():
            sig.set()  # wake waiters; they see the store closed
        self._signals.clear()
        self.store.close()

    # ------------------------------------------------------------------ writing

    def publish(self, channel: str, data: bytes) -> bytes:
        """Sign, durably append and send an event with payload `data`; returns its id."""
        return self.publish_event(channel, data).id

    def publish_event(self, channel: str, data: bytes) -> Published:
        """Like `publish`, with the seq, log position and live fan-out of the new event.

        Raises ValueError for a bad channel or a payload over `MAX_PAYLOAD`, `StoreError` when
        the log cannot store it.
        """
        store = self.store
        me = self._node.identity.cell_id
        cached = self._tips.get(channel)
        if cached is not None and cached[0] == store.writes:
            # Nothing was written since our last publish here: its heads and our own latest
            # event are still what the store would answer (saves two queries per publish).
            heads, prev = cached[1], cached[2]
        else:
            heads = store.heads(channel)
            own = [h for h in heads if bytes(h.author) == me]
            prev = None
            if own:
                held = store.get(own[0].id)
                if held is None:  # pragma: no cover - heads name held events
                    raise StoreError(f"head {own[0].id.hex()} of our chain is missing")
                prev = held.event
        event = create_event(
            self._node.identity,
            channel,
            bytes(data),
            prev,
            [h for h in heads if bytes(h.author) != me],
            int(time.time() * 1000),
        )
        result = store.append(event)
        if result.status is not AppendStatus.NEW or result.event_id is None:
            self._tips.pop(channel, None)
            raise StoreError(
                f"our own event was not stored: {result.status.value} "
                f"{result.reason or ''} {result.detail}".rstrip()
            )
        if result.delivered and result.position is not None:
            mine = Head(channel, me, event.seq, event.clock, result.event_id, result.position)
            tips = [h for h in heads if bytes(h.author) != me] + [mine]
            tips.sort(key=lambda h: bytes(h.author))
            if len(self._tips) >= MAX_WAITERS and channel not in self._tips:
                self._tips.clear()
            self._tips[channel] = (store.writes, tips, event)
        else:  # pragma: no cover - our own event always extends our own delivered chain
            self._tips.pop(channel, None)
        self.counters["published"] += 1
        self.sync.note_appended(channel, result.event_id, event.clock)
        self._notify(channel)
        encoded = encode_event(event)
        sent = self._node.channels.publish(channel, encoded)
        return Published(result.event_id, event.seq, result.position or 0, sent)

    def _on_message(self, msg: ChannelMessage) -> bool:
        """Channel-driver tap: True when `msg` carried an event (stored or refused)."""
        if self._closed:
            return False
        try:
            event = decode_event(msg.data)
        except (DecodeError, ValueError):
            return False  # not an event: an ordinary channel message
        if event.channel != msg.channel:
            self.counters["wrong_channel"] += 1
            log.warning(
                "refused an event for %s that %s sent on %s",
                event.channel,
                format_cell_id(msg.peer),
                msg.channel,
            )
            return True
        try:
            result = self.store.append(msg.data)
        except StoreError as exc:
            self.counters["store_error"] += 1
            log.error("cannot store an event on %s: %s", msg.channel, exc)
            return True
        if result.status is AppendStatus.REFUSED:
            self.counters[f"refused_{result.reason}"] += 1
            log.info(
                "refused an event on %s from %s: %s %s",
                msg.channel,
                format_cell_id(msg.peer),
                result.reason,
                result.detail,
            )
        elif result.status is AppendStatus.DUPLICATE:
            self.counters["duplicate"] += 1
        else:
            self.counters["received"] += 1
            if result.event_id is not None:
                self.sync.note_appended(msg.channel, result.event_id, event.clock)
            if result.fork is not None:
                self.counters["fork"] += 1
                log.warning(
                    "fork on %s: %s signed two events at seq %d",
                    msg.channel,
                    format_cell_id(result.fork.author),
                    result.fork.seq,
                )
            if result.delivered:
                self._notify(msg.channel)
            else:
                self.counters["pending"] += 1
                # A gap: events before this one never reached us (we subscribed late, or a
                # partition ate them). Ask the host for the difference now.
                if self.sync.holds_subscription(msg.peer, msg.channel):
                    self.sync.request(msg.peer, msg.channel)
        return True

    # ------------------------------------------------------------------ reading

    def _notify(self, channel: str) -> None:
        sig = self._signals.pop(channel, None)
        if sig is not None:
            sig.set()

    def _signal(self, channel: str) -> asyncio.Event:
        sig = self._signals.get(channel)
        if sig is None:
            if len(self._signals) >= MAX_WAITERS:
                raise ValueError(f"at most {MAX_WAITERS} channels can be waited on at once")
            sig = asyncio.Event()
            self._signals[channel] = sig
        return sig

    def last_position(self, channel: str) -> int:
        """Log position of the latest delivered event of `channel` (0: none)."""
        return max((h.position for h in self.store.heads(channel)), default=0)

    def log(self, channel: str, after_position: int = 0) -> list[StoredEvent]:
        """The delivered events of `channel` after `after_position`, in log (causal) order."""
        return list(self.store.iter_channel(channel, after_position))

    def verify(self, channel: str) -> list[Problem]:
        """Re-check every stored event of `channel` (signatures, hash chains, clocks)."""
        return self.store.verify_chain(channel)

    async def next_event(self, channel: str, after_position: int) -> StoredEvent | None:
        """The first delivered event of `channel` after `after_position`, waiting for one
        (bound the wait with `asyncio.wait_for`); None once the driver is closed."""
        while not self._closed:
            sig = self._signal(channel)
            for stored in self.store.iter_channel(channel, after_position):
                return stored
            await sig.wait()
        return None

    async def subscribe(self, channel: str, from_start: bool = False) -> AsyncIterator[StoredEvent]:
        """Events of `channel` as they are delivered to our log: those already held first
        when `from_start`, then live ones (ours and peers'), forever."""
        after = 0 if from_start else self.last_position(channel)
        while True:
            stored = await self.next_event(channel, after)
            if stored is None:
                return
            assert stored.position is not None
            after = stored.position
            yield stored

    def status(self) -> dict[str, object]:
        """The database path, per-channel sizes and counters."""
        channels = {}
        for name in self.store.channels():
            st = self.store.stats(name)
            channels[name] = {
                "events": st.events,
                "bytes": st.bytes,
                "pending": st.pending,
                "forks": st.forks,
            }
        return {
            "database": str(self.path),
            "channels": channels,
            "counters": dict(self.counters),
            "sync": self.sync.status(),
        }
