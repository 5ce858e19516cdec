"""`NodeFolds`: folds over a node's channel logs, and federated fold queries between peers.

Theory of operation
-------------------
Reach it as ``node.state.folds``. It wraps a `FoldEngine` over ``node.state.store`` (fold
states persist in the log's SQLite file, with the log position they reflect).

Folds. The built-ins are addressable on every channel by name, with no registration: the
engine registers them on a channel the first time they are used there (`BUILTIN_FOLDS`):
``counter`` (`Counter`), ``lww`` (`LwwMap`), ``set`` (`LwwSet`), ``latest`` (`LatestPerKey`,
records keyed by their ``key`` member). Python code registers its own folds per channel with
`register`. `read` brings a fold up to date with the log and returns its value (or one key's)
with the log position and event count it reflects.

Queries (NetDB). `query` evaluates the fold here and asks, concurrently and under one deadline,
every peer that holds the channel from our point of view: peers subscribed to a channel we host,
hosts we subscribed to, hosts that let us publish into it. Each request is one stream of kind
``query`` (`cellmesh.node.services`): the request is the stream's header line, our half is then
finished, and the peer writes one answer line and finishes its half (byte format: docs/wire.md,
"Fold queries"). The answers are merged by `cellmesh.state.query.merge` (entry by entry by stamp
for map, set and latest; the most complete replica for a counter or a user fold), and the
result says which peers answered, timed out or refused (and why).

Answering. A peer gets an answer only when it is entitled to read the channel: it subscribed to
the channel here, or this node subscribed to that channel at it or publishes into it there.
Everything about a request is bounded: the header (services: 4096 bytes), the key and fold name
lengths, the wait for the end of the request (`REQUEST_TIMEOUT`), the answer (`MAX_ANSWER`, the
state truncated to fit). The header is checked (fields, entitlement) before that wait, so a
peer not entitled is refused at once instead of holding a handler. A malformed request gets a
refusal line (``malformed``) and is counted; one that never ends is dropped and counted
(``dropped_incomplete``). Once the node's state layer closes (`close`), queries are no longer
served, and a handler still waiting answers ``unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from cellmesh.errors import CellmeshError, DecodeError, LocalProtocolError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.identity.tokens import validate_channel
from cellmesh.state.folds import (
    Counter,
    Fold,
    FoldEngine,
    FoldError,
    LatestPerKey,
    LwwMap,
    LwwSet,
)
from cellmesh.state.log import StoreError
from cellmesh.state.query import (
    MAX_ANSWER,
    MAX_FOLD_NAME,
    MAX_KEY,
    Answer,
    Refusal,
    decode_answer,
    encode_answer,
    encode_refusal,
    fold_kind,
    merge,
    select_key,
    view,
)

if TYPE_CHECKING:
    from cellmesh.node.node import Node
    from cellmesh.node.store_sqlite import SqliteLogStore
    from cellmesh.node.streams import Stream

__all__ = [
    "BUILTIN_FOLDS",
    "QUERY_KIND",
    "REQUEST_TIMEOUT",
    "FoldValue",
    "NodeFolds",
    "QueryResult",
]

log = logging.getLogger("cellmesh.state.folds")

QUERY_KIND: Final = "query"
"""The stream kind of a fold query (`cellmesh.node.services`)."""
REQUEST_TIMEOUT: Final = 5.0
"""Seconds a responder waits for the end of a request after its header."""
MAX_QUERY_TIMEOUT: Final = 60.0
"""Longest deadline a query may ask for."""
ANSWER_SLACK: Final = 64
"""Bytes a reader accepts beyond `MAX_ANSWER` before calling an answer oversized."""

BUILTIN_FOLDS: Final[dict[str, Callable[[], Fold]]] = {
    "counter": Counter,
    "lww": lambda: LwwMap(name="lww"),
    "set": LwwSet,
    "latest": LatestPerKey,
}
"""Folds every channel has without registration, by the name they are addressed with."""


@dataclass(frozen=True, slots=True)
class FoldValue:
    """A fold's value on this node (`NodeFolds.read`)."""

    channel: str
    fold: str
    key: str | None
    value: Any
    """The fold's view (counter: the sum; lww and latest: a map; set: a list; a user fold: its
    state); with `key`, that key's value (None when absent; a set: whether it holds it)."""
    position: int
    """The log position of the last event the value reflects (0: none)."""
    events: int
    """How many events the fold applied."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    """The merged answer of a federated query (`NodeFolds.query`)."""

    channel: str
    fold: str
    key: str | None
    value: Any
    """The merged value, shaped like `FoldValue.value`."""
    answered: list[str]
    """Peers (CellID hex) whose answer went into `value`, sorted."""
    timed_out: list[str]
    """Peers that had not answered when the deadline passed."""
    refused: dict[str, str]
    """Peer -> reason word: the peer refused (``not_entitled``, ``unknown_fold``, ...), could
    not be reached (``unreachable``), answered garbage (``bad_answer``, ``oversized_answer``)
    or answered with another kind of fold (``fold_mismatch``)."""
    replicas: int
    """States merged: this node's plus `answered`."""
    strategy: str
    """``stamp`` (merged entry by entry) or ``most_events`` (one replica's answer taken)."""
    chosen: str | None
    """With ``most_events``: ``local`` or the peer whose answer was taken."""
    truncated: list[str] = field(default_factory=list)
    """Peers whose answer was cut to `MAX_ANSWER` (the merged value may lack their entries)."""
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    """``local``/peer -> {"position", "events"} of each merged replica."""

    def to_json(self) -> dict[str, Any]:
        """The control API's answer to ``query``."""
        return {
            "channel": self.channel,
            "fold": self.fold,
            "key": self.key,
            "value": self.value,
            "answered": self.answered,
            "timed_out": self.timed_out,
            "refused": self.refused,
            "replicas": self.replicas,
            "strategy": self.strategy,
            "chosen": self.chosen,
            "truncated": self.truncated,
            "sources": self.sources,
        }


