"""The routing core: a sans-IO, loop-free distance-vector protocol in the spirit of Babel.

Theory of operation
-------------------
Every node originates one route, to its own CellID, with metric 0 and its own sequence number
(seqno, u16). Neighbours are the nodes we hold an encrypted session with; the driver reports
them (`neighbour_up` / `neighbour_down`) with their RTT and loss, from which the core computes
an additive link cost (`cellmesh.routing.metric`). A node learns routes from its neighbours'
UPDATE messages, keeps up to `max_alternates` of them per destination (one per neighbour),
selects the best *feasible* one and advertises that one, with the metric it pays, to every
neighbour. `next_hop(dst)` reads the selected route in O(1).

The tables (RFC 8966 sections 3.2.5-3.2.6, folded together because each node originates exactly
one destination, its CellID, so "source" and "destination" coincide):

* neighbours: CellID -> link cost, RTT, loss, and an index of the routes learned from it;
* destinations: CellID -> the routes through each neighbour (seqno, advertised metric, metric =
  advertised + link cost, hop count, expiry), the selected one, and the *feasibility distance*
  FD = (seqno, metric), the best pair we have advertised for it (section 3.7.3).

Loop freedom (section 3.5.1): an advertisement (s, m) from a neighbour is *feasible* when it is
strictly better than our FD: a newer seqno, or the same seqno and m < FD.metric. Only feasible
routes are selected; the FD only ever improves (until the destination is forgotten). So along
any chain of next hops u -> v, ``FD(v) <= what v advertised < FD(u)``: FDs strictly decrease
along every path, which therefore cannot come back to where it started. A route straight to the
destination (the neighbour *is* the destination) is always feasible: it cannot be part of a loop.
Naive distance vector would take an infeasible route, such as a neighbour's stale route through
us, and loop; we refuse it, retract the destination, and ask the origin for a newer seqno.

Seqno requests (section 3.8): a node left with only unfeasible routes retracts the destination
and sends a SEQNO_REQUEST for FD.seqno + 1 to the neighbours that offer them. A neighbour whose
selected route carries that seqno answers with an update; one that holds another feasible route
carrying it switches to that route and answers (advertising a route it does not use would break
the argument above); otherwise it forwards the request towards the origin along its selected
route (or its best other route, never back to the requester) with a decremented hop count,
remembering whom to answer. The origin raises its seqno to the requested value (at most once per
`seqno_bump_interval`) and advertises it. The answer retraces the request's path, node by node;
a new seqno triggers nothing else (the next dump spreads it), or every origin's bump after a
failure would reach every node. Requests and their answers leave at once, not batched: they
cross the mesh and back. Unanswered requests are resent with doubling timeouts,
`request_retries` times in all. A node that hears an unfeasible route better than the one it has
also asks (section 3.8.2.2), which is how routes become optimal again after a failure.

Updates (section 3.7): a full dump to every neighbour each `update_interval` (jittered), and
triggered updates, batched for `triggered_delay`, when a route appears, disappears (a
retraction, metric INFINITY), changes next hop, or changes metric by more than
`trigger_threshold`. A new neighbour gets a full dump at once, flagged DUMP_REQUEST so it sends
us its own. Left out of what goes to a neighbour (split horizon, section 3.7.4, generalised):
its own CellID, routes through it, and routes it has advertised back at least as good, which
are certainly unfeasible there (`_for_neighbour`); a neighbour that retracts a destination we
still reach gets our route at once. Routes not refreshed for `hold_factor` of their neighbour's
update intervals expire (section 3.5.4); destinations without a route keep their FD for the
source GC time and are advertised as retractions for one hold time.

Bounds: `max_routes` destinations (eviction: oldest unreachable first, then the worst metric if
the newcomer beats it), `max_alternates` routes each, `max_neighbours`, `max_pending_requests`,
`max_events`; every message at most `max_message_size` bytes. Input that is malformed, from a
non-neighbour, or makes no sense (a route to us, a zero metric for someone else, a hop count or
metric beyond the bounds) is dropped and counted in `drops` by reason; `receive` never raises.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Iterable

from cellmesh.errors import (
    DecodeError,
    LocalProtocolError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.routing.events import (
    NeighbourInfo,
    RouteChanged,
    RouteInfo,
    RoutingEvent,
    RoutingStats,
)
from cellmesh.routing.messages import (
    CELL_LEN,
    HEADER_LEN,
    REQUEST_RECORD_LEN,
    ROUTE_RECORD_LEN,
    MessageType,
    pack_route_record,
    pull_request_records,
    pull_update_records,
    push_request,
    push_update,
)
from cellmesh.routing.metric import (
    INFINITY,
    SEQNO_MASK,
    add_metric,
    feasible,
    link_cost,
    seqno_newer,
    seqno_not_older,
)
from cellmesh.routing.settings import MIN_INTERVAL, RoutingSettings

__all__ = ["Outgoing", "RoutingCore"]

Outgoing = tuple[bytes | None, bytes]
"""A message to send: (neighbour CellID, or None for every neighbour; the message bytes)."""

_Advert = tuple[bytes, bytes | None, bytes, bytes, int, int, bool]
"""(destination, next hop or None, record, the same as a retraction, seqno or -1 when the record
is never left out, metric, whether the metric got worse since last advertised)."""

_ZERO_CELL = bytes(CELL_LEN)
_VICTIM_BATCH = 64
_UPDATE = MessageType.UPDATE.name
_REQUEST = MessageType.SEQNO_REQUEST.name


class _Route:
    """A route to one destination through one neighbour."""

    __slots__ = ("adv_metric", "expires", "hops", "metric", "neighbour", "refreshed", "seqno")

    def __init__(
        self,
        neighbour: bytes,
        seqno: int,
        adv_metric: int,
        metric: int,
        hops: int,
        refreshed: float,
        expires: float,
    ) -> None:
        self.neighbour = neighbour
        self.seqno = seqno
        self.adv_metric = adv_metric  # what the neighbour advertised
        self.metric = metric  # adv_metric + our link cost (INFINITY: unusable)
        self.hops = hops  # the neighbour's hop count; ours is one more
        self.refreshed = refreshed
        self.expires = expires


class _Dest:
    """Everything about one destination: its routes, the selected one, its FD."""

    __slots__ = (
        "adv_metric",
        "adv_seqno",
        "dst",
        "fd_metric",
        "fd_seqno",
        "lost_at",
        "routes",
        "selected",
    )

    def __init__(self, dst: bytes, now: float) -> None:
        self.dst = dst
        self.routes: dict[bytes, _Route] = {}
        self.selected: _Route | None = None
        self.fd_seqno: int | None = None  # None: no feasibility distance (never advertised)
        self.fd_metric = INFINITY
        self.adv_seqno: int | None = None  # what we last advertised (for triggers)
        self.adv_metric = INFINITY
        self.lost_at = now


class _Neighbour:
    __slots__ = ("cell", "cost", "last_dump", "last_heard", "loss", "routes", "rtt", "up_since")

    def __init__(self, cell: bytes, cost: int, rtt: float | None, loss: float, now: float) -> None:
        self.cell = cell
        self.cost = cost
        self.rtt = rtt
        self.loss = loss
        self.up_since = now
        self.last_heard: float | None = None
        self.last_dump = -math.inf  # when we last answered its DUMP_REQUEST
        self.routes: dict[bytes, _Route] = {}  # destination -> route learned from it


class _Pending:
    """A seqno request in flight: ours (we are stuck) and/or forwarded for neighbours."""

    __slots__ = ("deadline", "dst", "ours", "requesters", "retry_at", "seqno", "tries")

    def __init__(self, dst: bytes, seqno: int) -> None:
        self.dst = dst
        self.seqno = seqno
        self.ours = False
        self.tries = 0
        self.retry_at = math.inf
        self.requesters: set[bytes] = set()
        self.deadline = -math.inf  # forwarded: duplicates suppressed until then


def _decode_reason(exc: DecodeError) -> str:
    if isinstance(exc, TruncatedError):
        return "truncated"
    if isinstance(exc, OversizeError):
        return "oversize"
    if isinstance(exc, VersionError):
        return "version"
    return "malformed"


class RoutingCore:
    """One node's routing table and protocol engine (module docstring). Sans-IO: the driver
    passes `now` (seconds, monotonic) to every call and a seeded `random.Random` for jitter.

    The driver loop: report neighbours and their link quality; feed every routing message a
    neighbour sends through `receive`; after each call, send what `updates_to_send(now)` returns
    (None = to every neighbour) and re-arm one timer at `get_timer()`, calling `handle_timer`
    when it fires; drain `next_event()`. Forward packets with `next_hop(dst)`.
    """

    def __init__(
        self,
        self_cell: bytes,
        settings: RoutingSettings,
        now: float,
        rng: random.Random,
        *,
        seqno: int | None = None,
    ) -> None:
        """`seqno`: our starting sequence number. Pass the last one used plus one when the node
        restarts (persisting it avoids up to `source_gc_time` of unreachability: neighbours
        hold feasibility distances at the old number); None draws one from `rng`."""
        self._self = _check_cell(self_cell)
        self._s = settings
        self._rng = rng
        if seqno is not None and not 0 <= seqno <= SEQNO_MASK:
            raise LocalProtocolError(f"seqno must be in 0..65535, got {seqno}")
        self._seqno = rng.randrange(SEQNO_MASK + 1) if seqno is None else seqno
        self._last_bump = -math.inf
        self._bump_to: int | None = None  # a requested seqno waiting for the rate limit
        self._now = now
        self._interval_ds = max(1, round(settings.update_interval * 10))
        self._per_update = min(255, (settings.max_message_size - HEADER_LEN) // ROUTE_RECORD_LEN)
        self._per_request = min(255, (settings.max_message_size - HEADER_LEN) // REQUEST_RECORD_LEN)
        self._neighbours: dict[bytes, _Neighbour] = {}
        self._dests: dict[bytes, _Dest] = {}
        self._next_hop: dict[bytes, bytes] = {}
        self._lost: dict[bytes, None] = {}  # destinations without a route, oldest loss first
        self._pending: dict[bytes, _Pending] = {}
        self._evicted: dict[bytes, int] = {}  # retractions owed for evicted destinations
        self._victims: list[bytes] = []
        self._victims_at = -math.inf
        # What the next flush sends.
        self._trig: dict[bytes, None] = {}
        self._uni: dict[bytes, dict[bytes, None]] = {}
        self._dumps: dict[bytes, bool] = {}  # neighbour -> set DUMP_REQUEST
        self._dump_all = False
        self._reqs: dict[bytes, dict[bytes, tuple[int, int]]] = {}
        self._flush_at: float | None = None
        # Timers.
        self._next_dump = now + self._dump_delay()
        self._next_sweep = now + settings.update_interval
        self._next_request_check = math.inf
        self._events: deque[RoutingEvent] = deque()
        self.drops: Counter[str] = Counter()
        """Refused input by reason (docs/routing.md lists the words)."""
        self._sent: Counter[str] = Counter()
        self._bytes_sent: Counter[str] = Counter()
        self._received = 0
        self._bytes_received = 0
        self._records_received = 0
        self._full_dumps = 0
        self._flushes = 0
        self._requests_sent = 0
        self._requests_forwarded = 0
        self._requests_answered = 0
        self._bumps = 0
        self._bumps_deferred = 0
        self._route_changes = 0
        self._evictions = 0

    # ------------------------------------------------------------------ properties

    @property
    def self_cell(self) -> bytes:
        """Our CellID."""
        return self._self

    @property
    def seqno(self) -> int:
        """Our current sequence number (persist it across restarts; see `__init__`)."""
        return self._seqno

    @property
    def settings(self) -> RoutingSettings:
        """The settings this core runs with."""
        return self._s

    # ------------------------------------------------------------------ neighbours

    def neighbour_up(
        self, cell: bytes, now: float, rtt: float | None = None, loss: float = 0.0
    ) -> bool:
        """A session with `cell` is established: it is a neighbour from now on, with a link of
        round-trip time `rtt` (seconds; None = not measured yet) and round-trip `loss`.

        It gets our full table at the next flush (flagged so it sends us its own). Calling it
        for a neighbour that is already up just updates the link quality. Returns False when
        the neighbour table is full (drop reason ``neighbour_limit``). Raises
        `LocalProtocolError` for our own or an invalid CellID, or an invalid rtt/loss.
        """
        self._tick(now)
        cell = _check_cell(cell)
        if cell == self._self:
            raise LocalProtocolError("a node is not its own neighbour")
        nb = self._neighbours.get(cell)
        if nb is not None:
            self.neighbour_metric(cell, rtt, loss, now)
            return True
        if len(self._neighbours) >= self._s.max_neighbours:
            self.drops["neighbour_limit"] += 1
            return False
        nb = _Neighbour(cell, self._cost(rtt, loss), rtt, loss, now)
        self._neighbours[cell] = nb
        self._dumps[cell] = True
        self._schedule(now)
        return True

    def neighbour_down(self, cell: bytes, now: float) -> bool:
        """The session with `cell` is gone: every route through it is dropped at once and the
        destinations re-selected (retracted when nothing feasible is left). Returns False when
        it was not a neighbour."""
        self._tick(now)
        nb = self._neighbours.pop(bytes(cell), None)
        if nb is None:
            return False
        c = nb.cell
        self._dumps.pop(c, None)
        self._uni.pop(c, None)
        self._reqs.pop(c, None)
        for dst, route in nb.routes.items():
            d = self._dests[dst]
            del d.routes[c]
            if d.selected is route:
                self._reselect(d, now)
        nb.routes = {}
        for p in self._pending.values():
            p.requesters.discard(c)
        return True

    def neighbour_metric(self, cell: bytes, rtt: float | None, loss: float, now: float) -> bool:
        """New link quality for neighbour `cell` (RTT in seconds or None, round-trip loss in
        [0, 1]). Changes within `cost_noise` of the current cost are ignored; others re-price
        every route through it. Returns False when `cell` is not a neighbour (a report that
        raced `neighbour_down`). Raises `LocalProtocolError` for an invalid rtt/loss."""
        self._tick(now)
        cost = self._cost(rtt, loss)
        nb = self._neighbours.get(bytes(cell))
        if nb is None:
            return False
        nb.rtt = rtt
        nb.loss = loss
        old = nb.cost
        if cost == old:
            return True
        if cost < INFINITY and old < INFINITY and abs(cost - old) <= old * self._s.cost_noise:
            return True
        nb.cost = cost
        for dst, route in nb.routes.items():
            d = self._dests[dst]
            previous = route.metric
            route.metric = add_metric(route.adv_metric, cost) if cost < INFINITY else INFINITY
            self._changed(d, route, self._feasible(d, route), previous, now)
        return True

    def neighbours(self) -> list[NeighbourInfo]:
        """The neighbours, by CellID."""
        return [
            NeighbourInfo(
                cell=nb.cell,
                cost=nb.cost,
                rtt=nb.rtt,
                loss=nb.loss,
                up_since=nb.up_since,
                last_heard=nb.last_heard,
                routes=len(nb.routes),
            )
            for nb in sorted(self._neighbours.values(), key=lambda n: n.cell)
        ]

    # ------------------------------------------------------------------ receiving

    def receive(self, from_neighbour: bytes, data: bytes, now: float) -> None:
        """Feed one routing message that neighbour `from_neighbour` sent over its session.

        Never raises for any `data`: what cannot be used is counted in `drops`.
        """
        self._tick(now)
        self._received += 1
        self._bytes_received += len(data)
        nb = self._neighbours.get(from_neighbour)
        if nb is None:
            self.drops["not_neighbour"] += 1
            return
        try:
            if len(data) > 1 and data[1] == MessageType.UPDATE:
                dump, interval_ds, records = pull_update_records(data)
                nb.last_heard = now
                self._on_update(nb, dump, interval_ds, records, now)
            else:
                requests = pull_request_records(data)
                nb.last_heard = now
                for dst, seqno, hops, _ in requests:
                    self._on_request(nb, dst, seqno, hops, now)
        except DecodeError as exc:
            self.drops[_decode_reason(exc)] += 1

    def _on_update(
        self,
        nb: _Neighbour,
        dump: bool,
        interval_ds: int,
        records: list[tuple[bytes, int, int, int, int]],
        now: float,
    ) -> None:
        cell = nb.cell
        if dump:
            if now - nb.last_dump >= self._s.dump_request_interval:
                nb.last_dump = now
                self._dumps.setdefault(cell, False)
                self._schedule(now)
            else:
                self.drops["dump_rate_limited"] += 1
        self._records_received += len(records)
        expires = now + self._s.hold_factor * max(MIN_INTERVAL, interval_ds / 10.0)
        dests = self._dests
        me = self._self
        max_hops = self._s.max_hops
        max_alternates = self._s.max_alternates
        hysteresis = self._s.hysteresis
        cost = nb.cost
        nb_routes = nb.routes
        drops = self.drops
        for dst, seqno, metric, hops, _ in records:
            d = dests.get(dst)
            r: _Route | None = None
            if d is not None:
                r = d.routes.get(cell)
                # Fast path: a periodic refresh of what we already hold.
                if r is not None and r.seqno == seqno and r.adv_metric == metric and r.hops == hops:
                    r.refreshed = now
                    r.expires = expires
                    continue
            if dst == me:
                if metric < INFINITY:  # a retraction of us is split horizon, not an attack
                    drops["route_to_self"] += 1
                continue
            retract = metric >= INFINITY
            if not retract:
                if dst == cell:
                    if metric or hops:
                        drops["bad_origin"] += 1  # a node's own route is metric 0, hop 0
                        continue
                elif metric == 0 or hops == 0:
                    drops["zero_metric"] += 1  # only the origin may claim distance 0
                    continue
                if hops >= max_hops:
                    drops["hop_limit"] += 1
                    retract = True
                elif cost < INFINITY and metric + cost >= INFINITY:
                    drops["metric_overflow"] += 1
                    retract = True
            if retract or d is None or cost >= INFINITY:
                self._acquire(nb, d, dst, seqno, metric, hops, retract, expires, now)
                continue
            # The common slow path, inlined (it is the cost of a cold start): a new or changed
            # finite route to a destination we know. Same steps as `_acquire`.
            total = metric + cost
            fd_s = d.fd_seqno
            if fd_s is None or dst == cell:
                ok = True
            elif seqno == fd_s:
                ok = metric < d.fd_metric
            else:
                ok = 0 < ((seqno - fd_s) & SEQNO_MASK) < 0x8000
            routes = d.routes
            if r is None:
                if len(routes) >= max_alternates and not self._make_room(d, total):
                    continue
                # Keyed by d.dst, not by this record's copy of the bytes: one key object per
                # destination, however many neighbours offer it (memory at 1,000 nodes).
                r = routes[cell] = nb_routes[d.dst] = _Route(
                    cell, seqno, metric, total, hops, now, expires
                )
                previous = INFINITY
            else:
                previous = r.metric
                r.seqno = seqno
                r.adv_metric = metric
                r.metric = total
                r.hops = hops
                r.refreshed = now
                r.expires = expires
            sel = d.selected
            if sel is None:
                self._reselect(d, now)
            elif r is sel:
                if ok and total <= previous:
                    self._kept(d, sel, now)
                else:
                    self._reselect(d, now)
            elif ok and total + hysteresis < sel.metric:
                self._apply(d, sel, r, now)
            elif ok and dst in self._pending:
                self._satisfy(d, now)  # r may carry a seqno someone is waiting for
            if not ok:
                sel = d.selected
                if sel is None or total + hysteresis < sel.metric:
                    self._request(d, now, only=cell)

    def _acquire(
        self,
        nb: _Neighbour,
        d: _Dest | None,
        dst: bytes,
        seqno: int,
        adv: int,
        hops: int,
        retract: bool,
        expires: float,
        now: float,
    ) -> None:
        """Route acquisition (RFC 8966 section 3.5.3) for one record that changed something."""
        cell = nb.cell
        cost = nb.cost
        # Overflow was turned into a retraction by the caller; an unusable link (cost
        # INFINITY) keeps the route, unusable until the link recovers.
        total = INFINITY if retract or cost >= INFINITY else adv + cost
        if d is None:
            if total >= INFINITY:
                return  # a retraction, or an unusable route, for a destination we do not know
            d = self._admit(dst, total, now)
            if d is None:
                return
        routes = d.routes
        r = routes.get(cell)
        if retract:
            if r is not None:
                del routes[cell]
                del nb.routes[d.dst]
                if d.selected is r:
                    self._reselect(d, now)
                elif d.selected is not None and self._s.split_horizon:
                    # It lost the destination (or now routes through us): our route may have
                    # been left out as unfeasible there, and may be its way back. Tell it.
                    self._queue_uni(cell, dst, now)
            return
        if r is None:
            if len(routes) >= self._s.max_alternates and not self._make_room(d, total):
                return  # worse than every alternative we hold; its next dump offers it again
            r = routes[cell] = nb.routes[d.dst] = _Route(
                cell, seqno, adv, total, hops, now, expires
            )
            old_metric = INFINITY
        else:
            old_metric = r.metric
            r.seqno = seqno
            r.adv_metric = adv
            r.metric = total
            r.hops = hops
            r.refreshed = now
            r.expires = expires
        ok = self._feasible(d, r)
        self._changed(d, r, ok, old_metric, now)
        if not ok and total < INFINITY:
            sel = d.selected
            # Section 3.8.2.2: an unfeasible route that would beat what we have is worth a
            # request for a newer seqno (this is how routes become optimal again).
            if sel is None or total + self._s.hysteresis < sel.metric:
                self._request(d, now, only=cell)

    @staticmethod
    def _feasible(d: _Dest, r: _Route) -> bool:
        """The feasibility condition for a held route (a route straight to the destination is
        always feasible: it cannot be part of a loop)."""
        fd_s = d.fd_seqno
        if fd_s is None or r.neighbour == d.dst:
            return True
        s = r.seqno
        if s == fd_s:
            return r.adv_metric < d.fd_metric
        return 0 < ((s - fd_s) & SEQNO_MASK) < 0x8000

    def _make_room(self, d: _Dest, metric: int) -> bool:
        """Drop the worst unselected route of `d` if it is worse than `metric`."""
        worst: _Route | None = None
        for r in d.routes.values():
            if r is not d.selected and (worst is None or r.metric > worst.metric):
                worst = r
        if worst is None or worst.metric <= metric:
            return False
        del d.routes[worst.neighbour]
        nb = self._neighbours.get(worst.neighbour)
        if nb is not None:
            nb.routes.pop(d.dst, None)
        return True

    def _on_request(self, nb: _Neighbour, dst: bytes, seqno: int, hops: int, now: float) -> None:
        """Seqno request handling (RFC 8966 section 3.8.1.2)."""
        cell = nb.cell
        if dst == self._self:
            if seqno_newer(seqno, self._seqno):
                # Jump straight to the requested number (RFC 8966 adds 1): one round trip
                # unsticks a network whose FDs carry a number we forgot in a restart. At most
                # one jump per `seqno_bump_interval`; a request inside it is served at its end.
                if self._bump_to is None or seqno_newer(seqno, self._bump_to):
                    self._bump_to = seqno
                if now - self._last_bump >= self._s.seqno_bump_interval:
                    self._bump(now)
                else:
                    self._bumps_deferred += 1
                return
            self._requests_answered += 1
            self._queue_uni(cell, self._self, now)
            return
        d = self._dests.get(dst)
        if d is None:
            self.drops["request_unknown"] += 1
            return
        sel = d.selected
        if sel is None or sel.neighbour == cell or not seqno_not_older(sel.seqno, seqno):
            fresh = self._fresh_route(d, seqno, cell)
            if fresh is not None:  # we hold what it asks for: take it (see `_satisfy`)
                self._take_fresh(d, fresh, now)
                sel = fresh
        if sel is not None and sel.neighbour != cell and seqno_not_older(sel.seqno, seqno):
            self._requests_answered += 1
            self._queue_uni(cell, dst, now)
            return
        if hops < 2:
            self.drops["request_hop_limit"] += 1
            return
        target = self._request_target(d, cell)
        if target is None:
            self.drops["request_dead_end"] += 1
            return
        p = self._pending.get(dst)
        if p is not None and (p.ours or now < p.deadline) and seqno_not_older(p.seqno, seqno):
            p.requesters.add(cell)  # already on its way: answer this one too
            return
        if p is None:
            p = self._new_pending(dst, seqno)
            if p is None:
                return
        elif seqno_newer(seqno, p.seqno):
            p.seqno = seqno
        p.requesters.add(cell)
        p.deadline = now + self._s.request_timeout
        self._next_request_check = min(self._next_request_check, p.deadline)
        self._requests_forwarded += 1
        self._queue_request(target, dst, seqno, hops - 1, now)

    def _bump(self, now: float) -> None:
        assert self._bump_to is not None
        self._seqno = self._bump_to
        self._bump_to = None
        self._last_bump = now
        self._bumps += 1
        self._trigger(self._self, now, urgent=True)

    def _request_target(self, d: _Dest, exclude: bytes | None) -> bytes | None:
        """Where to forward a request: the selected next hop, else the neighbour offering the
        best other route; never `exclude` (the requester)."""
        sel = d.selected
        if sel is not None and sel.neighbour != exclude:
            return sel.neighbour
        best: _Route | None = None
        for r in d.routes.values():
            if r.neighbour == exclude or r.metric >= INFINITY:
                continue
            if best is None or (r.metric, r.neighbour) < (best.metric, best.neighbour):
                best = r
        return best.neighbour if best is not None else None

    def _new_pending(self, dst: bytes, seqno: int) -> _Pending | None:
        if len(self._pending) >= self._s.max_pending_requests:
            self.drops["requests_full"] += 1
            return None
        p = self._pending[dst] = _Pending(dst, seqno)
        return p

    # ------------------------------------------------------------------ route selection

    def _choose(self, d: _Dest) -> _Route | None:
        """Route selection (RFC 8966 section 3.6): the feasible route with the smallest metric
        (ties: the smaller neighbour CellID), keeping the current one unless another beats it
        by more than `hysteresis`."""
        fd_s = d.fd_seqno
        fd_m = d.fd_metric
        dst = d.dst
        cur = d.selected
        cur_ok = False
        best: _Route | None = None
        for r in d.routes.values():
            m = r.metric
            if m >= INFINITY:
                continue
            if fd_s is not None and r.neighbour != dst:
                s = r.seqno
                if s == fd_s:
                    if r.adv_metric >= fd_m:
                        continue
                elif not (0 < ((s - fd_s) & SEQNO_MASK) < 0x8000):
                    continue
            if r is cur:
                cur_ok = True
            if (
                best is None
                or m < best.metric
                or (m == best.metric and r.neighbour < best.neighbour)
            ):
                best = r
        if (
            cur_ok
            and best is not cur
            and best is not None
            and cur is not None
            and best.metric + self._s.hysteresis >= cur.metric
        ):
            return cur
        return best

    def _changed(self, d: _Dest, r: _Route, ok: bool, previous: int, now: float) -> None:
        """Route `r` of `d` was added or changed (its metric was `previous`; `ok`: feasible).

        Re-selection is incremental. Invariant: no feasible route beats the selected one by
        more than `hysteresis` (every path below restores it). So if `r` is not selected it
        changes the selection only when it beats the selected route by more than that, and
        then it is the best of all; if it is selected and did not get worse it stays. Only a
        selected route that got worse or unfeasible needs the full scan of `_choose`; the
        result is the same as scanning every time."""
        sel = d.selected
        if sel is None:
            self._reselect(d, now)
            return
        if r is sel:
            if ok and r.metric <= previous and r.metric < INFINITY:
                self._kept(d, sel, now)
            else:
                self._reselect(d, now)
            return
        if ok and r.metric + self._s.hysteresis < sel.metric:
            self._apply(d, sel, r, now)
        elif ok and d.dst in self._pending:
            self._satisfy(d, now)  # r may carry a seqno someone is waiting for

    def _reselect(self, d: _Dest, now: float) -> None:
        old = d.selected
        best = self._choose(d)
        if best is not old:
            self._apply(d, old, best, now)
        elif old is not None:
            self._kept(d, old, now)
        elif d.dst not in self._lost:
            self._lost[d.dst] = None
            d.lost_at = now

    def _kept(self, d: _Dest, sel: _Route, now: float) -> None:
        """The selection stands; its seqno or metric may have moved."""
        # A new seqno alone triggers nothing: it answers the requests waiting for it
        # (`_satisfy`, along the request path) and reaches everyone else in the next dump.
        # Flooding it would send every origin's bump after a failure to every node.
        if sel.seqno == d.adv_seqno and self._significant(sel.metric, d.adv_metric):
            self._trigger(d.dst, now)
        if d.dst in self._pending:
            self._satisfy(d, now)

    def _apply(self, d: _Dest, old: _Route | None, best: _Route | None, now: float) -> None:
        """Switch `d` from route `old` to route `best` (either may be None)."""
        d.selected = best
        dst = d.dst
        old_hop = old.neighbour if old is not None else None
        if best is None:
            self._next_hop.pop(dst, None)
            self._lost[dst] = None
            d.lost_at = now
            new_hop = None
            metric = INFINITY
        else:
            if old is None:
                self._lost.pop(dst, None)
            new_hop = best.neighbour
            self._next_hop[dst] = new_hop
            metric = best.metric
        if old_hop != new_hop:
            self._route_changes += 1
            self._emit(RouteChanged(dst, old_hop, new_hop, metric))
        # A route under a seqno we never advertised is what stuck nodes downstream wait for.
        self._trigger(dst, now)
        if best is None:
            self._request(d, now, only=None)
        elif dst in self._pending:
            self._satisfy(d, now)

    def _significant(self, metric: int, advertised: int) -> bool:
        if metric >= INFINITY or advertised >= INFINITY:
            return metric != advertised
        return abs(metric - advertised) > advertised * self._s.trigger_threshold

    def _satisfy(self, d: _Dest, now: float) -> None:
        """A selected route exists: our own request is over; neighbours that asked for a seqno
        it carries get an update. If the selected route carries an older seqno but another
        feasible one carries the requested seqno, switch to it: advertising a route we do not
        use would break the feasibility argument, and keeping the slightly better old-seqno
        route would leave the requesters stuck. (It sticks: advertising it moves our FD to the
        new seqno, which makes the old-seqno routes unfeasible.)"""
        p = self._pending.get(d.dst)
        sel = d.selected
        if p is None or sel is None:
            return
        p.ours = False
        p.retry_at = math.inf
        if p.requesters and not seqno_not_older(sel.seqno, p.seqno):
            fresh = self._fresh_route(d, p.seqno, None)
            if fresh is not None:
                self._take_fresh(d, fresh, now)  # calls us again, with `fresh` selected
                return
        if p.requesters and seqno_not_older(sel.seqno, p.seqno):
            for cell in sorted(p.requesters):
                if cell != sel.neighbour and cell in self._neighbours:
                    self._queue_uni(cell, d.dst, now)
            p.requesters.clear()
        if not p.requesters:
            del self._pending[d.dst]

    def _fresh_route(self, d: _Dest, seqno: int, exclude: bytes | None) -> _Route | None:
        """The best usable, feasible route of `d` carrying at least `seqno`, not through
        `exclude`."""
        best: _Route | None = None
        for r in d.routes.values():
            if (
                r.metric >= INFINITY
                or r.neighbour == exclude
                or not seqno_not_older(r.seqno, seqno)
                or not self._feasible(d, r)
            ):
                continue
            if best is None or (r.metric, r.neighbour) < (best.metric, best.neighbour):
                best = r
        return best

    def _take_fresh(self, d: _Dest, fresh: _Route, now: float) -> None:
        """Select `fresh` (feasible, carrying a newer seqno) over a better old-seqno route, and
        raise the FD to it now rather than when it is advertised: stricter, so still safe, and
        the old-seqno routes become unfeasible at once, so nothing switches back before the
        answer leaves."""
        if d.fd_seqno is None or seqno_newer(fresh.seqno, d.fd_seqno):
            d.fd_seqno = fresh.seqno
            d.fd_metric = fresh.metric
        self._apply(d, d.selected, fresh, now)

    def _request(self, d: _Dest, now: float, only: bytes | None) -> None:
        """Ask for FD.seqno + 1 (RFC 8966 section 3.8.2.1): from `only`, or from every
        neighbour offering an unfeasible route (none: nothing to ask; their next change or dump
        reaches us anyway)."""
        if d.fd_seqno is None or not self._neighbours:
            return
        seqno = (d.fd_seqno + 1) & SEQNO_MASK
        targets = [only] if only is not None else self._unfeasible_neighbours(d)
        if not targets:
            return
        p = self._pending.get(d.dst)
        if p is not None and p.ours and seqno_not_older(p.seqno, seqno):
            return  # already asking; the retry timer resends
        if p is None:
            p = self._new_pending(d.dst, seqno)
            if p is None:
                return
        elif seqno_newer(seqno, p.seqno):
            p.seqno = seqno
        p.ours = True
        p.tries = 1
        p.retry_at = now + self._s.request_timeout
        self._next_request_check = min(self._next_request_check, p.retry_at)
        for cell in targets:
            self._queue_request(cell, d.dst, p.seqno, self._s.request_hops, now)
        self._requests_sent += len(targets)

    def _unfeasible_neighbours(self, d: _Dest) -> list[bytes]:
        return [
            r.neighbour
            for r in d.routes.values()
            if r.metric < INFINITY and not feasible(r.seqno, r.adv_metric, d.fd_seqno, d.fd_metric)
        ]

    # ------------------------------------------------------------------ table bounds

    def _admit(self, dst: bytes, metric: int, now: float) -> _Dest | None:
        if len(self._dests) >= self._s.max_routes and not self._evict_for(metric, now):
            self.drops["table_full"] += 1
            return None
        d = self._dests[dst] = _Dest(dst, now)
        return d

    def _evict_for(self, metric: int, now: float) -> bool:
        """Make room for a new destination reachable at `metric`: evict the destination lost
        longest ago, else the reachable one with the worst metric (ties: least recently
        refreshed, then the larger CellID) when the newcomer is better. The worst candidates
        are ranked in batches at most once a second, so a flood of new destinations costs
        O(1) each, not a table scan each."""
        if self._lost:
            self._evict(next(iter(self._lost)), now)
            return True
        for _ in range(2):
            while self._victims:
                v = self._victims.pop()
                d = self._dests.get(v)
                if d is None or d.selected is None:
                    continue
                if d.selected.metric <= metric:
                    self._victims.append(v)
                    return False
                self._evict(v, now)
                return True
            if now - self._victims_at < 1.0:
                return False
            self._victims_at = now
            worst = heapq.nlargest(
                _VICTIM_BATCH,
                (
                    (d.selected.metric, -d.selected.refreshed, d.dst)
                    for d in self._dests.values()
                    if d.selected is not None
                ),
            )
            self._victims = [dst for _, _, dst in reversed(worst)]
        return False

    def _evict(self, dst: bytes, now: float) -> None:
        d = self._dests.pop(dst)
        for cell in d.routes:
            nb = self._neighbours.get(cell)
            if nb is not None:
                nb.routes.pop(dst, None)
        self._lost.pop(dst, None)
        self._pending.pop(dst, None)
        sel = d.selected
        if sel is not None:
            self._next_hop.pop(dst, None)
            self._route_changes += 1
            self._emit(RouteChanged(dst, sel.neighbour, None, INFINITY))
            self._evicted[dst] = sel.seqno
            self._trigger(dst, now)
        self._evictions += 1

    # ------------------------------------------------------------------ sending

    def _tick(self, now: float) -> None:
        if now > self._now:
            self._now = now

    def _schedule(self, now: float, urgent: bool = False) -> None:
        """Arm the flush: after `triggered_delay`, or at once when `urgent`. Requests, their
        answers and our own seqno increases are urgent (as in Babel): a request crosses the mesh
        to the origin and the answer comes back, and batching at every hop would add the delay
        twice per hop of the path. They are point to point; everything that spreads as a wave
        (route changes, retractions) is batched, so a burst leaves in one message."""
        if urgent:
            if self._flush_at is None or self._flush_at > now:
                self._flush_at = now
        elif self._flush_at is None:
            self._flush_at = now + self._s.triggered_delay

    def _trigger(self, dst: bytes, now: float, urgent: bool = False) -> None:
        self._trig[dst] = None
        self._schedule(now, urgent)

    def _queue_uni(self, cell: bytes, dst: bytes, now: float) -> None:
        q = self._uni.get(cell)
        if q is None:
            q = self._uni[cell] = {}
        q[dst] = None
        self._schedule(now, urgent=True)

    def _queue_request(self, cell: bytes, dst: bytes, seqno: int, hops: int, now: float) -> None:
        q = self._reqs.get(cell)
        if q is None:
            q = self._reqs[cell] = {}
        q[dst] = (seqno, hops)
        self._schedule(now, urgent=True)

    def _dump_delay(self) -> float:
        s = self._s
        return s.update_interval * (1.0 - s.update_jitter * self._rng.random())

    def _own_record(self) -> bytes:
        return pack_route_record(self._self, self._seqno, 0, 0)

    def _advert_selected(self, d: _Dest, sel: _Route) -> bytes:
        """The record advertising `d`'s selected route; updates the FD first (RFC 8966
        section 3.7.3: before sending a finite metric, FD := min(FD, advertised))."""
        seqno = sel.seqno
        metric = sel.metric
        fd_s = d.fd_seqno
        if fd_s is None or ((metric < d.fd_metric) if seqno == fd_s else seqno_newer(seqno, fd_s)):
            d.fd_seqno = seqno
            d.fd_metric = metric
        d.adv_seqno = seqno
        d.adv_metric = metric
        return pack_route_record(d.dst, seqno, metric, sel.hops + 1)

    def _retraction(self, d: _Dest) -> bytes:
        d.adv_metric = INFINITY
        seqno = d.adv_seqno if d.adv_seqno is not None else (d.fd_seqno or 0)
        return pack_route_record(d.dst, seqno, INFINITY, 0)

    def _advert(self, dst: bytes) -> _Advert | None:
        """What a triggered update says about `dst` (None: forgotten since it was queued)."""
        if dst == self._self:
            return dst, None, self._own_record(), b"", -1, 0, False
        d = self._dests.get(dst)
        if d is None:
            seqno = self._evicted.get(dst)
            if seqno is None:
                return None
            return dst, None, pack_route_record(dst, seqno, INFINITY, 0), b"", -1, INFINITY, False
        sel = d.selected
        if sel is None:
            return dst, None, self._retraction(d), b"", -1, INFINITY, False
        worse = d.adv_seqno == sel.seqno and sel.metric > d.adv_metric
        rec = self._advert_selected(d, sel)
        retraction = pack_route_record(dst, sel.seqno, INFINITY, 0)
        return dst, sel.neighbour, rec, retraction, sel.seqno, sel.metric, worse

    def _dump_entries(self, now: float) -> list[_Advert]:
        """Every entry of a full dump: our own route, every selected route, and retractions of
        destinations lost within the last hold time (or evicted since the last flush)."""
        entries: list[_Advert] = [(self._self, None, self._own_record(), b"", -1, 0, False)]
        retract_since = now - self._s.hold_time
        for d in self._dests.values():
            sel = d.selected
            if sel is not None:
                rec = self._advert_selected(d, sel)
                entries.append((d.dst, sel.neighbour, rec, b"", sel.seqno, sel.metric, False))
            elif d.lost_at >= retract_since:
                entries.append((d.dst, None, self._retraction(d), b"", -1, INFINITY, False))
        for dst, seqno in self._evicted.items():
            rec = pack_route_record(dst, seqno, INFINITY, 0)
            entries.append((dst, None, rec, b"", -1, INFINITY, False))
        return entries

    @staticmethod
    def _for_neighbour(
        nb: _Neighbour, entries: list[_Advert], sent: set[bytes] | None = None
    ) -> list[bytes]:
        """The records of `entries` worth sending to `nb` (split horizon, generalised); with
        `sent` (a triggered update), the destinations included are added to it.

        Left out: a neighbour's own CellID; a route through `nb` itself (split horizon, RFC
        8966 section 3.7.4); and a route that is *certainly unfeasible at nb*: `nb` has
        advertised the destination to us with a (seqno, metric) at least as good as ours, and
        its FD is at least as good as anything it advertised, so it could never select ours.
        It changes no routing decision; routes flow away from their destination, so on any
        link about half a table is of this kind (we can only leave out what we know of). When
        our metric got worse, a triggered update sends `nb` a retraction in its place, so `nb`
        keeps no stale, too-good route from us.

        No poisoned reverse: a neighbour answers a retraction with its own route (it may have
        been left out here as unfeasible), and a retraction sent to our new next hop would be
        answered with the route we just took from it, over and over while metrics settle. Loop
        freedom does not need it: a stale route from us that `nb` still holds is feasible there
        only if it beats nb's FD, which it cannot while we route through `nb`."""
        cell = nb.cell
        held = nb.routes
        out: list[bytes] = []
        for dst, via, rec, retraction, seqno, metric, worse in entries:
            if dst == cell or via == cell:
                continue
            if seqno >= 0:
                theirs = held.get(dst)
                if theirs is not None:
                    s = theirs.seqno
                    if (
                        theirs.adv_metric <= metric
                        if s == seqno
                        else not (0 < ((seqno - s) & SEQNO_MASK) < 0x8000)
                    ):
                        if sent is not None and worse:
                            out.append(retraction)
                            sent.add(dst)
                        continue
            out.append(rec)
            if sent is not None:
                sent.add(dst)
        return out

    def _chunk(
        self, to: bytes | None, records: list[bytes], ask: bool, out: list[Outgoing]
    ) -> None:
        step = self._per_update
        for i in range(0, len(records), step):
            msg = push_update(self._interval_ds, records[i : i + step], ask and i == 0)
            out.append((to, msg))
            self._sent[_UPDATE] += 1
            self._bytes_sent[_UPDATE] += len(msg)

    def updates_to_send(self, now: float) -> list[Outgoing]:
        """Take the messages due at `now`: (neighbour CellID or None for every neighbour,
        bytes). Each is at most `max_message_size` bytes. Empty until the batching delay of
        the first pending change has passed (`get_timer` says when)."""
        self._tick(now)
        if self._flush_at is None or now < self._flush_at:
            return []
        self._flush_at = None
        out: list[Outgoing] = []
        if self._neighbours:
            if self._dump_all:
                self._full_dumps += 1
            else:
                self._flushes += 1
            self._build(now, out)
        self._trig.clear()
        self._uni.clear()
        self._dumps.clear()
        self._dump_all = False
        self._reqs.clear()
        self._evicted.clear()
        return out

    def _build(self, now: float, out: list[Outgoing]) -> None:
        dump_all = self._dump_all
        dumps = self._dumps
        entries = self._dump_entries(now) if dump_all or dumps else []
        trig = [a for a in map(self._advert, self._trig) if a is not None]
        split = self._s.split_horizon
        if not split:
            # One message set for everyone; only new neighbours and request answers are unicast.
            common = [e[2] for e in (entries if dump_all else trig)]
            if common:
                self._chunk(None, common, False, out)
        for cell, nb in self._neighbours.items():
            records: list[bytes]
            if cell in dumps or (split and dump_all):
                if split:
                    records = self._for_neighbour(nb, entries)
                else:
                    records = [e[2] for e in entries if e[0] != cell]
            else:
                sent: set[bytes] = set()
                records = self._for_neighbour(nb, trig, sent) if split else []
                uni = self._uni.get(cell)
                if uni and not dump_all:
                    for dst in uni:
                        if dst == cell or dst in sent or (not split and dst in self._trig):
                            continue
                        a = self._advert(dst)
                        if a is not None and a[1] != cell:
                            records.append(a[2])
            if records:
                self._chunk(cell, records, dumps.get(cell, False), out)
        for cell, reqs in self._reqs.items():
            if cell not in self._neighbours:
                continue
            triples = [(dst, seqno, hops) for dst, (seqno, hops) in reqs.items()]
            step = self._per_request
            for i in range(0, len(triples), step):
                msg = push_request(triples[i : i + step])
                out.append((cell, msg))
                self._sent[_REQUEST] += 1
                self._bytes_sent[_REQUEST] += len(msg)

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The absolute time at which `handle_timer` (or, for a batched flush,
        `updates_to_send`) must next be called. Never None: periodic dumps never stop."""
        t = min(self._next_dump, self._next_sweep, self._next_request_check)
        if self._bump_to is not None:
            t = min(t, self._last_bump + self._s.seqno_bump_interval)
        if self._flush_at is not None and self._flush_at < t:
            return self._flush_at
        return t

    def handle_timer(self, now: float) -> None:
        """Do what is due at `now`: a periodic dump, route expiry, request retries."""
        self._tick(now)
        if self._bump_to is not None and now >= self._last_bump + self._s.seqno_bump_interval:
            self._bump(now)
        if now >= self._next_dump:
            self._dump_all = True
            self._flush_at = now if self._flush_at is None else min(self._flush_at, now)
            self._next_dump = now + self._dump_delay()
        if now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + self._s.update_interval
        if now >= self._next_request_check:
            self._check_requests(now)

    def _sweep(self, now: float) -> None:
        """Expire routes not refreshed in time (RFC 8966 section 3.5.4) and forget
        destinations that have had no route for the source GC time."""
        for d in list(self._dests.values()):
            expired: list[_Route] | None = None
            for r in d.routes.values():
                if r.expires <= now:
                    if expired is None:
                        expired = []
                    expired.append(r)
            if expired is None:
                continue
            reselect = False
            for r in expired:
                del d.routes[r.neighbour]
                nb = self._neighbours.get(r.neighbour)
                if nb is not None:
                    nb.routes.pop(d.dst, None)
                if r is d.selected:
                    reselect = True
            if reselect:
                self._reselect(d, now)
        forget_before = now - self._s.source_gc
        gone: list[bytes] = []
        for dst in self._lost:
            d = self._dests[dst]
            if d.lost_at > forget_before:
                break
            if not d.routes and dst not in self._pending:
                gone.append(dst)
        for dst in gone:
            del self._lost[dst]
            del self._dests[dst]

    def _check_requests(self, now: float) -> None:
        s = self._s
        nxt = math.inf
        for dst, p in list(self._pending.items()):
            if p.ours and now >= p.retry_at:
                d = self._dests.get(dst)
                targets = self._unfeasible_neighbours(d) if d is not None else []
                if p.tries >= s.request_retries or not targets or d is None:
                    p.ours = False
                    p.retry_at = math.inf
                else:
                    p.tries += 1
                    p.retry_at = now + s.request_timeout * (1 << (p.tries - 1))
                    for cell in targets:
                        self._queue_request(cell, dst, p.seqno, s.request_hops, now)
                    self._requests_sent += len(targets)
            if not p.ours and now >= p.deadline:
                del self._pending[dst]
                continue
            if p.ours:
                nxt = min(nxt, p.retry_at)
            if now < p.deadline:
                nxt = min(nxt, p.deadline)
        self._next_request_check = nxt

    # ------------------------------------------------------------------ reading the table

    def next_hop(self, dst: bytes) -> bytes | None:
        """The neighbour to hand a packet for `dst` to, or None (no route). O(1)."""
        return self._next_hop.get(dst)

    def route(self, dst: bytes, now: float | None = None) -> RouteInfo | None:
        """The selected route to `dst`, or None. Ages are relative to `now` (default: the
        latest time the core has been given)."""
        d = self._dests.get(dst)
        if d is None or d.selected is None:
            return None
        return self._info(d, d.selected, self._now if now is None else now)

    def routes(self, now: float | None = None) -> list[RouteInfo]:
        """Every selected route, by destination CellID (for `cellmesh routes`)."""
        t = self._now if now is None else now
        return [
            self._info(d, d.selected, t)
            for d in sorted(self._dests.values(), key=lambda d: d.dst)
            if d.selected is not None
        ]

    def _info(self, d: _Dest, r: _Route, now: float) -> RouteInfo:
        return RouteInfo(
            destination=d.dst,
            next_hop=r.neighbour,
            metric=r.metric,
            seqno=r.seqno,
            hops=r.hops + 1,
            age=max(0.0, now - r.refreshed),
            expires_in=max(0.0, r.expires - now),
            alternatives=len(d.routes) - 1,
        )

    def next_event(self) -> RoutingEvent | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def _emit(self, ev: RoutingEvent) -> None:
        if len(self._events) >= self._s.max_events:
            self.drops["events"] += 1
            return
        self._events.append(ev)

    def statistics(self) -> RoutingStats:
        """A frozen snapshot of the counters."""
        return RoutingStats(
            seqno=self._seqno,
            neighbours=len(self._neighbours),
            destinations=len(self._dests),
            routes=len(self._next_hop),
            pending_requests=len(self._pending),
            sent=dict(self._sent),
            bytes_sent=dict(self._bytes_sent),
            received=self._received,
            bytes_received=self._bytes_received,
            records_received=self._records_received,
            full_dumps=self._full_dumps,
            triggered_flushes=self._flushes,
            requests_sent=self._requests_sent,
            requests_forwarded=self._requests_forwarded,
            requests_answered=self._requests_answered,
            seqno_bumps=self._bumps,
            seqno_bumps_deferred=self._bumps_deferred,
            route_changes=self._route_changes,
            evictions=self._evictions,
            drops=dict(self.drops),
        )

    def feasibility_distance(self, dst: bytes) -> tuple[int, int] | None:
        """Our FD (seqno, metric) for `dst`, or None (for tests and diagnostics)."""
        d = self._dests.get(dst)
        if d is None or d.fd_seqno is None:
            return None
        return d.fd_seqno, d.fd_metric

    def destinations(self) -> Iterable[bytes]:
        """Every destination held, reachable or not (for diagnostics)."""
        return list(self._dests)

    # ------------------------------------------------------------------ helpers

    def _cost(self, rtt: float | None, loss: float) -> int:
        s = self._s
        try:
            return link_cost(
                rtt,
                loss,
                hop_cost=s.hop_cost,
                default_rtt=s.default_rtt,
                max_link_cost=s.max_link_cost,
                max_loss=s.max_loss,
            )
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from exc


def _check_cell(cell: bytes) -> bytes:
    if not isinstance(cell, bytes | bytearray | memoryview) or len(cell) != CELL_LEN:
        raise LocalProtocolError(f"a CellID is {CELL_LEN} bytes")
    b = bytes(cell)
    if b == _ZERO_CELL:
        raise LocalProtocolError("the all-zero CellID names no node")
    return b
