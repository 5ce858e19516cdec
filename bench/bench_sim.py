"""Simulator speed: simulated node-seconds per wall-second with 1,000 real endpoints.

Scenario (both sizes): N `Endpoint` cores on a ring in one `SimNetwork` (10 ms +- 2 ms links), each
dialling its successor during the first second; once every node has a session both ways and has
seen one ping answered (not timed: handshakes are their own benchmark), the network runs idle for a
measured stretch of virtual time: every node pings its successor every 20 s (random phase),
sessions send keepalives, housekeeping timers fire, sessions rekey every 120 s. Everything is the
real transport code in virtual time; nothing sleeps.

Figures: simulated node-seconds per wall-second (N x virtual seconds / wall seconds) and simulator
events per wall-second. Baseline in the same run: the same network with 10 nodes, run for 100x the
virtual time so both do the same number of node-seconds (and the same number of rekeys per
node-second). A ratio near 1 means the per-node cost does not grow with the network's size.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from _common import Metric, Result, exit_on_sigterm, machine_line, parse_args, report
from cellmesh.sim import LinkModel, SimNetwork, SimNode, add_endpoint
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import HandshakeFailed, PeerConnected, PingReply

BENCH = "bench_sim"
BIG = 1000
SMALL = 10
PING_PERIOD = 20.0
REKEY_PERIOD = 120.0  # NodeConfig.rekey_after_seconds default: measure whole multiples of it


@dataclass(frozen=True, slots=True)
class Run:
    """What one network size measured."""

    nodes: int
    virtual_s: float
    wall_s: float
    setup_wall_s: float
    connect_wall_s: float
    connect_virtual_s: float
    events: int
    delivered: int
    pongs: int

    @property
    def node_seconds_per_s(self) -> float:
        return self.nodes * self.virtual_s / self.wall_s

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s

    @property
    def datagrams_per_s(self) -> float:
        return self.delivered / self.wall_s


def dial(addr: tuple[str, int]) -> Callable[[Endpoint, float], None]:
    """An action for `SimNode.call_at`: connect to `addr`."""
    return lambda ep, now: ep.connect(addr, now)


def run_ring(n: int, virtual_s: float, seed: int = 1) -> Run:
    """Build an n-node ring, connect it (untimed), then time `virtual_s` of idle running."""
    t0 = time.perf_counter()
    net = SimNetwork(seed, default_link=LinkModel(latency=0.01, jitter=0.002))
    counts = {"pongs": 0, "failed": 0}

    def on_event(node: SimNode[Endpoint], ev: object) -> None:
        if isinstance(ev, PingReply):
            counts["pongs"] += 1
        elif isinstance(ev, PeerConnected) and ev.initiator and not ev.rekey:
            node.core.send_ping(ev.cell_id, node.now)
        elif isinstance(ev, HandshakeFailed):
            counts["failed"] += 1

    nodes = [add_endpoint(net, on_event=on_event, record_events=False) for _ in range(n)]
    setup = time.perf_counter() - t0
    phase = random.Random(seed)
    for i, node in enumerate(nodes):
        node.call_at(phase.uniform(0.0, 1.0), dial(nodes[(i + 1) % n].addr))
    t1 = time.perf_counter()
    if not net.run_until(lambda: counts["pongs"] >= n, 60.0):
        raise RuntimeError(f"ring of {n} did not connect: {counts}")
    connect_wall = time.perf_counter() - t1
    connect_virtual = net.now

    def schedule_pings(node: SimNode[Endpoint], succ: bytes, first: float) -> None:
        def tick() -> None:
            node.act(lambda ep, now: ep.send_ping(succ, now))
            net.call_later(PING_PERIOD, tick)

        net.call_at(first, tick)

    for i, node in enumerate(nodes):
        schedule_pings(
            node, nodes[(i + 1) % n].core.cell_id, net.now + phase.uniform(0, PING_PERIOD)
        )
    before = net.statistics()
    pongs_before = counts["pongs"]
    t2 = time.perf_counter()
    net.run_for(virtual_s)
    wall = time.perf_counter() - t2
    after = net.statistics()
    if counts["failed"]:
        raise RuntimeError(f"{counts['failed']} handshakes failed in an ideal network")
    return Run(
        nodes=n,
        virtual_s=virtual_s,
        wall_s=wall,
        setup_wall_s=setup,
        connect_wall_s=connect_wall,
        connect_virtual_s=connect_virtual,
        events=after.events_processed - before.events_processed,
        delivered=after.delivered - before.delivered,
        pongs=counts["pongs"] - pongs_before,
    )


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH)
    big_virtual = REKEY_PERIOD * (1 if args.quick else 5)
    small_virtual = big_virtual * BIG / SMALL
    print(f"{BENCH}: {machine_line()}")
    t_start = time.monotonic()
    small = run_ring(SMALL, small_virtual)
    big = run_ring(BIG, big_virtual)
    report(
        Result(
            bench=BENCH,
            case=f"idle ring of {BIG} endpoints, {big_virtual:g} s virtual",
            ours=f"{BIG} Endpoint cores in one SimNetwork, keepalives + a ping per node per "
            f"{PING_PERIOD:g} s + rekeys",
            baseline=f"the same ring with {SMALL} nodes, {small_virtual:g} s virtual "
            "(same node-seconds)",
            metrics=[
                Metric(
                    "node-seconds per wall-second",
                    big.node_seconds_per_s,
                    small.node_seconds_per_s,
                    "/s",
                    "higher",
                ),
                Metric(
                    "events per wall-second", big.events_per_s, small.events_per_s, "/s", "higher"
                ),
                Metric(
                    "datagrams per wall-second",
                    big.datagrams_per_s,
                    small.datagrams_per_s,
                    "/s",
                    "higher",
                ),
                Metric("wall time", big.wall_s, small.wall_s, "s", "lower"),
            ],
            notes=[
                f"{BIG} nodes: {big.events} events, {big.delivered} datagrams, {big.pongs} pings "
                f"answered; virtual time runs {big.virtual_s / big.wall_s:.1f}x faster than real "
                "time",
                f"{BIG} nodes: {1e6 / big.node_seconds_per_s:.1f} us of wall time per "
                f"node-second, {big.events / (big.nodes * big.virtual_s):.2f} events per "
                "node-second",
                f"setup (Identity.generate + Endpoint) {big.setup_wall_s:.2f} s; {BIG} XX "
                f"handshakes + first pings: {big.connect_wall_s:.2f} s wall, done at "
                f"t={big.connect_virtual_s:.2f} s virtual",
            ],
            extra={
                "big": {
                    "nodes": big.nodes,
                    "virtual_s": big.virtual_s,
                    "wall_s": big.wall_s,
                    "events": big.events,
                    "connect_wall_s": big.connect_wall_s,
                },
                "small": {
                    "nodes": small.nodes,
                    "virtual_s": small.virtual_s,
                    "wall_s": small.wall_s,
                    "events": small.events,
                },
            },
        ),
        args.json,
        args.quick,
    )
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