def _check_request(channel: object, fold: object, key: object) -> str | None:
    """Why a query's fields are unacceptable, or None."""
    if not isinstance(channel, str):
        return "channel must be a string"
    try:
        validate_channel(channel)
    except ValueError as exc:
        return str(exc)
    if not isinstance(fold, str) or not 0 < len(fold) <= MAX_FOLD_NAME:
        return f"fold must be a name of 1 to {MAX_FOLD_NAME} characters"
    if key is not None and (not isinstance(key, str) or len(key) > MAX_KEY):
        return f"key must be null or a string of at most {MAX_KEY} characters"
    return None


def _usable(answer: Answer, key: str | None) -> bool:
    """Can `answer` be merged and viewed on its own without failing. `decode_answer` checks
    the structure it knows of, but a peer's answer is hostile input: whatever else about it
    breaks the merge or the view must cost that peer's answer, never the asker's query. The
    views work entry by entry, so answers usable one by one are usable merged together."""
    try:
        view(answer.kind, merge(answer.kind, {"peer": answer}).state, key)
    except Exception:  # any failure on hostile input refuses that answer alone
        log.debug("unusable %s answer", answer.kind, exc_info=True)
        return False
    return True


class NodeFolds:
    """Folds over this node's channel logs and federated queries. Reach it as
    ``node.state.folds``."""

    def __init__(self, node: Node, store: SqliteLogStore) -> None:
        self._node = node
        self.engine = FoldEngine(store, store)
        self._folds: dict[tuple[str, str], Fold] = {}
        self.counters: Tally[str] = Tally()
        """served, refused_<reason>, dropped_<why>, asked, answers, timeouts."""
        self._closed = False
        node.services.register(QUERY_KIND, self._serve)

    def close(self) -> None:
        """Stop answering queries (the node's state layer closes; the store goes next): new
        query streams are no longer routed here, and a handler still waiting for its request
        answers ``unavailable`` instead of reading the closed store."""
        if self._closed:
            return
        self._closed = True
        self._node.services.unregister(QUERY_KIND)

    # ------------------------------------------------------------------ local folds

    def register(self, channel: str, fold: Fold) -> None:
        """Maintain `fold` over `channel` under `fold.name`, queryable like the built-ins
        (peers answer only if they registered a fold of that name too). Raises `FoldError`
        when the name is a built-in's or already registered there."""
        if fold.name in BUILTIN_FOLDS:
            raise FoldError(f"{fold.name!r} is a built-in fold name")
        self.engine.register(channel, fold)
        self._folds[(channel, fold.name)] = fold

    def known(self, channel: str, name: str) -> bool:
        """True when `name` is a built-in or registered on `channel`."""
        return name in BUILTIN_FOLDS or (channel, name) in self._folds

    def _fold(self, channel: str, name: str) -> Fold:
        """The fold `name` of `channel`, registering a built-in on first use."""
        validate_channel(channel)
        fold = self._folds.get((channel, name))
        if fold is None:
            make = BUILTIN_FOLDS.get(name)
            if make is None:
                raise FoldError(
                    f"no fold {name!r} on {channel!r} (built-ins: {', '.join(BUILTIN_FOLDS)})"
                )
            fold = make()
            self.engine.register(channel, fold)
            self._folds[(channel, name)] = fold
        return fold

    def _answer(self, channel: str, name: str, key: str | None) -> Answer:
        """This node's answer: the fold brought up to date, restricted to `key`."""
        fold = self._fold(channel, name)
        kind = fold_kind(fold)
        current = self.engine.update(channel, name)
        state = select_key(kind, current.state, key)
        return Answer(kind, fold.version, current.position, current.events, state)

    def read(self, channel: str, fold: str, key: str | None = None) -> FoldValue:
        """The value of `fold` on `channel` as this node's log gives it, brought up to date.

        Raises `FoldError` for an unknown fold or a key on a fold without keys, ValueError for
        a bad channel name, `StoreError` when the database fails.
        """
        problem = _check_request(channel, fold, key)
        if problem is not None:
            raise ValueError(problem)
        a = self._answer(channel, fold, key)
        return FoldValue(channel, fold, key, view(a.kind, a.state, key), a.position, a.events)

    # ------------------------------------------------------------------ who holds a channel

    def holders(self, channel: str) -> list[bytes]:
        """Peers that hold `channel` from our point of view: subscribers of it here, hosts we
        subscribed to it at, hosts that let us publish into it. Sorted, without duplicates."""
        service = self._node.channels.service
        peers = {peer for ch, peer in service.subscribers() if ch == channel}
        peers.update(peer for peer, ch in service.subscriptions() if ch == channel)
        peers.update(peer for peer, ch in service.publish_grants_held() if ch == channel)
        peers.discard(self._node.cell_id)
        return sorted(peers)

    def entitled(self, peer: bytes, channel: str) -> bool:
        """May `peer` read `channel` from us: it subscribed to it here, or we subscribed to it
        at the peer or publish into it there."""
        service = self._node.channels.service
        return (
            any(ch == channel and p == peer for ch, p in service.subscribers())
            or (peer, channel) in service.subscriptions()
            or (peer, channel) in service.publish_grants_held()
        )

    # ------------------------------------------------------------------ asking

    async def query(
        self,
        channel: str,
        fold: str,
        key: str | None = None,
        timeout: float = 2.0,  # noqa: ASYNC109 - one deadline shared by every peer's answer
        peers: Iterable[bytes] | None = None,
    ) -> QueryResult:
        """Evaluate `fold` (optionally one `key`) here and at every peer holding `channel`
        (`holders`, or `peers`), concurrently, and merge the answers.

        At most `timeout` seconds are spent waiting for peers (one deadline for all); peers
        still silent then are listed in `timed_out`. Raises like `read` when the fold or key is
        unusable here (nothing is sent then), ValueError for a timeout outside (0, 60].
        """
        if not 0 < timeout <= MAX_QUERY_TIMEOUT:
            raise ValueError(f"timeout must be between 0 and {MAX_QUERY_TIMEOUT:g} seconds")
        problem = _check_request(channel, fold, key)
        if problem is not None:
            raise ValueError(problem)
        local = self._answer(channel, fold, key)
        me = self._node.cell_id
        targets = sorted({bytes(p) for p in (self.holders(channel) if peers is None else peers)})
        targets = [p for p in targets if p != me]
        tasks = {
            asyncio.ensure_future(self._ask(p, channel, fold, key, timeout)): p for p in targets
        }
        self.counters["asked"] += len(tasks)
        done: set[asyncio.Task[Answer | Refusal]] = set()
        try:
            if tasks:
                done, _ = await asyncio.wait(tasks, timeout=timeout)
        finally:
            # Past the deadline, or if this call itself is cancelled: no request outlives it
            # (their streams are reset).
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        answers: dict[str, Answer] = {"local": local}
        refused: dict[str, str] = {}
        timed_out: list[str] = []
        for task, peer in tasks.items():
            label = format_cell_id(peer)
            if task not in done or task.cancelled():
                timed_out.append(label)
                self.counters["timeouts"] += 1
                continue
            reply = task.result()
            if isinstance(reply, Refusal):
                refused[label] = reply.reason
            elif reply.kind != local.kind or reply.version != local.version:
                refused[label] = "fold_mismatch"
            elif not _usable(reply, key):
                refused[label] = "bad_answer"
            else:
                answers[label] = reply
                self.counters["answers"] += 1
        merged = merge(local.kind, answers)
        return QueryResult(
            channel=channel,
            fold=fold,
            key=key,
            value=view(local.kind, merged.state, key),
            answered=sorted(label for label in answers if label != "local"),
            timed_out=sorted(timed_out),
            refused=dict(sorted(refused.items())),
            replicas=len(answers),
            strategy=merged.strategy,
            chosen=merged.chosen,
            truncated=sorted(label for label, a in answers.items() if a.truncated),
            sources={
                label: {"position": a.position, "events": a.events}
                for label, a in sorted(answers.items())
            },
        )

    async def _ask(
        self,
        peer: bytes,
        channel: str,
        fold: str,
        key: str | None,
        timeout: float,  # noqa: ASYNC109 - bounds connecting; `query` bounds the whole
    ) -> Answer | Refusal:
        """One peer's answer; failures become refusals (`query` cancels this at the deadline)."""
        stream: Stream | None = None
        try:
            stream = await self._node.services.open(
                peer, QUERY_KIND, timeout=timeout, channel=channel, fold=fold, key=key
            )
            await stream.close()  # the request is the header alone
            data = await stream.read_all(MAX_ANSWER + ANSWER_SLACK)
            return decode_answer(data)
        except ValueError as exc:  # the header would exceed the services' bound
            return Refusal("request_too_large", str(exc))
        except LocalProtocolError as exc:
            # read_all's bound: the peer sent more than any answer may hold.
            if stream is not None:
                with contextlib.suppress(CellmeshError):
                    stream.reset()
            return Refusal("oversized_answer", str(exc))
        except DecodeError as exc:
            return Refusal("bad_answer", str(exc))
        except CellmeshError as exc:  # reset by the peer, session gone, connect failed
            return Refusal("unreachable", str(exc))
        except asyncio.CancelledError:
            if stream is not None:
                with contextlib.suppress(CellmeshError):
                    stream.reset()
            raise

    # ------------------------------------------------------------------ answering

    def _refuse(self, reason: str, detail: str = "") -> bytes:
        self.counters[f"refused_{reason}"] += 1
        return encode_refusal(reason, detail)

    async def _serve(self, stream: Stream, header: dict[str, Any]) -> None:
        """Answer one query stream (the header is the request)."""
        # Everything decidable from the header alone is decided before waiting for the end of
        # the request: a peer that may not read the channel (or sends a malformed header) is
        # refused at once, and so cannot hold a handler slot for REQUEST_TIMEOUT.
        line = self._check_header(stream.cell_id, header)
        if line is None:
            # The request ends with the requester finishing its half: wait for that, bounded,
            # so a request with a body (not part of the protocol) is refused, not ignored.
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    extra = await stream.read(1)
            except TimeoutError:
                self.counters["dropped_incomplete"] += 1
                stream.reset()
                return
            if extra:
                line = self._refuse("malformed", "a query request is its header alone")
            else:
                line = self._answer_line(header)
        await stream.write(line)
        await stream.close()

    def _check_header(self, peer: bytes, header: dict[str, Any]) -> bytes | None:
        """The refusal line for a request refused on its header alone, else None."""
        if self._closed:
            return self._refuse("unavailable", "this node is stopping")
        channel, fold, key = header.get("channel"), header.get("fold"), header.get("key")
        problem = _check_request(channel, fold, key)
        if problem is not None:
            return self._refuse("malformed", problem)
        assert isinstance(channel, str)
        if not self.entitled(peer, channel):
            return self._refuse("not_entitled", f"{channel} is not shared with you here")
        return None

    def _answer_line(self, header: dict[str, Any]) -> bytes:
        """The answer to a request `_check_header` accepted (so its fields are valid)."""
        channel, fold, key = header.get("channel"), header.get("fold"), header.get("key")
        assert isinstance(channel, str)
        assert isinstance(fold, str)
        assert key is None or isinstance(key, str)
        if self._closed:
            # The state layer closed while we waited for the end of the request.
            return self._refuse("unavailable", "this node is stopping")
        if not self.known(channel, fold):
            return self._refuse("unknown_fold", f"no fold {fold!r} on {channel}")
        try:
            answer = self._answer(channel, fold, key)
        except FoldError as exc:
            # The fold is known: what fails is the key (a counter has none, a user fold's
            # state is no object), or a user fold whose state is not JSON.
            return self._refuse("bad_key" if key is not None else "unavailable", str(exc))
        except (StoreError, LocalProtocolError) as exc:
            log.warning("query on %s: %s", channel, exc)
            return self._refuse("unavailable", str(exc))
        self.counters["served"] += 1
        return encode_answer(fold, answer)
