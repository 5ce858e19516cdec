"""Permission tokens: signed, delegable grants of rights on channels, and their revocation.

A token says "issuer grants subject these rights on channels matching this pattern, between
not_before and not_after". A root token is issued by a key the verifier trusts; a delegated
token is issued by the subject of its parent (which must hold DELEGATE) and may only narrow
the parent: fewer or equal rights, a covered pattern, a window inside the parent's window.
`verify_chain` checks a whole chain, root first, and returns the leaf or raises `TokenError`
with a machine-readable `reason`.

A revocation is a record signed by a token's issuer naming the token's id. A `RevocationSet`
keeps the ones whose signature checks and refuses any chain containing a revoked token.

Layouts are in docs/tokens.md. Everything here is pure: no I/O, no clocks, no randomness
(nonces and times are passed in).
"""

from __future__ import annotations

import hmac
import itertools
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntFlag

import blake3

from cellmesh.errors import (
    AuthenticationError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.identity.cellid import CELL_ID_LEN, CellId, cell_id_from_public_key
from cellmesh.identity.keys import (
    ED25519_PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    Identity,
    verify_signature,
)

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_SKEW",
    "MAX_PATTERN_LEN",
    "MAX_TOKEN_DEPTH",
    "MAX_TOKEN_LEN",
    "NONCE_LEN",
    "REVOCATION_CONTEXT",
    "REVOCATION_LEN",
    "REVOCATION_VERSION",
    "TOKEN_CONTEXT",
    "TOKEN_ID_LEN",
    "TOKEN_VERSION",
    "ZERO_TOKEN_ID",
    "Revocation",
    "RevocationSet",
    "Rights",
    "Token",
    "TokenError",
    "channel_matches",
    "decode_revocation",
    "decode_token",
    "encode_revocation",
    "encode_token",
    "issue_token",
    "pattern_covers",
    "revocation_signing_message",
    "revoke_token",
    "token_id",
    "token_signing_message",
    "validate_channel",
    "validate_pattern",
    "verify_chain",
]

TOKEN_VERSION = 1
REVOCATION_VERSION = 1
TOKEN_CONTEXT = b"cellmesh/v1 token\x00"
"""Domain-separation prefix of the message a token issuer signs."""
REVOCATION_CONTEXT = b"cellmesh/v1 token-revocation\x00"
"""Domain-separation prefix of the message a revocation issuer signs."""

NONCE_LEN = 16
TOKEN_ID_LEN = 32
ZERO_TOKEN_ID = bytes(TOKEN_ID_LEN)
"""The parent id of a root token."""
MAX_PATTERN_LEN = 255
"""Longest channel pattern, in bytes (ASCII)."""
MAX_SEGMENTS = 32
"""Most segments a channel or pattern may have."""
MAX_TOKEN_DEPTH = 16
"""Largest depth the encoding accepts; `verify_chain`'s `max_depth` is usually smaller."""
DEFAULT_SKEW = 120
DEFAULT_MAX_DEPTH = 4
U64_MAX = 2**64 - 1

# version u8 | issuer 32 | subject 16 | rights u8 | depth u8 | not_before u64 | not_after u64
# | nonce 16 | parent 32 | pattern_len u8 | pattern | signature 64
_TOKEN_HEAD = struct.Struct(
    f"!B{ED25519_PUBLIC_KEY_LEN}s{CELL_ID_LEN}sBBQQ{NONCE_LEN}s{TOKEN_ID_LEN}sB"
)
MIN_TOKEN_LEN = _TOKEN_HEAD.size + 1 + SIGNATURE_LEN
MAX_TOKEN_LEN = _TOKEN_HEAD.size + MAX_PATTERN_LEN + SIGNATURE_LEN

# version u8 | token_id 32 | issuer 32 | time u64 | signature 64
_REV_BODY = struct.Struct(f"!B{TOKEN_ID_LEN}s{ED25519_PUBLIC_KEY_LEN}sQ")
REVOCATION_LEN = _REV_BODY.size + SIGNATURE_LEN

_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.:-]+")


