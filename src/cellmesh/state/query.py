"""Federated fold queries (NetDB): the answer codec, key selection, truncation and the merge.

Theory of operation
-------------------
A query asks several replicas of a channel for the state of one fold (optionally one key of a
map-like fold) and combines the answers into one value. This module is the pure part: the node
driver (`cellmesh.node.state_folds`) carries requests and answers on streams.

Merging. The built-in folds other than the counter keep, for every key (map), element (set) or
record key (latest), the entry written by the event with the highest *stamp* ``(clock, id)``
(`cellmesh.state.folds`). A replica's entry for a key is therefore the maximum over the events
it holds that touch that key, and the maximum over several replicas' entries is the maximum over
the union of their events: merging the tables entry by entry by stamp gives exactly the state
one replica holding the union of the events would compute (tombstones included, so a deletion
seen by one replica beats an older write seen by another). Equal stamps name the same event, so
the entries are equal too.

A counter cannot be merged that way: two replicas that both hold an event would count it twice
and nothing in the state says which events were counted. A counter query (and a query of a
user fold, whose state has no known structure) takes the answer of the most complete replica:
the most events applied; ties go to the local replica, then to the lowest CellID, so the choice
is deterministic.

Kinds. Answers say which *kind* of fold produced them (`fold_kind`); only answers of the same
kind and version as the local fold are merged, because a fold registered under the same name
with another meaning would merge into nonsense.

Trust. A peer's answer is its claim: entries carry stamps, not the signed events, so a peer that
lies can win keys with invented stamps (or a counter with an invented event count). Queries are
answered only to peers entitled to read the channel and asked only of peers that hold it.
Answers are validated structurally (a malformed one is refused as ``bad_answer``, set element
keys included: they must be canonical JSON text), never trusted to be well-formed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from cellmesh.errors import DecodeError
from cellmesh.state.folds import (
    JSON,
    Counter,
    Fold,
    FoldError,
    LatestPerKey,
    LwwMap,
    LwwSet,
    dump_state,
)

__all__ = [
    "MAX_ANSWER",
    "MAX_FOLD_NAME",
    "MAX_KEY",
    "Answer",
    "Merged",
    "Refusal",
    "decode_answer",
    "encode_answer",
    "encode_refusal",
    "fold_kind",
    "merge",
    "select_key",
    "truncate",
    "view",
]

MAX_ANSWER: Final = 256 * 1024
"""Most bytes of one answer line, newline included; a larger state is truncated to fit."""
MAX_KEY: Final = 1024
"""Longest key (characters) a query may name."""
MAX_FOLD_NAME: Final = 128
"""Longest fold name a query may name."""

COUNTER: Final = "counter"
LWW_MAP: Final = "lww_map"
LWW_SET: Final = "lww_set"
OPAQUE: Final = "opaque"
_TABLES: Final = {LWW_MAP: ("entries", 4), LWW_SET: ("elements", 3)}
"""Kind -> (the state member holding the stamped table, the length of one entry)."""


def fold_kind(fold: Fold) -> str:
    """The merge-relevant kind of `fold`: ``counter``, ``lww_map``, ``lww_set``,
    ``latest:<key_field>`` / ``latest@author`` (records keyed by their author), or ``opaque``
    (a user fold: no structure the merge can use)."""
    if isinstance(fold, Counter):
        return COUNTER
    if isinstance(fold, LwwMap):
        return LWW_MAP
    if isinstance(fold, LwwSet):
        return LWW_SET
    if isinstance(fold, LatestPerKey):
        # The key field changes which events touch which key: two latest folds merge only
        # when they key records the same way.
        return "latest@author" if fold.key_field is None else f"latest:{fold.key_field}"
    return OPAQUE


def _table(kind: str) -> tuple[str, int] | None:
    """(state member, entry length) of a stamped kind, None for counter/opaque."""
    if kind.startswith("latest"):
        return "latest", 6
    return _TABLES.get(kind)


def set_member(key: str) -> str:
    """The table key of set element `key`: the element's canonical JSON when `key` is JSON
    text (``5``, ``"a"``, ``[1,2]``), else the string `key` itself (so ``a`` asks for "a")."""
    try:
        element: JSON = json.loads(key)
    except (ValueError, RecursionError):
        element = key
    return dump_state(element)


def select_key(kind: str, state: JSON, key: str | None) -> JSON:
    """`state` restricted to `key` (the whole state when `key` is None). Raises `FoldError`
    when the fold has no keys (a counter) or the state is not a keyed object."""
    if key is None:
        return state
    table = _table(kind)
    if table is None:
        if kind == OPAQUE and isinstance(state, dict):
            return {key: state.get(key)}
        raise FoldError(f"a {kind} fold has no keys")
    if not isinstance(state, dict) or not isinstance(state.get(table[0]), dict):
        raise FoldError("fold state has no table of keys")
    member = set_member(key) if kind == LWW_SET else key
    entries = state[table[0]]
    assert isinstance(entries, dict)
    picked = {member: entries[member]} if member in entries else {}
    return {table[0]: picked}


def view(kind: str, state: JSON, key: str | None) -> JSON:
    """What a user sees of a fold state: the counter's sum, the live map, the set's elements,
    the latest record per key, a user fold's state; with `key`, that key's value (None when
    absent or deleted; for a set, whether the element is present)."""
    if kind == COUNTER:
        if key is not None:
            raise FoldError("a counter fold has no keys")
        return Counter.view(state)
    if kind == OPAQUE:
        if key is None:
            return state
        if not isinstance(state, dict):
            raise FoldError("this fold's state is not an object: it has no keys")
        return state.get(key)
    state = select_key(kind, state, key)
    if kind == LWW_MAP:
        full: JSON = LwwMap.view(state)
    elif kind == LWW_SET:
        members = LwwSet.view(state)
        if key is not None:
            return bool(members)
        full = members
    else:
        full = LatestPerKey.view(state)
    if key is not None:
        assert isinstance(full, dict)
        return full.get(key)
    return full


def truncate(kind: str, state: JSON, budget: int) -> tuple[JSON, bool]:
    """`state`, or as much of it as fits in about `budget` bytes of JSON, and whether it was
    cut. Stamped tables keep whole entries in key order (so every entry sent is exact); any
    other state too large is sent as None."""
    text = dump_state(state)
    if len(text) <= budget:
        return state, False
    table = _table(kind)
    if table is None or not isinstance(state, dict) or not isinstance(state.get(table[0]), dict):
        return None, True
    entries = state[table[0]]
    assert isinstance(entries, dict)
    kept: dict[str, JSON] = {}
    used = 64  # the object around the table
    for k in sorted(entries):
        size = len(dump_state({k: entries[k]}))
        if used + size > budget:
            break
        kept[k] = entries[k]
        used += size
    return {table[0]: kept}, True


# ---------------------------------------------------------------------------------------------
# The answer line (docs/wire.md, "Fold queries")


@dataclass(frozen=True, slots=True)
class Answer:
    """One replica's answer to a query."""

    kind: str
    version: str
    position: int
    """The replica's log position the state reflects (positions are local to each replica)."""
    events: int
    """How many events the replica's fold applied."""
    state: JSON
    """The fold state, restricted to the key asked for, maybe truncated."""
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """A replica's refusal: `reason` is one word (``not_entitled``, ``unknown_fold``, ...)."""

    reason: str
    detail: str = ""


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def encode_answer(fold: str, answer: Answer) -> bytes:
    """The answer line: one JSON object and a newline, at most `MAX_ANSWER` bytes (the state is
    truncated to fit here, so callers need not). Raises `FoldError` for a non-JSON state."""
    fields: dict[str, Any] = {
        "ok": True,
        "fold": fold,
        "kind": answer.kind,
        "version": answer.version,
        "position": answer.position,
        "events": answer.events,
    }
    overhead = len(_line({**fields, "truncated": True, "state": None}))
    state, cut = truncate(answer.kind, answer.state, MAX_ANSWER - overhead - 16)
    line = _line({**fields, "truncated": cut or answer.truncated, "state": state})
    if len(line) > MAX_ANSWER:  # pragma: no cover - truncate() leaves room; belt and braces
        line = _line({**fields, "truncated": True, "state": None})
    return line


