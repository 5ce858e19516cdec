"""NAT traversal in memory: two endpoints behind modelled NATs meet through a public relay, learn
their reflexive addresses, punch holes with path challenges and move their session onto the direct
path; behind a symmetric NAT they stay relayed and say why."""

from __future__ import annotations

from test_endpoint import CONFIG, Addr, Net

from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import DatagramReceived
from cellmesh.transport.relay import via_cell
from cellmesh.transport.traversal import Reflexive
from cellmesh.wire.messages import Candidates, Observed, pull_messages, push_message


class NatNet(Net):
    """Net with NAT boxes: private addresses are translated on the way out, and inbound packets
    reach a private host only from addresses it has sent to (address-dependent filtering)."""

    def __init__(self) -> None:
        super().__init__()
        self.public_ip: dict[Addr, str] = {}  # private addr -> its NAT's public IP
        self.symmetric: set[str] = set()  # public IPs of NATs that map per destination
        self.mappings: dict[tuple[Addr, Addr | None], Addr] = {}
        self.inbound: dict[Addr, Addr] = {}  # public mapping -> private addr
        self.allowed: set[tuple[Addr, Addr]] = set()  # (public mapping, remote) pairs
        self.next_port = 40000
        self.dropped_by_nat = 0

    def _out(self, src: Addr, dst: Addr) -> Addr:
        ip = self.public_ip.get(src)
        if ip is None:
            return src
        key = (src, dst if ip in self.symmetric else None)
        mapped = self.mappings.get(key)
        if mapped is None:
            self.next_port += 1
            mapped = (ip, self.next_port)
            self.mappings[key] = mapped
            self.inbound[mapped] = src
        self.allowed.add((mapped, dst))
        return mapped

    def step(self) -> int:
        moved = 0
        for src, ep in list(self.nodes.items()):
            for data, dst in ep.datagrams_to_send():
                moved += 1
                seen_src = self._out(src, dst)
                target_addr = dst
                if dst in self.inbound:
                    if (dst, seen_src) not in self.allowed:
                        self.dropped_by_nat += 1
                        continue
                    target_addr = self.inbound[dst]
                elif dst in self.public_ip or dst not in self.nodes:
                    continue  # a private address is unreachable from outside its NAT
                target = self.nodes.get(target_addr)
                if target is not None:
                    target.receive_datagram(data, seen_src, self.now)
            while (ev := ep.next_event()) is not None:
                self.events[src].append(ev)
        return moved


def _world(symmetric: bool) -> tuple[NatNet, Endpoint, Addr, Endpoint, Addr, Endpoint]:
    net = NatNet()
    r, ra = net.add(1, CONFIG)  # public rendezvous / relay
    a, aa = net.add(2, CONFIG)
    b, ba = net.add(3, CONFIG)
    net.nodes[("192.168.1.2", 2)] = net.nodes.pop(aa)
    net.events[("192.168.1.2", 2)] = net.events.pop(aa)
    net.nodes[("192.168.9.3", 3)] = net.nodes.pop(ba)
    net.events[("192.168.9.3", 3)] = net.events.pop(ba)
    aa, ba = ("192.168.1.2", 2), ("192.168.9.3", 3)
    net.public_ip = {aa: "203.0.113.1", ba: "198.51.100.7"}
    if symmetric:
        net.symmetric = {"203.0.113.1"}
    a.connect(ra, net.now)
    b.connect(ra, net.now)
    net.run()
    cells = {a.cell_id: "a", b.cell_id: "b", r.cell_id: "r"}
    r.set_router(lambda dst: dst if dst in cells and dst != r.cell_id else None)
    a.set_router(lambda dst: r.cell_id if dst == b.cell_id else None)
    b.set_router(lambda dst: r.cell_id if dst == a.cell_id else None)
    return net, a, aa, b, ba, r


def _peer(ep: Endpoint, cell: bytes, now: float) -> tuple[Addr, str]:
    p = ep._peers[cell]
    return p.addr, p.path_note


def test_reflexive_addresses_and_nat_type_are_learned_from_neighbours() -> None:
    _net, a, _aa, _b, _ba, _r = _world(symmetric=False)
    status = a.nat_status()
    assert status["reflexive"] == ["203.0.113.1:40001"]  # what the relay sees: A's NAT mapping
    assert status["type"] == "nat"  # one observer only


def test_hole_punching_moves_a_relayed_session_onto_the_direct_path() -> None:
    net, a, _aa, b, ba, r = _world(symmetric=False)
    a.send_ping(b.cell_id, net.now)
    net.advance(0.5, tick=0.05)
    assert a.session_for(b.cell_id) is not None
    net.advance(3.0, tick=0.05)
    a_addr, a_note = _peer(a, b.cell_id, net.now)
    b_addr, b_note = _peer(b, a.cell_id, net.now)
    assert via_cell(a_addr) is None, a_note
    assert a_addr[0] == "198.51.100.7"  # B's NAT, not the relay
    assert via_cell(b_addr) is None, b_note
    assert b_addr[0] == "203.0.113.1"
    assert "direct" in a_note
    assert "direct" in b_note
    # Traffic now bypasses the relay.
    before, _ = r.relay_statistics()
    a.send_datagram(b.cell_id, b"direct", net.now)
    net.run()
    assert DatagramReceived(a.cell_id, b"direct") in net.of(ba, DatagramReceived)
    assert r.relay_statistics()[0] == before
    # Frames still in flight through the relay do not pull the session back onto it.
    for _ in range(20):
        a.send_ping(b.cell_id, net.now)
        b.send_ping(a.cell_id, net.now)
        net.advance(0.2, tick=0.05)
    assert via_cell(_peer(a, b.cell_id, net.now)[0]) is None
    assert via_cell(_peer(b, a.cell_id, net.now)[0]) is None


def test_behind_a_symmetric_nat_the_session_stays_relayed_and_says_why() -> None:
    net, a, _aa, b, ba, _r = _world(symmetric=True)
    a.send_ping(b.cell_id, net.now)
    net.advance(8.0, tick=0.05)
    a_addr, a_note = _peer(a, b.cell_id, net.now)
    assert via_cell(a_addr) == b.cell_id
    assert a_note.startswith("relayed: hole punching failed")
    # Still usable through the relay.
    a.send_datagram(b.cell_id, b"relayed", net.now)
    net.run()
    assert DatagramReceived(a.cell_id, b"relayed") in net.of(ba, DatagramReceived)
    assert net.dropped_by_nat > 0


def test_nat_classification() -> None:
    refl = Reflexive()
    assert refl.classify(lambda a: False)[0] == "unknown"
    refl.report(b"r1", ("203.0.113.1", 4000))
    assert refl.classify(lambda a: False)[0] == "nat"
    refl.report(b"r2", ("203.0.113.1", 4000))
    assert refl.classify(lambda a: False)[0] == "endpoint-independent"
    refl.report(b"r3", ("203.0.113.1", 4100))
    assert refl.classify(lambda a: False)[0] == "endpoint-dependent"
    assert refl.classify(lambda a: a == ("203.0.113.1", 4000))[0] == "public"


def test_traversal_records_round_trip_and_reject_junk() -> None:
    for rec in (
        Observed("203.0.113.1", 4000),
        Observed("2001:db8::1", 19541),
        Candidates((("203.0.113.1", 4000), ("2001:db8::1", 1))),
    ):
        assert pull_messages(push_message(rec)) == [rec]