class TokenError(AuthenticationError):
    """A token, chain or revocation was refused. `reason` says why, in one word.

    Reasons from `verify_chain`: "expired", "not_yet_valid", "bad_signature",
    "untrusted_root", "widened", "too_deep", "revoked", "wrong_channel", "missing_right",
    "broken_chain", "no_delegate_right", "malformed". `RevocationSet.add` may also give
    "full" and `revoke_token` "not_issuer".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class Rights(IntFlag):
    """What a token allows. No right implies another; ADMIN is just a right like the rest."""

    PUBLISH = 0x01
    SUBSCRIBE = 0x02
    ADMIN = 0x04
    DELEGATE = 0x08


_RIGHTS_MASK = 0x0F
"""Bits of the rights byte that are defined; the rest are reserved and must be zero."""


# ---------------------------------------------------------------------------------------------
# Channels and patterns


def _pattern_problem(pattern: object, *, wildcards: bool) -> str | None:
    if not isinstance(pattern, str):
        return f"must be str, got {type(pattern).__name__}"
    if not pattern.isascii():
        return "must be ASCII"
    if not 0 < len(pattern) <= MAX_PATTERN_LEN:
        return f"length must be 1..{MAX_PATTERN_LEN}, got {len(pattern)}"
    segments = pattern.split("/")
    if len(segments) > MAX_SEGMENTS:
        return f"has {len(segments)} segments, at most {MAX_SEGMENTS} allowed"
    for i, seg in enumerate(segments):
        if wildcards and seg == "*":
            continue
        if wildcards and seg == "**":
            if i != len(segments) - 1:
                return "'**' is only allowed as the last segment"
            continue
        if not _SEGMENT_RE.fullmatch(seg):
            return f"bad segment {seg!r} (allowed: A-Z a-z 0-9 _ . : -)"
    return None


def validate_pattern(pattern: str) -> None:
    """Raise `ValueError` unless `pattern` is a valid channel pattern."""
    problem = _pattern_problem(pattern, wildcards=True)
    if problem is not None:
        raise ValueError(f"channel pattern {pattern!r} {problem}")


def validate_channel(channel: str) -> None:
    """Raise `ValueError` unless `channel` is a valid concrete channel name (no wildcards)."""
    problem = _pattern_problem(channel, wildcards=False)
    if problem is not None:
        raise ValueError(f"channel {channel!r} {problem}")


def _covers(outer: list[str], inner: list[str]) -> bool:
    for i, o in enumerate(outer):
        if o == "**":
            # Matches one or more further segments; inner's rest always needs at least one
            # segment per entry, so it is covered iff it is not empty.
            return len(inner) > i
        if i >= len(inner):
            return False
        s = inner[i]
        if s == "**":
            return False  # unbounded depth against a bounded outer
        if o != "*" and o != s:
            return False  # literal outer: inner must be the same literal (not "*")
    return len(inner) == len(outer)


def pattern_covers(outer: str, inner: str) -> bool:
    """Return whether every channel matched by `inner` is also matched by `outer`.

    `*` matches exactly one segment; a trailing `**` matches one or more segments. A concrete
    channel is a pattern without wildcards, so `pattern_covers(p, channel)` is matching.
    Raises `ValueError` if either pattern is invalid.
    """
    validate_pattern(outer)
    validate_pattern(inner)
    return _covers(outer.split("/"), inner.split("/"))


def channel_matches(pattern: str, channel: str) -> bool:
    """Return whether the concrete `channel` matches `pattern`; False if either is invalid."""
    if _pattern_problem(pattern, wildcards=True) or _pattern_problem(channel, wildcards=False):
        return False
    return _covers(pattern.split("/"), channel.split("/"))


# ---------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True, slots=True)
class Token:
    """A signed permission token. Build with `issue_token` or `decode_token`."""

    version: int
    issuer: bytes
    """Ed25519 public key (32 bytes) of the issuer."""
    subject: CellId
    """CellID (16 bytes) of the holder."""
    pattern: str
    rights: Rights
    not_before: int
    not_after: int
    nonce: bytes
    parent: bytes
    """`token_id` of the parent token, or `ZERO_TOKEN_ID` for a root token."""
    depth: int
    """0 for a root token, parent's depth + 1 otherwise."""
    signature: bytes