def encode_refusal(reason: str, detail: str = "") -> bytes:
    """The refusal line (detail cut to 200 characters)."""
    return _line({"ok": False, "reason": reason, "detail": detail[:200]})


def _uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _canonical_member(key: str) -> bool:
    """Is `key` a set element's table key as `LwwSet` writes it: the canonical JSON text of
    the element. `LwwSet.view` parses every key back, so a key that is not JSON text (or not
    in canonical form, which would list one element twice) must be refused at decoding."""
    try:
        return dump_state(json.loads(key)) == key
    except (ValueError, RecursionError, FoldError):  # not JSON, too deep, NaN or infinite
        return False


def _valid_table(kind: str, state: JSON) -> bool:
    table = _table(kind)
    if table is None:
        return True
    if not isinstance(state, dict):
        return False
    entries = state.get(table[0])
    if not isinstance(entries, dict):
        return False
    name, length = table
    if name == "elements" and not all(_canonical_member(k) for k in entries):
        return False
    for entry in entries.values():
        if not (
            isinstance(entry, list)
            and len(entry) == length
            and isinstance(entry[0], int)
            and not isinstance(entry[0], bool)
            and isinstance(entry[1], str)
        ):
            return False
        if name != "latest" and entry[2] not in (0, 1):
            return False
    return True


