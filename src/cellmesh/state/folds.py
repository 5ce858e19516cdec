"""Folds (CortEX): named reducers over a channel's log, materialised incrementally.

Theory of operation
-------------------
A fold turns a channel's events into a state: ``state = apply(... apply(initial(), e1) ..., en)``.
The `FoldEngine` keeps each registered fold's state together with the log position it reflects,
in a `FoldStateStore` (the same SQLite file as the log for `SqliteLogStore`; a dict for tests).
`update` reads only the events delivered after that position (`LogStore.iter_channel`), applies
them and saves the state and the new position in one write, so a crash between the two never
applies an event twice or skips one. `rebuild` starts again from `initial()` over the whole log,
which is also what happens when the stored state was written by another `version` of the fold.

Order. The log delivers events in causal order, but two replicas that received the same events in
different orders deliver concurrent events in different orders. The built-in folds are written so
that this does not matter: the counter adds, and the others decide every conflict by the event's
*stamp* ``(clock, id)``, the signed Lamport clock then the event id: a total order that extends
causality (`cellmesh.state.events`). A later write in causal order always wins; of two concurrent
writes, the one with the higher clock, then the higher id, wins. Their states are therefore a
function of the *set* of events, identical on every replica that holds the same set, whatever the
arrival order. A user fold sees events in this replica's delivery order; it converges across
replicas only if it is order-independent the same way.

Payloads of the built-ins are UTF-8 JSON (formats below and in docs/state.md). An event whose
payload does not fit is counted as ignored, never an error: a fold never fails on bad input.

States are JSON values (dicts, lists, str, int, float, bool, None): what `apply` returns must
serialise with `json.dumps`, or `FoldError` is raised when it is saved. The engine owns the state
object between calls; built-ins update it in place and return it.

Retention: events dropped by retention are gone for `rebuild`; an incrementally maintained fold
keeps their effect if it was updated before `apply_retention` ran (`FoldEngine.apply_retention`
does that first).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from cellmesh.errors import LocalProtocolError
from cellmesh.identity.tokens import validate_channel
from cellmesh.state.log import LogStore, RetentionReport, StoredEvent

__all__ = [
    "JSON",
    "Counter",
    "Fold",
    "FoldEngine",
    "FoldError",
    "FoldStateStore",
    "FoldView",
    "FunctionFold",
    "InMemoryFoldStates",
    "LatestPerKey",
    "LwwMap",
    "LwwSet",
    "SavedFold",
    "dump_state",
    "stamp",
]

JSON: TypeAlias = bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None
"""A JSON-serialisable value."""

DEFAULT_CHECKPOINT_EVERY = 10_000
"""A long catch-up saves its progress every this many events."""


class FoldError(LocalProtocolError):
    """A fold was misused: unknown name, or a state that is not JSON-serialisable."""


class Fold(Protocol):
    """A named reducer. `version` names the meaning of `apply`: change it when `apply` changes
    and the engine rebuilds states saved under the old one."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def initial(self) -> JSON:
        """The state of an empty log (a fresh object on every call)."""
        ...

    def apply(self, state: JSON, event: StoredEvent) -> JSON:
        """The state after `event`. May update `state` in place and return it."""
        ...


@dataclass(frozen=True, slots=True)
class SavedFold:
    """A persisted fold state and the log position it reflects."""

    version: str
    position: int
    """Every delivered event of the channel up to this position has been applied."""
    events: int
    """How many events were applied."""
    state: str
    """The state as JSON text."""


class FoldStateStore(Protocol):
    """Where fold states live. `SqliteLogStore` implements it (a ``folds`` table in the log's
    file); `InMemoryFoldStates` for tests and the simulator."""

    def load_fold(self, channel: str, name: str) -> SavedFold | None:
        """The saved state of fold `name` on `channel`, or None."""
        ...

    def save_fold(self, channel: str, name: str, saved: SavedFold) -> None:
        """Replace the saved state of fold `name` on `channel` (atomically, durably)."""
        ...


class InMemoryFoldStates:
    """A `FoldStateStore` in a dict."""

    def __init__(self) -> None:
        self._saved: dict[tuple[str, str], SavedFold] = {}

    def load_fold(self, channel: str, name: str) -> SavedFold | None:
        """The saved state of fold `name` on `channel`, or None."""
        return self._saved.get((channel, name))

    def save_fold(self, channel: str, name: str, saved: SavedFold) -> None:
        """Replace the saved state of fold `name` on `channel`."""
        self._saved[(channel, name)] = saved