def _token_problem(t: Token) -> str | None:
    """Describe what is structurally wrong with `t` (not its signature), or None."""
    checks: list[tuple[bool, str]] = [
        (t.version == TOKEN_VERSION, f"unsupported version {t.version}"),
        (isinstance(t.issuer, bytes) and len(t.issuer) == ED25519_PUBLIC_KEY_LEN, "bad issuer"),
        (isinstance(t.subject, bytes) and len(t.subject) == CELL_ID_LEN, "bad subject"),
        (isinstance(t.nonce, bytes) and len(t.nonce) == NONCE_LEN, "bad nonce"),
        (isinstance(t.parent, bytes) and len(t.parent) == TOKEN_ID_LEN, "bad parent id"),
        (isinstance(t.signature, bytes) and len(t.signature) == SIGNATURE_LEN, "bad signature"),
        (
            isinstance(t.rights, int) and t.rights != 0 and (int(t.rights) & ~_RIGHTS_MASK) == 0,
            "rights must be a non-empty set of known rights",
        ),
        (
            isinstance(t.not_before, int)
            and isinstance(t.not_after, int)
            and 0 <= t.not_before <= t.not_after <= U64_MAX,
            "validity window must satisfy 0 <= not_before <= not_after < 2**64",
        ),
        (isinstance(t.depth, int) and 0 <= t.depth <= MAX_TOKEN_DEPTH, "bad depth"),
    ]
    for ok, message in checks:
        if not ok:
            return message
    if (t.depth == 0) != (t.parent == ZERO_TOKEN_ID):
        return "a token has a zero parent id exactly when its depth is 0"
    problem = _pattern_problem(t.pattern, wildcards=True)
    if problem is not None:
        return f"pattern {problem}"
    return None


def _token_body(t: Token) -> bytes:
    pattern = t.pattern.encode("ascii")
    head = _TOKEN_HEAD.pack(
        t.version,
        t.issuer,
        t.subject,
        int(t.rights),
        t.depth,
        t.not_before,
        t.not_after,
        t.nonce,
        t.parent,
        len(pattern),
    )
    return head + pattern


def token_signing_message(token: Token) -> bytes:
    """Return the exact message the issuer signs: `TOKEN_CONTEXT` + the encoding minus signature.

    Raises `ValueError` if the token is structurally invalid.
    """
    problem = _token_problem(token)
    if problem is not None:
        raise ValueError(f"invalid token: {problem}")
    return TOKEN_CONTEXT + _token_body(token)


def encode_token(token: Token) -> bytes:
    """Return the canonical encoding of `token`. Raises `ValueError` if it is invalid."""
    problem = _token_problem(token)
    if problem is not None:
        raise ValueError(f"invalid token: {problem}")
    return _token_body(token) + token.signature


