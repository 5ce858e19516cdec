"""Channels between real nodes: tokens decide who may subscribe and publish, the policy file is
reloaded under traffic, and the ring 0 gate drops channel frames nobody was granted."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from cellmesh.config import NodeConfig
from cellmesh.errors import AccessDeniedError, PeerUnreachableError
from cellmesh.filter.channels import channel_hash
from cellmesh.filter.inspection import SizeShapeValidator
from cellmesh.identity.keys import Identity
from cellmesh.identity.tokens import Rights, Token, issue_token, revoke_token
from cellmesh.node.node import Node

LOCAL = ("127.0.0.1:0",)


def _addr(node: Node) -> str:
    host, port = node.local_addresses()[0]
    return f"{host}:{port}"


def _token(issuer: Identity, subject: Identity, pattern: str, rights: Rights) -> tuple[Token, ...]:
    now = int(time.time())
    return (
        issue_token(issuer, subject.cell_id, pattern, rights, now - 5, now + 3600, os.urandom(16)),
    )


async def _next(node: Node, channel: str) -> bytes:
    msg = await asyncio.wait_for(node.channels.recv(channel), 3.0)
    return msg.data


def test_subscribe_needs_a_token_and_succeeds_with_one() -> None:
    async def go() -> None:
        host_id, with_id, without_id = Identity.generate(), Identity.generate(), Identity.generate()
        host_cfg = NodeConfig(listen=LOCAL, channels=("telemetry/** token", "chat open"))
        async with (
            Node(host_id, host_cfg) as host,
            Node(with_id, NodeConfig(listen=LOCAL)) as holder,
            Node(without_id, NodeConfig(listen=LOCAL)) as stranger,
        ):
            await holder.connect(_addr(host))
            await stranger.connect(_addr(host))
            # Without a token: refused with the specific reason, before anything is delivered.
            with pytest.raises(AccessDeniedError) as refused:
                await stranger.channels.subscribe(host.cell_id, "telemetry/engine-3")
            assert refused.value.reason == "token_required"
            # A token for another CellID does not help: the leaf must name the presenter.
            with pytest.raises(AccessDeniedError) as wrong:
                await stranger.channels.subscribe(
                    host.cell_id,
                    "telemetry/engine-3",
                    _token(host_id, with_id, "telemetry/**", Rights.SUBSCRIBE),
                )
            assert wrong.value.reason == "wrong_subject"
            # A token signed by an untrusted key does not help either.
            with pytest.raises(AccessDeniedError) as untrusted:
                await stranger.channels.subscribe(
                    host.cell_id,
                    "telemetry/engine-3",
                    _token(Identity.generate(), without_id, "telemetry/**", Rights.SUBSCRIBE),
                )
            assert untrusted.value.reason == "untrusted_root"
            # The holder's token from the host grants subscribe.
            await holder.channels.subscribe(
                host.cell_id,
                "telemetry/engine-3",
                _token(host_id, with_id, "telemetry/**", Rights.SUBSCRIBE),
            )
            assert host.channels.publish("telemetry/engine-3", b"rpm=3000") == 1
            assert await _next(holder, "telemetry/engine-3") == b"rpm=3000"
            # Unreliable publications travel in channel-tagged frames and arrive too.
            assert host.channels.publish("telemetry/engine-3", b"rpm=3100", reliable=False) == 1
            assert await _next(holder, "telemetry/engine-3") == b"rpm=3100"
            # An undeclared channel is unknown; an open one needs no token.
            with pytest.raises(AccessDeniedError) as unknown:
                await holder.channels.subscribe(host.cell_id, "secret/x")
            assert unknown.value.reason == "unknown_channel"
            await stranger.channels.subscribe(host.cell_id, "chat")
            host.channels.publish("chat", b"hello")
            assert await _next(stranger, "chat") == b"hello"
            refusals = host.channels.status()["refusals"]
            assert refusals["token_required"] == 1
            assert refusals["wrong_subject"] == 1

    asyncio.run(go())


def test_publish_grant_hub_forwarding_and_revocation() -> None:
    async def go() -> None:
        hub_id, sensor_id, viewer_id = Identity.generate(), Identity.generate(), Identity.generate()
        cfg = NodeConfig(listen=LOCAL, channels=("telemetry/** token",))
        async with (
            Node(hub_id, cfg) as hub,
            Node(sensor_id, NodeConfig(listen=LOCAL)) as sensor,
            Node(viewer_id, NodeConfig(listen=LOCAL)) as viewer,
        ):
            await sensor.connect(_addr(hub))
            await viewer.connect(_addr(hub))
            sub_only = _token(hub_id, sensor_id, "telemetry/**", Rights.SUBSCRIBE)
            with pytest.raises(AccessDeniedError) as missing:
                await sensor.channels.request_publish(hub.cell_id, "telemetry/t", sub_only)
            assert missing.value.reason == "missing_right"
            pub = _token(hub_id, sensor_id, "telemetry/**", Rights.PUBLISH)
            await sensor.channels.request_publish(hub.cell_id, "telemetry/t", pub)
            await viewer.channels.subscribe(
                hub.cell_id,
                "telemetry/t",
                _token(hub_id, viewer_id, "telemetry/**", Rights.SUBSCRIBE),
            )
            # The sensor publishes into the hub; the hub delivers locally and to its subscriber.
            assert sensor.channels.publish("telemetry/t", b"21.5C") == 1
            assert await _next(hub, "telemetry/t") == b"21.5C"
            assert await _next(viewer, "telemetry/t") == b"21.5C"
            # The hub revokes the sensor's token: the grant ends and further publications drop.
            hub.channels.revoke(revoke_token(hub_id, pub[0], int(time.time())))
            await asyncio.sleep(0.3)
            assert sensor.channels.status()["publish_grants_held"] == []
            # Sending anyway (bypassing the grant bookkeeping) is dropped at the hub.
            h = channel_hash("telemetry/t")
            sensor.endpoint.send_message(hub.cell_id, b"forged", sensor._now(), h)
            sensor.endpoint.send_channel_datagram(hub.cell_id, h, b"forged", sensor._now())
            sensor._pump()
            await asyncio.sleep(0.3)
            drops = hub.statistics().drops
            assert drops["channel_denied"] >= 1  # the tagged frame, before decryption
            assert hub.channels.status()["drops"]["channel_denied"] >= 1  # the reliable one
            assert hub.channels._queue("telemetry/t").empty()
            # The revocation was passed on: the viewer knows it too.
            assert len(viewer.channels.access.revocations) == 1

    asyncio.run(go())


def test_policy_hot_reload_under_traffic(tmp_path: Path) -> None:
    """A broken file keeps the old policy (error with line:col); a fixed one takes effect."""

    async def go() -> None:
        host_id, peer_id = Identity.generate(), Identity.generate()
        policy = tmp_path / "policy.cm"
        policy.write_text('rule "all": -> pass\ndefault -> drop\n')
        cfg = NodeConfig(listen=LOCAL, channels=("data/** open",), policy_file=str(policy))
        async with Node(host_id, cfg) as host, Node(peer_id, NodeConfig(listen=LOCAL)) as peer:
            await peer.connect(_addr(host))
            await peer.channels.request_publish(host.cell_id, "data/a")
            received = 0
            stop = asyncio.Event()

            async def traffic() -> None:
                i = 0
                while not stop.is_set():
                    peer.channels.publish("data/a", f"m{i}".encode())
                    i += 1
                    await asyncio.sleep(0.005)

            async def consume() -> None:
                nonlocal received
                while True:
                    await host.channels.recv("data/a")
                    received += 1

            sender = asyncio.create_task(traffic())
            consumer = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
            before_broken = received
            assert before_broken > 0
            # A broken file: rejected with its position, the old policy stays, traffic flows.
            policy.write_text('rule "all": -> pass\ndefault -> dorp\n')
            os.utime(policy, ns=(time.time_ns(), time.time_ns() + 10**9))
            error = host.channels.reload_policy()
            assert error is not None
            assert ":2:12:" in error
            await asyncio.sleep(0.3)
            assert received > before_broken
            assert host.channels.status()["policy"]["errors"] >= 1
            # A fixed file that drops this peer: the grant ends, the peer is told, traffic stops.
            policy.write_text(f'rule "no": from {peer_id.cell_id.hex()} -> drop\ndefault -> pass\n')
            assert host.channels.reload_policy() is None
            await asyncio.sleep(0.3)
            assert peer.channels.status()["publish_grants_held"] == []
            settled = received
            await asyncio.sleep(0.3)
            assert received == settled
            stop.set()
            await sender
            consumer.cancel()
            # The file watcher also picks up changes by itself.
            policy.write_text("default -> pass\n")
            os.utime(policy, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
            for _ in range(40):
                if host.channels.status()["policy"]["reloads"] >= 2:
                    break
                await asyncio.sleep(0.1)
            assert host.channels.status()["policy"]["reloads"] >= 2

    asyncio.run(go())


def test_ring2_inspection_drops_bad_payloads_and_bans_listed_peers(tmp_path: Path) -> None:
    """Ring 2 inspects what granted publishers send; a threat-listed CellID ends up banned at
    ring 0, where its datagrams then drop before any cryptography."""

    async def go() -> None:
        host_id, good_id, bad_id = Identity.generate(), Identity.generate(), Identity.generate()
        threats = tmp_path / "threats.txt"
        threats.write_text(f"# known bad\n{bad_id.cell_id.hex()}\n")
        cfg = NodeConfig(listen=LOCAL, channels=("json/** open",), threat_list=str(threats))
        shape = SizeShapeValidator(256, json_object=True)
        async with (
            Node(host_id, cfg, inspectors=[shape]) as host,
            Node(good_id, NodeConfig(listen=LOCAL)) as good,
            Node(bad_id, NodeConfig(listen=LOCAL)) as bad,
        ):
            for n in (good, bad):
                await n.connect(_addr(host))
                await n.channels.request_publish(host.cell_id, "json/x")
            good.channels.publish("json/x", b"not json")
            good.channels.publish("json/x", b'{"ok": true}')
            assert await _next(host, "json/x") == b'{"ok": true}'
            bad.channels.publish("json/x", b'{"ok": true}')
            for _ in range(50):
                if host.statistics().drops.get("banned") or not any(
                    p.cell_id == bad.cell_id for p in host.peers()
                ):
                    break
                await asyncio.sleep(0.05)
            assert all(p.cell_id != bad.cell_id for p in host.peers())
            assert host.channels._queue("json/x").empty()
            dropped = host.channels.status()["drops"]
            assert dropped["inspection_drop"] == 1  # the non-JSON payload
            assert dropped["inspection_ban"] == 1
            # The banned node's next packets die at ring 0.
            with pytest.raises(PeerUnreachableError):
                await bad.ping(host.cell_id, timeout=0.5)
            assert host.statistics().drops["banned"] >= 1

    asyncio.run(go())


def test_capability_adverts_are_exchanged_and_searchable() -> None:
    async def go() -> None:
        a_cfg = NodeConfig(listen=LOCAL, capabilities=("storage", "gpu=a100"))
        async with (
            Node(Identity.generate(), a_cfg) as a,
            Node(Identity.generate(), NodeConfig(listen=LOCAL, capabilities=("relay",))) as b,
        ):
            await b.connect(_addr(a))
            for _ in range(50):
                if b.channels.find("gpu"):
                    break
                await asyncio.sleep(0.05)
            assert b.channels.find("gpu", "a100") == [a.cell_id]
            assert b.channels.find("gpu", "h100") == []
            assert a.channels.find("relay") == [b.cell_id]
            assert b.channels.find("relay") == [b.cell_id]  # its own advert counts too

    asyncio.run(go())
