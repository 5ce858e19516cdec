"""The local control API: newline-delimited JSON over a Unix socket in the node's home (mode 0600).

Request:  {"op": "peers"}                 one JSON object per line, at most 64 KiB
Response: {"ok": true, "result": ...}     or {"ok": false, "error": "one-line message", "kind": "..."}

Operations: `status`, `peers`, `ping` {cell_id, timeout, size}, `connect` {address, timeout}.
Only the owner of the home directory can reach the socket; the API never returns key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from cellmesh.errors import ControlError, PeerUnreachableError
from cellmesh.node.node import Node, peer_dict

log = logging.getLogger("cellmesh.control")
MAX_LINE = 64 * 1024


def _socket_in_use(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


class ControlServer:
    """Serves the control API of one `Node`."""

    def __init__(self, node: Node, path: Path) -> None:
        self.node = node
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Create the socket (refusing if another node already serves this home)."""
        if self.path.exists():
            if _socket_in_use(self.path):
                raise ControlError(
                    f"another node is already running with this home ({self.path} is live)"
                )
            self.path.unlink()  # stale socket left by a node that was killed
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """Close the socket and remove its file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(
                        writer, {"ok": False, "error": "request too long", "kind": "bad_request"}
                    )
                    return
                if not line:
                    return
                reply = await self._serve_line(line)
                await self._reply(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    async def _serve_line(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON", "kind": "bad_request"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "request needs an 'op' string", "kind": "bad_request"}
        try:
            return {"ok": True, "result": await self._op(req)}
        except PeerUnreachableError as exc:
            return {"ok": False, "error": str(exc), "kind": "unreachable"}
        except (ValueError, TypeError, KeyError) as exc:
            return {"ok": False, "error": f"bad request: {exc}", "kind": "bad_request"}

    async def _op(self, req: dict[str, Any]) -> Any:
        op = req["op"]
        node = self.node
        if op == "status":
            return node.status()
        if op == "peers":
            return [peer_dict(p) for p in node.peers()]
        if op == "ping":
            timeout = float(req.get("timeout", 2.0))
            size = int(req.get("size", 0))
            if not 0 <= size <= 60000:
                raise ValueError("size must be between 0 and 60000")
            if not 0 < timeout <= 300:
                raise ValueError("timeout must be between 0 and 300 seconds")
            rtt = await node.ping(str(req["cell_id"]), timeout=timeout, data=bytes(size))
            return {"rtt": rtt}
        if op == "connect":
            cell = await node.connect(str(req["address"]), timeout=float(req.get("timeout", 5.0)))
            return {"cell_id": cell.hex()}
        raise ValueError(f"unknown op {op!r}")


class ControlClient:
    """Talks to a running node's control socket. `async with ControlClient(path) as c: ...`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ControlClient:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                str(self.path), limit=16 * 1024 * 1024
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            home = self.path.parent
            raise ControlError(
                f"no node is running for {home} (nothing answers at {self.path}); "
                f"start one with: cellmesh --home {home} node"
            ) from exc
        except PermissionError as exc:
            raise ControlError(f"permission denied on {self.path}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    async def call(self, op: str, **args: Any) -> Any:
        """Send one request; return its result or raise ControlError/PeerUnreachableError."""
        if self._reader is None or self._writer is None:
            raise ControlError("client is not connected")
        self._writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await self._writer.drain()
        line = await self._reader.readline()
        if not line:
            raise ControlError("the node closed the control connection")
        reply = json.loads(line)
        if reply.get("ok"):
            return reply.get("result")
        if reply.get("kind") == "unreachable":
            raise PeerUnreachableError(str(reply.get("error")))
        raise ControlError(str(reply.get("error")))