def decode_token(data: bytes) -> Token:
    """Parse a token from exactly `data`. The signature is not checked here.

    Raises `TruncatedError`, `OversizeError`, `VersionError` or `MalformedError`.
    """
    data = bytes(data)
    if len(data) > MAX_TOKEN_LEN:
        raise OversizeError(f"token of {len(data)} bytes exceeds {MAX_TOKEN_LEN}")
    if len(data) >= 1 and data[0] != TOKEN_VERSION:
        raise VersionError(f"token version {data[0]} is not supported")
    if len(data) < MIN_TOKEN_LEN:
        raise TruncatedError(f"token needs at least {MIN_TOKEN_LEN} bytes, got {len(data)}")
    (version, issuer, subject, rights, depth, nb, na, nonce, parent, plen) = (
        _TOKEN_HEAD.unpack_from(data)
    )
    expected = _TOKEN_HEAD.size + plen + SIGNATURE_LEN
    if len(data) < expected:
        raise TruncatedError(f"token needs {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise MalformedError(f"{len(data) - expected} trailing bytes after token")
    raw_pattern = data[_TOKEN_HEAD.size : _TOKEN_HEAD.size + plen]
    if not raw_pattern.isascii():
        raise MalformedError("token pattern is not ASCII")
    if rights & ~_RIGHTS_MASK:
        raise MalformedError(f"reserved rights bits set: {rights:#04x}")
    token = Token(
        version=version,
        issuer=issuer,
        subject=CellId(subject),
        pattern=raw_pattern.decode("ascii"),
        rights=Rights(rights),
        not_before=nb,
        not_after=na,
        nonce=nonce,
        parent=parent,
        depth=depth,
        signature=data[expected - SIGNATURE_LEN :],
    )
    problem = _token_problem(token)
    if problem is not None:
        raise MalformedError(f"invalid token: {problem}")
    return token


def token_id(token: Token) -> bytes:
    """Return the 32-byte id of `token`: BLAKE3 of its canonical encoding (signature included)."""
    return bytes(blake3.blake3(encode_token(token)).digest(length=TOKEN_ID_LEN))


def _narrowing_problem(parent: Token, child: Token) -> tuple[str, str] | None:
    """Check that `child` may be a delegation of `parent`; return (reason, message) or None."""
    if not hmac.compare_digest(child.parent, token_id(parent)):
        return "broken_chain", "parent id does not match the previous token"
    if child.depth != parent.depth + 1:
        return "broken_chain", "depth is not the parent's depth + 1"
    if not hmac.compare_digest(cell_id_from_public_key(child.issuer), parent.subject):
        return "broken_chain", "issuer is not the parent's subject"
    if not parent.rights & Rights.DELEGATE:
        return "no_delegate_right", "parent token lacks DELEGATE"
    if int(child.rights) & ~int(parent.rights):
        return "widened", "rights exceed the parent's"
    if not _covers(parent.pattern.split("/"), child.pattern.split("/")):
        return "widened", "pattern is not covered by the parent's"
    if child.not_before < parent.not_before or child.not_after > parent.not_after:
        return "widened", "validity window is not inside the parent's"
    return None


def issue_token(
    issuer: Identity,
    subject: CellId,
    pattern: str,
    rights: Rights,
    not_before: int,
    not_after: int,
    nonce: bytes,
    parent: Token | None = None,
) -> Token:
    """Sign a token granting `subject` `rights` on channels matching `pattern`.

    With `parent`, the token is a delegation: `issuer` must be the parent's subject, the parent
    must hold DELEGATE, and the new token must narrow it. Raises `TokenError` (reasons
    "broken_chain", "no_delegate_right", "widened", "too_deep") if not, and `ValueError` for
    malformed arguments. `nonce` must be 16 fresh random bytes.
    """
    if parent is not None:
        parent_problem = _token_problem(parent)
        if parent_problem is not None:
            raise ValueError(f"invalid parent token: {parent_problem}")
        if parent.depth >= MAX_TOKEN_DEPTH:
            raise TokenError(f"delegation deeper than {MAX_TOKEN_DEPTH}", "too_deep")
    token = Token(
        version=TOKEN_VERSION,
        issuer=issuer.public_key,
        subject=CellId(bytes(subject)),
        pattern=pattern,
        rights=Rights(rights),
        not_before=not_before,
        not_after=not_after,
        nonce=bytes(nonce),
        parent=ZERO_TOKEN_ID if parent is None else token_id(parent),
        depth=0 if parent is None else parent.depth + 1,
        signature=bytes(SIGNATURE_LEN),
    )
    message = token_signing_message(token)  # validates fields
    if parent is not None:
        refusal = _narrowing_problem(parent, token)
        if refusal is not None:
            raise TokenError(refusal[1], refusal[0])
    return Token(
        version=token.version,
        issuer=token.issuer,
        subject=token.subject,
        pattern=token.pattern,
        rights=token.rights,
        not_before=token.not_before,
        not_after=token.not_after,
        nonce=token.nonce,
        parent=token.parent,
        depth=token.depth,
        signature=issuer.sign(message),
    )


# ---------------------------------------------------------------------------------------------
# Revocation


@dataclass(frozen=True, slots=True)
class Revocation:
    """A statement by `issuer` that the token with id `token_id` it issued is revoked."""

    token_id: bytes
    issuer: bytes
    time: int
    """When the revocation was made (Unix seconds); informational."""
    signature: bytes
    version: int = REVOCATION_VERSION


def _revocation_problem(r: Revocation) -> str | None:
    checks: list[tuple[bool, str]] = [
        (r.version == REVOCATION_VERSION, f"unsupported version {r.version}"),
        (isinstance(r.token_id, bytes) and len(r.token_id) == TOKEN_ID_LEN, "bad token id"),
        (isinstance(r.issuer, bytes) and len(r.issuer) == ED25519_PUBLIC_KEY_LEN, "bad issuer"),
        (isinstance(r.time, int) and 0 <= r.time <= U64_MAX, "bad time"),
        (isinstance(r.signature, bytes) and len(r.signature) == SIGNATURE_LEN, "bad signature"),
    ]
    for ok, message in checks:
        if not ok:
            return message
    return None


def _revocation_body(r: Revocation) -> bytes:
    return _REV_BODY.pack(r.version, r.token_id, r.issuer, r.time)


def revocation_signing_message(rev: Revocation) -> bytes:
    """Return the message a revocation's issuer signs: `REVOCATION_CONTEXT` + body."""
    problem = _revocation_problem(rev)
    if problem is not None:
        raise ValueError(f"invalid revocation: {problem}")
    return REVOCATION_CONTEXT + _revocation_body(rev)


def revoke_token(issuer: Identity, token: Token, time: int) -> Revocation:
    """Sign a revocation of `token`. Raises `TokenError("not_issuer")` unless `issuer` issued it."""
    if not hmac.compare_digest(issuer.public_key, token.issuer):
        raise TokenError("only a token's issuer can revoke it", "not_issuer")
    unsigned = Revocation(
        token_id=token_id(token),
        issuer=issuer.public_key,
        time=time,
        signature=bytes(SIGNATURE_LEN),
    )
    return Revocation(
        token_id=unsigned.token_id,
        issuer=unsigned.issuer,
        time=unsigned.time,
        signature=issuer.sign(revocation_signing_message(unsigned)),
    )


def encode_revocation(rev: Revocation) -> bytes:
    """Return the canonical encoding of `rev` (`REVOCATION_LEN` bytes)."""
    problem = _revocation_problem(rev)
    if problem is not None:
        raise ValueError(f"invalid revocation: {problem}")
    return _revocation_body(rev) + rev.signature


def decode_revocation(data: bytes) -> Revocation:
    """Parse a revocation from exactly `data`. The signature is not checked here."""
    data = bytes(data)
    if len(data) > REVOCATION_LEN:
        raise OversizeError(f"revocation of {len(data)} bytes exceeds {REVOCATION_LEN}")
    if len(data) >= 1 and data[0] != REVOCATION_VERSION:
        raise VersionError(f"revocation version {data[0]} is not supported")
    if len(data) < REVOCATION_LEN:
        raise TruncatedError(f"revocation needs {REVOCATION_LEN} bytes, got {len(data)}")
    version, tid, issuer, time = _REV_BODY.unpack_from(data)
    return Revocation(
        token_id=tid,
        issuer=issuer,
        time=time,
        signature=data[_REV_BODY.size :],
        version=version,
    )


class RevocationSet:
    """The revocations a node has seen and verified, bounded to `max_entries`.

    Entries are keyed by (token id, issuer key), so a revocation signed by anyone but the
    token's issuer never revokes it (the token id commits to its issuer). Revocations whose
    issuer `pinned` accepts (a trusted root) are never forgotten: when the set is full of them,
    `add` refuses new ones rather than un-revoking a token. Anyone can sign revocations of tokens
    it issued, so the others are kept oldest-first and give way, oldest first, to new ones when
    the set is full: a flood of strangers' revocations can then push out a revocation by a
    delegated (non-root) issuer, which is why a token that must stay revoked is best revoked at
    the root (docs/tokens.md).
    """

    __slots__ = ("_max_entries", "_others", "_pin", "_pinned", "evicted")

    def __init__(
        self, max_entries: int = 100_000, pinned: Callable[[bytes], bool] | None = None
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._pin = pinned
        self._pinned: set[tuple[bytes, bytes]] = set()
        self._others: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self.evicted = 0

    def add(self, rev: Revocation) -> bool:
        """Verify and record `rev`; return True if it was new, False if already known.

        Raises `TokenError` with reason "malformed", "bad_signature" or "full".
        """
        problem = _revocation_problem(rev)
        if problem is not None:
            raise TokenError(problem, "malformed")
        try:
            verify_signature(rev.issuer, revocation_signing_message(rev), rev.signature)
        except AuthenticationError as exc:
            raise TokenError("revocation signature did not verify", "bad_signature") from exc
        key = (rev.token_id, rev.issuer)
        if key in self._pinned or key in self._others:
            return False
        if len(self) >= self._max_entries:
            if not self._others:
                raise TokenError(f"revocation set holds {self._max_entries} entries", "full")
            self._others.popitem(last=False)
            self.evicted += 1
        if self._pin is not None and self._pin(rev.issuer):
            self._pinned.add(key)
        else:
            self._others[key] = None
        return True

    def add_all(self, revs: Iterable[Revocation]) -> int:
        """Add each revocation; return how many were new. Stops at the first refusal."""
        return sum(1 for rev in revs if self.add(rev))

    def is_revoked(self, token: Token) -> bool:
        """Return whether `token` was revoked by its issuer."""
        key = (token_id(token), token.issuer)
        return key in self._pinned or key in self._others

    def __len__(self) -> int:
        return len(self._pinned) + len(self._others)


# ---------------------------------------------------------------------------------------------
# Chain verification


def verify_chain(
    chain: Sequence[Token],
    *,
    now: int,
    trusted_roots: set[bytes] | frozenset[bytes],
    channel: str,
    right: Rights,
    skew: int = DEFAULT_SKEW,
    max_depth: int = DEFAULT_MAX_DEPTH,
    revoked: RevocationSet | None = None,
) -> Token:
    """Check a delegation chain (root first, leaf last) and return the leaf.

    The leaf grants `right` on `channel` at time `now` (give or take `skew` seconds) if: the
    chain has at most `max_depth` delegations, the root's issuer is in `trusted_roots`, every
    signature verifies, each link is issued by its parent's subject, whose token holds DELEGATE,
    and narrows it, no token is revoked, every token is inside its validity window, and the
    leaf's pattern matches `channel` and holds every bit of `right`.

    The caller must still check that the leaf's `subject` is the authenticated peer.
    Raises `TokenError` with the first failing check's `reason`.
    """
    if right == 0 or int(right) & ~_RIGHTS_MASK:
        raise ValueError("right must be a non-empty set of known rights")
    if not chain:
        raise TokenError("empty chain", "malformed")
    if len(chain) > max_depth + 1:
        raise TokenError(f"{len(chain) - 1} delegations, at most {max_depth}", "too_deep")
    for tok in chain:
        if not isinstance(tok, Token):
            raise TokenError(f"chain element is {type(tok).__name__}, not Token", "malformed")
        problem = _token_problem(tok)
        if problem is not None:
            raise TokenError(problem, "malformed")

    root = chain[0]
    if root.depth != 0:
        raise TokenError("first token is not a root token", "broken_chain")
    if not any(hmac.compare_digest(root.issuer, key) for key in trusted_roots):
        raise TokenError("root issuer is not trusted", "untrusted_root")

    for tok in chain:
        try:
            verify_signature(tok.issuer, token_signing_message(tok), tok.signature)
        except AuthenticationError as exc:
            raise TokenError(
                f"token at depth {tok.depth} is not signed by its issuer", "bad_signature"
            ) from exc

    for parent, child in itertools.pairwise(chain):
        refusal = _narrowing_problem(parent, child)
        if refusal is not None:
            raise TokenError(f"depth {child.depth}: {refusal[1]}", refusal[0])

    if revoked is not None:
        for tok in chain:
            if revoked.is_revoked(tok):
                raise TokenError(f"token at depth {tok.depth} is revoked", "revoked")

    for tok in chain:
        if now + skew < tok.not_before:
            raise TokenError(f"token at depth {tok.depth} is not valid yet", "not_yet_valid")
        if now - skew > tok.not_after:
            raise TokenError(f"token at depth {tok.depth} has expired", "expired")

    leaf = chain[-1]
    if not channel_matches(leaf.pattern, channel):
        raise TokenError(f"channel {channel!r} is not matched by {leaf.pattern!r}", "wrong_channel")
    if int(right) & ~int(leaf.rights):
        missing = Rights(int(right) & ~int(leaf.rights))
        raise TokenError(f"token lacks {missing!r}", "missing_right")
    return leaf
