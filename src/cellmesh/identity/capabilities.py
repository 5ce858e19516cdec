"""Capability adverts: signed statements of what a node offers, and an index that answers
"which nodes offer capability X?".

Theory of operation
-------------------
A node describes what it offers as a short list of *tags*, each a name with an optional value
(`storage`, `gpu=a100`, `relay`, `bandwidth=100M`), and signs them with its Ed25519 identity key
into a `CapabilityAdvert`. The advert carries a sequence number (a newer advert from the same
issuer replaces an older one) and a validity window (issued_at .. expires_at, Unix seconds), so a
stale or replayed advert dies on its own. The encoding is canonical, like permission tokens
(tokens.py): tags are sorted and unique by name, every length is bounded, and `decode_advert`
accepts exactly one byte string per advert. The issuer signs a domain-separated message
(`ADVERT_CONTEXT` + the encoding without its signature), so an advert signature can never pass
for a token, a revocation or a static binding.

A `CapabilityIndex` keeps the newest verified advert of each issuer, keyed by the issuer's
CellID, bounded to `capacity` entries (expired entries go first, then the least recently
updated). It keeps an inverted index, tag name -> CellIDs and (name, value) -> CellIDs, so
`find` costs O(matches), not O(adverts); every insert, replace, forget, eviction and expiry
updates it. Refused adverts are counted by reason in `drops`, never raised: adverts arrive from
the network, and the receive path must not raise (DESIGN.md, conventions 4).

`Deadlines` is the small keyed min-heap the index uses for expiry; the ring-0 ban list
(filter/inspection.py) reuses it.

Layouts are in docs/capabilities.md. Everything here is pure: no I/O, no clocks, no randomness
(`now` is passed in).
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
import struct
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from cellmesh.errors import (
    AuthenticationError,
    DecodeError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.identity.cellid import CellId, cell_id_from_public_key
from cellmesh.identity.keys import (
    ED25519_PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    Identity,
    verify_signature,
)
from cellmesh.identity.tokens import DEFAULT_SKEW

__all__ = [
    "ADVERT_CONTEXT",
    "ADVERT_VERSION",
    "DEFAULT_INDEX_CAPACITY",
    "DEFAULT_SKEW",
    "MAX_ADVERT_LEN",
    "MAX_TAGS",
    "MAX_TAG_NAME_LEN",
    "MAX_TAG_VALUE_LEN",
    "MIN_ADVERT_LEN",
    "AdvertError",
    "CapabilityAdvert",
    "CapabilityIndex",
    "Deadlines",
    "Tag",
    "advert_signing_message",
    "decode_advert",
    "encode_advert",
    "issue_advert",
    "parse_tag",
    "validate_tag",
    "verify_advert",
]

ADVERT_VERSION = 1
ADVERT_CONTEXT = b"cellmesh/v1 capability-advert\x00"
"""Domain-separation prefix of the message an advert's issuer signs."""

MAX_TAGS = 32
"""Most tags one advert may carry."""
MAX_TAG_NAME_LEN = 32
"""Longest tag name, in bytes (ASCII)."""
MAX_TAG_VALUE_LEN = 64
"""Longest tag value, in bytes of UTF-8."""
MAX_ADVERT_LEN = 2048
"""Longest encoded advert, signature included. 32 maximal tags would not fit: the total is capped
separately so an advert always fits in a couple of datagrams and a flood of them stays cheap."""
DEFAULT_INDEX_CAPACITY = 4096
U64_MAX = 2**64 - 1

# version u8 | issuer 32 | seq u64 | issued_at u64 | expires_at u64 | tag_count u8
# | tag_count x (name_len u8 | name | value_len u8 | value) | signature 64
_HEAD = struct.Struct(f"!B{ED25519_PUBLIC_KEY_LEN}sQQQB")
MIN_ADVERT_LEN = _HEAD.size + SIGNATURE_LEN
"""Shortest encoded advert: no tags."""

_TAG_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
# C0 controls, DEL, C1 controls, and the bidirectional overrides/isolates: a value is shown in
# terminals and dashboards, so nothing in it may move the cursor or reorder the text around it.
# The set is fixed code points (not Unicode categories) so every Python version agrees on it.
_FORBIDDEN_VALUE_CHARS = frozenset(
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e"]
    + ["\u2066", "\u2067", "\u2068", "\u2069"]
)

