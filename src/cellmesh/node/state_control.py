"""Control-API operations of the state layer: signed, durable channel logs (docs/state.md).

Events travel as JSON objects (`event_json`): ids, authors and payloads in hex/base64, so
`cellmesh sub --json` and `cellmesh log --json` print exactly what the node answered.
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any, Final

from cellmesh.errors import CellmeshError, LocalProtocolError
from cellmesh.identity.cellid import format_cell_id, parse_cell_id
from cellmesh.node.channel_control import _data, _timeout
from cellmesh.state.log import StoredEvent, StoreError

if TYPE_CHECKING:
    from cellmesh.node.node import Node

STATE_OPS: Final = frozenset(
    {"pub", "log", "log_verify", "sub_recv", "state", "fold", "query", "sync"}
)
MAX_LOG_EVENTS: Final = 10000
"""Most events one `log` answer carries; ask again with `after` for the rest."""


def event_json(stored: StoredEvent) -> dict[str, Any]:
    """One stored event as the control API shows it."""
    e = stored.event
    return {
        "id": stored.id.hex(),
        "position": stored.position,
        "channel": e.channel,
        "author": format_cell_id(e.author),
        "seq": e.seq,
        "clock": e.clock,
        "prev": e.prev.hex(),
        "horizon": [[format_cell_id(h.author), h.seq] for h in e.horizon],
        "timestamp_ms": e.timestamp_ms,
        "data_b64": base64.b64encode(e.payload).decode(),
    }


def _position(req: dict[str, Any], key: str) -> int:
    value = int(req.get(key, 0))
    if value < 0:
        raise ValueError(f"{key} must be >= 0")
    return value


async def state_op(node: Node, req: dict[str, Any]) -> Any:
    """Serve one of `STATE_OPS`. Raises ValueError/KeyError for bad requests, and ValueError
    too when the node has no database or the store fails (the control API answers both)."""
    try:
        return await _state_op(node, req)
    except (LocalProtocolError, StoreError) as exc:
        raise ValueError(str(exc)) from exc


async def _state_op(node: Node, req: dict[str, Any]) -> Any:
    op = req["op"]
    st = node.state
    if op == "state":
        return st.status()
    channel = str(req["channel"])
    if op == "sync":
        return await _sync(node, channel, req)
    if op == "pub":
        p = st.publish_event(channel, _data(req))
        return {"id": p.id.hex(), "seq": p.seq, "position": p.position, "sent_to": p.sent_to}
    if op == "log":
        limit = int(req.get("limit", MAX_LOG_EVENTS))
        if not 0 < limit <= MAX_LOG_EVENTS:
            raise ValueError(f"limit must be between 1 and {MAX_LOG_EVENTS}")
        events: list[dict[str, Any]] = []
        for held in st.store.iter_channel(channel, _position(req, "after")):
            if len(events) >= limit:
                break
            events.append(event_json(held))
        return {"events": events, "last_position": st.last_position(channel)}
    if op == "log_verify":
        problems = st.verify(channel)
        return {
            "events": st.store.stats(channel).events,
            "problems": [
                {
                    "kind": p.kind,
                    "detail": p.detail,
                    "event_id": None if p.event_id is None else p.event_id.hex(),
                }
                for p in problems
            ],
        }
    if op == "sub_recv":
        after = req.get("after")
        position = st.last_position(channel) if after is None else _position(req, "after")
        stored: StoredEvent | None = None
        try:
            async with asyncio.timeout(_timeout(req, 30.0)):
                stored = await st.next_event(channel, position)
        except TimeoutError:
            pass
        return {
            "after": position,
            "event": None if stored is None else event_json(stored),
        }
    if op in ("fold", "query"):
        return await _fold_op(node, op, channel, req)
    raise ValueError(f"unknown op {op!r}")


async def _fold_op(node: Node, op: str, channel: str, req: dict[str, Any]) -> dict[str, Any]:
    """``fold``: a fold's value in this node's log; ``query``: merged over the replicas
    (node/state_folds.py; docs/state.md, "Folds and queries through the node")."""
    fold = str(req["fold"])
    key = req.get("key")
    if key is not None and not isinstance(key, str):
        raise ValueError("key must be a string or null")
    folds = node.state.folds
    if op == "fold":
        v = folds.read(channel, fold, key)
        return {
            "channel": v.channel,
            "fold": v.fold,
            "key": v.key,
            "value": v.value,
            "position": v.position,
            "events": v.events,
        }
    result = await folds.query(channel, fold, key, timeout=float(req.get("timeout", 2.0)))
    return result.to_json()


async def _sync(node: Node, channel: str, req: dict[str, Any]) -> dict[str, Any]:
    """Reconcile `channel` now with one peer (`peer`) or every host we subscribe to it at."""
    sync = node.state.sync
    peers: list[bytes]
    if req.get("peer"):
        peers = [bytes(parse_cell_id(str(req["peer"])))]
    else:
        peers = sorted(
            {bytes(p) for p, name in node.channels.service.subscriptions() if name == channel}
        )
        if not peers:
            raise ValueError(
                f"this node subscribes to {channel} nowhere; name a peer (--with) or subscribe first"
            )
    timeout = _timeout(req, 60.0)

    async def one(peer: bytes) -> dict[str, Any]:
        try:
            return (await sync.sync_with(peer, channel, timeout)).as_json()
        except TimeoutError:
            return {"peer": format_cell_id(peer), "error": f"no result within {timeout:g} s"}
        except CellmeshError as exc:
            return {"peer": format_cell_id(peer), "error": str(exc)}

    results = await asyncio.gather(*(one(p) for p in peers))
    return {"channel": channel, "results": list(results)}
