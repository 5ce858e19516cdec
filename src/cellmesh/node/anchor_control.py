"""Control-API operations for the anchor (docs/anchor.md, docs/api.md).

* ``anchor``: the anchor's status as `AnchorDriver.status` reports it (`cellmesh anchor`), or
  ``{"running": false, "why": ...}`` when this node does not take part in the election.
* ``anchor_epoch_key``: FOR TESTS ONLY. The current epoch key as ``{"epoch", "key"}`` (hex).
  Refused (``bad_request``) unless the node process was started with
  ``CELLMESH_TEST_EXPORT_EPOCH_KEY=1``; the network-namespace test uses it to search a capture of
  the link for the key bytes. No CLI command calls it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from cellmesh.errors import LocalProtocolError

if TYPE_CHECKING:
    from cellmesh.node.node import Node

__all__ = ["ANCHOR_OPS", "anchor_op", "not_running_reason"]

ANCHOR_OPS: Final = frozenset({"anchor", "anchor_epoch_key"})


def not_running_reason(node: Node) -> str:
    """Why a node runs no anchor driver, in one sentence."""
    if not node.config.anchor:
        return "the anchor is off on this node (config anchor = false)"
    if node.discovery is None:
        return (
            "discovery is not running on this node (its members come from discovery: it needs "
            "discovery = true and a wildcard listen address such as [::])"
        )
    return "the anchor driver is not running"


def anchor_op(node: Node, req: dict[str, Any]) -> Any:
    """Serve one of `ANCHOR_OPS`. Raises ValueError for a refused or malformed request."""
    op = req["op"]
    driver = node.anchor
    if op == "anchor":
        if driver is None or not driver.running:
            return {"running": False, "why": not_running_reason(node)}
        return driver.status()
    if op == "anchor_epoch_key":
        if driver is None or not driver.running:
            raise ValueError(not_running_reason(node))
        try:
            return driver.export_epoch_key()
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None
    raise ValueError(f"unknown op {op!r}")