Tag = tuple[str, str]
"""A tag: (name, value). An empty value means the tag has no metadata (`relay`)."""


class AdvertError(AuthenticationError):
    """An advert was refused. `reason` says why, in one word.

    Reasons from `verify_advert`: "malformed", "bad_signature", "not_yet_valid", "expired".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Tags


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"tag name must be str, got {type(name).__name__}"
    if not _TAG_NAME_RE.fullmatch(name):
        return (
            f"tag name {name!r} must be 1..{MAX_TAG_NAME_LEN} characters of a-z 0-9 _ . -"
            " starting with a letter or digit"
        )
    return None


def _value_problem(name: str, value: object) -> str | None:
    if not isinstance(value, str):
        return f"value of tag {name!r} must be str, got {type(value).__name__}"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return f"value of tag {name!r} is not encodable as UTF-8 (lone surrogate)"
    if size > MAX_TAG_VALUE_LEN:
        return f"value of tag {name!r} is {size} bytes of UTF-8, at most {MAX_TAG_VALUE_LEN}"
    if not _FORBIDDEN_VALUE_CHARS.isdisjoint(value):
        return f"value of tag {name!r} contains a control or bidirectional-override character"
    return None


def validate_tag(name: str, value: str = "") -> None:
    """Raise `ValueError` unless (`name`, `value`) is a valid tag."""
    problem = _name_problem(name) or _value_problem(name, value)
    if problem is not None:
        raise ValueError(problem)


def parse_tag(text: str) -> Tag:
    """Parse `NAME` or `NAME=VALUE` (as typed on a command line) into a validated tag.

    Only the first `=` splits, so a value may contain `=`. Raises `ValueError`.
    """
    name, _, value = text.partition("=")
    validate_tag(name, value)
    return name, value


def _tags_problem(tags: object) -> str | None:
    if not isinstance(tags, tuple):
        return f"tags must be a tuple, got {type(tags).__name__}"
    if len(tags) > MAX_TAGS:
        return f"{len(tags)} tags, at most {MAX_TAGS}"
    previous = ""
    for tag in tags:
        if not (isinstance(tag, tuple) and len(tag) == 2):
            return f"a tag must be a (name, value) tuple, got {tag!r}"
        name, value = tag
        problem = _name_problem(name) or _value_problem(name, value)
        if problem is not None:
            return problem
        # Names are ASCII, so str order is byte order: the order of the encoding.
        if name <= previous:
            return f"tags must be sorted and unique by name ({name!r} after {previous!r})"
        previous = name
    return None


# ---------------------------------------------------------------------------------------------
# Adverts


@dataclass(frozen=True, slots=True)
class CapabilityAdvert:
    """A signed capability advert. Build with `issue_advert` or `decode_advert`."""

    issuer: bytes
    """Ed25519 public key (32 bytes) of the node the advert describes and which signed it."""
    seq: int
    """u64; among adverts of one issuer, the highest sequence number wins."""
    issued_at: int
    """u64 Unix seconds; the advert is not valid before this (give or take the skew)."""
    expires_at: int
    """u64 Unix seconds; the advert is not valid after this (give or take the skew)."""
    tags: tuple[Tag, ...]
    """(name, value) pairs sorted and unique by name; value "" means no metadata."""
    signature: bytes
    version: int = ADVERT_VERSION

    @property
    def cell_id(self) -> CellId:
        """The issuer's CellID."""
        return cell_id_from_public_key(self.issuer)

    @property
    def tag_names(self) -> frozenset[str]:
        """The names of the advert's tags."""
        return frozenset(name for name, _ in self.tags)

    def value_of(self, name: str) -> str | None:
        """The value of tag `name` ("" for a tag without metadata), or None if absent."""
        for tag_name, value in self.tags:
            if tag_name == name:
                return value
        return None


def _encoded_len(tags: tuple[Tag, ...]) -> int:
    return (
        _HEAD.size
        + sum(2 + len(name) + len(value.encode("utf-8")) for name, value in tags)
        + SIGNATURE_LEN
    )