def dump_state(state: JSON) -> str:
    """Canonical JSON text of a fold state (sorted keys, no NaN). Raises `FoldError`."""
    try:
        return json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise FoldError(f"fold state is not JSON-serialisable: {exc}") from exc


def stamp(event: StoredEvent) -> tuple[int, str]:
    """The conflict-deciding order of built-in folds: (Lamport clock, event id in hex)."""
    return event.event.clock, event.id.hex()


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf, which no state may hold
        raise ValueError(f"number {text[:20]!r} is out of range")
    return value


def _no_constants(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _json_payload(event: StoredEvent) -> JSON | Exception:
    """The payload parsed as strict UTF-8 JSON (no NaN or infinities), or the exception that
    says why it is not."""
    try:
        value: JSON = json.loads(
            event.event.payload.decode("utf-8"),
            parse_float=_finite,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return exc
    return value


def _parse_saved(text: str) -> tuple[bool, JSON]:
    """(True, value) of a saved state's text, or (False, None) when the text is damaged."""
    try:
        value: JSON = json.loads(text)
    except (ValueError, RecursionError):
        return False, None
    return True, value


def _ignore(state: dict[str, Any]) -> dict[str, Any]:
    state["ignored"] = state.get("ignored", 0) + 1
    return state


def _as_dict(state: JSON) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise FoldError("built-in fold state must be a dict (was it saved by another fold?)")
    return state


# ---------------------------------------------------------------------------------------------
# Built-ins


@dataclass(frozen=True, slots=True)
class Counter:
    """Sums deltas. Payload: empty (counts 1) or a JSON integer (``5``, ``-2``).

    State: ``{"value": sum, "applied": n, "ignored": m}``. Addition commutes, so the state is
    the same in any order.
    """

    name: str = "counter"
    version: str = "1"

    def initial(self) -> JSON:
        """Zero."""
        return {"value": 0, "applied": 0, "ignored": 0}

    def apply(self, state: JSON, event: StoredEvent) -> JSON:
        """Add the event's delta."""
        s = _as_dict(state)
        if not event.event.payload:
            delta = 1
        else:
            value = _json_payload(event)
            if not isinstance(value, int) or isinstance(value, bool):
                return _ignore(s)
            delta = value
        s["value"] += delta
        s["applied"] += 1
        return s

    @staticmethod
    def view(state: JSON) -> int:
        """The current total."""
        value = _as_dict(state)["value"]
        assert isinstance(value, int)
        return value


def _merge(table: dict[str, Any], key: str, new: list[Any]) -> None:
    """Keep in `table[key]` whichever of the old and `new` entries has the higher stamp.

    Entries are lists whose first two items are the stamp (clock, id hex).
    """
    old = table.get(key)
    if old is None or (new[0], new[1]) > (old[0], old[1]):
        table[key] = new


@dataclass(frozen=True, slots=True)
class LwwMap:
    """A last-writer-wins map by causal order. Payload: ``{"set": {key: value, ...},
    "del": [key, ...]}`` (either part optional; a key in both is deleted).

    State: ``{"entries": {key: [clock, id, alive, value]}, "applied": n, "ignored": m}``;
    deleted keys stay as tombstones (alive 0) so that an older write arriving later cannot
    resurrect them. `view` gives the plain map.
    """

    name: str = "lww_map"
    version: str = "1"

    def initial(self) -> JSON:
        """An empty map."""
        return {"entries": {}, "applied": 0, "ignored": 0}

    def apply(self, state: JSON, event: StoredEvent) -> JSON:
        """Merge the event's writes, each key won by the higher stamp."""
        s = _as_dict(state)
        value = _json_payload(event)
        if not isinstance(value, dict) or not set(value) <= {"set", "del"}:
            return _ignore(s)
        sets = value.get("set", {})
        dels = value.get("del", [])
        if not isinstance(sets, dict) or not isinstance(dels, list):
            return _ignore(s)
        deleted: set[str] = set()
        for k in dels:
            if not isinstance(k, str):
                return _ignore(s)
            deleted.add(k)
        clock, eid = stamp(event)
        entries = s["entries"]
        for key, v in sets.items():
            if key not in deleted:
                _merge(entries, key, [clock, eid, 1, v])
        for key in sorted(deleted):
            _merge(entries, key, [clock, eid, 0, None])
        s["applied"] += 1
        return s

    @staticmethod
    def view(state: JSON) -> dict[str, JSON]:
        """The map: live keys and their values."""
        entries = _as_dict(state)["entries"]
        return {k: e[3] for k, e in sorted(entries.items()) if e[2]}


@dataclass(frozen=True, slots=True)
class LwwSet:
    """A set with add and remove, each element decided last-writer-wins by causal order.
    Payload: ``{"add": [element, ...], "remove": [element, ...]}`` (elements: any JSON value;
    one in both lists is removed).

    State: ``{"elements": {canonical JSON of element: [clock, id, present]}, ...}``.
    """

    name: str = "set"
    version: str = "1"

    def initial(self) -> JSON:
        """The empty set."""
        return {"elements": {}, "applied": 0, "ignored": 0}

    def apply(self, state: JSON, event: StoredEvent) -> JSON:
        """Add and remove the event's elements, each decided by the higher stamp."""
        s = _as_dict(state)
        value = _json_payload(event)
        if not isinstance(value, dict) or not set(value) <= {"add", "remove"}:
            return _ignore(s)
        adds = value.get("add", [])
        removes = value.get("remove", [])
        if not isinstance(adds, list) or not isinstance(removes, list):
            return _ignore(s)
        try:
            add_keys = {dump_state(x) for x in adds}
            remove_keys = {dump_state(x) for x in removes}
        except FoldError:
            return _ignore(s)
        clock, eid = stamp(event)
        elements = s["elements"]
        for key in sorted(add_keys - remove_keys):
            _merge(elements, key, [clock, eid, 1])
        for key in sorted(remove_keys):
            _merge(elements, key, [clock, eid, 0])
        s["applied"] += 1
        return s

    @staticmethod
    def view(state: JSON) -> list[JSON]:
        """The elements present, sorted by their canonical JSON text."""
        elements = _as_dict(state)["elements"]
        return [json.loads(k) for k, e in sorted(elements.items()) if e[2]]


@dataclass(frozen=True, slots=True)
class LatestPerKey:
    """The latest record per key, by causal order.

    With `key_field` (default "key"): the payload is a JSON object whose `key_field` member is a
    string; the whole object is the record. With `key_field` None: the key is the author's CellID
    (hex) and the record is the payload parsed as JSON, or ``{"base64": ...}`` when it is not JSON.

    State: ``{"latest": {key: [clock, id, record, author hex, seq, timestamp_ms]}, ...}``.
    """

    name: str = "latest"
    version: str = "1"
    key_field: str | None = "key"

    def initial(self) -> JSON:
        """No records."""
        return {"latest": {}, "applied": 0, "ignored": 0}

    def apply(self, state: JSON, event: StoredEvent) -> JSON:
        """Keep the event's record if its stamp is the highest for its key."""
        s = _as_dict(state)
        value = _json_payload(event)
        ev = event.event
        if self.key_field is None:
            key = ev.author.hex()
            if isinstance(value, Exception):
                value = {"base64": base64.b64encode(ev.payload).decode("ascii")}
        else:
            if not isinstance(value, dict) or not isinstance(value.get(self.key_field), str):
                return _ignore(s)
            key_value = value[self.key_field]
            assert isinstance(key_value, str)
            key = key_value
        clock, eid = stamp(event)
        _merge(s["latest"], key, [clock, eid, value, ev.author.hex(), ev.seq, ev.timestamp_ms])
        s["applied"] += 1
        return s

    @staticmethod
    def view(state: JSON) -> dict[str, JSON]:
        """Key -> latest record."""
        latest = _as_dict(state)["latest"]
        return {k: e[2] for k, e in sorted(latest.items())}


@dataclass(frozen=True, slots=True)
class FunctionFold:
    """A user fold from two plain functions.

    >>> FunctionFold("bytes", lambda: 0, lambda s, e: s + len(e.event.payload))  # doctest: +SKIP
    """

    name: str
    initial_fn: Callable[[], JSON]
    apply_fn: Callable[[JSON, StoredEvent], JSON]
    version: str = "1"

    def initial(self) -> JSON:
        """`initial_fn()`."""
        return self.initial_fn()

    def apply(self, state: JSON, event: StoredEvent) -> JSON:
        """`apply_fn(state, event)`."""
        return self.apply_fn(state, event)


# ---------------------------------------------------------------------------------------------
# Materialisation


@dataclass(frozen=True, slots=True)
class FoldView:
    """A fold's state as of a log position (a snapshot: a copy of the state)."""

    channel: str
    name: str
    state: JSON
    position: int
    events: int


@dataclass(slots=True)
class _Live:
    fold: Fold
    state: JSON = None
    position: int = 0
    events: int = 0
    loaded: bool = False
    dirty: bool = field(default=False)


class FoldEngine:
    """Keeps registered folds of channels up to date with a `LogStore`.

    `update` is incremental and persists; `rebuild` recomputes from the whole log. The engine
    caches live states in memory and writes them to `states` after each update that applied
    something (and every `checkpoint_every` events of a long catch-up).
    """

    def __init__(
        self,
        log: LogStore,
        states: FoldStateStore,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        self._log = log
        self._states = states
        self._checkpoint_every = checkpoint_every
        self._live: dict[tuple[str, str], _Live] = {}

    def register(self, channel: str, fold: Fold) -> None:
        """Maintain `fold` over `channel`. Raises `FoldError` if the name is taken."""
        validate_channel(channel)
        if not isinstance(fold.name, str) or not fold.name:
            raise FoldError("a fold needs a non-empty name")
        key = (channel, fold.name)
        if key in self._live:
            raise FoldError(f"fold {fold.name!r} is already registered on {channel!r}")
        self._live[key] = _Live(fold)

    def folds(self, channel: str) -> list[str]:
        """Names of the folds registered on `channel`, sorted."""
        return sorted(name for ch, name in self._live if ch == channel)

    def _get(self, channel: str, name: str) -> _Live:
        live = self._live.get((channel, name))
        if live is None:
            raise FoldError(f"no fold {name!r} registered on {channel!r}")
        if not live.loaded:
            saved = self._states.load_fold(channel, name)
            readable, state = _parse_saved(saved.state) if saved is not None else (False, None)
            if saved is not None and readable and saved.version == live.fold.version:
                live.state = state
                live.position, live.events = saved.position, saved.events
            else:  # none saved, another version, or damaged text: start from the beginning
                live.state, live.position, live.events = live.fold.initial(), 0, 0
                live.dirty = saved is not None  # another version: replaced on the next save
            live.loaded = True
        return live

    def _save(self, channel: str, live: _Live) -> None:
        text = dump_state(live.state)
        self._states.save_fold(
            channel,
            live.fold.name,
            SavedFold(live.fold.version, live.position, live.events, text),
        )
        live.dirty = False

    def update(self, channel: str, name: str) -> FoldView:
        """Apply the events delivered since the fold's position; persist; return the state."""
        live = self._get(channel, name)
        since_save = 0
        for stored in self._log.iter_channel(channel, live.position):
            live.state = live.fold.apply(live.state, stored)
            assert stored.position is not None
            live.position = stored.position
            live.events += 1
            live.dirty = True
            since_save += 1
            if since_save >= self._checkpoint_every:
                self._save(channel, live)
                since_save = 0
        if live.dirty:
            self._save(channel, live)
        return FoldView(
            channel, name, json.loads(dump_state(live.state)), live.position, live.events
        )

    def update_all(self, channel: str) -> list[FoldView]:
        """`update` every fold registered on `channel`."""
        return [self.update(channel, name) for name in self.folds(channel)]

    def rebuild(self, channel: str, name: str) -> FoldView:
        """Recompute the fold from `initial()` over the whole log; persist; return the state."""
        live = self._get(channel, name)
        live.state, live.position, live.events = live.fold.initial(), 0, 0
        live.dirty = True
        return self.update(channel, name)

    def apply_retention(self, channel: str, now_ms: int) -> RetentionReport:
        """Bring every fold of `channel` up to date, then apply the log's retention, so folds
        keep the effect of the events retention drops."""
        self.update_all(channel)
        return self._log.apply_retention(channel, now_ms)
