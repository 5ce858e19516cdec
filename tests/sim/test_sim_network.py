"""The simulator itself, exercised with `ScriptedCore`: links, partitions, segments, timers, runs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cellmesh.sim import (
    EventLimitError,
    LinkModel,
    Received,
    ScriptedCore,
    SimNetwork,
    SimNode,
    TimerFired,
)

Addr = tuple[str, int]
GROUP: Addr = ("ff02::1", 19541)


def net_of(
    n: int, seed: int = 1, link: LinkModel | None = None
) -> tuple[SimNetwork, list[SimNode[ScriptedCore]]]:
    net = SimNetwork(seed, default_link=link)
    return net, [net.add_node(ScriptedCore()) for _ in range(n)]


def send(src: SimNode[ScriptedCore], dst: SimNode[ScriptedCore] | Addr, data: bytes) -> None:
    src.act(sender(data, dst.addr if isinstance(dst, SimNode) else dst))


def sender(data: bytes, addr: Addr) -> Callable[[ScriptedCore, float], None]:
    """An action for `SimNode.act` / `call_at`: send `data` to `addr`."""
    return lambda core, now: core.send(data, addr)


def send_every(
    net: SimNetwork,
    src: SimNode[ScriptedCore],
    dst: SimNode[ScriptedCore],
    count: int,
    interval: float,
    size: int = 100,
) -> None:
    """Schedule `count` datagrams, the i-th carrying i (4 bytes) padded to `size`."""
    for i in range(count):
        payload = i.to_bytes(4, "big") + bytes(size - 4)
        src.call_at(net.now + i * interval, sender(payload, dst.addr))


def seqs(node: SimNode[ScriptedCore]) -> list[int]:
    return [int.from_bytes(r.data[:4], "big") for r in node.core.received]


# ------------------------------------------------------------------------------- delay


def test_latency_sets_the_delivery_time() -> None:
    net, (a, b) = net_of(2, link=LinkModel(latency=0.05))
    net.run_for(1.0)
    send(a, b, b"hello")
    net.run_for(1.0)
    (rec,) = b.core.received
    assert (rec.data, rec.addr) == (b"hello", a.addr)
    assert rec.time == pytest.approx(1.05)
    assert b.events_of(Received) == [rec]
    assert b.timed_events_of(Received) == [(rec.time, rec)]


def test_jitter_spreads_delays_within_bounds_and_never_reorders() -> None:
    net, (a, b) = net_of(2, link=LinkModel(latency=0.05, jitter=0.01))
    send_every(net, a, b, 400, interval=0.5)
    net.run_for(400 * 0.5 + 1)
    delays = [r.time - i * 0.5 for i, r in enumerate(b.core.received)]
    assert len(delays) == 400
    assert min(delays) >= 0.04 - 1e-9
    assert max(delays) <= 0.06 + 1e-9
    assert max(delays) - min(delays) > 0.015  # really spread
    assert sum(delays) / len(delays) == pytest.approx(0.05, abs=0.002)
    # Back-to-back sends: jitter alone keeps FIFO order on a link.
    net2, (c, d) = net_of(2, link=LinkModel(latency=0.05, jitter=0.04))
    send_every(net2, c, d, 300, interval=0.001)
    net2.run_for(2.0)
    assert seqs(d) == list(range(300))


# ------------------------------------------------------------------------------- loss, dup, reorder


def test_loss_rate_is_close_to_the_configured_probability() -> None:
    net, (a, b) = net_of(2, seed=7, link=LinkModel(loss=0.2))
    send_every(net, a, b, 10_000, interval=0.001)
    net.run_for(20.0)
    got = len(b.core.received)
    assert 0.2 - 0.015 < 1 - got / 10_000 < 0.2 + 0.015
    st = net.statistics()
    assert st.sent == 10_000
    assert st.dropped == {"loss": 10_000 - got}
    assert st.delivered == got
    assert a.statistics().dropped == {"loss": 10_000 - got}
    assert b.statistics().received == got
    assert b.statistics().bytes_received == got * 100


def test_duplication_delivers_extra_copies() -> None:
    net, (a, b) = net_of(2, seed=3, link=LinkModel(duplicate=0.1))
    send_every(net, a, b, 5_000, interval=0.001)
    net.run_for(10.0)
    st = net.statistics()
    assert 400 < st.duplicated < 600
    assert len(b.core.received) == 5_000 + st.duplicated
    assert sorted(set(seqs(b))) == list(range(5_000))


def test_reordering_lets_later_datagrams_overtake() -> None:
    net, (a, b) = net_of(2, seed=5, link=LinkModel(latency=0.01, reorder=0.2, reorder_delay=0.01))
    send_every(net, a, b, 2_000, interval=0.001)
    net.run_for(5.0)
    got = seqs(b)
    assert sorted(got) == list(range(2_000))
    late = sum(1 for i in range(1, len(got)) if got[i] < got[i - 1])
    assert 300 < late < 500  # about 20% of datagrams were held back
    assert 300 < net.statistics().reordered < 500


def test_datagrams_over_the_mtu_are_dropped() -> None:
    net, (a, b) = net_of(2, link=LinkModel(mtu=1280))
    send(a, b, bytes(1280))
    send(a, b, bytes(1281))
    net.run_for(1.0)
    assert [len(r.data) for r in b.core.received] == [1280]
    assert net.statistics().dropped == {"mtu": 1}


# ------------------------------------------------------------------------------- bandwidth


def test_bandwidth_queues_a_burst() -> None:
    net, (a, b) = net_of(2, link=LinkModel(latency=0.01, bandwidth=1000.0))
    for _ in range(10):
        send(a, b, bytes(100))
    net.run_for(5.0)
    times = [r.time for r in b.core.received]
    assert times == pytest.approx([0.01 + 0.1 * (i + 1) for i in range(10)])


def test_bandwidth_queue_tail_drops_and_recovers() -> None:
    model = LinkModel(latency=0.01, bandwidth=1000.0, queue_limit=500)
    net, (a, b) = net_of(2, link=model)
    for _ in range(10):
        send(a, b, bytes(100))
    assert net.statistics().dropped == {"queue": 5}
    net.run_for(1.0)  # the queue drains in 0.5 s
    assert len(b.core.received) == 5
    send(a, b, bytes(100))
    net.run_for(1.0)
    assert len(b.core.received) == 6
    assert b.core.received[-1].time == pytest.approx(1.0 + 0.1 + 0.01)


def test_links_are_directed_and_per_pair() -> None:
    net, (a, b, c) = net_of(3, link=LinkModel(latency=0.001))
    net.set_link(a, b, LinkModel(latency=0.2), symmetric=False)
    assert net.link_model(a, b).latency == 0.2
    assert net.link_model(b.addr, a.addr).latency == 0.001
    send(a, b, b"slow")
    send(b, a, b"fast")
    send(a, c, b"default")
    net.run_for(1.0)
    assert b.core.received[0].time == pytest.approx(0.2)
    assert a.core.received[0].time == pytest.approx(0.001)
    assert c.core.received[0].time == pytest.approx(0.001)
    net.clear_link(a, b)
    assert net.link_model(a, b).latency == 0.001


def test_link_model_validation() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkModel(loss=1.5)
    with pytest.raises(ValueError, match="latency"):
        LinkModel(latency=-1.0)
    with pytest.raises(ValueError, match="queue_limit needs a bandwidth"):
        LinkModel(queue_limit=1000)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkModel(bandwidth=0.0)


# ------------------------------------------------------------------------------- reachability


def test_partition_and_heal() -> None:
    net, (a, b, c) = net_of(3)
    net.partition([[a], [b, c]])
    assert not net.can_reach(a, b)
    assert net.can_reach(b, c)
    send(a, b, b"x")
    send(b, c, b"y")
    net.run_for(1.0)
    assert not b.core.received
    assert [r.data for r in c.core.received] == [b"y"]
    assert net.statistics().dropped == {"partition": 1}
    net.heal()
    send(a, b, b"z")
    net.run_for(1.0)
    assert [r.data for r in b.core.received] == [b"z"]


def test_unlisted_nodes_form_their_own_group() -> None:
    net, (a, b, c) = net_of(3)
    net.partition([[a]])
    assert not net.can_reach(a, b)
    assert net.can_reach(b, c)
    with pytest.raises(ValueError, match="two partition groups"):
        net.partition([[a], [a, b]])


def test_block_is_per_pair_and_optionally_one_way() -> None:
    net, (a, b, c) = net_of(3)
    net.block(a, b, symmetric=False)
    send(a, b, b"blocked")
    send(b, a, b"open")
    send(a, c, b"other")
    net.run_for(1.0)
    assert not b.core.received
    assert len(a.core.received) == 1
    assert len(c.core.received) == 1
    assert net.statistics().dropped == {"blocked": 1}
    net.unblock(a, b)
    send(a, b, b"again")
    net.run_for(1.0)
    assert len(b.core.received) == 1


def test_unknown_address_is_no_route_and_down_node_receives_nothing() -> None:
    net, (a, b) = net_of(2)
    send(a, ("10.99.99.99", 1), b"nobody")
    send(a, b, b"in flight")
    net.set_node_down(b)
    net.run_for(1.0)
    assert not b.core.received
    assert net.statistics().dropped == {"no_route": 1, "node_down": 1}
    net.set_node_up(b)
    send(a, b, b"back")
    net.run_for(1.0)
    assert [r.data for r in b.core.received] == [b"back"]


def test_restarted_node_gets_a_fresh_core_and_its_timer_back() -> None:
    net, (a, b) = net_of(2)
    a.act(lambda core, now: core.add_timer(1.0))
    net.set_node_down(a)
    assert a.timer is None
    net.run_for(2.0)
    assert not a.core.fired  # a frozen node's timer does not run
    net.set_node_up(a)
    assert a.timer == 2.0  # overdue: fires at once
    net.run_for(0.0)
    assert [f.time for f in a.core.fired] == [2.0]
    fresh = ScriptedCore(echo=True)
    net.set_node_down(b)
    net.set_node_up(b, fresh)
    assert b.core is fresh
    send(a, b, b"hi")
    net.run_for(1.0)
    assert [r.data for r in a.core.received] == [b"hi"]


# ------------------------------------------------------------------------------- segments


def test_multicast_reaches_only_the_senders_segments() -> None:
    net = SimNetwork(1)
    a = net.add_node(ScriptedCore(), segments=["lan1"])
    b = net.add_node(ScriptedCore(), segments=["lan1"])
    c = net.add_node(ScriptedCore(), segments=["lan2"])
    d = net.add_node(ScriptedCore(), segments=["lan1", "lan2"])
    send(a, GROUP, b"beacon-a")
    net.run_for(1.0)
    assert [len(n.core.received) for n in (a, b, c, d)] == [0, 1, 0, 1]
    assert b.core.received[0].addr == a.addr
    net.broadcast(d, b"beacon-d", ("224.0.0.251", 5353))  # both of d's segments, once each
    net.run_for(1.0)
    assert [len(n.core.received) for n in (a, b, c, d)] == [1, 2, 1, 1]
    assert net.statistics().multicast == 2
    with pytest.raises(ValueError, match="not a multicast"):
        net.broadcast(a, b"x", ("10.0.0.1", 1))


def test_multicast_obeys_partitions_and_segment_changes() -> None:
    net, (a, b, c) = net_of(3)  # all in the default segment
    net.partition([[a, b], [c]])
    send(a, GROUP, b"1")
    net.run_for(1.0)
    assert [len(n.core.received) for n in (a, b, c)] == [0, 1, 0]
    net.heal()
    net.leave_segment(b, "default")
    assert net.segment_members("default") == [a, c]
    send(a, GROUP, b"2")
    net.run_for(1.0)
    assert [len(n.core.received) for n in (a, b, c)] == [0, 1, 1]


# ------------------------------------------------------------------------------- timers and runs


class MovingTimerCore(ScriptedCore):
    """A core whose deadline moves later each time it receives a datagram."""

    def __init__(self) -> None:
        super().__init__()
        self.deadline = 1.0

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.fired.append(TimerFired(now, self.deadline))
        self.deadline = 1e9

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        super().receive_datagram(data, addr, now)
        self.deadline = now + 1.0


def test_timers_fire_at_their_deadline_and_past_ones_fire_now() -> None:
    net, (a,) = net_of(1)
    a.act(lambda core, now: core.add_timer(2.5))
    a.act(lambda core, now: core.add_timer(1.0))
    assert a.timer == 1.0
    net.run_for(3.0)
    assert [f.time for f in a.core.fired] == [1.0, 2.5]
    assert a.events_of(TimerFired) == a.core.fired
    a.act(lambda core, now: core.add_timer(0.5))  # already past
    net.run_for(0.0)
    assert a.core.fired[-1] == TimerFired(3.0, 0.5)
    assert a.statistics().timers_fired == 3
    assert a.timer is None


def test_superseded_timer_entries_do_not_fire() -> None:
    net = SimNetwork(1)
    a = net.add_node(MovingTimerCore())
    b = net.add_node(ScriptedCore())
    for t in (0.5, 1.2, 1.9):
        b.call_at(t, sender(b"push", a.addr))
    net.run_for(5.0)
    # Each arrival pushed the deadline 1 s later; only the last one fires.
    assert [f.time for f in a.core.fired] == [pytest.approx(2.901)]


class BusyCore(ScriptedCore):
    """A broken core that always wants its timer at t = 0."""

    def get_timer(self) -> float | None:
        return 0.0

    def handle_timer(self, now: float) -> None:
        pass


def test_event_cap_stops_a_runaway_core() -> None:
    net = SimNetwork(1, max_events=1_000)
    net.add_node(BusyCore())
    with pytest.raises(EventLimitError, match="more than 1000 events"):
        net.run_for(1.0)
    assert net.now == 0.0
    with pytest.raises(EventLimitError):
        net.run_until(lambda: False, 1.0, max_events=10)
    zero = SimNetwork(1, max_events_per_instant=500)
    zero.add_node(BusyCore())
    with pytest.raises(EventLimitError, match="without time advancing"):
        zero.run_for(1.0)


def test_run_until_predicate_idle_and_call_order() -> None:
    net, (a, b) = net_of(2, link=LinkModel(latency=0.1))
    order: list[str] = []
    net.call_at(1.0, lambda: order.append("first"))
    net.call_at(1.0, lambda: order.append("second"))
    net.call_later(0.5, lambda: order.append("earlier"))
    assert not net.idle
    assert net.run_until_idle(10.0)
    assert order == ["earlier", "first", "second"]
    assert net.now == 1.0
    a.core.echo = b.core.echo = True
    send(a, b, b"ping-pong")  # echoed forever: never idle
    assert not net.run_until_idle(5.0)
    assert net.now == 6.0
    assert net.run_until(lambda: len(a.core.received) >= 30, 10.0)
    assert net.now == pytest.approx(7.0)  # the 30th echo: 60 hops of 0.1 s after t = 1
    assert not net.run_until(lambda: False, 2.0)
    with pytest.raises(ValueError, match="back in time"):
        net.run_until(1.0)


def test_addresses_are_unique_and_nodes_resolvable() -> None:
    net, nodes = net_of(300)
    assert nodes[0].addr == ("10.0.0.1", 19541)
    assert len({n.addr for n in nodes}) == 300
    assert net.node(nodes[299].addr) is nodes[299]
    with pytest.raises(ValueError, match="already taken"):
        net.add_node(ScriptedCore(), nodes[0].addr)
    with pytest.raises(KeyError):
        net.node(("1.2.3.4", 5))


def test_inject_delivers_from_any_address() -> None:
    net, (a,) = net_of(1)
    net.inject(a, b"spoofed", ("192.0.2.1", 666), delay=0.25)
    net.run_for(1.0)
    assert a.core.received == [Received(0.25, b"spoofed", ("192.0.2.1", 666))]


# ------------------------------------------------------------------------------- determinism


def lossy_script(seed: int) -> tuple[str, int]:
    model = LinkModel(latency=0.02, jitter=0.01, loss=0.1, duplicate=0.05, reorder=0.05)
    net, nodes = net_of(6, seed=seed, link=model)
    for n in nodes:
        n.core.echo = True
    for i, n in enumerate(nodes):
        for j in range(20):
            dst = nodes[(i + j) % 6]
            if dst is not n:
                n.call_at(j * 0.01, sender(b"x" * 50, dst.addr))
    net.run_for(0.5)
    return net.trace_digest(), net.statistics().delivered


def test_same_seed_same_trace_and_different_seed_different_trace() -> None:
    d1, n1 = lossy_script(11)
    d2, n2 = lossy_script(11)
    d3, _ = lossy_script(12)
    assert d1 == d2
    assert n1 == n2 > 100
    assert d1 != d3
