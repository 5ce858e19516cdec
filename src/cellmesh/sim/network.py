"""The simulated network: real sans-IO cores driven by a discrete-event loop in virtual time.

Theory of operation
-------------------
`SimNetwork` owns a virtual clock (`now`, seconds, starting at `start_time`) and one event heap.
Nothing here reads a wall clock, sleeps, opens a socket or uses asyncio: time moves only by
popping the next event off the heap, so a minute of a thousand-node mesh runs as fast as the
cores can compute, and the same seed with the same script gives the same run, bit for bit.

Heap entries are tuples ``(time, seq, kind, ...)``. `seq` comes from one ever-increasing counter,
so two entries never compare beyond it: events at the same instant run in the order they were
scheduled, which is what makes the simulation deterministic. There are three kinds:

* DELIVER: a datagram reaches a node. The node's core gets ``receive_datagram(data, src, now)``.
* TIMER: a node's deadline. The core gets ``handle_timer(now)``.
* CALL: a scripted action (`call_at`, `SimNode.call_at`, ...).

After every event that touched a node (and after `SimNode.act`), the network *services* it, the
same loop the asyncio driver in `cellmesh.node` runs: take ``datagrams_to_send()`` and put each
datagram through the link model (`cellmesh.sim.links`), which drops it or schedules a DELIVER;
drain ``next_event()`` into the node's event log (calling its `on_event` hook, whose actions are
serviced in turn); then re-arm the node's one timer from ``get_timer()``. Each node has at most one
live TIMER entry: re-arming bumps the node's timer generation, and a popped TIMER whose generation
is stale is skipped, so cancelling costs nothing. A deadline in the past fires at `now`. If the
deadline did not change, nothing is pushed, so the heap holds about one timer per node plus the
datagrams in flight, and an event costs O(log heap) plus the core's own work, never O(nodes).

Links are directed and looked up per (source, destination) pair: a per-pair `LinkModel` set with
`set_link` or the network default. Each directed link keeps its own serialising queue (bandwidth,
tail drop) and FIFO state. Reachability is checked when a datagram is sent: partitions (every node
carries a group number; different numbers cannot talk), blocked pairs, a node that is down, or an
address nobody holds (``no_route``). Datagrams to a multicast address (``ff02::1``, ``224.0.0.251``
...) go, through each pair's link model, to every other node sharing a segment (broadcast domain)
with the sender; a node is in segment ``"default"`` unless told otherwise. Each sim node has one
socket, so the group's port is not checked.

`run_until(t)`, `run_for(dt)`, `run_until(predicate, timeout)` and `run_until_idle(max_time)` pop
events in order; each call raises `EventLimitError` after `max_events` events, which catches a
core that keeps re-arming a timer at the same instant. Statistics are kept as plain counters on
the hot path and returned as frozen snapshots. `trace_digest` hashes every delivery (time, source,
destination, length) with BLAKE2b so tests can check that two runs were identical.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from cellmesh.errors import CellmeshError
from cellmesh.sim.links import LinkModel, is_multicast
from cellmesh.sim.protocol import Addr, SansIOCore

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_MAX_EVENTS_PER_INSTANT",
    "DEFAULT_SEGMENT",
    "SIM_PORT",
    "EventLimitError",
    "NetworkStats",
    "NodeRef",
    "NodeStats",
    "SimEvent",
    "SimNetwork",
    "SimNode",
    "SimulationError",
]

C = TypeVar("C", bound=SansIOCore)
E = TypeVar("E")
T = TypeVar("T")

SIM_PORT = 19541
"""The port auto-assigned addresses use (cellmesh's default port)."""
DEFAULT_SEGMENT = "default"
"""The broadcast domain a node joins unless `add_node` is told otherwise."""
DEFAULT_MAX_EVENTS = 20_000_000
"""Events one `run_*` call may process before it raises `EventLimitError`."""
DEFAULT_MAX_EVENTS_PER_INSTANT = 1_000_000
"""Events that may run at one virtual instant before `EventLimitError` (a zero-time loop)."""

_DELIVER = 0
_TIMER = 1
_CALL = 2
_TRACE = struct.Struct("<dI")


class SimulationError(CellmeshError):
    """The simulation cannot go on (misuse of the simulator, not a protocol error)."""


class EventLimitError(SimulationError):
    """A `run_*` call processed more events than its cap (a runaway core or script)."""


@dataclass(frozen=True, slots=True)
class SimEvent:
    """An event a core reported, with the virtual time it was pulled at."""

    time: float
    event: object


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A snapshot of one node's counters. `dropped` counts, by reason, datagrams it sent."""

    sent: int
    bytes_sent: int
    received: int
    bytes_received: int
    timers_fired: int
    events: int
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NetworkStats:
    """A snapshot of the whole network's counters.

    A multicast datagram counts once in `sent` (and in `multicast`), and each copy counts in
    `delivered` or `dropped`. Duplicates count in `duplicated` and, on arrival, in `delivered`.
    """

    now: float
    nodes: int
    events_processed: int
    sent: int
    bytes_sent: int
    delivered: int
    bytes_delivered: int
    duplicated: int
    reordered: int
    multicast: int
    in_flight: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        """All drops, whatever the reason."""
        return sum(self.dropped.values())


class _Link:
    """Mutable state of one directed link: its explicit model and its queue."""

    __slots__ = ("free_at", "last_arrival", "model")

    def __init__(self) -> None:
        self.model: LinkModel | None = None  # None: the network default
        self.free_at = 0.0  # when the serialising queue is empty again
        self.last_arrival = 0.0  # FIFO: nothing sent later may arrive before this


class SimNode(Generic[C]):
    """One simulated node: a core, its address, its event log and its counters.

    Create nodes with `SimNetwork.add_node` (or `cellmesh.sim.add_endpoint`). To make a core do
    something (connect, send, ping), go through `act` so the network collects its output.
    """

    __slots__ = (
        "_dropped",
        "_group",
        "_key",
        "_links",
        "_segments",
        "_timer_at",
        "_timer_gen",
        "addr",
        "bytes_received",
        "bytes_sent",
        "core",
        "events",
        "index",
        "name",
        "network",
        "on_event",
        "received",
        "record_events",
        "sent",
        "timers_fired",
        "up",
    )

    def __init__(
        self,
        network: SimNetwork,
        core: C,
        addr: Addr,
        index: int,
        name: str,
        on_event: Callable[[SimNode[C], object], None] | None,
        record_events: bool,
    ) -> None:
        self.network = network
        self.core: C = core
        self.addr: Addr = addr
        self.index = index
        self.name = name
        self.on_event = on_event
        """Called as ``on_event(node, event)`` for every event the core reports."""
        self.record_events = record_events
        self.events: list[SimEvent] = []
        """Every event pulled from the core, with its time (unless `record_events` is off)."""
        self.up = True
        self.sent = 0
        self.bytes_sent = 0
        self.received = 0
        self.bytes_received = 0
        self.timers_fired = 0
        self._dropped: Counter[str] = Counter()
        self._group = 0
        self._key = _addr_key(addr)
        self._links: dict[int, _Link] = {}
        self._segments: list[str] = []
        self._timer_at: float | None = None
        self._timer_gen = 0

    def __repr__(self) -> str:
        return f"SimNode({self.name}, {self.addr[0]}:{self.addr[1]})"

    @property
    def now(self) -> float:
        """The network's virtual time."""
        return self.network.now

    @property
    def timer(self) -> float | None:
        """When this node's timer is armed for (None when it is not)."""
        return self._timer_at

    @property
    def segments(self) -> tuple[str, ...]:
        """The broadcast domains this node belongs to."""
        return tuple(self._segments)

    def act(self, fn: Callable[[C, float], T]) -> T:
        """Run ``fn(core, now)`` now, then send what it queued; returns what `fn` returned.

        Example: ``node.act(lambda ep, now: ep.connect(peer.addr, now))``.
        """
        try:
            return fn(self.core, self.network.now)
        finally:
            self.network._service(self)

    def call_at(self, when: float, fn: Callable[[C, float], object]) -> None:
        """Schedule ``self.act(fn)`` at virtual time `when` (the past means now)."""
        self.network.call_at(when, lambda: self.act(fn))

    def call_later(self, delay: float, fn: Callable[[C, float], object]) -> None:
        """Schedule ``self.act(fn)`` `delay` seconds from now."""
        self.network.call_at(self.network.now + delay, lambda: self.act(fn))

    def events_of(self, kind: type[E]) -> list[E]:
        """The recorded events of type `kind`, oldest first."""
        return [e.event for e in self.events if isinstance(e.event, kind)]

    def timed_events_of(self, kind: type[E]) -> list[tuple[float, E]]:
        """The recorded events of type `kind` with the times they were reported."""
        return [(e.time, e.event) for e in self.events if isinstance(e.event, kind)]

    def statistics(self) -> NodeStats:
        """A frozen snapshot of this node's counters."""
        return NodeStats(
            sent=self.sent,
            bytes_sent=self.bytes_sent,
            received=self.received,
            bytes_received=self.bytes_received,
            timers_fired=self.timers_fired,
            events=len(self.events),
            dropped=dict(self._dropped),
        )


NodeRef = SimNode[Any] | Addr
"""A node, or the address of one."""


def _addr_key(addr: Addr) -> bytes:
    return f"{addr[0]}|{addr[1]}\n".encode()


class SimNetwork:
    """A deterministic discrete-event network of sans-IO cores. See the module docstring."""

    def __init__(
        self,
        seed: int,
        *,
        start_time: float = 0.0,
        default_link: LinkModel | None = None,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_events_per_instant: int = DEFAULT_MAX_EVENTS_PER_INSTANT,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        """The network's own random source (link decisions). Do not share it with cores."""
        self.default_link = default_link if default_link is not None else LinkModel()
        """The model of every directed link that has none of its own (see `set_link`)."""
        self.max_events = max_events
        """Default cap on events per `run_*` call."""
        self.max_events_per_instant = max_events_per_instant
        """Cap on events at one virtual instant (time not advancing means a zero-time loop)."""
        self.nodes: list[SimNode[Any]] = []
        self._now = float(start_time)
        self._heap: list[tuple[Any, ...]] = []
        self._seq = itertools.count()
        self._by_addr: dict[Addr, SimNode[Any]] = {}
        self._segments: dict[str, list[SimNode[Any]]] = {}
        self._blocked: dict[tuple[int, int], None] = {}
        self._next_host = 1
        self._in_flight = 0
        self._pending_calls = 0
        self._events_processed = 0
        self._sent = 0
        self._bytes_sent = 0
        self._delivered = 0
        self._bytes_delivered = 0
        self._duplicated = 0
        self._reordered = 0
        self._multicast = 0
        self._dropped: Counter[str] = Counter()
        self._trace = hashlib.blake2b(digest_size=32)

    # ------------------------------------------------------------------ clock and randomness

    @property
    def now(self) -> float:
        """Virtual time, in seconds."""
        return self._now

    def derive_seed(self, label: str) -> int:
        """A 64-bit seed derived from the network seed and `label` (stable across runs)."""
        h = hashlib.blake2b(f"{self.seed}|{label}".encode(), digest_size=8, person=b"cellmesh-sim")
        return int.from_bytes(h.digest(), "big")

    # ------------------------------------------------------------------ nodes

    def add_node(
        self,
        core: C,
        addr: Addr | None = None,
        *,
        name: str | None = None,
        segments: Iterable[str] = (DEFAULT_SEGMENT,),
        on_event: Callable[[SimNode[C], object], None] | None = None,
        record_events: bool = True,
    ) -> SimNode[C]:
        """Attach `core` at `addr` (default: the next free ``10.x.y.z:19541``); return its node.

        `segments` are the broadcast domains it joins (multicast reaches the other members).
        `on_event(node, event)` is called for each event the core reports; set `record_events`
        to False to keep no event log (large benchmarks).
        """
        if addr is None:
            addr = self._free_addr()
        elif addr in self._by_addr:
            raise ValueError(f"address {addr[0]}:{addr[1]} is already taken")
        index = len(self.nodes)
        node = SimNode(
            self,
            core,
            addr,
            index,
            name if name is not None else f"n{index}",
            on_event,
            record_events,
        )
        self.nodes.append(node)
        self._by_addr[addr] = node
        for seg in segments:
            self.join_segment(node, seg)
        self._service(node)
        return node

    def _free_addr(self) -> Addr:
        while True:
            n = self._next_host
            self._next_host += 1
            if n >= 1 << 24:
                raise SimulationError("the 10.0.0.0/8 sim address space is exhausted")
            addr = (f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}", SIM_PORT)
            if addr not in self._by_addr:
                return addr

    def node(self, ref: NodeRef) -> SimNode[Any]:
        """The node `ref` names (a node, or the address of one). Raises KeyError if none."""
        if isinstance(ref, SimNode):
            if ref.network is not self:
                raise KeyError(f"{ref!r} belongs to another network")
            return ref
        try:
            return self._by_addr[ref]
        except KeyError:
            raise KeyError(f"no node at {ref[0]}:{ref[1]}") from None

    def set_node_down(self, ref: NodeRef) -> None:
        """Take a node off the network: it receives nothing, sends nothing, its timer is stopped.

        Its core keeps its state, as if the process were frozen or its cable pulled.
        """
        node = self.node(ref)
        node.up = False
        node._timer_gen += 1
        node._timer_at = None

    def set_node_up(self, ref: NodeRef, core: SansIOCore | None = None) -> None:
        """Bring a node back; with `core`, as a restarted process with that fresh core."""
        node = self.node(ref)
        if core is not None:
            node.core = core
        node.up = True
        self._service(node)

    def join_segment(self, ref: NodeRef, segment: str) -> None:
        """Put a node in broadcast domain `segment` (created on first use)."""
        node = self.node(ref)
        if segment in node._segments:
            return
        node._segments.append(segment)
        self._segments.setdefault(segment, []).append(node)

    def leave_segment(self, ref: NodeRef, segment: str) -> None:
        """Take a node out of broadcast domain `segment`."""
        node = self.node(ref)
        if segment in node._segments:
            node._segments.remove(segment)
            self._segments[segment].remove(node)

    def segment_members(self, segment: str) -> list[SimNode[Any]]:
        """The nodes in broadcast domain `segment`, in joining order."""
        return list(self._segments.get(segment, ()))

    # ------------------------------------------------------------------ links and reachability

    def set_link(self, a: NodeRef, b: NodeRef, model: LinkModel, symmetric: bool = True) -> None:
        """Give the link a -> b (and b -> a when `symmetric`) its own model."""
        na, nb = self.node(a), self.node(b)
        self._link(na, nb).model = model
        if symmetric:
            self._link(nb, na).model = model

    def clear_link(self, a: NodeRef, b: NodeRef, symmetric: bool = True) -> None:
        """Return the link a -> b (and b -> a) to the network default model."""
        na, nb = self.node(a), self.node(b)
        self._link(na, nb).model = None
        if symmetric:
            self._link(nb, na).model = None

    def link_model(self, a: NodeRef, b: NodeRef) -> LinkModel:
        """The model the link a -> b uses now."""
        na, nb = self.node(a), self.node(b)
        link = na._links.get(nb.index)
        model = link.model if link is not None else None
        return model if model is not None else self.default_link

    def _link(self, src: SimNode[Any], dst: SimNode[Any]) -> _Link:
        link = src._links.get(dst.index)
        if link is None:
            link = src._links[dst.index] = _Link()
        return link

    def block(self, a: NodeRef, b: NodeRef, symmetric: bool = True) -> None:
        """Drop everything a sends to b (and b to a when `symmetric`) until `unblock` or `heal`."""
        na, nb = self.node(a), self.node(b)
        self._blocked[na.index, nb.index] = None
        if symmetric:
            self._blocked[nb.index, na.index] = None

    def unblock(self, a: NodeRef, b: NodeRef, symmetric: bool = True) -> None:
        """Undo `block`."""
        na, nb = self.node(a), self.node(b)
        self._blocked.pop((na.index, nb.index), None)
        if symmetric:
            self._blocked.pop((nb.index, na.index), None)

    def partition(self, groups: Sequence[Iterable[NodeRef]]) -> None:
        """Split the network: nodes in different groups cannot reach each other.

        Nodes named in no group form one more group of their own. Replaces any earlier
        partition (blocked pairs stay). Datagrams already in flight still arrive.
        """
        for n in self.nodes:
            n._group = 0
        seen: dict[int, int] = {}
        for gi, group in enumerate(groups, start=1):
            for ref in group:
                node = self.node(ref)
                if node.index in seen and seen[node.index] != gi:
                    raise ValueError(f"{node!r} is in two partition groups")
                seen[node.index] = gi
                node._group = gi

    def heal(self) -> None:
        """End every partition and unblock every pair."""
        for n in self.nodes:
            n._group = 0
        self._blocked.clear()

    def can_reach(self, a: NodeRef, b: NodeRef) -> bool:
        """True when a datagram from a to b is not stopped by a partition, block or down node."""
        na, nb = self.node(a), self.node(b)
        return (
            na.up and nb.up and na._group == nb._group and (na.index, nb.index) not in self._blocked
        )

    # ------------------------------------------------------------------ scripted traffic and calls

    def broadcast(self, src: NodeRef, data: bytes, group_addr: Addr) -> None:
        """Send `data` from `src` to multicast `group_addr`: every other node sharing a segment
        with `src` receives it (through each pair's link model)."""
        if not is_multicast(group_addr[0]):
            raise ValueError(f"{group_addr[0]} is not a multicast address")
        self._transmit(self.node(src), data, group_addr)

    def inject(self, dst: NodeRef, data: bytes, src_addr: Addr, delay: float = 0.0) -> None:
        """Deliver `data` to `dst` after `delay`, claiming to come from `src_addr` (any address,
        spoofed or not), bypassing link models and reachability. For hostile-traffic tests."""
        node = self.node(dst)
        self._sent += 1
        self._bytes_sent += len(data)
        self._in_flight += 1
        heapq.heappush(
            self._heap,
            (self._now + max(0.0, delay), next(self._seq), _DELIVER, node, data, src_addr, None),
        )

    def call_at(self, when: float, fn: Callable[[], object]) -> None:
        """Run ``fn()`` at virtual time `when` (a time in the past means now).

        `fn` runs outside any node: to make a core act, use `SimNode.act` inside it.
        """
        self._pending_calls += 1
        at = when if when > self._now else self._now
        heapq.heappush(self._heap, (at, next(self._seq), _CALL, fn))

    def call_later(self, delay: float, fn: Callable[[], object]) -> None:
        """Run ``fn()`` `delay` seconds from now."""
        self.call_at(self._now + delay, fn)

    # ------------------------------------------------------------------ running

    @overload
    def run_until(self, until: float, *, max_events: int | None = None) -> bool: ...

    @overload
    def run_until(
        self, until: Callable[[], bool], timeout: float, *, max_events: int | None = None
    ) -> bool: ...

    def run_until(
        self,
        until: float | Callable[[], bool],
        timeout: float | None = None,
        *,
        max_events: int | None = None,
    ) -> bool:
        """Run to virtual time `until`, or until the predicate `until()` holds.

        With a time: processes every event due at or before it, leaves `now` there and returns
        True. With a predicate: checks it before starting and after every event; returns True
        (and stops at that instant) once it holds, or False with `now` at `now + timeout`.
        Keep the predicate cheap (O(1)): it runs once per event.
        """
        cap = self.max_events if max_events is None else max_events
        if callable(until):
            if timeout is None or timeout < 0:
                raise ValueError("run_until(predicate) needs a timeout >= 0")
            if until():
                return True
            return self._loop(self._now + timeout, until, cap)
        if timeout is not None:
            raise ValueError("timeout only applies to run_until(predicate, timeout)")
        if until < self._now:
            raise ValueError(f"cannot run back in time to {until} (now is {self._now})")
        self._loop(float(until), None, cap)
        return True

    def run_for(self, dt: float, *, max_events: int | None = None) -> None:
        """Run for `dt` virtual seconds."""
        if dt < 0:
            raise ValueError(f"cannot run for a negative time ({dt})")
        self.run_until(self._now + dt, max_events=max_events)

    def run_until_idle(self, max_time: float = 60.0, *, max_events: int | None = None) -> bool:
        """Run until no datagram is in flight and no scripted call is pending, for at most
        `max_time` virtual seconds. Node timers do not count as activity (an endpoint always has
        one). Returns True when idle, False when `max_time` ran out first."""
        if max_time < 0:
            raise ValueError(f"max_time must be >= 0, got {max_time}")
        if self.idle:
            return True
        cap = self.max_events if max_events is None else max_events
        return self._loop(self._now + max_time, lambda: self.idle, cap)

    @property
    def idle(self) -> bool:
        """True when no datagram is in flight and no scripted call is pending."""
        return self._in_flight == 0 and self._pending_calls == 0

    def _loop(self, deadline: float, stop: Callable[[], bool] | None, cap: int) -> bool:
        heap = self._heap
        pop = heapq.heappop
        processed = 0
        instant_cap = self.max_events_per_instant
        same_instant = 0
        try:
            while heap and heap[0][0] <= deadline:
                entry = pop(heap)
                processed += 1
                t = entry[0]
                if t == self._now:
                    same_instant += 1
                    if same_instant > instant_cap:
                        heapq.heappush(heap, entry)
                        raise EventLimitError(
                            f"more than {instant_cap} events at virtual time {t:.6f} s without "
                            "time advancing: a zero-time loop (a core re-arming its timer for "
                            "`now` forever, or datagrams bouncing over zero-latency links)"
                        )
                else:
                    same_instant = 0
                if processed > cap:
                    heapq.heappush(heap, entry)
                    raise EventLimitError(
                        f"more than {cap} events in one run call (virtual time "
                        f"{self._now:.6f} s): a runaway core or script, or the run needs a "
                        "larger max_events"
                    )
                self._now = t
                kind = entry[2]
                if kind == _DELIVER:
                    self._in_flight -= 1
                    self._deliver(t, entry[3], entry[4], entry[5], entry[6])
                elif kind == _TIMER:
                    node = entry[3]
                    if entry[4] != node._timer_gen:
                        continue  # superseded by a later re-arm
                    node._timer_at = None
                    node.timers_fired += 1
                    node.core.handle_timer(t)
                    self._service(node)
                else:
                    self._pending_calls -= 1
                    entry[3]()
                if stop is not None and stop():
                    return True
        finally:
            self._events_processed += processed
        if deadline > self._now:
            self._now = deadline
        return False

    def _deliver(
        self,
        t: float,
        node: SimNode[Any],
        data: bytes,
        src_addr: Addr,
        src: SimNode[Any] | None,
    ) -> None:
        if not node.up:
            self._dropped["node_down"] += 1
            if src is not None:
                src._dropped["node_down"] += 1
            return
        size = len(data)
        self._delivered += 1
        self._bytes_delivered += size
        node.received += 1
        node.bytes_received += size
        self._trace.update(
            _TRACE.pack(t, size)
            + (src._key if src is not None else _addr_key(src_addr))
            + node._key
        )
        node.core.receive_datagram(data, src_addr, t)
        self._service(node)

    # ------------------------------------------------------------------ the driver loop

    def _service(self, node: SimNode[Any]) -> None:
        """Collect a node's datagrams and events, then re-arm its timer."""
        core = node.core
        now = self._now
        while True:
            out = core.datagrams_to_send()
            if out:
                for data, dst in out:
                    # A link hands the very object it carries to every copy it delivers: a
                    # datagram sealed in place (a bytearray) becomes bytes, as a socket gives.
                    self._transmit(node, data if type(data) is bytes else bytes(data), dst)
            ev = core.next_event()
            if ev is None:
                break
            cb = node.on_event
            record = node.record_events
            while ev is not None:
                if record:
                    node.events.append(SimEvent(now, ev))
                if cb is not None:
                    cb(node, ev)
                ev = core.next_event()
            if cb is None:
                break  # without a hook nothing new can have been queued since
        if not node.up:
            return
        t = core.get_timer()
        if t is None:
            if node._timer_at is not None:
                node._timer_gen += 1
                node._timer_at = None
            return
        if t < now:
            t = now
        if t != node._timer_at:
            node._timer_gen += 1
            node._timer_at = t
            heapq.heappush(self._heap, (t, next(self._seq), _TIMER, node, node._timer_gen))

    def _drop(self, src: SimNode[Any], reason: str) -> None:
        self._dropped[reason] += 1
        src._dropped[reason] += 1

    def _transmit(self, src: SimNode[Any], data: bytes, dst: Addr) -> None:
        size = len(data)
        self._sent += 1
        self._bytes_sent += size
        src.sent += 1
        src.bytes_sent += size
        if not src.up:
            self._drop(src, "node_down")
            return
        target = self._by_addr.get(dst)
        if target is not None:
            self._carry(src, target, data, size)
        elif is_multicast(dst[0]):
            self._multicast += 1
            members = self._segments
            if len(src._segments) == 1:
                for other in members[src._segments[0]]:
                    if other is not src:
                        self._carry(src, other, data, size)
            else:
                seen: dict[int, None] = {src.index: None}
                for seg in src._segments:
                    for other in members[seg]:
                        if other.index not in seen:
                            seen[other.index] = None
                            self._carry(src, other, data, size)
        else:
            self._drop(src, "no_route")

    def _carry(self, src: SimNode[Any], dst: SimNode[Any], data: bytes, size: int) -> None:
        """Put one datagram through the link src -> dst (see cellmesh.sim.links)."""
        if src._group != dst._group:
            self._drop(src, "partition")
            return
        if self._blocked and (src.index, dst.index) in self._blocked:
            self._drop(src, "blocked")
            return
        link = src._links.get(dst.index)
        if link is None:
            link = src._links[dst.index] = _Link()
        model = link.model
        if model is None:
            model = self.default_link
        if model.mtu is not None and size > model.mtu:
            self._drop(src, "mtu")
            return
        now = self._now
        depart = now
        bandwidth = model.bandwidth
        if bandwidth is not None:
            free = link.free_at
            if free < now:
                free = now
            limit = model.queue_limit
            if limit is not None and (free - now) * bandwidth + size > limit + 1e-6:
                self._drop(src, "queue")
                return
            depart = link.free_at = free + size / bandwidth
        rng = self.rng
        if model.loss and rng.random() < model.loss:
            self._drop(src, "loss")
            return
        jitter = model.jitter
        delay = model.latency
        if jitter:
            delay += rng.uniform(-jitter, jitter)
            if delay < 0.0:
                delay = 0.0
        arrive = depart + delay
        if model.reorder and rng.random() < model.reorder:
            self._reordered += 1
            arrive += model.reorder_delay  # outside the FIFO: later datagrams overtake it
        else:
            if arrive < link.last_arrival:
                arrive = link.last_arrival
            link.last_arrival = arrive
        heap = self._heap
        seq = self._seq
        heapq.heappush(heap, (arrive, next(seq), _DELIVER, dst, data, src.addr, src))
        self._in_flight += 1
        if model.duplicate and rng.random() < model.duplicate:
            self._duplicated += 1
            extra = rng.uniform(0.0, jitter) if jitter else 0.0
            heapq.heappush(heap, (arrive + extra, next(seq), _DELIVER, dst, data, src.addr, src))
            self._in_flight += 1

    # ------------------------------------------------------------------ results

    def statistics(self) -> NetworkStats:
        """A frozen snapshot of the network's counters."""
        return NetworkStats(
            now=self._now,
            nodes=len(self.nodes),
            events_processed=self._events_processed,
            sent=self._sent,
            bytes_sent=self._bytes_sent,
            delivered=self._delivered,
            bytes_delivered=self._bytes_delivered,
            duplicated=self._duplicated,
            reordered=self._reordered,
            multicast=self._multicast,
            in_flight=self._in_flight,
            dropped=dict(self._dropped),
        )

    def trace_digest(self) -> str:
        """BLAKE2b (hex) of every delivery so far as (time, source, destination, length)."""
        return self._trace.copy().hexdigest()
