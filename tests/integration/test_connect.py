"""`cellmesh.connect(home)`: the same state API over a `cellmesh node` daemon and over a node
embedded in the calling process, and a clear error when a daemon is required but absent."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

import cellmesh
from cellmesh.errors import ControlError, KeystoreError
from cellmesh.node.connect import StateConnection, StateEvent, Subscription
from cellmesh.node.control import ControlClient
from conftest import CliRunner, NodeProcess

CHANNEL = "notes/today"


def _home(tmp_path: Path, cli: type[CliRunner]) -> tuple[Path, str]:
    home = tmp_path / "home"
    cell = cli.identity(home)
    # Loopback only and no multicast discovery: the test node must not meet other nodes.
    (home / "config.toml").write_text('listen = ["127.0.0.1:0"]\ndiscovery = false\n')
    return home, cell


async def _next(sub: Subscription) -> StateEvent:
    return await asyncio.wait_for(anext(sub), 5.0)


async def _exercise(node: StateConnection, cell: str) -> list[str]:
    """What both modes must do alike; returns the ids published, in order."""
    assert node.cell_id == cell
    before = await node.publish(CHANNEL, "before")  # str is sent as UTF-8
    assert (before.seq, before.position) == (1, 1)
    async with node.subscribe(CHANNEL) as live, node.subscribe(CHANNEL, from_start=True) as old:
        # Published after the live subscription started but before anyone waits on it: the
        # subscription's starting point was fixed on entry, so it is not missed.
        after = await node.publish(CHANNEL, b"after \x00\xff")
        got = await _next(live)
        assert got.id == after.id
        assert got.data == b"after \x00\xff"
        assert (got.author, got.seq, got.channel, got.prev) == (cell, 2, CHANNEL, before.id)
        assert got.clock == 2
        assert got.timestamp.tzinfo is not None
        replay = [await _next(old), await _next(old)]
        assert [e.id for e in replay] == [before.id, after.id]
        assert replay[0].text == "before"
        # Several events published while nobody waits arrive in order, none skipped.
        burst = [(await node.publish(CHANNEL, f"n{i}")).id for i in range(5)]
        assert [(await _next(live)).id for _ in burst] == burst
    held = await node.log(CHANNEL)
    ids = [before.id, after.id, *burst]
    assert [e.id for e in held] == ids
    assert [e.position for e in held] == list(range(1, 8))
    assert [e.id for e in await node.log(CHANNEL, after=5)] == ids[5:]
    report = await node.verify(CHANNEL)
    assert report.ok
    assert report.events == 7
    with pytest.raises(ControlError, match="bad request"):
        await node.publish("not a channel!", b"x")
    status = await node.status()
    assert status["channels"][CHANNEL]["events"] == 7
    await _folds(node)
    return ids


async def _folds(node: StateConnection) -> None:
    """Folds and a (single-replica) query through the same API."""
    for amount in ("5", "-2", ""):  # an empty payload counts 1
        await node.publish("notes/count", amount)
    counted = await node.fold("notes/count", "counter")
    assert (counted.value, counted.events) == (4, 3)
    assert counted.position == (await node.log("notes/count"))[-1].position
    await node.publish("notes/kv", '{"set": {"colour": "red", "size": 3}}')
    await node.publish("notes/kv", '{"set": {"colour": "blue"}, "del": ["size"]}')
    assert (await node.fold("notes/kv", "lww")).value == {"colour": "blue"}
    one = await node.fold("notes/kv", "lww", key="colour")
    assert (one.key, one.value) == ("colour", "blue")
    asked = await node.query("notes/kv", "lww", timeout=0.5)
    assert asked.value == {"colour": "blue"}
    assert (asked.replicas, asked.answered, asked.timed_out) == (1, (), ())
    with pytest.raises(ControlError, match="no fold 'nope'"):
        await node.fold("notes/kv", "nope")


def test_embedded_node_when_no_daemon_runs(tmp_path: Path, cli: type[CliRunner]) -> None:
    home, cell = _home(tmp_path, cli)

    async def main() -> list[str]:
        async with cellmesh.connect(home) as node:
            assert node.mode == "embedded"
            assert node.node is not None
            ids = await _exercise(node, cell)
            # The embedded node serves the home's control socket like a daemon would, so the
            # CLI and other programs see the same log meanwhile.
            async with ControlClient(home / "control.sock") as client:
                r = await client.call("log", channel=CHANNEL)
            assert [e["id"] for e in r["events"]] == ids
            await _close_ends_a_pending_wait(node)
            ids = [e.id for e in await node.log(CHANNEL)]
            # A subscription still waiting when the block ends finishes instead of hanging.
            waiting = asyncio.create_task(_drain(node))
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(waiting, 5.0) == []
        assert not (home / "control.sock").exists()
        return ids

    ids = asyncio.run(main())

    async def again() -> list[str]:
        # The log is durable: a new embedded node on the same home holds the same events.
        async with cellmesh.connect(home, embedded=True) as node:
            return [e.id for e in await node.log(CHANNEL)]

    assert asyncio.run(again()) == ids


async def _close_ends_a_pending_wait(node: StateConnection) -> None:
    """`Subscription.close()` from another task ends a pending `__anext__`, and an event
    published after the close is never returned by the closed subscription."""
    sub = await node.subscribe(CHANNEL).start()
    waiter = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0.1)  # let it reach the node's wait for the next event
    assert not waiter.done()
    await sub.close()
    await node.publish(CHANNEL, "after close")
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, 5.0)
    with pytest.raises(StopAsyncIteration):
        await anext(sub)


async def _drain(node: StateConnection) -> list[StateEvent]:
    return [ev async for ev in node.subscribe(CHANNEL)]


def test_daemon_is_used_when_it_runs(
    tmp_path: Path, cli: type[CliRunner], node_factory: type[NodeProcess]
) -> None:
    home, cell = _home(tmp_path, cli)
    node_factory(home)

    async def main() -> list[str]:
        async with cellmesh.connect(home) as node:
            assert node.mode == "daemon"
            assert node.node is None
            ids = await _exercise(node, cell)
            await _close_ends_a_pending_wait(node)
            ids = [e.id for e in await node.log(CHANNEL)]
            waiting = asyncio.create_task(_drain(node))
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(waiting, 5.0) == []
        async with cellmesh.connect(home, embedded=False) as node:
            assert node.mode == "daemon"
        # One node per home: an embedded node cannot open the daemon's database too.
        with pytest.raises(ControlError, match=r"already running.*embedded=False"):
            async with cellmesh.connect(home, embedded=True):
                pass
        return ids

    ids = asyncio.run(main())
    r = cli.run("--home", str(home), "log", CHANNEL, "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == ids


def test_no_daemon_with_embedded_false_says_how_to_start_one(
    tmp_path: Path, cli: type[CliRunner]
) -> None:
    home, _ = _home(tmp_path, cli)
    # A socket file nobody serves (a killed daemon's leftover) is no daemon either.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home / "control.sock"))
    stale.close()

    async def main() -> None:
        async with cellmesh.connect(home, embedded=False):
            raise AssertionError("connected without a daemon")

    with pytest.raises(ControlError) as info:
        asyncio.run(main())
    message = str(info.value)
    assert f"no node is running for {home}" in message
    assert f"cellmesh --home {home} node" in message


def test_embedded_without_identity_names_the_fix(tmp_path: Path) -> None:
    async def main() -> None:
        async with cellmesh.connect(tmp_path / "empty"):
            raise AssertionError("connected without an identity")

    with pytest.raises(KeystoreError, match="id new"):
        asyncio.run(main())
