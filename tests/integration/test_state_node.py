"""The state layer inside real nodes: events published on a channel reach a subscriber's own
durable log over the mesh, verified and hash-chained, and survive a restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cellmesh.config import NodeConfig
from cellmesh.errors import LocalProtocolError
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.state.events import (
    ZERO_EVENT_ID,
    create_event,
    encode_event,
    event_id,
    verify_event,
)
from cellmesh.state.log import StoredEvent

LOCAL = ("127.0.0.1:0",)
CHANNEL = "chat/room-1"


def _addr(node: Node) -> str:
    host, port = node.local_addresses()[0]
    return f"{host}:{port}"


async def _received(node: Node, channel: str, after: int) -> StoredEvent:
    stored = await asyncio.wait_for(node.state.next_event(channel, after), 3.0)
    assert stored is not None
    return stored


def test_published_events_reach_the_subscribers_log_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    host_id, peer_id = Identity.generate(), Identity.generate()
    host_db, peer_db = str(tmp_path / "host.db"), str(tmp_path / "peer.db")

    def host_cfg() -> NodeConfig:
        return NodeConfig(listen=LOCAL, channels=("chat/** open",), database=host_db)

    async def first_run() -> list[bytes]:
        async with (
            Node(host_id, host_cfg()) as host,
            Node(peer_id, NodeConfig(listen=LOCAL, database=peer_db)) as peer,
        ):
            await peer.connect(_addr(host))
            await peer.channels.subscribe(host.cell_id, CHANNEL)
            ids = [host.state.publish(CHANNEL, f"msg {i}".encode()) for i in range(3)]
            after = 0
            for expected in ids:
                got = await _received(peer, CHANNEL, after)
                assert got.id == expected
                assert got.position is not None
                after = got.position
            log = peer.state.log(CHANNEL)
            assert [s.id for s in log] == ids == [s.id for s in host.state.log(CHANNEL)]
            assert [s.event.payload for s in log] == [b"msg 0", b"msg 1", b"msg 2"]
            for s in log:
                verify_event(s.event)  # signature and author key, on the peer's copy
                assert s.event.author == host.cell_id
            assert log[0].event.prev == ZERO_EVENT_ID
            assert [s.event.prev for s in log[1:]] == ids[:2]  # the hash chain
            assert [s.event.seq for s in log] == [1, 2, 3]
            assert peer.state.verify(CHANNEL) == [] == host.state.verify(CHANNEL)
            assert peer.state.counters["received"] == 3

            # The peer may publish into the open channel: its event lands in the host's log,
            # and the host's next event names it in its horizon (it had seen it).
            await peer.channels.request_publish(host.cell_id, CHANNEL)
            reply = peer.state.publish_event(CHANNEL, b"from the peer")
            assert reply.sent_to == 1
            got = await _received(host, CHANNEL, after_host := host.state.last_position(CHANNEL))
            assert got.id == reply.id
            assert got.event.author == peer.cell_id
            assert got.position is not None
            assert got.position > after_host
            answer = host.state.publish(CHANNEL, b"seen it")
            back = await _received(peer, CHANNEL, reply.position)
            assert back.id == answer
            assert [(h.author, h.seq) for h in back.event.horizon] == [(peer.cell_id, 1)]
            assert back.event.clock > got.event.clock

            # Ordinary messages still reach channels.recv; an event of another channel sent
            # on this one is refused (the grant of this channel does not cover that log).
            host.channels.publish(CHANNEL, b"plain bytes")
            msg = await asyncio.wait_for(peer.channels.recv(CHANNEL), 3.0)
            assert msg.data == b"plain bytes"
            smuggled = create_event(host_id, "chat/other", b"x", None, [], 1)
            host.channels.publish(CHANNEL, encode_event(smuggled))
            for _ in range(100):
                if peer.state.counters["wrong_channel"]:
                    break
                await asyncio.sleep(0.02)
            assert peer.state.counters["wrong_channel"] == 1
            assert peer.state.log("chat/other") == []
            return [s.id for s in peer.state.log(CHANNEL)]

    async def second_run(before: list[bytes]) -> None:
        # Both nodes restart on their databases: every acknowledged event is still there, the
        # chains verify, and the host's next event continues its chain.
        async with (
            Node(host_id, host_cfg()) as host,
            Node(peer_id, NodeConfig(listen=LOCAL, database=peer_db)) as peer,
        ):
            assert [s.id for s in peer.state.log(CHANNEL)] == before
            assert [s.id for s in host.state.log(CHANNEL)] == before
            assert peer.state.verify(CHANNEL) == [] == host.state.verify(CHANNEL)
            p = host.state.publish_event(CHANNEL, b"after restart")
            assert p.seq == 5  # msg 0..2, "seen it", then this one
            assert host.state.store.get(p.id) is not None
            own = [s for s in host.state.log(CHANNEL) if s.event.author == host.cell_id]
            assert own[-1].event.prev == own[-2].id

    before = asyncio.run(first_run())
    assert len(before) == 5
    asyncio.run(second_run(before))


def test_subscribe_iterates_held_then_live_events(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = NodeConfig(listen=LOCAL, database=str(tmp_path / "n.db"))
        async with Node(Identity.generate(), cfg) as node:
            first = node.state.publish(CHANNEL, b"one")
            seen: list[bytes] = []

            async def consume() -> None:
                async for stored in node.state.subscribe(CHANNEL, from_start=True):
                    seen.append(stored.event.payload)
                    if len(seen) == 3:
                        return

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)
            node.state.publish(CHANNEL, b"two")
            await asyncio.sleep(0.01)
            node.state.publish(CHANNEL, b"three")
            await asyncio.wait_for(task, 3.0)
            assert seen == [b"one", b"two", b"three"]
            assert node.state.log(CHANNEL)[0].id == first

    asyncio.run(go())


def test_no_database_means_no_state_layer(tmp_path: Path) -> None:
    async def go() -> None:
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            # A relative path with no home to resolve it against opens nothing.
            async with Node(Identity.generate(), NodeConfig(listen=LOCAL)) as node:
                with pytest.raises(LocalProtocolError, match="no state database"):
                    _ = node.state
            assert not (tmp_path / "cellmesh.db").exists()
            async with Node(Identity.generate(), NodeConfig(listen=LOCAL, database="")) as node:
                with pytest.raises(LocalProtocolError):
                    _ = node.state
        finally:
            os.chdir(cwd)

    asyncio.run(go())


def test_host_forwards_a_publishers_events_and_late_joiners_catch_up(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        def cfg(name: str, *channels: str) -> NodeConfig:
            return NodeConfig(listen=LOCAL, channels=channels, database=str(tmp_path / name))

        async with (
            Node(Identity.generate(), cfg("host.db", "chat/** open")) as host,
            Node(Identity.generate(), cfg("writer.db")) as writer,
            Node(Identity.generate(), cfg("reader.db")) as reader,
            Node(Identity.generate(), cfg("late.db")) as late,
        ):
            for n in (writer, reader, late):
                await n.connect(_addr(host))
            await reader.channels.subscribe(host.cell_id, CHANNEL)
            await writer.channels.request_publish(host.cell_id, CHANNEL)
            h1 = host.state.publish(CHANNEL, b"h1")
            w1 = writer.state.publish(CHANNEL, b"w1")
            # The writer's event goes to the host, which stores it and forwards it.
            first = await _received(reader, CHANNEL, 0)
            assert first.position is not None
            second = await _received(reader, CHANNEL, first.position)
            assert {first.id, second.id} == {h1, w1}
            assert {s.id for s in host.state.log(CHANNEL)} == {h1, w1}
            assert reader.state.verify(CHANNEL) == []

            # A node that subscribes now catches up: the grant starts a sync with the host,
            # which brings h1 and w1; h2, published live, then follows them in the log.
            await late.channels.subscribe(host.cell_id, CHANNEL)
            host.state.publish(CHANNEL, b"h2")
            for _ in range(250):
                if len(late.state.log(CHANNEL)) == 3:
                    break
                await asyncio.sleep(0.02)
            assert [s.event.payload for s in late.state.log(CHANNEL)][-1] == b"h2"
            assert {s.id for s in late.state.log(CHANNEL)} == {
                s.id for s in host.state.log(CHANNEL)
            }
            assert late.state.store.stats(CHANNEL).pending == 0
            assert late.state.verify(CHANNEL) == []

    asyncio.run(go())


def test_publish_sees_writes_made_beside_it(tmp_path: Path) -> None:
    # `publish` remembers its last heads to save two queries, but only while nothing else wrote
    # to the store: an event appended directly (ours or another author's) is taken into account.
    async def go() -> None:
        cfg = NodeConfig(listen=LOCAL, database=str(tmp_path / "n.db"))
        other = Identity.generate()
        async with Node(Identity.generate(), cfg) as node:
            node.state.publish(CHANNEL, b"1")
            second = node.state.store.get(node.state.publish(CHANNEL, b"2"))
            assert second is not None
            own = create_event(node.identity, CHANNEL, b"3, written directly", second.event, [], 3)
            assert node.state.store.append(own).delivered
            theirs = create_event(other, CHANNEL, b"someone else", None, [], 4)
            assert node.state.store.append(theirs).delivered
            p = node.state.publish_event(CHANNEL, b"4")
            held = node.state.store.get(p.id)
            assert held is not None
            assert held.event.seq == 4
            assert held.event.prev == event_id(own)  # chained to the event written directly
            assert [h.author for h in held.event.horizon] == [other.cell_id]
            assert node.state.store.forks(CHANNEL) == []
            assert node.state.verify(CHANNEL) == []

    asyncio.run(go())