def decode_answer(data: bytes) -> Answer | Refusal:
    """Parse an answer line (trailing newline optional). Raises `DecodeError` when it is not
    one: not JSON, wrong fields, or a state whose stamped entries are malformed."""
    if len(data) > MAX_ANSWER:
        raise DecodeError(f"answer of {len(data)} bytes exceeds {MAX_ANSWER}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"answer is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError("answer is not a JSON object")
    if obj.get("ok") is False:
        reason, detail = obj.get("reason"), obj.get("detail", "")
        if not isinstance(reason, str) or not reason or not isinstance(detail, str):
            raise DecodeError("refusal without a reason")
        return Refusal(reason[:64], detail[:200])
    if obj.get("ok") is not True:
        raise DecodeError("answer has no ok field")
    kind, version = obj.get("kind"), obj.get("version")
    position, events, cut = obj.get("position"), obj.get("events"), obj.get("truncated")
    if not isinstance(kind, str) or not isinstance(version, str):
        raise DecodeError("answer without kind or version")
    if not _uint(position) or not _uint(events) or not isinstance(cut, bool):
        raise DecodeError("answer with a bad position, event count or truncated flag")
    assert isinstance(position, int)
    assert isinstance(events, int)
    state: JSON = obj.get("state")
    if not _valid_table(kind, state) or (
        kind == COUNTER and not (isinstance(state, dict) and isinstance(state.get("value"), int))
    ):
        raise DecodeError(f"answer state is not a valid {kind} state")
    return Answer(kind, version, position, events, state, cut)


# ---------------------------------------------------------------------------------------------
# Merging


@dataclass(frozen=True, slots=True)
class Merged:
    """The combination of several replicas' answers."""

    state: JSON
    strategy: str
    """``stamp`` (entry by entry) or ``most_events`` (one replica's answer)."""
    chosen: str | None
    """With ``most_events``: the label of the replica whose answer was taken."""


def merge(kind: str, answers: dict[str, Answer], local: str = "local") -> Merged:
    """Merge `answers` (label -> answer, all of `kind`; `local` labels this replica's own).

    Stamped kinds: entry by entry, the higher ``(clock, id)`` stamp wins, which equals the
    fold over the union of the replicas' events. Counter and opaque: the answer of the replica
    that applied the most events (ties: `local`, then the lowest label).
    """
    if not answers:
        raise ValueError("nothing to merge")
    table = _table(kind)
    if table is None:
        best = min(answers, key=lambda label: (-answers[label].events, label != local, label))
        return Merged(answers[best].state, "most_events", best)
    name = table[0]
    merged: dict[str, list[Any]] = {}
    for label in sorted(answers):
        state = answers[label].state
        assert isinstance(state, dict)
        entries = state[name]
        assert isinstance(entries, dict)
        for key, entry in entries.items():
            assert isinstance(entry, list)
            old = merged.get(key)
            if old is None or (entry[0], entry[1]) > (old[0], old[1]):
                merged[key] = entry
    state_out: JSON = {name: dict(sorted(merged.items()))}
    return Merged(state_out, "stamp", None)
