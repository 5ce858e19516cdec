"""`cellmesh.connect(home)`: the state layer from Python, through a daemon or an embedded node.

```python
async with cellmesh.connect("~/.cellmesh") as node:
    await node.publish("chat/room", "hello")
    async for ev in node.subscribe("chat/room"):
        print(ev.author, ev.data)
```

`connect` yields one `StateConnection` whatever runs the node:

* **daemon**: a `cellmesh node` process already serves this home (its control socket answers):
  every method is a control-API request (`cellmesh.node.state_control` ops) over that socket;
* **embedded**: nothing serves the home (or ``embedded=True``): a `Node` is started in this
  process from the home's keystore and config.toml, exactly as `cellmesh node` builds it
  (control socket and transfer service included, so the CLI can reach it and a second node
  cannot open the same database), and stopped when the block ends.

Both modes run the very same requests: the embedded mode hands them to the control-op handlers
in-process instead of writing them to a socket, so answers, limits and errors are identical.
Control errors become cellmesh exceptions: `ControlError` (bad request, no database, no node),
`PeerUnreachableError`, `AccessDeniedError`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Protocol

from cellmesh.errors import ControlError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.node.control import ControlClient, ControlServer
from cellmesh.node.home import NodeHome
from cellmesh.node.node import Node, env_snapshot
from cellmesh.node.state_control import MAX_LOG_EVENTS, state_op
from cellmesh.node.transfer import TransferService

__all__ = [
    "FoldResult",
    "PublishResult",
    "QueryResult",
    "StateConnection",
    "StateEvent",
    "Subscription",
    "VerifyProblem",
    "VerifyReport",
    "connect",
]

Mode = Literal["daemon", "embedded"]
PROBE_TIMEOUT: Final = 5.0
"""Seconds a control socket may take to answer `status` before it counts as not answering."""
WAIT_SLICE: Final = 30.0
"""Seconds one `sub_recv` request waits for the next event; a subscription repeats it."""


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class StateEvent:
    """One delivered event of a channel's log."""

    id: str
    """Event id, 64 hex digits."""
    position: int
    """Log position in this node's store: increases in delivery order (shared by its channels,
    so one channel's positions may have gaps)."""
    channel: str
    author: str
    """CellID of the author, 32 hex digits."""
    seq: int
    """The author's sequence number on the channel (from 1)."""
    clock: int
    """Lamport clock: orders causally related events; concurrent ones may share it."""
    timestamp: datetime.datetime
    """The author's wall clock when it signed the event (UTC; for display, never for order)."""
    data: bytes
    prev: str
    """Id of the author's previous event on the channel (64 zeros for seq 1)."""
    horizon: tuple[tuple[str, int], ...]
    """(author, seq) pairs the author had seen from others when it signed."""

    @property
    def text(self) -> str:
        """`data` as UTF-8 (undecodable bytes as backslash escapes)."""
        return self.data.decode("utf-8", "backslashreplace")

    @classmethod
    def from_json(cls, ev: Mapping[str, Any]) -> StateEvent:
        """From the control API's event object (`state_control.event_json`)."""
        return cls(
            id=str(ev["id"]),
            position=int(ev["position"]),
            channel=str(ev["channel"]),
            author=str(ev["author"]),
            seq=int(ev["seq"]),
            clock=int(ev["clock"]),
            timestamp=datetime.datetime.fromtimestamp(int(ev["timestamp_ms"]) / 1000, datetime.UTC),
            data=base64.b64decode(str(ev["data_b64"])),
            prev=str(ev["prev"]),
            horizon=tuple((str(a), int(s)) for a, s in ev.get("horizon", ())),
        )


@dataclass(frozen=True, slots=True)
class PublishResult:
    """A published event: signed, durably stored (fsynced) and sent to the live peers."""

    id: str
    seq: int
    position: int
    sent_to: int
    """How many live peers it was sent to (0: it is only in this node's log for now)."""


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    kind: str
    detail: str
    event_id: str | None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What re-checking a channel's stored events found (`problems` empty: sound)."""

    events: int
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class FoldResult:
    """A fold's state over this node's log of the channel."""

    channel: str
    fold: str
    key: str | None
    value: Any
    """The fold's view (counter: the sum; lww and latest: a map; set: a list), or with `key`
    that key's value (None when absent; a set: whether it holds it)."""
    position: int
    """The log position the value reflects."""
    events: int
    """How many events the fold has applied."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    """A fold's value gathered from the replicas of the channel."""

    channel: str
    fold: str
    key: str | None
    value: Any
    """The merged value, shaped like `FoldResult.value`."""
    answered: tuple[str, ...]
    """CellIDs of the replicas that answered in time."""
    timed_out: tuple[str, ...]
    refused: dict[str, str]
    """CellID -> reason, for replicas that refused the query."""
    replicas: int
    """States merged: this node's plus those of `answered`."""
    strategy: str | None
    """How they were merged: ``stamp`` (entry by entry) or ``most_events`` (one replica's)."""


