"""Control-API operations for channels, capabilities, policy and revocations (docs/api.md).

Each request is a JSON object; token chains and revocations travel as lists of hex strings,
exactly as `cellmesh token issue|revoke` write them to files, so the CLI passes files through.
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any, Final

from cellmesh.identity.cellid import format_cell_id, parse_cell_id
from cellmesh.identity.tokens import Token, decode_revocation, decode_token

if TYPE_CHECKING:
    from cellmesh.node.node import Node

CHANNEL_OPS: Final = frozenset(
    {
        "channels",
        "channel_declare",
        "subscribe",
        "unsubscribe",
        "request_publish",
        "publish",
        "channel_recv",
        "policy_reload",
        "caps",
        "revoke",
    }
)
MAX_TIMEOUT: Final = 86400.0


def _chain(req: dict[str, Any]) -> tuple[Token, ...]:
    raw = req.get("chain") or []
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise ValueError("chain must be a list of hex-encoded tokens")
    return tuple(decode_token(bytes.fromhex(t)) for t in raw)


def _timeout(req: dict[str, Any], default: float) -> float:
    t = float(req.get("timeout", default))
    if not 0 < t <= MAX_TIMEOUT:
        raise ValueError(f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds")
    return t


def _data(req: dict[str, Any]) -> bytes:
    if "data_b64" in req:
        return base64.b64decode(str(req["data_b64"]), validate=True)
    return str(req.get("data", "")).encode("utf-8")


async def channel_op(node: Node, req: dict[str, Any]) -> Any:
    """Serve one of `CHANNEL_OPS`. Raises ValueError/KeyError for bad requests, and
    AccessDeniedError / PeerUnreachableError as the node does."""
    op = req["op"]
    ch = node.channels
    if op == "channels":
        return ch.status()
    if op == "channel_declare":
        spec = ch.declare(
            str(req["pattern"]), str(req.get("access", "token")), str(req.get("visibility", "mesh"))
        )
        return {"declared": spec.text()}
    if op == "subscribe":
        await ch.subscribe(
            parse_cell_id(str(req["peer"])), str(req["channel"]), _chain(req), _timeout(req, 5.0)
        )
        return {"subscribed": str(req["channel"])}
    if op == "unsubscribe":
        return {
            "was_subscribed": ch.unsubscribe(parse_cell_id(str(req["peer"])), str(req["channel"]))
        }
    if op == "request_publish":
        await ch.request_publish(
            parse_cell_id(str(req["peer"])), str(req["channel"]), _chain(req), _timeout(req, 5.0)
        )
        return {"may_publish": str(req["channel"])}
    if op == "publish":
        n = ch.publish(str(req["channel"]), _data(req), reliable=not req.get("unreliable", False))
        return {"sent_to": n}
    if op == "channel_recv":
        channel = req.get("channel")
        try:
            msg = await asyncio.wait_for(
                ch.recv(str(channel) if channel else None), _timeout(req, 30.0)
            )
        except TimeoutError:
            return None
        return {
            "peer": format_cell_id(msg.peer),
            "channel": msg.channel,
            "data_b64": base64.b64encode(msg.data).decode(),
            "reliable": msg.reliable,
            "tag": msg.tag,
        }
    if op == "policy_reload":
        error = ch.reload_policy()
        if error is not None:
            raise ValueError(f"policy not reloaded (the previous one stays in force): {error}")
        return {"reloaded": ch.policy_path}
    if op == "caps":
        find = req.get("find")
        if find:
            name, _, value = str(find).partition("=")
            return {"found": [format_cell_id(c) for c in ch.find(name, value or None)]}
        ch.advert()
        return {"own": ch.status()["capabilities"], "known": ch.known_capabilities()}
    if op == "revoke":
        rev = decode_revocation(bytes.fromhex(str(req["revocation"])))
        return {"new": ch.revoke(rev)}
    raise ValueError(f"unknown op {op!r}")