def _advert_problem(a: CapabilityAdvert) -> str | None:
    """Describe what is structurally wrong with `a` (not its signature), or None."""
    checks: list[tuple[bool, str]] = [
        (a.version == ADVERT_VERSION, f"unsupported version {a.version}"),
        (isinstance(a.issuer, bytes) and len(a.issuer) == ED25519_PUBLIC_KEY_LEN, "bad issuer"),
        (isinstance(a.signature, bytes) and len(a.signature) == SIGNATURE_LEN, "bad signature"),
        (
            isinstance(a.seq, int) and not isinstance(a.seq, bool) and 0 <= a.seq <= U64_MAX,
            "seq must be an integer in 0..2**64-1",
        ),
        (
            isinstance(a.issued_at, int)
            and isinstance(a.expires_at, int)
            and 0 <= a.issued_at <= a.expires_at <= U64_MAX,
            "validity window must satisfy 0 <= issued_at <= expires_at < 2**64",
        ),
    ]
    for ok, message in checks:
        if not ok:
            return message
    problem = _tags_problem(a.tags)
    if problem is not None:
        return problem
    size = _encoded_len(a.tags)
    if size > MAX_ADVERT_LEN:
        return f"encoded advert would be {size} bytes, at most {MAX_ADVERT_LEN}"
    return None


def _advert_body(a: CapabilityAdvert) -> bytes:
    parts = [_HEAD.pack(a.version, a.issuer, a.seq, a.issued_at, a.expires_at, len(a.tags))]
    for name, value in a.tags:
        raw = value.encode("utf-8")
        parts += [bytes([len(name)]), name.encode("ascii"), bytes([len(raw)]), raw]
    return b"".join(parts)


def _checked(a: CapabilityAdvert) -> CapabilityAdvert:
    if not isinstance(a, CapabilityAdvert):
        raise TypeError(f"expected CapabilityAdvert, got {type(a).__name__}")
    problem = _advert_problem(a)
    if problem is not None:
        raise ValueError(f"invalid capability advert: {problem}")
    return a


def advert_signing_message(advert: CapabilityAdvert) -> bytes:
    """Return the exact message the issuer signs: `ADVERT_CONTEXT` + the encoding minus signature.

    Raises `ValueError` if the advert is structurally invalid.
    """
    return ADVERT_CONTEXT + _advert_body(_checked(advert))


def encode_advert(advert: CapabilityAdvert) -> bytes:
    """Return the canonical encoding of `advert`. Raises `ValueError` if it is invalid."""
    return _advert_body(_checked(advert)) + advert.signature