def _need(reply: Any, *keys: str) -> dict[str, Any]:
    """`reply` as a dict holding `keys`, or ControlError naming what is missing (a node that
    speaks another version of the control API)."""
    if not isinstance(reply, dict):
        raise ControlError(f"the node answered {type(reply).__name__}, expected an object")
    missing = [k for k in keys if k not in reply]
    if missing:
        raise ControlError(f"the node's answer lacks {', '.join(missing)}")
    return reply


# ------------------------------------------------------------------------------ transports


class _Backend(Protocol):
    async def call(self, op: str, **args: Any) -> Any: ...

    async def open_stream(self) -> _Backend:
        """A backend for one long wait (`sub_recv`) that must not hold up other requests."""
        ...

    async def close(self) -> None: ...


class _DaemonBackend:
    """Requests over one control-socket connection, one at a time (replies are not tagged, so
    two tasks sharing the connection must not interleave their request and reply lines)."""

    def __init__(self, client: ControlClient) -> None:
        self._client = client
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, home: NodeHome) -> _DaemonBackend:
        client = ControlClient(home.control_socket_path)
        await client.__aenter__()
        return cls(client)

    async def call(self, op: str, **args: Any) -> Any:
        async with self._lock:
            try:
                return await self._client.call(op, **args)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                raise ControlError(f"lost the connection to the node: {exc}") from exc

    async def open_stream(self) -> _Backend:
        return await self.open(NodeHome(self._client.path.parent))

    async def close(self) -> None:
        await self._client.__aexit__(None, None, None)


