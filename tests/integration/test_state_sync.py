"""Anti-entropy sync between real nodes (node/state_sync.py): late subscribers catch up, only
the difference travels, access rules hold, and hostile sync streams cost nothing but themselves."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from cellmesh.config import NodeConfig
from cellmesh.errors import RemoteProtocolError
from cellmesh.identity.keys import Identity
from cellmesh.node.node import Node
from cellmesh.node.services import header_line
from cellmesh.node.state_sync import SYNC_KIND, SYNC_MESSAGE_SIZE, SyncRefused
from cellmesh.node.streams import StreamError

LOCAL = ("127.0.0.1:0",)
CHANNEL = "chat/room-1"


def _addr(node: Node) -> str:
    host, port = node.local_addresses()[0]
    return f"{host}:{port}"


def _cfg(tmp_path: Path, name: str, *channels: str, interval: float = 0.0) -> NodeConfig:
    return NodeConfig(
        listen=LOCAL, channels=channels, database=str(tmp_path / name), sync_interval=interval
    )


async def _until(pred: object, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    assert callable(pred)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _ids(node: Node) -> set[bytes]:
    return {s.id for s in node.state.log(CHANNEL)}


def test_a_late_subscriber_catches_up_and_a_second_sync_sends_only_the_difference(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), _cfg(tmp_path, "host.db", "chat/** open")) as host,
            Node(Identity.generate(), _cfg(tmp_path, "late.db")) as late,
        ):
            for i in range(300):
                host.state.publish(CHANNEL, f"before {i}".encode())
            await late.connect(_addr(host))
            await late.channels.subscribe(host.cell_id, CHANNEL)
            await _until(lambda: len(late.state.log(CHANNEL)) == 300)
            assert _ids(late) == _ids(host)
            assert late.state.verify(CHANNEL) == []
            assert late.state.counters["synced"] == 300

            # Offline for the subscriber (no live delivery: we unsubscribe), the host writes 5
            # more; a sync now moves those 5 and a few fingerprints, not the 305.
            late.channels.unsubscribe(host.cell_id, CHANNEL)
            await _until(lambda: not host.channels.service.access.grants() or True)
            for i in range(5):
                host.state.publish(CHANNEL, f"after {i}".encode())
            await late.channels.subscribe(host.cell_id, CHANNEL)
            report = await late.state.sync.sync_with(host.cell_id, CHANNEL)
            await _until(lambda: len(late.state.log(CHANNEL)) == 305)
            assert _ids(late) == _ids(host)
            full = sum(len(s.encoded) for s in host.state.log(CHANNEL))
            assert report.bytes_received < full / 10, (report, full)

    asyncio.run(go())


def test_a_subscriber_that_may_publish_pushes_what_it_wrote_offline(tmp_path: Path) -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), _cfg(tmp_path, "host.db", "chat/** open")) as host,
            Node(Identity.generate(), _cfg(tmp_path, "w.db")) as writer,
        ):
            # Written while not connected: only in the writer's own log.
            mine = [writer.state.publish(CHANNEL, f"offline {i}".encode()) for i in range(20)]
            await writer.connect(_addr(host))
            await writer.channels.request_publish(host.cell_id, CHANNEL)
            await writer.channels.subscribe(host.cell_id, CHANNEL)
            await _until(lambda: set(mine) <= _ids(host))
            assert host.state.verify(CHANNEL) == []

    asyncio.run(go())


def test_a_reader_without_publish_right_cannot_write_through_sync(tmp_path: Path) -> None:
    async def go() -> None:
        async with (
            Node(
                Identity.generate(), _cfg(tmp_path, "host.db", "chat/** open", "news/** open")
            ) as host,
            Node(Identity.generate(), _cfg(tmp_path, "r.db")) as reader,
        ):
            host_ev = host.state.publish("news/today", b"from the host")
            forged = reader.state.publish("news/today", b"not allowed")
            await reader.connect(_addr(host))
            # Subscribe only (no publish grant): news/** is readable but not writable by us...
            # the open declaration would grant publish if asked, so we never ask.
            await reader.channels.subscribe(host.cell_id, "news/today")
            report = await reader.state.sync.sync_with(host.cell_id, "news/today")
            assert report.complete
            assert host_ev in {s.id for s in reader.state.log("news/today")}
            assert forged not in {s.id for s in host.state.log("news/today")}

    asyncio.run(go())


def test_a_peer_that_is_not_subscribed_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), _cfg(tmp_path, "host.db", "chat/** token")) as host,
            Node(Identity.generate(), _cfg(tmp_path, "x.db")) as stranger,
        ):
            host.state.publish(CHANNEL, b"secret")
            await stranger.connect(_addr(host))
            with pytest.raises(SyncRefused, match="not_subscribed"):
                await stranger.state.sync.sync_with(host.cell_id, CHANNEL)
            assert stranger.state.log(CHANNEL) == []
            assert host.state.sync.counters["refused_not_subscribed"] == 1

    asyncio.run(go())


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # a length far over the limit
        struct.pack("!I", 40) + b"\x00" * 40,  # a frame that is not a sync message
        struct.pack("!I", 100) + b"\x01" * 10,  # a truncated frame, then the end
        struct.pack("!I", SYNC_MESSAGE_SIZE + 1),  # one byte over the limit
    ],
)
def test_hostile_sync_streams_are_dropped_and_the_host_keeps_serving(
    tmp_path: Path, payload: bytes
) -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), _cfg(tmp_path, "host.db", "chat/** open")) as host,
            Node(Identity.generate(), _cfg(tmp_path, "bad.db")) as bad,
        ):
            good = [host.state.publish(CHANNEL, f"e{i}".encode()) for i in range(10)]
            await bad.connect(_addr(host))
            await bad.channels.subscribe(host.cell_id, CHANNEL)
            await _until(lambda: len(bad.state.log(CHANNEL)) == 10)
            st = await bad.open_stream(host.cell_id)
            await st.write(header_line(SYNC_KIND, channel=CHANNEL))
            assert await st.read(3) == b"ok\n"
            await st.write(payload)
            await st.close()

            async def drain() -> None:
                async with asyncio.timeout(5):
                    while await st.read():
                        pass

            with pytest.raises(StreamError):
                await drain()
            assert host.state.sync.counters["session_failed"] >= 1
            # The host still serves an honest sync afterwards.
            report = await bad.state.sync.sync_with(host.cell_id, CHANNEL)
            assert report.complete
            assert set(good) == _ids(bad) == _ids(host)

    asyncio.run(go())


def test_periodic_sync_heals_a_missed_live_event(tmp_path: Path) -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), _cfg(tmp_path, "host.db", "chat/** open")) as host,
            Node(Identity.generate(), _cfg(tmp_path, "sub.db", interval=0.5)) as sub,
        ):
            await sub.connect(_addr(host))
            await sub.channels.subscribe(host.cell_id, CHANNEL)
            # Stored at the host without being sent live (as if the datagram was lost and the
            # host then crashed before retransmitting): only anti-entropy can bring it.
            from cellmesh.state.events import create_event

            heads = host.state.store.heads(CHANNEL)
            assert heads == []
            ev = create_event(host.identity, CHANNEL, b"quiet", None, [], 1)
            assert host.state.store.append(ev).delivered
            host.state.sync.forget_index(CHANNEL)
            await _until(lambda: len(sub.state.log(CHANNEL)) == 1, timeout=15)
            assert sub.state.log(CHANNEL)[0].event.payload == b"quiet"

    asyncio.run(go())


# Two channel names with one 32-bit channel hash (found by a birthday search).
OPEN_NAME, SECRET_NAME = "chat/a109094", "secret/b12049"


def test_a_grant_on_a_colliding_channel_name_opens_nothing(tmp_path: Path) -> None:
    from cellmesh.filter.channels import channel_hash

    assert channel_hash(OPEN_NAME) == channel_hash(SECRET_NAME)

    async def go() -> None:
        async with (
            Node(
                Identity.generate(), _cfg(tmp_path, "host.db", "chat/** open", "secret/** token")
            ) as host,
            Node(Identity.generate(), _cfg(tmp_path, "evil.db")) as evil,
        ):
            host.state.publish(SECRET_NAME, b"top secret")
            await evil.connect(_addr(host))
            await evil.channels.subscribe(host.cell_id, OPEN_NAME)
            await evil.channels.request_publish(host.cell_id, OPEN_NAME)
            # Reading the protected channel through the open one's grant: refused.
            with pytest.raises(SyncRefused, match="not_subscribed"):
                await evil.state.sync.sync_with(host.cell_id, SECRET_NAME)
            assert evil.state.log(SECRET_NAME) == []
            # Writing into it the same way: its events never reach the host's log.
            forged = evil.state.publish(SECRET_NAME, b"forged")
            with pytest.raises(SyncRefused):
                await evil.state.sync.sync_with(host.cell_id, SECRET_NAME)
            assert forged not in {s.id for s in host.state.log(SECRET_NAME)}

    asyncio.run(go())


def test_a_silent_peer_cannot_hold_a_sync_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cellmesh.node import state_sync

    monkeypatch.setattr(state_sync, "ANSWER_TIMEOUT", 0.5)

    async def go() -> None:
        async with (
            Node(Identity.generate(), NodeConfig(listen=LOCAL, database="")) as mute,
            Node(Identity.generate(), _cfg(tmp_path, "a.db")) as asker,
        ):
            # `mute` has no state layer: nobody answers its sync streams.
            await asker.connect(_addr(mute))
            with pytest.raises(RemoteProtocolError, match="no answer"):
                await asker.state.sync.sync_with(mute.cell_id, CHANNEL, timeout=10)
            assert asker.state.sync.status()["running"] == []
            assert asker.state.sync.request(mute.cell_id, CHANNEL, force=True)

    asyncio.run(go())


def test_one_peer_gets_at_most_two_sessions_and_one_per_channel(tmp_path: Path) -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), _cfg(tmp_path, "host.db", "chat/** open")) as host,
            Node(Identity.generate(), _cfg(tmp_path, "greedy.db")) as greedy,
        ):
            await greedy.connect(_addr(host))
            names = [f"chat/room-{i}" for i in range(3)]
            for name in names:
                await greedy.channels.subscribe(host.cell_id, name)
            await _until(lambda: not greedy.state.sync.status()["running"])

            async def open_session(name: str) -> bytes:
                st = await greedy.open_stream(host.cell_id)
                await st.write(header_line(SYNC_KIND, channel=name))
                line = b""
                while not line.endswith(b"\n"):
                    line += await st.read(1)
                return line

            # Sessions that never send their first message hold their slot (until timeouts).
            assert await open_session(names[0]) == b"ok\n"
            assert (await open_session(names[0])).startswith(b"busy: a sync of")
            assert await open_session(names[1]) == b"ok\n"
            assert (await open_session(names[2])).startswith(b"busy: 2 sync sessions")
            assert host.state.sync.counters["refused_busy"] == 2

    asyncio.run(go())


def test_leaving_while_a_grant_renewal_runs_stays_left(tmp_path: Path) -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), _cfg(tmp_path, "host.db", "chat/** open")) as host,
            Node(Identity.generate(), _cfg(tmp_path, "sub.db")) as sub,
        ):
            await sub.connect(_addr(host))
            await sub.channels.subscribe(host.cell_id, CHANNEL)
            sub.channels._renew(host.cell_id)  # what a reconnection starts
            sub.channels._renew(host.cell_id)  # a second one while the first runs: no-op
            assert len(sub.channels._renewing) == 1
            sub.channels.unsubscribe(host.cell_id, CHANNEL)  # the application leaves meanwhile
            await asyncio.wait_for(asyncio.gather(*sub.channels._renewing), 10)
            assert (host.cell_id, CHANNEL) not in set(sub.channels.service.subscriptions())
            await _until(lambda: not any(True for _ in host.channels.service.subscribers()))

    asyncio.run(go())
