"""`RoutingDriver`: the distance-vector routing core inside a running `Node`.

Theory of operation: the routing decisions live in `cellmesh.routing.RoutingCore` (sans-IO). This
driver tells it which sessions are direct neighbours (a session reached through relays is not),
refreshes their link quality from the connections' RTT and loss every few seconds, carries its
messages in ROUTE records over the neighbours' sessions, runs its timer, and installs its
next-hop lookup in the endpoint, which then reaches non-neighbours through relays and relays
for others. It also runs `trace`, a hop-by-hop path probe (see `Endpoint.start_trace`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import TYPE_CHECKING, Any, Final

from cellmesh.errors import LocalProtocolError, PeerUnreachableError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.routing.core import RoutingCore
from cellmesh.routing.events import RouteChanged
from cellmesh.routing.settings import RoutingSettings
from cellmesh.transport.events import TraceReply
from cellmesh.transport.relay import via_cell

if TYPE_CHECKING:
    from cellmesh.node.node import Node

log = logging.getLogger("cellmesh.routing")
METRIC_INTERVAL: Final = 5.0
MAX_TRACE_HOPS: Final = 32


class RoutingDriver:
    """Routing for one node. Reach it as `node.routing`."""

    def __init__(self, node: Node) -> None:
        self._node = node
        cfg = node.config
        settings = RoutingSettings(update_interval=cfg.route_update_interval)
        self.core = RoutingCore(node.cell_id, settings, node._now(), random.Random())
        node.endpoint.set_router(self.core.next_hop)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._next_metrics = node._now() + METRIC_INTERVAL
        self._traces: dict[int, tuple[float, asyncio.Future[tuple[bytes, float]]]] = {}
        self._stopped = False

    def start(self) -> None:
        for cell in self._node.endpoint.neighbours():
            self.core.neighbour_up(cell, self._node._now())
        self._flush()

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        for _, fut in self._traces.values():
            if not fut.done():
                fut.set_exception(PeerUnreachableError("node stopped"))
        self._traces.clear()

    # ------------------------------------------------------------------ node events

    def on_connected(self, cell: bytes, addr: tuple[str, int]) -> None:
        if via_cell(addr) is None:
            self.core.neighbour_up(cell, self._node._now())
            self._flush()

    def on_moved(self, cell: bytes, addr: tuple[str, int]) -> None:
        """A session changed path: it is a neighbour exactly when the path is direct."""
        now = self._node._now()
        if via_cell(addr) is None:
            self.core.neighbour_up(cell, now)
        else:
            self.core.neighbour_down(cell, now)
        self._flush()

    def on_gone(self, cell: bytes) -> None:
        if self.core.neighbour_down(cell, self._node._now()):
            self._flush()

    def on_message(self, cell: bytes, data: bytes) -> None:
        self.core.receive(cell, data, self._node._now())
        self._flush()

    def on_trace_reply(self, ev: TraceReply) -> None:
        entry = self._traces.pop(ev.probe_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result((ev.hop, self._node._now() - entry[0]))

    # ------------------------------------------------------------------ driving the core

    def _flush(self) -> None:
        if self._stopped:
            return
        node = self._node
        ep = node.endpoint
        now = node._now()
        for to, data in self.core.updates_to_send(now):
            targets = [to] if to is not None else ep.neighbours()
            for cell in targets:
                ep.send_route(cell, data, now)
        while (ev := self.core.next_event()) is not None:
            if isinstance(ev, RouteChanged):
                log.debug(
                    "route to %s: %s -> %s (metric %d)",
                    format_cell_id(ev.destination),
                    format_cell_id(ev.old_next_hop) if ev.old_next_hop else "none",
                    format_cell_id(ev.new_next_hop) if ev.new_next_hop else "none",
                    ev.metric,
                )
        node._pump()
        self._arm()

    def _arm(self) -> None:
        loop = self._node._loop
        if loop is None or self._stopped:
            return
        when = self.core.get_timer()
        when = self._next_metrics if when is None else min(when, self._next_metrics)
        if self._timer is not None:
            if abs(self._timer_when - when) < 1e-4:
                return
            self._timer.cancel()
        self._timer_when = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._stopped or self._node._endpoint is None:
            return
        now = self._node._now()
        if now >= self._next_metrics:
            self._next_metrics = now + METRIC_INTERVAL
            self._refresh_metrics(now)
        self.core.handle_timer(now)
        self._flush()

    def _refresh_metrics(self, now: float) -> None:
        """Link quality from the reliable connections: smoothed RTT, and the share of packets
        declared lost (a crude ETX input: loss only moves once traffic flows)."""
        for info in self._node.endpoint.peers(now):
            if info.relayed:
                continue
            sent = max(info.packets_out, 1)
            loss = min(0.9, info.packets_lost / sent)
            try:
                self.core.neighbour_metric(info.cell_id, info.rtt, loss, now)
            except LocalProtocolError:
                continue

    # ------------------------------------------------------------------ queries

    def routes(self) -> list[dict[str, Any]]:
        """What `cellmesh routes` shows: one row per destination with a route."""
        now = self._node._now()
        return [
            {
                "destination": format_cell_id(r.destination),
                "next_hop": format_cell_id(r.next_hop),
                "metric": r.metric,
                "hops": r.hops,
                "seqno": r.seqno,
                "age_s": round(r.age, 1),
                "expires_in_s": round(r.expires_in, 1),
                "alternatives": r.alternatives,
            }
            for r in sorted(self.core.routes(now), key=lambda r: (r.hops, r.metric))
        ]

    def status(self) -> dict[str, Any]:
        st = self.core.statistics()
        total, by_neighbour = self._node.endpoint.relay_statistics()
        return {
            "routes": len(self.core.routes()),
            "neighbours": [
                {
                    "cell_id": format_cell_id(n.cell),
                    "cost": n.cost,
                    "rtt_ms": None if n.rtt is None else round(n.rtt * 1000, 3),
                    "loss": round(n.loss, 3),
                    "routes": n.routes,
                }
                for n in self.core.neighbours()
            ],
            "relayed": {"total": total, **{format_cell_id(c): n for c, n in by_neighbour.items()}},
            "drops": dict(sorted(self.core.drops.items())),
            "statistics": dataclasses.asdict(st),
            "nat": self._node.endpoint.nat_status(),
        }

    async def trace(
        self, dst: bytes, max_hops: int = MAX_TRACE_HOPS, timeout: float = 2.0
    ) -> list[dict[str, Any]]:
        """Hop-by-hop path to `dst` with per-hop RTT, like traceroute: probes with growing TTL."""
        node = self._node
        hops: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        for ttl in range(1, max_hops + 1):
            fut: asyncio.Future[tuple[bytes, float]] = loop.create_future()
            probe_id = node.endpoint.start_trace(dst, ttl, node._now())
            self._traces[probe_id] = (node._now(), fut)
            node._pump()
            try:
                hop, rtt = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                self._traces.pop(probe_id, None)
                hops.append({"ttl": ttl, "cell_id": None, "rtt_ms": None})
                continue
            hops.append(
                {"ttl": ttl, "cell_id": format_cell_id(hop), "rtt_ms": round(rtt * 1000, 3)}
            )
            if hop == dst:
                break
        return hops
