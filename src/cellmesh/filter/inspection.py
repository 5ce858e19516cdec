"""Ring 2: deep inspection of decrypted payloads, off the hot path, feeding bans back to ring 0.

Theory of operation
-------------------
Rings 0 and 1 decide per packet from identity, channel and rates, in O(1). Ring 2 looks *inside*
payloads that were decrypted for this node, which costs real work, so it never runs inline: the
driver `submit`s an `InspectionItem` to a bounded `InspectionQueue` (a full queue refuses the
item and counts "inspection_overload"; memory never grows without bound) and, whenever it has
time, calls `run` with a budget of items and seconds. `run` passes each item through the
configured inspectors in order; the first verdict that is not PASS decides and the remaining
inspectors are skipped, so put cheap inspectors (a threat list) before expensive ones (a JSON
parser).

An inspector is any object with a `name` and an `inspect(item) -> InspectionVerdict` method
(the `Inspector` protocol). A verdict is PASS, DROP(reason) or BAN(reason, seconds). BAN asks
ring 0 to drop everything from the item's source CellID until `now + seconds` (capped by
`max_ban_seconds`): `run` records the ban and the driver collects it with `take_bans()` and
hands it to its ring-0 `BanList`. The queue also remembers its own bans, so items already
queued or submitted later from a banned source are dropped without inspection.

Inspectors are plugins and may be buggy: one that raises (or returns something that is not a
verdict) is contained, counted as "inspector_error:<name>" and its item is dropped. Time spent
in each inspector is accounted per name, measured with the caller's clock.

`BanList` is ring 0's side: an O(1) `is_banned(cell_id, now)`, bounded to `capacity` entries;
when full, the ban that expires soonest gives way.

Everything here is sans-IO: no clocks (`now` and a `clock` callable are passed in), no files
(`ThreatList.from_lines` takes text the caller read), no randomness.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from cellmesh.identity.capabilities import Deadlines
from cellmesh.identity.cellid import CELL_ID_LEN, CellId, parse_cell_id

__all__ = [
    "DEFAULT_BAN_CAPACITY",
    "DEFAULT_MAX_BAN_SECONDS",
    "DEFAULT_QUEUE_CAPACITY",
    "PASS",
    "BanList",
    "InspectionItem",
    "InspectionQueue",
    "InspectionStats",
    "InspectionVerdict",
    "Inspector",
    "SizeShapeValidator",
    "ThreatList",
    "Verdict",
]

DEFAULT_QUEUE_CAPACITY = 1024
DEFAULT_BAN_CAPACITY = 4096
DEFAULT_MAX_BAN_SECONDS = 86_400.0
"""Longest ban an inspector can impose through the queue (one day)."""


# ---------------------------------------------------------------------------------------------
# Items and verdicts


@dataclass(frozen=True, slots=True)
class InspectionItem:
    """One decrypted payload destined to this node, as handed to ring 2."""

    source: bytes
    """CellID (16 bytes) of the authenticated peer that sent it."""
    channel: str
    payload: bytes
    received_at: float
    """When the node received it (the driver's clock)."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, bytes) or len(self.source) != CELL_ID_LEN:
            raise ValueError(f"source must be a {CELL_ID_LEN}-byte CellID")


class Verdict(StrEnum):
    """What an inspector decided."""

    PASS = "pass"
    DROP = "drop"
    BAN = "ban"


@dataclass(frozen=True, slots=True)
class InspectionVerdict:
    """An inspector's decision. Build with `PASS`, `InspectionVerdict.drop(reason)` or
    `InspectionVerdict.ban(reason, seconds)`.

    `inspector` is filled in by `InspectionQueue.run` with the name of the inspector that
    decided (empty for PASS, which is everyone's decision).
    """

    kind: Verdict
    reason: str = ""
    ban_seconds: float = 0.0
    inspector: str = ""

    def __post_init__(self) -> None:
        if self.kind is Verdict.PASS:
            if self.reason or self.ban_seconds:
                raise ValueError("a PASS verdict has no reason and no ban")
            return
        if not isinstance(self.reason, str) or not self.reason:
            raise ValueError(f"a {self.kind.value} verdict needs a non-empty reason")
        if self.kind is Verdict.BAN:
            if not (math.isfinite(self.ban_seconds) and self.ban_seconds > 0):
                raise ValueError("a BAN verdict needs a finite ban_seconds > 0")
        elif self.ban_seconds:
            raise ValueError("only a BAN verdict has ban_seconds")

    @classmethod
    def drop(cls, reason: str) -> InspectionVerdict:
        """Drop this item."""
        return cls(Verdict.DROP, reason)

    @classmethod
    def ban(cls, reason: str, seconds: float) -> InspectionVerdict:
        """Drop this item and ask ring 0 to drop everything from its source for `seconds`."""
        return cls(Verdict.BAN, reason, float(seconds))


PASS = InspectionVerdict(Verdict.PASS)
"""The verdict "nothing wrong here"."""


class Inspector(Protocol):
    """A ring-2 plugin. `inspect` must be pure and quick: it runs inside the node's loop."""

    @property
    def name(self) -> str:
        """A short name, used in counters and verdicts (`[a-z0-9_.-]` by convention)."""
        ...

    def inspect(self, item: InspectionItem) -> InspectionVerdict:
        """Return PASS, a DROP or a BAN verdict for `item`."""
        ...


# ---------------------------------------------------------------------------------------------
# Built-in inspectors


def _reject_constant(text: str) -> object:
    # NaN and Infinity are Python extensions, not JSON (RFC 8259): refuse them.
    raise ValueError(f"{text} is not JSON")


class SizeShapeValidator:
    """Drop payloads that are too big or not shaped as expected.

    Checks, cheapest first: at most `max_size` bytes (reason "too_large"); starts with `prefix`
    (a magic number, "bad_prefix"); with `json_object`, the payload (after the prefix) is UTF-8
    ("not_utf8") holding one strict JSON value ("not_json") that is an object
    ("not_json_object").
    """

    __slots__ = ("_json_object", "_max_size", "_name", "_prefix")

    def __init__(
        self,
        max_size: int,
        *,
        prefix: bytes = b"",
        json_object: bool = False,
        name: str = "size_shape",
    ) -> None:
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self._max_size = max_size
        self._prefix = bytes(prefix)
        self._json_object = json_object
        self._name = name

    @property
    def name(self) -> str:
        """The inspector's name."""
        return self._name

    def inspect(self, item: InspectionItem) -> InspectionVerdict:
        """Check size, prefix and (optionally) JSON-object shape."""
        payload = item.payload
        if len(payload) > self._max_size:
            return InspectionVerdict.drop("too_large")
        if not payload.startswith(self._prefix):
            return InspectionVerdict.drop("bad_prefix")
        if self._json_object:
            try:
                text = payload[len(self._prefix) :].decode("utf-8")
            except UnicodeDecodeError:
                return InspectionVerdict.drop("not_utf8")
            try:
                value = json.loads(text, parse_constant=_reject_constant)
            except (ValueError, RecursionError):
                # RecursionError: "[[[[..." nested deeper than the parser's stack allows.
                return InspectionVerdict.drop("not_json")
            if not isinstance(value, dict):
                return InspectionVerdict.drop("not_json_object")
        return PASS


class ThreatList:
    """BAN every item whose source is on a list of CellIDs (threat intelligence).

    Build from CellIDs, or from text with `from_lines`: one CellID (32 hex digits) per line,
    blank lines and `#` comments ignored.
    """

    __slots__ = ("_ban_seconds", "_cell_ids", "_name")

    def __init__(
        self,
        cell_ids: Iterable[bytes] = (),
        *,
        ban_seconds: float = 3600.0,
        name: str = "threat_list",
    ) -> None:
        if not (math.isfinite(ban_seconds) and ban_seconds > 0):
            raise ValueError("ban_seconds must be finite and > 0")
        ids = frozenset(bytes(c) for c in cell_ids)
        for c in ids:
            if len(c) != CELL_ID_LEN:
                raise ValueError(f"a CellID is {CELL_ID_LEN} bytes, got {len(c)}")
        self._cell_ids = ids
        self._ban_seconds = float(ban_seconds)
        self._name = name

    @classmethod
    def from_lines(
        cls,
        lines: str | Iterable[str],
        *,
        source: str = "<threat list>",
        ban_seconds: float = 3600.0,
        name: str = "threat_list",
    ) -> ThreatList:
        """Parse a threat list: one CellID per line, `#` starts a comment.

        `lines` is the whole text or its lines (the caller reads the file). Raises
        `ValueError("SOURCE:LINE: problem")` at the first bad line.
        """
        if isinstance(lines, str):
            lines = lines.splitlines()
        ids: list[CellId] = []
        for number, line in enumerate(lines, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            if len(text.split()) > 1:
                raise ValueError(f"{source}:{number}: expected one CellID per line, got {text!r}")
            try:
                ids.append(parse_cell_id(text))
            except ValueError as exc:
                raise ValueError(f"{source}:{number}: {exc}") from None
        return cls(ids, ban_seconds=ban_seconds, name=name)

    @property
    def name(self) -> str:
        """The inspector's name."""
        return self._name

    def inspect(self, item: InspectionItem) -> InspectionVerdict:
        """BAN (reason "threat_list") if the source is listed, else PASS."""
        if item.source in self._cell_ids:
            return InspectionVerdict.ban("threat_list", self._ban_seconds)
        return PASS

    def __contains__(self, cell_id: object) -> bool:
        return cell_id in self._cell_ids

    def __len__(self) -> int:
        return len(self._cell_ids)


# ---------------------------------------------------------------------------------------------
# Ring 0's ban list


class BanList:
    """CellIDs ring 0 drops until a deadline. `is_banned` is one dict lookup.

    A ban lasts while `now <= until`. At most `capacity` bans are kept: when full, the ban that
    expires soonest gives way (if that is the new ban itself, it is refused). `evicted` counts
    bans dropped that way. Use one clock (the driver's monotonic `now`) for `until` and `now`.
    """

    __slots__ = ("_deadlines", "capacity", "evicted")

    def __init__(self, capacity: int = DEFAULT_BAN_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.evicted = 0
        self._deadlines: Deadlines[bytes] = Deadlines()

    def ban(self, cell_id: bytes, until: float) -> bool:
        """Ban `cell_id` until `until`; True if the ban is in force afterwards.

        An existing longer ban is never shortened. Raises `ValueError` for a bad CellID or NaN.
        """
        cell_id = bytes(cell_id)
        if len(cell_id) != CELL_ID_LEN:
            raise ValueError(f"a CellID is {CELL_ID_LEN} bytes, got {len(cell_id)}")
        if math.isnan(until):
            raise ValueError("until must not be NaN")
        current = self._deadlines.get(cell_id)
        if current is not None:
            if until > current:
                self._deadlines.set(cell_id, until)
            return True
        if len(self._deadlines) >= self.capacity:
            soonest = self._deadlines.soonest()
            assert soonest is not None  # capacity >= 1, so a full list is not empty
            self.evicted += 1
            if until <= soonest[1]:
                return False  # the new ban is itself the soonest to expire
            self._deadlines.discard(soonest[0])
        self._deadlines.set(cell_id, until)
        return True

    def unban(self, cell_id: bytes) -> bool:
        """Lift the ban on `cell_id`; True if there was one."""
        cell_id = bytes(cell_id)
        present = cell_id in self._deadlines
        self._deadlines.discard(cell_id)
        return present

    def is_banned(self, cell_id: bytes, now: float) -> bool:
        """Whether `cell_id` is banned at `now`. O(1)."""
        until = self._deadlines.get(cell_id)
        return until is not None and now <= until

    def until(self, cell_id: bytes) -> float | None:
        """When the ban on `cell_id` ends (it may already have ended), or None."""
        return self._deadlines.get(cell_id)

    def expire(self, now: float) -> int:
        """Forget every ban that has ended by `now`; return how many."""
        return len(self._deadlines.pop_before(now))

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, cell_id: object) -> bool:
        return cell_id in self._deadlines


# ---------------------------------------------------------------------------------------------
# The queue


@dataclass(frozen=True, slots=True)
class InspectionStats:
    """A snapshot of an `InspectionQueue`'s counters."""

    queued: int
    """Items waiting now."""
    counters: dict[str, int]
    """Queue events: "submitted", "inspected", "pass", "drop", "ban", "inspection_overload",
    "source_quota", "banned_source", "ban_overflow" and "inspector_error:<name>"."""
    reasons: dict[str, int]
    """DROP and BAN verdicts by "<inspector>:<reason>"."""
    inspector_calls: dict[str, int]
    inspector_seconds: dict[str, float]
    """Time spent in each inspector, measured with the clock passed to `run`."""
    pending_bans: int


class InspectionQueue:
    """A bounded queue of items waiting for ring-2 inspection, processed within budgets.

    `capacity` bounds the queue; `per_source` (optional) bounds how many queued items one
    source may hold, so a single peer cannot fill the queue and starve the others.
    `max_ban_seconds` caps any BAN; `ban_capacity` bounds the queue's own ban memory and the
    pending bans awaiting `take_bans`.
    """

    def __init__(
        self,
        inspectors: Sequence[Inspector],
        *,
        capacity: int = DEFAULT_QUEUE_CAPACITY,
        per_source: int | None = None,
        max_ban_seconds: float = DEFAULT_MAX_BAN_SECONDS,
        ban_capacity: int = DEFAULT_BAN_CAPACITY,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if per_source is not None and per_source < 1:
            raise ValueError("per_source must be at least 1 (or None)")
        if not (math.isfinite(max_ban_seconds) and max_ban_seconds > 0):
            raise ValueError("max_ban_seconds must be finite and > 0")
        names = [i.name for i in inspectors]
        if len(set(names)) != len(names):
            raise ValueError(f"inspector names must be unique, got {names}")
        self.inspectors: tuple[Inspector, ...] = tuple(inspectors)
        # Names are read once: counters stay keyed consistently whatever a plugin does later.
        self._plugins = tuple(zip(names, self.inspectors, strict=True))
        self.capacity = capacity
        self.per_source = per_source
        self.max_ban_seconds = float(max_ban_seconds)
        self.counters: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.inspector_calls: Counter[str] = Counter()
        self.inspector_seconds: dict[str, float] = dict.fromkeys(names, 0.0)
        self._queue: deque[InspectionItem] = deque()
        self._per_source: Counter[bytes] = Counter()
        self._banned = BanList(ban_capacity)
        self._pending: dict[CellId, float] = {}
        self._ban_capacity = ban_capacity

    def submit(self, item: InspectionItem, now: float) -> bool:
        """Queue `item` for inspection; False (and counted) if it was refused.

        Refusals: "banned_source" (the queue banned its source and the ban holds at `now`),
        "inspection_overload" (queue full) and "source_quota" (its source has `per_source`
        items queued already).
        """
        if self._banned.is_banned(item.source, now):
            self.counters["banned_source"] += 1
            return False
        if len(self._queue) >= self.capacity:
            self.counters["inspection_overload"] += 1
            return False
        if self.per_source is not None and self._per_source[item.source] >= self.per_source:
            self.counters["source_quota"] += 1
            return False
        self._queue.append(item)
        self._per_source[item.source] += 1
        self.counters["submitted"] += 1
        return True

    def run(
        self,
        now: float,
        budget_items: int,
        budget_seconds: float,
        clock: Callable[[], float],
    ) -> list[tuple[InspectionItem, InspectionVerdict]]:
        """Inspect queued items, oldest first, within a budget; return each item's verdict.

        Stops when the queue is empty, `budget_items` items are done, or `budget_seconds` have
        passed on `clock` (the driver's monotonic clock; read before each item and around each
        inspector call, so one slow inspector can overrun the time budget by its own duration).
        `now` timestamps bans. Items left over stay queued for the next run.
        """
        if budget_items < 0 or not budget_seconds >= 0:
            raise ValueError("budgets must not be negative")
        results: list[tuple[InspectionItem, InspectionVerdict]] = []
        start = clock()
        while self._queue and len(results) < budget_items:
            if clock() - start >= budget_seconds:
                break
            item = self._queue.popleft()
            self._release(item.source)
            if self._banned.is_banned(item.source, now):
                # Banned after it was queued: inspecting it again would be wasted work.
                self.counters["banned_source"] += 1
                verdict = InspectionVerdict.drop("banned_source")
            else:
                verdict = self._inspect(item, clock)
                self.counters["inspected"] += 1
            self._record(item, verdict, now)
            results.append((item, verdict))
        return results

    def _release(self, source: bytes) -> None:
        left = self._per_source[source] - 1
        if left > 0:
            self._per_source[source] = left
        else:
            del self._per_source[source]

    def _inspect(self, item: InspectionItem, clock: Callable[[], float]) -> InspectionVerdict:
        for name, inspector in self._plugins:
            t0 = clock()
            try:
                verdict = inspector.inspect(item)
            except Exception:  # noqa: BLE001
                # Plugins are third-party code run inside the node: one that fails must cost
                # its item, never the node. Contained, counted, and the item dropped.
                verdict = None
            self.inspector_seconds[name] += clock() - t0
            self.inspector_calls[name] += 1
            if not isinstance(verdict, InspectionVerdict):
                self.counters[f"inspector_error:{name}"] += 1
                return InspectionVerdict(Verdict.DROP, "inspector_error", inspector=name)
            if verdict.kind is not Verdict.PASS:
                return dataclasses.replace(verdict, inspector=name)
        return PASS

    def _record(self, item: InspectionItem, verdict: InspectionVerdict, now: float) -> None:
        self.counters[verdict.kind.value] += 1
        if verdict.kind is Verdict.PASS:
            return
        self.reasons[f"{verdict.inspector or 'queue'}:{verdict.reason}"] += 1
        if verdict.kind is Verdict.BAN:
            until = now + min(verdict.ban_seconds, self.max_ban_seconds)
            source = CellId(item.source)
            self._banned.ban(source, until)
            if source in self._pending or len(self._pending) < self._ban_capacity:
                self._pending[source] = max(until, self._pending.get(source, until))
            else:
                # The driver is not collecting bans; the verdict is still in `run`'s result.
                self.counters["ban_overflow"] += 1

    def take_bans(self) -> list[tuple[CellId, float]]:
        """Return and forget the bans decided since the last call: (CellID, until) pairs for
        ring 0's `BanList.ban`. Each source appears once, with its latest deadline."""
        bans = list(self._pending.items())
        self._pending.clear()
        return bans

    def statistics(self) -> InspectionStats:
        """A frozen snapshot of the counters."""
        return InspectionStats(
            queued=len(self._queue),
            counters=dict(self.counters),
            reasons=dict(self.reasons),
            inspector_calls=dict(self.inspector_calls),
            inspector_seconds=dict(self.inspector_seconds),
            pending_bans=len(self._pending),
        )

    def __len__(self) -> int:
        return len(self._queue)
