"""The anchor driver (node/anchor.py): membership bookkeeping from discovery events, settings
from the config, and three drivers on a fake in-process link (real asyncio loop and timers,
short anchor timing): election, key agreement, broadcast fan-out, failover, status and the
test-only key export."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import pytest

from cellmesh.anchor import AnchorCore, AnchorSettings, Role
from cellmesh.config import NodeConfig
from cellmesh.discovery.beacon import Capabilities
from cellmesh.discovery.events import PeerDiscovered, PeerExpired, PeerUpdated
from cellmesh.discovery.settings import DiscoverySettings
from cellmesh.discovery.table import PeerRecord
from cellmesh.errors import LocalProtocolError
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import Identity
from cellmesh.node.anchor import (
    ANCHOR_MAGIC,
    TEST_EXPORT_ENV,
    AnchorDriver,
    Membership,
    anchor_settings_from,
)
from cellmesh.node.anchor_control import anchor_op, not_running_reason
from cellmesh.node.udp import Addr

if TYPE_CHECKING:
    from cellmesh.node.node import Node


def ident(i: int) -> Identity:
    """A fixed identity per index (tests only: the secret is public)."""
    return Identity.from_secret(bytes([i % 256, 0x5C, 0xA7]) * 21 + b"\x02")


def record(
    i: int, *, ego: int = 0, eligible: bool = True, host: str | None = None, port: int = 19541
) -> PeerRecord:
    idn = ident(i)
    h = host if host is not None else f"198.18.0.{i + 1}"
    return PeerRecord(
        cell_id=idn.cell_id,
        public_key=idn.public_key,
        noise_static=idn.noise_static_public,
        name=f"n{i}",
        node_type="",
        zone="",
        ego=ego,
        caps=Capabilities(anchor_eligible=eligible),
        tags=(),
        addresses=(("0.0.0.0", port),),
        observed_addr=(h, 40000 + i),
        first_seen=0.0,
        last_seen=0.0,
        seq=1,
        timestamp_ms=0,
        interval=5.0,
        expires_at=15.0,
        cert=None,
    )


def core_for(i: int) -> AnchorCore:
    return AnchorCore(ident(i), AnchorSettings(), 0.0, wall=lambda: 1_800_000_000.0)


# ---------------------------------------------------------------------- membership bookkeeping


def test_discovered_peers_are_admitted_with_their_beacon_keys_ego_and_address() -> None:
    core = core_for(0)
    m = Membership(core)
    m.apply(PeerDiscovered(record(1, ego=7)), 1.0)
    m.apply(PeerDiscovered(record(2, eligible=False)), 1.0)
    assert set(core.members()) == {ident(0).cell_id, ident(1).cell_id, ident(2).cell_id}
    # The address is the beacon's source host and the data port the peer announces.
    assert m.address(ident(1).cell_id) == ("198.18.0.2", 19541)
    assert sorted(m.addresses()) == [("198.18.0.2", 19541), ("198.18.0.3", 19541)]
    assert len(m) == 2
    member = core._members[ident(1).cell_id]
    assert (member.ego, member.eligible) == (7, True)
    assert member.x25519_public_key == ident(1).noise_static_public
    assert core._members[ident(2).cell_id].eligible is False


def test_updates_change_ego_eligibility_key_and_address() -> None:
    core = core_for(0)
    m = Membership(core)
    old = record(1)
    m.apply(PeerDiscovered(old), 1.0)
    new = replace(
        old,
        ego=50,
        caps=Capabilities(anchor_eligible=False),
        noise_static=ident(9).noise_static_public,
        observed_addr=("198.18.1.1", 1),
    )
    m.apply(PeerUpdated(new, old, frozenset({"ego", "caps", "noise_static", "addresses"})), 2.0)
    member = core._members[ident(1).cell_id]
    assert (member.ego, member.eligible) == (50, False)
    assert member.x25519_public_key == ident(9).noise_static_public
    assert m.address(ident(1).cell_id) == ("198.18.1.1", 19541)


def test_expired_and_evicted_peers_are_forgotten() -> None:
    core = core_for(0)
    m = Membership(core)
    for i in (1, 2):
        m.apply(PeerDiscovered(record(i)), 1.0)
    m.apply(PeerExpired(record(1), "expired"), 2.0)
    m.apply(PeerExpired(record(2), "evicted"), 2.0)
    assert core.members() == [ident(0).cell_id]
    assert m.address(ident(1).cell_id) is None
    assert len(m) == 0
    m.apply(PeerExpired(record(3)), 2.0)  # never admitted: nothing happens
    assert core.members() == [ident(0).cell_id]


def test_sync_makes_the_membership_exactly_the_table() -> None:
    core = core_for(0)
    m = Membership(core)
    for i in (1, 2, 3):
        m.apply(PeerDiscovered(record(i)), 1.0)
    m.sync([record(2), record(4), record(0)], 2.0)  # our own record (never expected) is ignored
    assert set(core.members()) == {ident(i).cell_id for i in (0, 2, 4)}
    assert m.address(ident(1).cell_id) is None
    assert m.address(ident(4).cell_id) == ("198.18.0.5", 19541)


def test_a_record_whose_key_is_not_its_cell_id_is_refused_and_a_full_core_counted() -> None:
    core = AnchorCore(ident(0), AnchorSettings(max_members=1), 0.0, wall=lambda: 1_800_000_000.0)
    m = Membership(core)
    bad = replace(record(1), public_key=ident(2).public_key)
    m.apply(PeerDiscovered(bad), 1.0)
    assert m.refused["bad_key"] == 1
    assert core.members() == [ident(0).cell_id]
    m.apply(PeerDiscovered(record(3)), 1.0)  # room for one more than max_members (the core's rule)
    m.apply(PeerDiscovered(record(4)), 1.0)
    assert m.refused["full"] == 1
    assert m.address(ident(4).cell_id) is None


def test_anchor_settings_follow_the_config() -> None:
    s = anchor_settings_from(NodeConfig())
    assert s == AnchorSettings()  # the defaults are the core's defaults
    s = anchor_settings_from(NodeConfig(anchor_pulse_interval=2.0, anchor_epoch_seconds=30.0))
    assert (s.pulse_interval, s.epoch_period) == (2.0, 30.0)
    assert s.listen_time == 6.0
    assert s.hold_time == 4.0
    assert s.silence_timeout == 6.25


def test_anchor_messages_are_told_apart_by_their_first_byte() -> None:
    assert ANCHOR_MAGIC == 0xCA
    assert ANCHOR_MAGIC != 1  # byte 0 of every cellmesh frame is the wire version, 1


# ---------------------------------------------------------------------- drivers on a fake link

FAST = AnchorSettings(
    pulse_interval=0.2,
    pulse_slack=0.05,
    listen_time=0.6,
    hold_time=0.4,
    epoch_period=5.0,
    succession_wait=0.2,
)


@dataclass
class FakeLink:
    """Delivers what a driver sends to the driver bound at the destination address."""

    drivers: dict[Addr, AnchorDriver] = field(default_factory=dict)
    down: set[Addr] = field(default_factory=set)
    sent: list[tuple[Addr, Addr, bytes]] = field(default_factory=list)

    def send(self, src: Addr, data: bytes, dst: Addr) -> None:
        self.sent.append((src, dst, data))
        target = self.drivers.get(dst)
        if target is None or dst in self.down or src in self.down:
            return
        loop = asyncio.get_running_loop()

        def deliver() -> None:
            if target.running:
                target.feed(data, src, loop.time())
                target.flush()

        loop.call_soon(deliver)


class FakeUdp:
    def __init__(self, link: FakeLink, addr: Addr) -> None:
        self.link = link
        self.addr = addr
        self.has_backlog = False

    def send(self, data: bytes, addr: Addr) -> bool:
        self.link.send(self.addr, data, addr)
        return True


@dataclass
class FakeDiscoveryCore:
    records: dict[bytes, PeerRecord]

    def peer(self, cell_id: bytes) -> PeerRecord | None:
        return self.records.get(cell_id)


class FakeDiscovery:
    def __init__(self, ego: int = 0) -> None:
        self.settings = DiscoverySettings(ego=ego, caps=Capabilities(anchor_eligible=True))
        self.core = FakeDiscoveryCore({})
        self.listeners: list[Callable[[Any], None]] = []

    def peers(self) -> tuple[PeerRecord, ...]:
        return tuple(self.core.records.values())

    def learn(self, rec: PeerRecord) -> None:
        new = rec.cell_id not in self.core.records
        self.core.records[rec.cell_id] = rec
        for listener in list(self.listeners):
            listener(PeerDiscovered(rec) if new else PeerUpdated(rec, rec, frozenset()))

    def expire(self, cell_id: bytes) -> None:
        rec = self.core.records.pop(cell_id)
        for listener in list(self.listeners):
            listener(PeerExpired(rec))


class FakeNode:
    def __init__(self, i: int, link: FakeLink) -> None:
        self.identity = ident(i)
        self.config = NodeConfig(name=f"n{i}")
        self.discovery: FakeDiscovery | None = FakeDiscovery()
        self.addr: Addr = (f"198.18.0.{i + 1}", 19541)
        self._udp = FakeUdp(link, self.addr)
        self.anchor: AnchorDriver | None = None
        self.writing = False

    def _set_writing(self, on: bool) -> None:
        self.writing = on


def _record_of(node: FakeNode, i: int) -> PeerRecord:
    return replace(record(i, host=node.addr[0]), observed_addr=(node.addr[0], 50000))


async def _until(cond: Callable[[], bool], limit: float) -> None:
    async with asyncio.timeout(limit):
        while not cond():  # noqa: ASYNC110 - polling driver state that has no event to await
            await asyncio.sleep(0.02)


def _mesh(n: int, link: FakeLink) -> list[FakeNode]:
    nodes = [FakeNode(i, link) for i in range(n)]
    for node in nodes:
        node.anchor = AnchorDriver(cast("Node", node), FAST)
        link.drivers[node.addr] = node.anchor
    return nodes


def test_three_drivers_elect_share_a_key_and_fail_over() -> None:
    link = FakeLink()

    async def scenario() -> None:
        nodes = _mesh(3, link)
        for i, node in enumerate(nodes):
            # Discovery knew node i-1 before the anchor started: admitted by the start sync.
            if i:
                assert node.discovery is not None
                node.discovery.learn(_record_of(nodes[i - 1], i - 1))
            assert node.anchor is not None
            node.anchor.start()
        for i, node in enumerate(nodes):  # the rest arrives as discovery events
            for j, other in enumerate(nodes):
                if j != i:
                    assert node.discovery is not None
                    node.discovery.learn(_record_of(other, j))
        drivers = [n.anchor for n in nodes]
        assert all(d is not None and d.core is not None and len(d.core) == 3 for d in drivers)

        def agreed(ds: list[AnchorDriver]) -> bool:
            sts = [d.status() for d in ds]
            return (
                len({st["anchor"] for st in sts}) == 1
                and sts[0]["anchor"] is not None
                and len({st["epoch"] for st in sts}) == 1
                and sts[0]["epoch"] is not None
            )

        live = [d for d in drivers if d is not None]
        await _until(lambda: agreed(live), 5.0)
        st = live[0].status()
        assert st["running"]
        assert st["members"] == 3
        anchor_idx = next(i for i, d in enumerate(live) if d.core is not None and d.core.is_anchor)
        a = live[anchor_idx]
        assert a.status()["anchor_is_self"]
        assert a.status()["anchor_name"] == f"n{anchor_idx}"
        seen_by = live[(anchor_idx + 1) % 3].status()
        assert seen_by["anchor_address"] == f"198.18.0.{anchor_idx + 1}:19541"
        assert seen_by["anchor_name"] == f"n{anchor_idx}"
        # Broadcasts (pulses) went to every member by unicast, each to its discovery address.
        pulses = [(s, d) for s, d, data in link.sent if len(data) == 132 and data[0] == 0xCA]
        src = nodes[anchor_idx].addr
        assert {d for s, d in pulses if s == src} == {n.addr for n in nodes if n.addr != src}
        # Every member holds the same key, and no datagram on the link contains it.
        keys = set()
        for d in live:
            assert d.core is not None
            got = d.core.export_epoch_key()
            assert got is not None
            keys.add(got)
        assert len(keys) == 1
        key = next(iter(keys))[1]
        assert not any(key in data for _, _, data in link.sent)
        assert key.hex() not in json.dumps([d.status() for d in live])
        # The anchor goes silent (its process dies): the survivors fail over to a new epoch.
        old_epoch = st["epoch"]
        link.down.add(src)
        a.stop()
        assert not a.running
        assert a.status() == {
            "running": False,
            "why": "the anchor driver is stopped",
        }
        survivors = [d for i, d in enumerate(live) if i != anchor_idx]
        await _until(
            lambda: agreed(survivors) and survivors[0].status()["anchor"] != st["anchor"], 5.0
        )
        after = survivors[0].status()
        assert after["epoch"] > old_epoch
        assert any(s.status()["stats"]["failovers"] == 1 for s in survivors)
        # Discovery then expires the dead node: it is forgotten, and the new anchor rotates.
        for i, node in enumerate(nodes):
            if i != anchor_idx:
                assert node.discovery is not None
                node.discovery.expire(ident(anchor_idx).cell_id)
        assert all(s.status()["members"] == 2 for s in survivors)
        await _until(
            lambda: agreed(survivors) and survivors[0].status()["epoch"] > after["epoch"], 5.0
        )
        for d in survivors:
            d.stop()
        assert all(not n.discovery.listeners for n in nodes if n.discovery is not None)

    asyncio.run(scenario())


def test_unicast_to_an_unknown_member_is_counted_and_start_needs_discovery() -> None:
    link = FakeLink()

    async def scenario() -> None:
        node = FakeNode(0, link)
        node.discovery = None
        with pytest.raises(LocalProtocolError, match="needs discovery"):
            AnchorDriver(cast("Node", node), FAST).start()
        node = FakeNode(0, link)
        d = AnchorDriver(cast("Node", node), FAST)
        d.start()
        assert d.core is not None
        assert d.core.role is Role.LISTENING
        assert d.status()["members"] == 1
        assert d.status()["anchor"] is None
        # A message for a CellID the membership has no address for is dropped and counted.
        d.core._out.append((CellId(ident(5).cell_id), b"\xca"))
        d.flush()
        assert d.unroutable == 1
        d.stop()

    asyncio.run(scenario())


def test_the_key_export_is_refused_unless_the_test_variable_was_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = FakeLink()

    async def scenario() -> None:
        monkeypatch.delenv(TEST_EXPORT_ENV, raising=False)
        node = FakeNode(0, link)
        node.anchor = AnchorDriver(cast("Node", node), FAST)
        node.anchor.start()
        with pytest.raises(ValueError, match="test-only operation and is refused"):
            anchor_op(cast("Node", node), {"op": "anchor_epoch_key"})
        assert anchor_op(cast("Node", node), {"op": "anchor"})["running"] is True
        node.anchor.stop()
        monkeypatch.setenv(TEST_EXPORT_ENV, "1")
        node.anchor = AnchorDriver(cast("Node", node), FAST)
        node.anchor.start()
        assert anchor_op(cast("Node", node), {"op": "anchor_epoch_key"}) is None  # no key yet
        await _until(
            lambda: node.anchor is not None and node.anchor.status()["epoch"] is not None, 5.0
        )
        got = anchor_op(cast("Node", node), {"op": "anchor_epoch_key"})
        assert got["epoch"] == 1
        assert len(bytes.fromhex(got["key"])) == 32
        node.anchor.stop()

    asyncio.run(scenario())


def test_the_control_op_says_why_no_anchor_runs() -> None:
    link = FakeLink()
    node = FakeNode(0, link)
    assert anchor_op(cast("Node", node), {"op": "anchor"}) == {
        "running": False,
        "why": "the anchor driver is not running",
    }
    node.config = NodeConfig(anchor=False)
    assert "config anchor = false" in not_running_reason(cast("Node", node))
    node.config = NodeConfig()
    node.discovery = None
    assert "discovery is not running" in not_running_reason(cast("Node", node))
    with pytest.raises(ValueError, match="discovery is not running"):
        anchor_op(cast("Node", node), {"op": "anchor_epoch_key"})
    with pytest.raises(ValueError, match="unknown op"):
        anchor_op(cast("Node", node), {"op": "anchorz"})
