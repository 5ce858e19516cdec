"""Congestion control between real endpoints in the simulator (virtual time, seeded).

(a) On a lossy but uncongested path the model-based controller (bbr) keeps its rate where a
loss-based one (reno) collapses. (b) Two bbr flows through one bottleneck share it and keep the queue's
drops bounded (with a deep enough queue; a shallow one starves a flow). (c) reno backs off when the bottleneck queue overflows.

Links carry at most 1500-byte datagrams (an Ethernet path), so path-MTU discovery settles at 1452
as it would in the field. A shared bottleneck needs a node in the middle: the simulator's links are
per (source, destination) pair, so `Router` forwards every datagram from the senders to the
receiver over one bandwidth-limited link, and routes the receiver's answers back by the destination
CellID in the cleartext frame header.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from cellmesh.config import NodeConfig
from cellmesh.sim import SIM_CONFIG, Addr, LinkModel, SimNetwork, SimNode, add_endpoint
from cellmesh.sim.endpoints import sim_identity
from cellmesh.transport.congestion import NewReno
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import StreamData
from cellmesh.wire.header import CELL_LEN, HEADER_LEN

EpNode = SimNode[Endpoint]
ETHERNET = 1500


def config(cc: str) -> NodeConfig:
    return replace(SIM_CONFIG, congestion_control=cc)


@dataclass
class Sink:
    """Counts (and consumes) stream bytes per (sender CellID, stream id), like a fast reader."""

    received: dict[tuple[bytes, int], int] = field(default_factory=dict)

    def __call__(self, node: EpNode, ev: object) -> None:
        if isinstance(ev, StreamData) and ev.data:
            key = (ev.cell_id, ev.stream_id)
            self.received[key] = self.received.get(key, 0) + len(ev.data)
            cell, sid, n = ev.cell_id, ev.stream_id, len(ev.data)
            node.act(lambda e, now: e.stream_consumed(cell, sid, n, now))

    def of(self, cell: bytes, sid: int) -> int:
        return self.received.get((cell, sid), 0)


class Bulk:
    """One stream that the application keeps full (a bulk transfer that never runs dry)."""

    def __init__(self, node: EpNode, peer: bytes, chunk: int = 256 * 1024) -> None:
        self.node = node
        self.peer = peer
        self.block = random.Random(len(peer)).randbytes(chunk)
        self.sid: int = node.act(lambda e, now: e.open_stream(peer))
        self.pump()

    def pump(self) -> None:
        def fill(e: Endpoint, now: float) -> None:
            while e.stream_send_space(self.peer, self.sid) >= len(self.block):
                e.stream_write(self.peer, self.sid, self.block, now)

        self.node.act(fill)
        self.node.call_later(0.005, lambda e, now: self.pump())


def handshake(net: SimNetwork, senders: Sequence[EpNode], addr: Addr, hub: EpNode) -> None:
    for s in senders:
        s.act(lambda e, now: e.connect(addr, now))
    assert net.run_until(
        lambda: all(
            s.core.session_for(hub.core.cell_id) is not None
            and hub.core.session_for(s.core.cell_id) is not None
            for s in senders
        ),
        30.0,
    )


# ------------------------------------------------------------------------------ (a) lossy path


def goodput_on_lossy_path(cc: str, seed: int, seconds: float = 2.0, loss: float = 0.05) -> float:
    link = LinkModel(latency=0.01, bandwidth=10e6, loss=loss, mtu=ETHERNET)  # 20 ms RTT
    net = SimNetwork(seed, default_link=link)
    sink = Sink()
    a = add_endpoint(net, config(cc), sim_identity(net, "a"))
    b = add_endpoint(net, config(cc), sim_identity(net, "b"), on_event=sink)
    handshake(net, [a], b.addr, b)
    bulk = Bulk(a, b.core.cell_id)
    net.run_for(seconds)
    return sink.of(a.core.cell_id, bulk.sid) / seconds


def test_bbr_keeps_its_rate_through_random_loss_where_reno_collapses() -> None:
    bbr = goodput_on_lossy_path("bbr", seed=1)
    reno = goodput_on_lossy_path("reno", seed=1)
    print(
        f"\n10 MB/s, 20 ms RTT, 5% random loss: bbr {bbr / 1e6:.2f} MB/s, "
        f"reno {reno / 1e6:.2f} MB/s ({bbr / reno:.1f}x)"
    )
    assert reno > 0
    assert bbr >= 3 * reno


@pytest.mark.parametrize(("loss", "floor"), [(0.10, 4e6), (0.15, 1e6)])
def test_bbr_on_a_very_lossy_path_learns_the_random_loss(loss: float, floor: float) -> None:
    """10-15% random loss (a bad radio link): three times the path's own loss is what counts
    as congestion, so the rate is not cut round after round."""
    bbr = goodput_on_lossy_path("bbr", seed=1, seconds=4.0, loss=loss)
    reno = goodput_on_lossy_path("reno", seed=1, seconds=4.0, loss=loss)
    print(
        f"\n10 MB/s, 20 ms RTT, {loss:.0%} random loss: bbr {bbr / 1e6:.2f} MB/s, reno "
        f"{reno / 1e6:.3f} MB/s"
    )
    assert bbr >= floor
    assert bbr >= 3 * reno


# ------------------------------------------------------------------------- (b) shared bottleneck


class Router:
    """Forwards senders' datagrams to `hub` and the hub's answers back by destination CellID."""

    def __init__(self) -> None:
        self.hub: Addr | None = None
        self.routes: dict[bytes, Addr] = {}
        self.to_hub = 0
        self._out: list[tuple[bytes, Addr]] = []

    def receive_datagram(self, data: bytes, addr: Addr, now: float, /) -> None:
        if self.hub is None or len(data) < HEADER_LEN:
            return
        src = bytes(data[8 : 8 + CELL_LEN])
        dst = bytes(data[24 : 24 + CELL_LEN])
        if addr != self.hub:
            self.routes[src] = addr
            self.to_hub += 1
            self._out.append((data, self.hub))
        elif dst in self.routes:
            self._out.append((data, self.routes[dst]))

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float, /) -> None:
        return None

    def next_event(self) -> object | None:
        return None


BOTTLENECK = 2e6  # bytes per second; with a 20 ms RTT the BDP is 40 KB


@dataclass
class Shared:
    rates: list[float]  # goodput of each flow, bytes per second
    drops: int  # datagrams tail-dropped at the bottleneck queue
    offered: int  # datagrams offered to the bottleneck


def two_flows_through_a_bottleneck(
    queue_limit: int, seconds: float = 6.0, controllers: tuple[str, str] = ("bbr", "bbr")
) -> Shared:
    net = SimNetwork(21, default_link=LinkModel(latency=0.005, mtu=ETHERNET))
    router = net.add_node(Router(), name="router")
    sink = Sink()
    hub = add_endpoint(net, config("bbr"), sim_identity(net, "hub"), on_event=sink)
    router.core.hub = hub.addr
    net.set_link(
        router,
        hub,
        LinkModel(latency=0.005, bandwidth=BOTTLENECK, queue_limit=queue_limit, mtu=ETHERNET),
        symmetric=False,
    )
    senders = [
        add_endpoint(net, config(cc), sim_identity(net, f"sender{i}"))
        for i, cc in enumerate(controllers)
    ]
    handshake(net, senders, router.addr, hub)
    flows = [Bulk(s, hub.core.cell_id) for s in senders]
    net.run_for(2.0)  # both flows ramp up
    before = [sink.of(s.core.cell_id, f.sid) for s, f in zip(senders, flows, strict=True)]
    drops0 = router.statistics().dropped.get("queue", 0)
    offered0 = router.core.to_hub
    net.run_for(seconds)
    rates = [
        (sink.of(s.core.cell_id, f.sid) - b) / seconds
        for s, f, b in zip(senders, flows, before, strict=True)
    ]
    shared = Shared(
        rates,
        router.statistics().dropped.get("queue", 0) - drops0,
        router.core.to_hub - offered0,
    )
    print(
        f"\nbottleneck {BOTTLENECK / 1e6:.1f} MB/s, queue {queue_limit // 1000} KB: "
        f"{' + '.join(controllers)} flows "
        f"{rates[0] / 1e6:.3f} + {rates[1] / 1e6:.3f} MB/s "
        f"(utilisation {sum(rates) / BOTTLENECK:.0%}), queue drops "
        f"{shared.drops}/{shared.offered} datagrams ({shared.drops / max(shared.offered, 1):.1%})"
    )
    return shared


def test_two_bbr_flows_share_a_bottleneck() -> None:
    r = two_flows_through_a_bottleneck(queue_limit=60_000)  # 1.5 BDP of queue
    assert all(rate >= 0.2 * BOTTLENECK for rate in r.rates), r.rates
    assert sum(r.rates) >= 0.7 * BOTTLENECK
    assert r.drops / r.offered < 0.10


def test_two_bbr_flows_share_a_shallow_queue_bottleneck() -> None:
    r = two_flows_through_a_bottleneck(queue_limit=20_000)  # 0.5 BDP of queue
    assert r.drops / r.offered < 0.10  # the drops stay bounded even here (about 6%)
    assert all(rate >= 0.2 * BOTTLENECK for rate in r.rates), r.rates


# ---------------------------------------------------------------------------- (c) reno backs off


def test_reno_backs_off_when_the_bottleneck_queue_overflows() -> None:
    link = LinkModel(latency=0.01, bandwidth=1e6, queue_limit=30_000, mtu=ETHERNET)
    net = SimNetwork(31, default_link=link)
    sink = Sink()
    a = add_endpoint(net, config("reno"), sim_identity(net, "a"))
    b = add_endpoint(net, config("reno"), sim_identity(net, "b"), on_event=sink)
    handshake(net, [a], b.addr, b)
    conn = a.core.connection(b.core.cell_id)
    assert conn is not None
    cc = conn.cc
    assert isinstance(cc, NewReno)
    samples: list[int] = []

    def sample() -> None:
        samples.append(cc.cwnd)
        net.call_later(0.005, sample)

    sample()
    bulk = Bulk(a, b.core.cell_id)
    net.run_for(4.0)
    cuts = [i for i in range(1, len(samples)) if samples[i] < samples[i - 1]]
    queue_drops = a.statistics().dropped.get("queue", 0)
    print(
        f"\nreno over 1 MB/s with a 30 KB queue: {len(cuts)} window cuts, peak cwnd "
        f"{max(samples)}, final cwnd {samples[-1]}, ssthresh {cc.ssthresh}, queue drops "
        f"{queue_drops}, goodput {sink.of(a.core.cell_id, bulk.sid) / 4.0 / 1e6:.2f} MB/s"
    )
    assert queue_drops > 0
    assert conn.stats.packets_lost > 0
    assert cuts, "the congestion window never shrank"
    first = cuts[0]
    assert samples[first] <= samples[first - 1] // 2 + cc.mss  # a multiplicative decrease
    assert cc.ssthresh < float("inf")
    # The window no longer grows without bound: it stays near what the path plus queue holds.
    assert max(samples[first:]) < 4 * (1e6 * 0.02 + 30_000)
    assert sink.of(a.core.cell_id, bulk.sid) > 0.5 * 1e6 * 4.0 * 0.5


@pytest.mark.parametrize("queue_limit", [60_000, 20_000])
def test_bbr_leaves_a_loss_based_flow_its_share(queue_limit: int) -> None:
    """A fair citizen: next to a NewReno flow (which halves on every loss) through one
    bottleneck, ours does not take it all, with a deep queue or a shallow one."""
    r = two_flows_through_a_bottleneck(queue_limit, controllers=("bbr", "reno"))
    bbr, reno = r.rates
    assert reno >= 0.2 * BOTTLENECK, r.rates
    assert bbr >= 0.2 * BOTTLENECK, r.rates
    assert sum(r.rates) >= 0.7 * BOTTLENECK
