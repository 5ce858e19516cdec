"""Control-API operations of the blob exchange (docs/blobs_sync.md, section 7).

* `blobs`: the blob service's state and counters (`BlobService.statistics`).
* `blob_fetch` {blob_id, path, peers?, timeout?}: a streaming op like `cp`: it takes over the
  connection, sends progress lines `{"phase": "fetching", "progress": bytes, "total": bytes}`
  (at most one per `PROGRESS_INTERVAL`), then `{"ok": true, "result": {...}}` (see
  `BlobFetchResult.as_json`) or `{"ok": false, "error": ..., "kind": ...}`. `path` is where the
  node writes the verified blob (absolute); `peers` are CellIDs (default: every connected peer).
  A client that goes away cancels the fetch (blocks already verified stay in the store).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cellmesh.errors import CellmeshError, PeerUnreachableError
from cellmesh.identity.cellid import parse_cell_id
from cellmesh.node.blob_service import BlobFetchError
from cellmesh.state.blobs import FetchProgress

if TYPE_CHECKING:
    from cellmesh.node.node import Node

__all__ = ["BLOB_OPS", "BLOB_STREAMING_OPS", "blob_op", "blob_streaming_op"]

BLOB_OPS: Final = frozenset({"blobs"})
BLOB_STREAMING_OPS: Final = frozenset({"blob_fetch"})
PROGRESS_INTERVAL: Final = 0.1
MAX_FETCH_TIMEOUT: Final = 86400.0


def blob_op(node: Node, req: dict[str, Any]) -> Any:
    """Serve one of `BLOB_OPS`."""
    return node.blobs.statistics()


async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
    await writer.drain()


def _request(req: dict[str, Any]) -> tuple[bytes, Path, list[bytes] | None, float | None]:
    """Validate a `blob_fetch` request (ValueError/KeyError/TypeError for a bad one)."""
    blob_id = bytes.fromhex(str(req["blob_id"]))
    if len(blob_id) != 32:
        raise ValueError("blob_id must be 64 hex digits")
    path = Path(str(req["path"]))
    if not path.is_absolute():
        raise ValueError(f"path must be absolute, got {str(path)!r}")
    raw_peers = req.get("peers")
    peers: list[bytes] | None = None
    if raw_peers is not None:
        if not isinstance(raw_peers, list) or not raw_peers:
            raise ValueError("peers must be a non-empty list of CellIDs")
        peers = [parse_cell_id(str(p)) for p in raw_peers]
    timeout = req.get("timeout")
    if timeout is not None:
        timeout = float(timeout)
        if not 0 < timeout <= MAX_FETCH_TIMEOUT:
            raise ValueError(f"timeout must be between 0 and {MAX_FETCH_TIMEOUT:g} seconds")
    return blob_id, path, peers, timeout


async def blob_streaming_op(
    node: Node, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve `blob_fetch` on a control connection (it ends with the final line)."""
    try:
        blob_id, path, peers, timeout = _request(req)
    except (ValueError, KeyError, TypeError) as exc:
        await _reply(writer, {"ok": False, "error": f"bad request: {exc}", "kind": "bad_request"})
        return
    latest: list[FetchProgress] = []

    def on_progress(p: FetchProgress) -> None:
        latest[:] = [p]  # only the newest matters: lines go out at most every 100 ms

    task = asyncio.create_task(
        node.blobs.fetch(blob_id, peers, progress=on_progress, timeout=timeout, output=path)
    )
    # The client sends nothing more; EOF on its side means it went away: cancel then.
    hangup = asyncio.create_task(reader.read(1))
    last: int | None = None
    try:
        while True:
            done, _ = await asyncio.wait(
                {task, hangup}, timeout=PROGRESS_INTERVAL, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                break
            if hangup in done:
                return  # nobody left to answer; `finally` cancels the fetch
            if latest and latest[0].bytes_done != last:
                p = latest[0]
                last = p.bytes_done
                await _reply(
                    writer, {"phase": "fetching", "progress": p.bytes_done, "total": p.bytes_total}
                )
        try:
            result = task.result()
        except BlobFetchError as exc:
            await _reply(writer, {"ok": False, "error": str(exc), "kind": "not_found"})
        except PeerUnreachableError as exc:
            await _reply(writer, {"ok": False, "error": str(exc), "kind": "unreachable"})
        except (ValueError, TypeError) as exc:
            await _reply(
                writer, {"ok": False, "error": f"bad request: {exc}", "kind": "bad_request"}
            )
        except (CellmeshError, OSError) as exc:
            await _reply(writer, {"ok": False, "error": str(exc), "kind": "error"})
        else:
            await _reply(writer, {"ok": True, "result": result.as_json()})
    finally:
        for t in (task, hangup):
            t.cancel()
        await asyncio.gather(task, hangup, return_exceptions=True)
