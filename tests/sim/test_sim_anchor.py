"""Anchor cores in the simulator: 10, 100 and 1,000 members in virtual time.

Each scenario forms a mesh (every member admits every other, as discovery would), lets it elect
and rotate keys, kills the anchor, splits the survivors in two, lets each half elect, heals the
partition, and checks at every stage: exactly one anchor among the nodes that can hear each
other, every one of them following it and holding its current epoch key. Times are virtual
(deterministic, seeded), so the failover and merge bounds below are exact properties of the
protocol, not measurements of this machine.

The 1,000-member run skips the cold-start REQ_EPOCH broadcast (`request_on_start=False`): at a
cold start nobody is anchor, so the thousand broadcasts (a million deliveries) are pure cost for
the simulator and test nothing the 10 and 100-member runs do not. Joins use it (see
`test_a_newcomer_gets_the_key_within_half_a_second`).
"""

from __future__ import annotations

import functools
import gc
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from cellmesh.anchor import AnchorChanged, AnchorCore, AnchorSettings, EpochKeyInstalled
from cellmesh.sim import LinkModel, SimNetwork
from cellmesh.sim.anchor import AnchorMesh

LAN = LinkModel(latency=0.002, jitter=0.0005)
S = AnchorSettings()


def has_key(core: AnchorCore) -> bool:
    return core.epoch is not None


@contextmanager
def gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True)
class Report:
    n: int
    formed: float
    failover: float
    merge: float
    epochs_seen: int


