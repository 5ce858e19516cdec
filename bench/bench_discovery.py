"""Discovery: join latency and beacon overhead against a fixed 5 s pulse, in the simulator.

Ours: `DiscoveryCore` with its defaults: Trickle-paced beacons (Imin 0.1 s, Imax 5 s, k 3), a
liveness promise that grows with the mesh, and a SOLICIT at start answered by every neighbour
within 200 ms. Baseline, in the same invocation: the same core with Trickle disabled
(``adaptive=False``: one beacon every 5 s at a random point of each interval, never suppressed),
no SOLICIT and no introductions (``solicit_on_start=False, introduce=False``): NEXUS-0's 5 s
announcement pulse.

Scenario: N cores on one broadcast segment (2 ms links), powering on at 150 per second. Figures:

* join latency: in a stable mesh of 100 nodes, a new node starts; the time until its peer table
  holds all 100 (median of several newcomers, each joining alone);
* beacon overhead: once every node knows every other (plus 10 s), beacon datagrams (multicast and
  SOLICIT answers) per node per minute at N = 10, 100, 500 (``--quick``: 10 and 100). Ours is
  measured over 300 s, one full liveness interval of a dense mesh, so every node's slowest beacon
  is in the window; the baseline's pulse is the same every second, so a shorter window suffices.
* formation time: from the first power-on until every node knows every other.

All cores share one `CachedVerifier` (each distinct frame is verified once per process; this
changes how fast the simulation runs, not what it computes).
"""

from __future__ import annotations

import functools
import gc
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

from _common import Metric, Result, exit_on_sigterm, machine_line, parse_args, report
from cellmesh.discovery import (
    CachedVerifier,
    DiscoveryCore,
    DiscoverySettings,
    PeerDiscovered,
)
from cellmesh.sim import LinkModel, SimNetwork, SimNode, sim_identity

BENCH = "bench_discovery"
WALL0 = 1_800_000_000.0
LAN = LinkModel(latency=0.002)
JOIN_RATE = 150.0
OURS = DiscoverySettings()
BASELINE = DiscoverySettings(adaptive=False, solicit_on_start=False, introduce=False)
OURS_WINDOW = 300.0
JOIN_MESH = 100


@dataclass
class Mesh:
    """Discovery cores on one segment; counts the nodes that know every other node."""

    settings: DiscoverySettings
    seed: int
    net: SimNetwork = field(init=False)
    verifier: CachedVerifier = field(default_factory=CachedVerifier)
    nodes: list[SimNode[DiscoveryCore]] = field(default_factory=list)
    size: int = 0
    complete: int = 0

    def __post_init__(self) -> None:
        self.net = SimNetwork(self.seed, default_link=LAN)

    def _on_event(self, node: SimNode[DiscoveryCore], ev: object) -> None:
        if isinstance(ev, PeerDiscovered) and len(node.core) == self.size - 1:
            self.complete += 1

    def add(self, label: str) -> SimNode[DiscoveryCore]:
        net = self.net
        core = DiscoveryCore(
            sim_identity(net, label),
            self.settings,
            net.now,
            lambda: WALL0 + net.now,
            random.Random(net.derive_seed(label)),
            self.verifier,
        )
        node = net.add_node(core, name=label, on_event=self._on_event, record_events=False)
        node.act(lambda c, now: c.start(now))
        self.nodes.append(node)
        return node

    def form(self, n: int) -> float:
        self.size = n
        for i in range(n):
            self.net.call_at(i / JOIN_RATE, functools.partial(self.add, f"n{i}"))
        if not self.net.run_until(lambda: self.complete == n, 120.0):
            raise RuntimeError(f"{n} nodes did not all find each other")
        return self.net.now

    def load(self, window: float) -> float:
        """Beacon datagrams per node per minute over `window` virtual seconds."""

        def sent() -> int:
            return sum(
                (st := n.core.statistics()).beacons_sent + st.replies_sent for n in self.nodes
            )

        before = sent()
        self.net.run_for(window)
        return (sent() - before) / len(self.nodes) / (window / 60.0)

    def join(self, label: str, timeout: float = 30.0) -> float:
        """Start one more node; the virtual time until it knows every existing node."""
        target = len(self.nodes)
        node = self.add(label)
        start = self.net.now
        if not self.net.run_until(lambda: len(node.core) == target, timeout):
            raise RuntimeError(f"{label} did not find all {target} nodes in {timeout} s")
        latency = self.net.now - start
        self.size += 1
        self.net.run_for(10.0)  # let the mesh settle before the next newcomer
        return latency