class _EmbeddedBackend:
    """Requests served in-process by the same handler the control socket uses, with its
    exceptions turned into what `ControlClient.call` raises for the same answer."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def call(self, op: str, **args: Any) -> Any:
        try:
            return await state_op(self._node, {"op": op, **args})
        except (ValueError, TypeError, KeyError) as exc:
            raise ControlError(f"bad request: {exc}") from exc

    async def open_stream(self) -> _Backend:
        return self  # nothing to share: every call is its own coroutine

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------------------ the API


class Subscription:
    """The events of one channel as they are delivered to the node's log, forever (until the
    connection closes or `close()`).

    `async with node.subscribe(ch) as sub:` fixes the starting point on entry (so an event
    published inside the block is never missed) and releases the subscription on exit;
    `async for ev in node.subscribe(ch)` starts at its first step (over a daemon it then holds
    a control connection of its own until `close()` or the end of the `connect` block). With
    ``from_start=True`` the events already held come first.
    """

    def __init__(self, conn: StateConnection, channel: str, from_start: bool) -> None:
        self._conn = conn
        self.channel = channel
        self._after: int | None = 0 if from_start else None
        self._backend: _Backend | None = None
        self._closed = False
        self._wait: asyncio.Future[Any] | None = None
        """The pending `sub_recv` request, which `close()` cancels."""

    async def start(self) -> Subscription:
        """Fix the starting point now (the end of the log, unless `from_start`)."""
        if self._closed:
            raise ControlError(f"the subscription to {self.channel} is closed")
        if self._backend is None:
            self._conn._check_open()
            self._backend = await self._conn._backend.open_stream()
            self._conn._subscriptions.add(self)
            if self._after is None:
                # `log` answers the current end of the log; one event at most travels with it.
                r = _need(
                    await self._backend.call("log", channel=self.channel, after=0, limit=1),
                    "last_position",
                )
                self._after = int(r["last_position"])
        return self

    async def __aenter__(self) -> Subscription:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> StateEvent:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        assert self._backend is not None
        while not self._closed and not self._conn.closed:
            # The wait runs as a task of its own so that `close()` can end it: over an
            # embedded node nothing else would (the backend is shared, there is no connection
            # of ours to cut), and the wait lasts up to WAIT_SLICE.
            wait = asyncio.ensure_future(
                self._backend.call(
                    "sub_recv", channel=self.channel, after=self._after, timeout=WAIT_SLICE
                )
            )
            self._wait = wait
            try:
                await asyncio.wait((wait,))
            except asyncio.CancelledError:
                wait.cancel()  # our caller gave up: so does the request
                raise
            finally:
                self._wait = None
            if self._closed or self._conn.closed:
                # Closed meanwhile: an event the wait may still have got is not returned.
                if not wait.cancelled():
                    wait.exception()  # retrieved, so never logged as unhandled
                break
            if wait.cancelled():  # pragma: no cover - only close() cancels it, handled above
                raise ControlError(f"the subscription to {self.channel} was interrupted")
            r = _need(wait.result(), "event")
            if r["event"] is None:
                continue  # nothing within the slice (or the embedded node is stopping)
            ev = StateEvent.from_json(r["event"])
            # The next request starts after this event: whatever is delivered meanwhile
            # waits in the log for it, so nothing is missed between two requests.
            self._after = ev.position
            return ev
        await self.close()
        raise StopAsyncIteration

    async def close(self) -> None:
        """End the subscription (a pending `__anext__` ends the iteration)."""
        if self._closed:
            return
        self._closed = True
        self._conn._subscriptions.discard(self)
        if self._wait is not None:
            self._wait.cancel()  # a pending `__anext__` wakes up, sees the flag and stops
        backend, self._backend = self._backend, None
        if backend is not None and backend is not self._conn._backend:
            await backend.close()


class StateConnection:
    """The state layer of the node serving a home: publish, subscribe, read, verify, fold and
    query channel logs. Obtain it with `cellmesh.connect(home)`."""

    def __init__(
        self,
        home: NodeHome,
        mode: Mode,
        backend: _Backend,
        cell_id: str,
        node: Node | None = None,
    ) -> None:
        self.home = home
        self.mode: Mode = mode
        """"daemon": requests go to a `cellmesh node` process; "embedded": to `node`."""
        self.cell_id = cell_id
        """This node's CellID (32 hex digits): the author of what `publish` signs."""
        self.node = node
        """The embedded `Node` (None over a daemon)."""
        self._backend = backend
        self._subscriptions: set[Subscription] = set()
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise ControlError("this cellmesh connection is closed")

    async def _call(self, op: str, **args: Any) -> Any:
        self._check_open()
        return await self._backend.call(op, **args)

    async def publish(self, channel: str, data: bytes | str) -> PublishResult:
        """Sign an event with `data` (a str is sent as UTF-8; at most 64 KiB) on `channel`,
        store it durably (returns after the fsync), and send it to the live peers."""
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        r = _need(
            await self._call(
                "pub", channel=channel, data_b64=base64.b64encode(payload).decode("ascii")
            ),
            "id",
            "seq",
            "position",
            "sent_to",
        )
        return PublishResult(str(r["id"]), int(r["seq"]), int(r["position"]), int(r["sent_to"]))

    def subscribe(self, channel: str, from_start: bool = False) -> Subscription:
        """Events of `channel` as they enter the node's log (its own and its peers'); with
        `from_start` the events already held first. See `Subscription` for when it starts."""
        return Subscription(self, channel, from_start)

    async def log(self, channel: str, after: int = 0) -> list[StateEvent]:
        """The delivered events of `channel` after position `after`, in log (causal) order."""
        out: list[StateEvent] = []
        while True:
            r = _need(
                await self._call("log", channel=channel, after=after, limit=MAX_LOG_EVENTS),
                "events",
                "last_position",
            )
            page = [StateEvent.from_json(ev) for ev in r["events"]]
            out.extend(page)
            if not page:
                return out
            after = page[-1].position
            if after >= int(r["last_position"]):
                return out

    async def verify(self, channel: str) -> VerifyReport:
        """Re-check every stored event of `channel`: ids, signatures, hash chains, clocks."""
        r = _need(await self._call("log_verify", channel=channel), "events", "problems")
        problems = tuple(
            VerifyProblem(
                str(p["kind"]),
                str(p["detail"]),
                None if p.get("event_id") is None else str(p["event_id"]),
            )
            for p in r["problems"]
        )
        return VerifyReport(int(r["events"]), problems)

    async def fold(self, channel: str, name: str, key: str | None = None) -> FoldResult:
        """The value of fold `name` over this node's log of `channel` (of `key` only, when
        given), brought up to date with every event delivered so far. Built-ins on every
        channel: ``counter``, ``lww``, ``set``, ``latest`` (docs/state.md)."""
        r = _need(
            await self._call("fold", channel=channel, fold=name, key=key),
            "value",
            "position",
            "events",
        )
        return FoldResult(
            str(r.get("channel", channel)),
            str(r.get("fold", name)),
            key,
            r["value"],
            int(r["position"]),
            int(r["events"]),
        )

    async def query(
        self,
        channel: str,
        name: str,
        key: str | None = None,
        timeout: float = 2.0,  # noqa: ASYNC109 - the node's deadline for the replicas' answers
    ) -> QueryResult:
        """Fold `name` of `channel` merged over this node and every peer holding the channel
        (its subscribers here, the hosts it subscribes or publishes to), asked over the mesh;
        waits up to `timeout` seconds for their answers."""
        r = _need(
            await self._call("query", channel=channel, fold=name, key=key, timeout=timeout),
            "value",
            "answered",
            "timed_out",
            "refused",
            "replicas",
        )
        return QueryResult(
            str(r.get("channel", channel)),
            str(r.get("fold", name)),
            key,
            r["value"],
            tuple(str(c) for c in r["answered"]),
            tuple(str(c) for c in r["timed_out"]),
            {str(k): str(v) for k, v in dict(r["refused"]).items()},
            int(r["replicas"]),
            None if r.get("strategy") is None else str(r["strategy"]),
        )

    async def status(self) -> dict[str, Any]:
        """The database path, per-channel sizes and the state counters of the node."""
        r: dict[str, Any] = _need(await self._call("state"))
        return r

    async def close(self) -> None:
        """End every subscription and release the connection (the context manager does it;
        it also stops an embedded node)."""
        if self.closed:
            return
        self.closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        await self._backend.close()