def run_scenario(n: int, seed: int, epochs: int) -> Report:
    net = SimNetwork(seed, default_link=LAN)
    mesh = AnchorMesh(net, AnchorSettings(request_on_start=n <= 100))
    rng = random.Random(seed)
    mesh.form(n, egos=lambda i: rng.randrange(0, 101))

    # Formation: one anchor, everybody on its key, right after the listening period.
    assert net.run_until(mesh.converged, S.listen_time + 1.0)
    formed = net.now
    anchor = mesh.anchors()[0]
    assert anchor.core.core.ego == max(nd.core.core.ego for nd in mesh.nodes)

    # Steady state: keys rotate; at every epoch boundary (plus a moment) all agree again.
    first_epoch = anchor.core.core.epoch
    assert first_epoch is not None
    for _ in range(epochs):
        net.run_for(S.epoch_period)
        assert net.run_until(mesh.converged, 1.0)
    assert anchor.core.core.epoch == first_epoch + epochs
    assert len(mesh.anchors()) == 1

    # Failover: the anchor's cable is pulled; the next member by the rule takes over.
    killed_at = net.now
    mesh.kill(anchor)
    assert net.run_until(mesh.converged, S.silence_timeout + 2.0)
    failover = net.now - killed_at
    successor = mesh.anchors()[0]
    survivors = mesh.live()
    assert successor.core.core.ego == max(nd.core.core.ego for nd in survivors)

    # Partition: the half without the anchor elects its own; both halves are consistent.
    # Discovery is emulated: after 15 s each node forgets the members it cannot reach.
    rest = [nd for nd in survivors if nd is not successor]
    random.Random(seed).shuffle(rest)
    half = rest[: len(survivors) // 2]
    other = [nd for nd in survivors if nd not in set(half)]
    mesh.partition([half, other])
    assert net.run_until(
        lambda: mesh.converged(half) and mesh.converged(other), S.silence_timeout + 2.0
    )
    assert len(mesh.anchors()) == 2
    net.run_for(S.epoch_period)  # both halves rotate keys on their own
    assert net.run_until(lambda: mesh.converged(half) and mesh.converged(other), 1.0)

    # Merge: the two anchors hear each other and resolve, by the claim order, after the hold.
    healed_at = net.now
    mesh.heal()
    assert net.run_until(mesh.converged, S.hold_time + S.pulse_interval + 2.0)
    merge = net.now - healed_at
    assert len(mesh.anchors()) == 1
    keys = {nd.core.core.export_epoch_key() for nd in mesh.live()}
    assert len(keys) == 1  # every member ends with the same epoch key
    return Report(n, formed, failover, merge, epochs)


@pytest.mark.parametrize(("n", "epochs"), [(10, 3), (100, 2), (1000, 1)])
def test_mesh_converges_fails_over_partitions_and_merges(n: int, epochs: int) -> None:
    with gc_paused():
        r = run_scenario(n, seed=n, epochs=epochs)
    print(
        f"\n{n:5d} members: one anchor {r.formed:.3f} s after start; failover "
        f"{r.failover:.3f} s after the kill; merge {r.merge:.3f} s after the heal"
    )
    assert r.formed <= S.listen_time + 0.1
    # The anchor's last pulse was at most one interval before the kill: the followers declare
    # it dead 15 s after that pulse, and the successor's key reaches them a link delay later.
    assert S.silence_timeout - S.pulse_interval < r.failover <= S.silence_timeout + 0.1
    # Hearing the other side's anchor takes up to one pulse (plus a REQ_EPOCH round trip for
    # its key), then it serves the hold.
    assert S.hold_time <= r.merge <= S.hold_time + S.pulse_interval + 0.1


def test_runs_are_reproducible_from_the_seed() -> None:
    def trace(seed: int) -> tuple[str, list[tuple[float, str, str]]]:
        net = SimNetwork(seed, default_link=LAN)
        mesh = AnchorMesh(net)
        mesh.form(12, egos=lambda i: i % 4)
        net.run_for(100.0)
        mesh.kill(mesh.anchors()[0])
        net.run_for(40.0)
        events = [(s.time, s.node, type(s.event).__name__) for s in mesh.log]
        return net.trace_digest(), events

    a, b, c = trace(5), trace(5), trace(6)
    assert a == b
    assert a[0] != c[0]


def test_one_anchor_holds_through_ten_minutes_of_a_lossy_link() -> None:
    """5% loss, jitter: pulses and EPOCH messages get lost (the latter recovered by REQ_EPOCH
    at the next pulse). A follower may even miss three pulses in a row and declare the anchor
    dead, but it does not promote itself while the anchor it outranks is still heard: nobody
    but the first anchor ever claims the role."""
    net = SimNetwork(11, default_link=LinkModel(latency=0.002, jitter=0.001, loss=0.05))
    mesh = AnchorMesh(net)
    mesh.form(100, egos=lambda i: i)
    with gc_paused():
        net.run_for(600.0)
        assert net.run_until(mesh.converged, S.pulse_interval + 1.0)
    promotions = sum(nd.core.core.statistics().promotions for nd in mesh.nodes)
    assert promotions == 1
    changes = [s for s in mesh.log if isinstance(s.event, AnchorChanged)]
    lost_and_found = len(changes) - 99  # beyond each follower's first choice
    print(f"\n100 members, 5% loss, 600 s: {lost_and_found} spurious failovers and returns")
    drops: dict[str, int] = {}
    for nd in mesh.nodes:
        for k, v in nd.core.core.drops.items():
            drops[k] = drops.get(k, 0) + v
    assert set(drops) <= {"unknown_epoch", "unrequested"}


def test_a_newcomer_gets_the_key_within_half_a_second() -> None:
    net = SimNetwork(21, default_link=LAN)
    mesh = AnchorMesh(net)
    mesh.form(100, egos=lambda i: i % 7)
    net.run_for(90.0)
    assert mesh.converged()
    latencies = []
    for k in range(5):
        newcomer = mesh.add(f"new{k}", ego=1)
        started = net.now
        assert net.run_until(functools.partial(has_key, newcomer.core.core), 0.5)
        installed = [
            s.time
            for s in mesh.log
            if s.node == newcomer.name and isinstance(s.event, EpochKeyInstalled)
        ]
        latencies.append(installed[0] - started)
        net.run_for(7.0)
    print(f"\njoin-to-key latency: {', '.join(f'{x * 1000:.1f} ms' for x in latencies)}")
    assert max(latencies) < 0.5
    assert mesh.converged()