def _pull_bytes(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    """Read a u8 length and that many bytes at `pos`; return them and the next position."""
    if pos >= len(data):
        raise TruncatedError(f"advert ends before the length of {what}")
    end = pos + 1 + data[pos]
    if end > len(data):
        raise TruncatedError(f"advert ends inside {what}")
    return data[pos + 1 : end], end


def _decode_tag(raw_name: bytes, raw_value: bytes) -> Tag:
    if not raw_name.isascii():
        raise MalformedError("tag name is not ASCII")
    name = raw_name.decode("ascii")
    problem = _name_problem(name)
    if problem is not None:
        raise MalformedError(problem)
    try:
        value = raw_value.decode("utf-8")  # strict: no overlong forms, no surrogates
    except UnicodeDecodeError as exc:
        raise MalformedError(f"value of tag {name!r} is not valid UTF-8") from exc
    problem = _value_problem(name, value)
    if problem is not None:
        raise MalformedError(problem)
    return name, value


def decode_advert(data: bytes) -> CapabilityAdvert:
    """Parse an advert from exactly `data`. The signature is not checked here.

    Raises a `DecodeError`: `OversizeError`, `VersionError`, `TruncatedError` or
    `MalformedError` (trailing bytes, too many tags, bad tag name or value, tags unsorted or
    duplicated, issued_at after expires_at). Never anything else, whatever `data` holds.
    """
    data = bytes(data)
    if len(data) > MAX_ADVERT_LEN:
        raise OversizeError(f"advert of {len(data)} bytes exceeds {MAX_ADVERT_LEN}")
    if len(data) >= 1 and data[0] != ADVERT_VERSION:
        raise VersionError(f"advert version {data[0]} is not supported")
    if len(data) < MIN_ADVERT_LEN:
        raise TruncatedError(f"advert needs at least {MIN_ADVERT_LEN} bytes, got {len(data)}")
    version, issuer, seq, issued_at, expires_at, count = _HEAD.unpack_from(data)
    if count > MAX_TAGS:
        raise MalformedError(f"advert claims {count} tags, at most {MAX_TAGS}")
    pos = _HEAD.size
    tags: list[Tag] = []
    for i in range(count):
        raw_name, pos = _pull_bytes(data, pos, f"tag {i} name")
        raw_value, pos = _pull_bytes(data, pos, f"tag {i} value")
        tags.append(_decode_tag(raw_name, raw_value))
    expected = pos + SIGNATURE_LEN
    if len(data) < expected:
        raise TruncatedError(f"advert needs {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise MalformedError(f"{len(data) - expected} trailing bytes after advert")
    advert = CapabilityAdvert(
        issuer=issuer,
        seq=seq,
        issued_at=issued_at,
        expires_at=expires_at,
        tags=tuple(tags),
        signature=data[pos:],
        version=version,
    )
    problem = _advert_problem(advert)
    if problem is not None:
        raise MalformedError(f"invalid capability advert: {problem}")
    return advert


def _normalise_tags(tags: Mapping[str, str] | Iterable[Tag]) -> tuple[Tag, ...]:
    pairs = list(tags.items()) if isinstance(tags, Mapping) else list(tags)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"a tag must be a (name, value) pair, got {pair!r}")
        validate_tag(*pair)
    counts = Counter(name for name, _ in pairs)
    duplicates = sorted(name for name, n in counts.items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate tag names: {', '.join(duplicates)}")
    return tuple(sorted(pairs))


def issue_advert(
    identity: Identity,
    seq: int,
    tags: Mapping[str, str] | Iterable[Tag],
    issued_at: int,
    expires_at: int,
) -> CapabilityAdvert:
    """Sign an advert of `tags` for `identity`.

    `tags` is a mapping name -> value or an iterable of (name, value) pairs, in any order; use
    "" as the value of a tag without metadata. Raises `ValueError` for an invalid tag, a
    duplicate name, more than `MAX_TAGS` tags, an encoding over `MAX_ADVERT_LEN` bytes, `seq`
    outside u64, or an inverted validity window.
    """
    unsigned = CapabilityAdvert(
        issuer=identity.public_key,
        seq=seq,
        issued_at=issued_at,
        expires_at=expires_at,
        tags=_normalise_tags(tags),
        signature=bytes(SIGNATURE_LEN),
    )
    message = advert_signing_message(unsigned)  # validates every field
    return CapabilityAdvert(
        issuer=unsigned.issuer,
        seq=unsigned.seq,
        issued_at=unsigned.issued_at,
        expires_at=unsigned.expires_at,
        tags=unsigned.tags,
        signature=identity.sign(message),
    )


def _time_problem(a: CapabilityAdvert, now: float, skew: float) -> tuple[str, str] | None:
    if now + skew < a.issued_at:
        return "not_yet_valid", f"advert is valid from {a.issued_at}, now is {now}"
    if now - skew > a.expires_at:
        return "expired", f"advert expired at {a.expires_at}, now is {now}"
    return None


def verify_advert(advert: CapabilityAdvert, now: float, *, skew: float = DEFAULT_SKEW) -> None:
    """Check that `advert` is well formed, signed by its issuer and valid at `now` (± `skew`).

    Raises `AdvertError` with reason "malformed", "bad_signature", "not_yet_valid" or
    "expired" (checked in that order); returns None when the advert is good.
    """
    if not isinstance(advert, CapabilityAdvert):
        raise AdvertError(f"expected CapabilityAdvert, got {type(advert).__name__}", "malformed")
    problem = _advert_problem(advert)
    if problem is not None:
        raise AdvertError(problem, "malformed")
    try:
        verify_signature(advert.issuer, advert_signing_message(advert), advert.signature)
    except AuthenticationError as exc:
        raise AdvertError("advert is not signed by its issuer", "bad_signature") from exc
    refusal = _time_problem(advert, now, skew)
    if refusal is not None:
        raise AdvertError(refusal[1], refusal[0])


# ---------------------------------------------------------------------------------------------
# Deadlines: keyed min-heap with lazy deletion

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """A map key -> deadline that finds and removes the earliest deadlines in O(log n).

    A binary heap with lazy deletion: changing or removing a key leaves its old heap entry in
    place, and an entry counts only while it still matches the map. The heap is rebuilt when
    stale entries outnumber live ones, so memory stays O(len).
    """

    __slots__ = ("_at", "_heap", "_tie")

    def __init__(self) -> None:
        self._at: dict[K, float] = {}
        # The counter breaks ties so keys themselves are never compared (they need not be ordered).
        self._heap: list[tuple[float, int, K]] = []
        self._tie = itertools.count()

    def set(self, key: K, deadline: float) -> None:
        """Give `key` this deadline (replacing any earlier one). Raises `ValueError` on NaN."""
        if math.isnan(deadline):
            raise ValueError("deadline must not be NaN")
        self._at[key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._tie), key))
        self._compact()

    def discard(self, key: K) -> None:
        """Forget `key` if present."""
        if self._at.pop(key, None) is not None:
            self._compact()

    def get(self, key: K) -> float | None:
        """The deadline of `key`, or None."""
        return self._at.get(key)

    def soonest(self) -> tuple[K, float] | None:
        """The key with the earliest deadline and that deadline, or None when empty."""
        heap = self._heap
        while heap:
            deadline, _, key = heap[0]
            if self._at.get(key) == deadline:
                return key, deadline
            heapq.heappop(heap)  # stale: the key was changed or removed since
        return None

    def pop_before(self, limit: float) -> list[K]:
        """Remove and return, earliest first, every key whose deadline is < `limit`."""
        out: list[K] = []
        heap = self._heap
        while heap and heap[0][0] < limit:
            deadline, _, key = heapq.heappop(heap)
            if self._at.get(key) == deadline:
                del self._at[key]
                out.append(key)
        return out

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._at) + 32:
            self._heap = [(d, next(self._tie), k) for k, d in self._at.items()]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, key: object) -> bool:
        return key in self._at