@dataclass(frozen=True)
class LoadRun:
    nodes: int
    formation: float
    load: float
    window: float
    wall: float


def measure_load(settings: DiscoverySettings, n: int, window: float, seed: int) -> LoadRun:
    t0 = time.perf_counter()
    mesh = Mesh(settings, seed)
    formation = mesh.form(n)
    mesh.net.run_for(10.0)
    load = mesh.load(window)
    return LoadRun(n, formation, load, window, time.perf_counter() - t0)


def measure_join(settings: DiscoverySettings, trials: int, seed: int) -> list[float]:
    mesh = Mesh(settings, seed)
    mesh.form(JOIN_MESH)
    mesh.net.run_for(30.0)
    return [mesh.join(f"new{i}") for i in range(trials)]


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH)
    sizes = (10, 100) if args.quick else (10, 100, 500)
    trials = 3 if args.quick else 7
    print(f"{BENCH}: {machine_line()}; sizes {', '.join(map(str, sizes))}")
    t_start = time.monotonic()
    gc.disable()  # large object graphs without cycles; the collector only costs time here
    ours_join = measure_join(OURS, trials, seed=1)
    base_join = measure_join(BASELINE, trials, seed=1)
    report(
        Result(
            bench=BENCH,
            case=f"new node joins a stable mesh of {JOIN_MESH}",
            ours="DiscoveryCore defaults: SOLICIT at start, answers within 200 ms",
            baseline="fixed 5 s pulse, no SOLICIT, no introductions (adaptive=False)",
            metrics=[
                Metric(
                    "time to know every neighbour (median)",
                    statistics.median(ours_join),
                    statistics.median(base_join),
                    "ms",
                    "lower",
                ),
                Metric("worst of the newcomers", max(ours_join), max(base_join), "ms", "lower"),
            ],
            notes=[
                f"{trials} newcomers, one at a time; ours "
                + ", ".join(f"{x * 1000:.0f}" for x in ours_join)
                + " ms; baseline "
                + ", ".join(f"{x * 1000:.0f}" for x in base_join)
                + " ms"
            ],
        ),
        args.json,
        args.quick,
    )
    for n in sizes:
        base_window = 60.0 if n <= 100 else 10.0
        ours = measure_load(OURS, n, OURS_WINDOW, seed=n)
        base = measure_load(BASELINE, n, base_window, seed=n)
        report(
            Result(
                bench=BENCH,
                case=f"beacon overhead, {n} nodes on one segment",
                ours="Trickle (Imin 0.1 s, Imax 5 s, k 3) + liveness promise "
                f"{OURS.imax:g} s x (peers + 1) / k, capped at {OURS.max_announce_interval:g} s",
                baseline="fixed 5 s pulse (adaptive=False), no SOLICIT, no introductions",
                metrics=[
                    Metric("beacons per node per minute", ours.load, base.load, "/min", "lower"),
                    Metric(
                        "beacons per minute on the link",
                        ours.load * n,
                        base.load * n,
                        "/min",
                        "lower",
                    ),
                    Metric(
                        "formation (all know all)", ours.formation, base.formation, "s", "lower"
                    ),
                ],
                notes=[
                    f"windows: ours {ours.window:g} s, baseline {base.window:g} s of virtual "
                    f"time after formation + 10 s; wall {ours.wall:.1f} s / {base.wall:.1f} s",
                    f"power-on at {JOIN_RATE:g} nodes/s: the last node starts at "
                    f"{(n - 1) / JOIN_RATE:.2f} s",
                ],
            ),
            args.json,
            args.quick,
        )
    gc.enable()
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