# ------------------------------------------------------------------------------ connect


async def _probe_daemon(home: NodeHome) -> tuple[_DaemonBackend, str] | None:
    """A connection to the daemon serving `home` and its CellID, or None when nothing answers
    there."""
    if not home.control_socket_path.exists():
        return None
    try:
        backend = await _DaemonBackend.open(home)
    except ControlError:
        return None  # a stale socket left by a killed node, or no permission
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            status = _need(await backend.call("status"), "cell_id")
    except (ControlError, TimeoutError):
        await backend.close()
        return None
    return backend, str(status["cell_id"])


def _no_daemon(home: NodeHome) -> ControlError:
    return ControlError(
        f"no node is running for {home.path} (nothing answers at {home.control_socket_path}); "
        f"start one with: cellmesh --home {home.path} node, or connect with embedded=True"
    )


@contextlib.asynccontextmanager
async def _embedded(
    home: NodeHome, passphrase: bytes | None, env: Mapping[str, str]
) -> AsyncIterator[StateConnection]:
    """The node `cellmesh node` would run on `home`, in this process, for the block."""
    config = home.load_config(env)
    identity = home.load_identity(
        passphrase if passphrase is not None else NodeHome.read_passphrase(None, env)
    )
    node = Node(identity, config)
    transfers = TransferService(node, home.inbox_path)
    server = ControlServer(node, home.control_socket_path, transfers)
    # The socket first, as `cellmesh node` does: it refuses when another node serves this home,
    # so two processes never write the same database.
    try:
        await server.start()
    except ControlError as exc:
        raise ControlError(f"{exc}; connect with embedded=False to use that node") from exc
    try:
        await transfers.start()
        await node.start()
        conn = StateConnection(
            home, "embedded", _EmbeddedBackend(node), format_cell_id(node.cell_id), node
        )
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        await transfers.stop()
        await server.stop()
        await node.stop()


@contextlib.asynccontextmanager
async def connect(
    home: str | os.PathLike[str] | NodeHome | None = None,
    *,
    embedded: bool | None = None,
    passphrase: bytes | None = None,
) -> AsyncIterator[StateConnection]:
    """The state layer of the node of `home` (default: $CELLMESH_HOME, else ~/.cellmesh).

    ``embedded=None``: the daemon serving `home` when one answers, else an embedded node started
    from `home` for the duration of the block. ``embedded=False``: the daemon or `ControlError`
    saying how to start one. ``embedded=True``: always embedded (`ControlError` when a daemon
    serves the home: one node per home). The embedded node's keystore passphrase is
    `passphrase`, else $CELLMESH_PASSPHRASE. Raises `KeystoreError`/`ConfigError` when the home
    cannot run a node.
    """
    env = env_snapshot()
    if isinstance(home, NodeHome):
        node_home = home
    else:
        node_home = NodeHome.resolve(None if home is None else os.fspath(home), env)
    if embedded is not True:
        daemon = await _probe_daemon(node_home)
        if daemon is not None:
            conn = StateConnection(node_home, "daemon", *daemon)
            try:
                yield conn
            finally:
                await conn.close()
            return
        if embedded is False:
            raise _no_daemon(node_home)
    async with _embedded(node_home, passphrase, env) as conn:
        yield conn