# ---------------------------------------------------------------------------------------------
# The index


@dataclass(frozen=True, slots=True)
class _Entry:
    advert: CapabilityAdvert
    names: frozenset[str]


class CapabilityIndex:
    """The newest verified advert of each issuer, with a tag -> CellIDs inverted index.

    At most `capacity` issuers are kept. Every `accept` first sweeps expired adverts; when a
    new issuer arrives and the index is still full, the least recently updated one goes. `skew` is the
    clock-skew tolerance (seconds) applied to every validity check.

    `drops` counts refused adverts by reason: "malformed", "undecodable", "bad_signature",
    "not_yet_valid", "expired", "stale" (sequence below the stored one), "duplicate" (the
    stored advert again) and "conflict" (same sequence, different content: the issuer signed
    two adverts with one sequence number; the first one stays). `events` counts "accepted",
    "replaced", "evicted", "expired" and "forgotten".
    """

    def __init__(
        self, capacity: int = DEFAULT_INDEX_CAPACITY, *, skew: float = DEFAULT_SKEW
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if skew < 0:
            raise ValueError("skew must not be negative")
        self.capacity = capacity
        self.skew = skew
        self.drops: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        # Insertion order is update order: the first entry is the least recently updated.
        self._entries: OrderedDict[CellId, _Entry] = OrderedDict()
        self._by_name: dict[str, set[CellId]] = {}
        self._by_pair: dict[Tag, set[CellId]] = {}
        # Deadline = expires_at + skew: past it, no verifier would accept the advert any more.
        self._deadlines: Deadlines[CellId] = Deadlines()

    # -- mutation ------------------------------------------------------------------------------

    def accept(self, advert: CapabilityAdvert, now: float) -> bool:
        """Verify `advert` and keep it if it is the newest from its issuer; True if stored.

        Never raises for a bad advert: the refusal is counted in `drops`. Cheap checks (shape,
        time, sequence) run before the signature so replays cost no Ed25519 verification.
        """
        # Sweeping first makes the outcome independent of when the driver last called
        # `expire`: an expired entry never blocks (or is replaced like) a live one.
        self.expire(now)
        if not isinstance(advert, CapabilityAdvert) or _advert_problem(advert) is not None:
            self.drops["malformed"] += 1
            return False
        refusal = _time_problem(advert, now, self.skew)
        if refusal is not None:
            self.drops[refusal[0]] += 1
            return False
        cell_id = cell_id_from_public_key(advert.issuer)
        current = self._entries.get(cell_id)
        if current is not None:
            if advert.seq < current.advert.seq:
                self.drops["stale"] += 1
                return False
            if advert == current.advert:
                self.drops["duplicate"] += 1
                return False
        try:
            verify_signature(advert.issuer, advert_signing_message(advert), advert.signature)
        except AuthenticationError:
            self.drops["bad_signature"] += 1
            return False
        if current is not None and advert.seq == current.advert.seq:
            self.drops["conflict"] += 1
            return False
        if current is not None:
            self._remove(cell_id)
            self.events["replaced"] += 1
        elif len(self._entries) >= self.capacity:
            self._remove(next(iter(self._entries)))  # least recently updated
            self.events["evicted"] += 1
        self._insert(cell_id, advert)
        self.events["accepted"] += 1
        return True

    def accept_encoded(self, data: bytes, now: float) -> bool:
        """Decode and `accept` an advert straight off the wire; undecodable input is counted."""
        try:
            advert = decode_advert(data)
        except DecodeError:
            self.drops["undecodable"] += 1
            return False
        return self.accept(advert, now)

    def forget(self, cell_id: bytes) -> bool:
        """Drop the advert of `cell_id`; True if there was one.

        Afterwards an advert with any sequence number is accepted again from that issuer.
        """
        if CellId(bytes(cell_id)) not in self._entries:
            return False
        self._remove(CellId(bytes(cell_id)))
        self.events["forgotten"] += 1
        return True

    def expire(self, now: float) -> int:
        """Drop every advert that has expired at `now` (beyond the skew); return how many."""
        gone = self._deadlines.pop_before(now)
        for cell_id in gone:
            self._remove(cell_id, deadline_gone=True)
        self.events["expired"] += len(gone)
        return len(gone)

    def _insert(self, cell_id: CellId, advert: CapabilityAdvert) -> None:
        entry = _Entry(advert, frozenset(name for name, _ in advert.tags))
        self._entries[cell_id] = entry
        for tag in advert.tags:
            self._by_name.setdefault(tag[0], set()).add(cell_id)
            self._by_pair.setdefault(tag, set()).add(cell_id)
        self._deadlines.set(cell_id, advert.expires_at + self.skew)

    def _remove(self, cell_id: CellId, *, deadline_gone: bool = False) -> None:
        entry = self._entries.pop(cell_id)
        for tag in entry.advert.tags:
            _discard_from(self._by_name, tag[0], cell_id)
            _discard_from(self._by_pair, tag, cell_id)
        if not deadline_gone:
            self._deadlines.discard(cell_id)

    # -- queries -------------------------------------------------------------------------------

    def _live(self, entry: _Entry, now: float) -> bool:
        # Entries past their deadline but not yet swept by `expire` must not answer queries.
        return now - self.skew <= entry.advert.expires_at

    def get(self, cell_id: bytes, now: float) -> CapabilityAdvert | None:
        """The current advert of `cell_id`, or None (also when it has expired at `now`)."""
        entry = self._entries.get(CellId(bytes(cell_id)))
        return entry.advert if entry is not None and self._live(entry, now) else None

    def find(self, tag: str, value: str | None = None, *, now: float) -> list[CellId]:
        """CellIDs of issuers whose live advert has tag `tag` (with exactly `value` if given).

        Sorted by CellID so the answer is deterministic. Costs O(matches): the inverted index
        is consulted, not every advert. Raises `ValueError` if `tag` is not a valid tag name.
        """
        problem = _name_problem(tag)
        if problem is not None:
            raise ValueError(problem)
        holders = self._by_name.get(tag) if value is None else self._by_pair.get((tag, value))
        if not holders:
            return []
        entries = self._entries
        return sorted(c for c in holders if self._live(entries[c], now))

    def capabilities_of(self, cell_id: bytes, now: float) -> frozenset[str]:
        """The tag names `cell_id` advertises at `now` (empty if none): the ring-1 policy's
        `capability NAME` condition tests membership in this set."""
        entry = self._entries.get(CellId(bytes(cell_id)))
        if entry is None or not self._live(entry, now):
            return frozenset()
        return entry.names

    def tag_names(self) -> frozenset[str]:
        """Every tag name some stored advert carries (expired ones included until swept)."""
        return frozenset(self._by_name)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, cell_id: object) -> bool:
        return cell_id in self._entries


def _discard_from(index: dict[K, set[CellId]], key: K, cell_id: CellId) -> None:
    holders = index.get(key)
    if holders is not None:
        holders.discard(cell_id)
        if not holders:
            del index[key]  # empty sets would keep every tag name ever seen alive
