"""Channels with access control: a hub hosts telemetry/**, a viewer with a token subscribes, a
stranger without one is refused, and a sensor granted PUBLISH feeds the hub (docs/channels.md)."""

from __future__ import annotations

import asyncio
import os
import time

from cellmesh import Identity, Node, NodeConfig
from cellmesh.errors import AccessDeniedError
from cellmesh.identity.tokens import Rights, Token, issue_token


def grant(hub: Identity, to: Identity, rights: Rights) -> tuple[Token, ...]:
    """A one-token chain from the hub (always a trusted root for its own channels)."""
    now = int(time.time())
    return (issue_token(hub, to.cell_id, "telemetry/**", rights, now, now + 3600, os.urandom(16)),)


async def main() -> None:
    hub_id, viewer_id, sensor_id = Identity.generate(), Identity.generate(), Identity.generate()
    local = NodeConfig(listen=("127.0.0.1:0",))
    hub_cfg = NodeConfig(listen=("127.0.0.1:0",), channels=("telemetry/** token",))
    async with (
        Node(hub_id, hub_cfg) as hub,
        Node(viewer_id, local) as viewer,
        Node(sensor_id, local) as sensor,
        Node(Identity.generate(), local) as stranger,
    ):
        for node in (viewer, sensor, stranger):
            await node.connect(hub.local_addresses()[0])
        try:
            await stranger.channels.subscribe(hub.cell_id, "telemetry/engine-3")
        except AccessDeniedError as exc:
            print(f"stranger refused: {exc.reason}")
        await viewer.channels.subscribe(
            hub.cell_id, "telemetry/engine-3", grant(hub_id, viewer_id, Rights.SUBSCRIBE)
        )
        await sensor.channels.request_publish(
            hub.cell_id, "telemetry/engine-3", grant(hub_id, sensor_id, Rights.PUBLISH)
        )
        sensor.channels.publish("telemetry/engine-3", b"rpm=3000")
        msg = await viewer.channels.recv("telemetry/engine-3")  # passed on by the hub
        print(f"viewer got {msg.data!r} on {msg.channel}")


asyncio.run(main())
