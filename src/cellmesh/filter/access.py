"""Channel access decisions: tokens + ring-1 policy at subscription time, an O(1) check per packet.

Theory of operation: when a peer asks to subscribe to, or publish on, a channel this node hosts,
`AccessController.request` does the expensive work once: it finds the channel's declaration,
verifies the peer's permission-token chain (signatures, delegation, expiry, revocation), asks the
ring-1 policy with everything it knows (source, channel, capabilities, rights, trust, session age,
rate), and caches a positive verdict as a `Grant` keyed by (peer, right, channel hash). Every
packet after that costs one dictionary lookup (`grant`) plus, for `throttle` rules, one token
bucket. A grant ends when its token expires, when the peer goes away, or when a policy reload or a
revocation makes `revalidate` decide again and say no.

All times are passed in: `wall` is Unix time in seconds (tokens are dated in it) and `now` the
caller's monotonic clock (buckets).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from cellmesh.filter.channels import ChannelSpec, ChannelTable, channel_hash
from cellmesh.filter.policy import Context, Decision, PolicyHolder, Throttles
from cellmesh.identity.tokens import (
    DEFAULT_SKEW,
    RevocationSet,
    Rights,
    Token,
    TokenError,
    verify_chain,
)

Right = Literal["publish", "subscribe"]
RIGHT_BITS: Final[dict[str, Rights]] = {"publish": Rights.PUBLISH, "subscribe": Rights.SUBSCRIBE}
MAX_GRANTS: Final = 65536


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one access request. `reason` is "ok" or why not (a stable word)."""

    allowed: bool
    reason: str
    channel: str
    detail: str = ""
    decision: Decision | None = None
    expires: float | None = None
    """Unix time at which the grant lapses (the token's not_after), or None."""


@dataclass(slots=True)
class Grant:
    """A cached positive verdict: what the per-packet check consults."""

    peer: bytes
    right: Right
    channel: str
    hash: int
    decision: Decision
    chain: tuple[Token, ...]
    expires: float | None
    session_age_base: float
    """The session age at request time minus the request's monotonic time (to re-evaluate)."""
    trust: float = 0.0
    rate: float = 0.0
    local: bool = False
    """The rest of what the request said, so `revalidate` decides on the same inputs."""


class AccessController:
    """Decides channel access for peers and caches the verdicts. See the module docstring."""

    def __init__(
        self,
        channels: ChannelTable,
        own_key: bytes,
        trusted_roots: frozenset[bytes] = frozenset(),
        policy: PolicyHolder | None = None,
        capabilities_of: Callable[[bytes], frozenset[str]] | None = None,
        revocations: RevocationSet | None = None,
        skew: int = DEFAULT_SKEW,
        max_grants: int = MAX_GRANTS,
    ) -> None:
        self.channels = channels
        self.trusted_roots = trusted_roots | {own_key}
        self.policy = policy
        # Revocations by a key we trust as a root are never forgotten; others may give way to
        # newer ones when the set is full (RevocationSet explains why).
        self.revocations = (
            revocations
            if revocations is not None
            else RevocationSet(pinned=lambda issuer: issuer in self.trusted_roots)
        )
        self._capabilities_of = capabilities_of
        self.skew = skew
        self.max_grants = max_grants
        self._grants: dict[tuple[bytes, str, int], Grant] = {}
        self.throttles = Throttles()
        self.refusals: dict[str, int] = {}

    # ------------------------------------------------------------------ deciding

    def request(
        self,
        peer: bytes,
        channel: str,
        right: Right,
        chain: Sequence[Token],
        *,
        wall: float,
        now: float,
        session_age: float = 0.0,
        trust: float = 0.0,
        rate: float = 0.0,
        local: bool = False,
    ) -> Verdict:
        """Decide whether `peer` may use `right` on `channel`; cache and return the verdict.

        `local` is True for this node's own applications (they may use local channels).
        """
        verdict = self._decide(peer, channel, right, chain, wall, session_age, trust, rate, local)
        if not verdict.allowed:
            self.refusals[verdict.reason] = self.refusals.get(verdict.reason, 0) + 1
            self._grants.pop((peer, right, _hash_or_zero(channel)), None)
            return verdict
        h = channel_hash(channel)
        key = (peer, right, h)
        if key not in self._grants and len(self._grants) >= self.max_grants:
            self.refusals["grant_table_full"] = self.refusals.get("grant_table_full", 0) + 1
            return Verdict(False, "grant_table_full", channel, f"{self.max_grants} grants held")
        assert verdict.decision is not None
        self._grants[key] = Grant(
            peer,
            right,
            channel,
            h,
            verdict.decision,
            tuple(chain),
            verdict.expires,
            session_age - now,
            trust,
            rate,
            local,
        )
        return verdict

    def _decide(
        self,
        peer: bytes,
        channel: str,
        right: Right,
        chain: Sequence[Token],
        wall: float,
        session_age: float,
        trust: float,
        rate: float,
        local: bool,
    ) -> Verdict:
        try:
            channel_hash(channel)
        except ValueError as exc:
            return Verdict(False, "invalid_channel", channel, str(exc))
        spec = self.channels.lookup(channel)
        if spec is None or (spec.visibility == "local" and not local):
            # A local channel looks exactly like a missing one to a peer.
            return Verdict(False, "unknown_channel", channel, "this node hosts no such channel")
        rights: frozenset[str] = frozenset()
        expires: float | None = None
        if chain:
            try:
                leaf = verify_chain(
                    chain,
                    now=int(wall),
                    trusted_roots=self.trusted_roots,
                    channel=channel,
                    right=RIGHT_BITS[right],
                    skew=self.skew,
                    revoked=self.revocations,
                )
            except TokenError as exc:
                return Verdict(False, exc.reason, channel, str(exc))
            if not hmac.compare_digest(leaf.subject, peer):
                return Verdict(
                    False, "wrong_subject", channel, "the token was issued to another CellID"
                )
            rights = frozenset(name for name, bit in _RIGHT_NAMES.items() if leaf.rights & bit)
            expires = float(min(t.not_after for t in chain) + self.skew)
        elif spec.access == "token" and not local:
            return Verdict(
                False, "token_required", channel, f"{spec.pattern} requires a {right} token"
            )
        decision = self._policy_decision(peer, channel, rights, trust, session_age, rate, spec)
        if decision.action == "drop":
            return Verdict(
                False,
                "policy_drop",
                channel,
                f"rule {decision.rule!r} (line {decision.line})",
                decision,
            )
        return Verdict(True, "ok", channel, "", decision, expires)

    def _policy_decision(
        self,
        peer: bytes,
        channel: str,
        rights: frozenset[str],
        trust: float,
        session_age: float,
        rate: float,
        spec: ChannelSpec,
    ) -> Decision:
        if self.policy is None:
            return Decision("pass", None, "no policy", 0, (f"declared by {spec.text()}",))
        caps = self._capabilities_of(peer) if self._capabilities_of is not None else frozenset()
        ctx = Context(peer, channel, caps, rights, trust, session_age, rate)
        return self.policy.decide(ctx, reasons=False)

    # ------------------------------------------------------------------ per packet

    def grant(self, peer: bytes, right: Right, h: int, wall: float) -> Grant | None:
        """The live grant for (peer, right, channel hash), or None. O(1).

        A lapsed grant answers None but stays until `expire` removes it, so that the peer is
        told (ENDED) once, by the periodic sweep, rather than never.
        """
        g = self._grants.get((peer, right, h))
        if g is not None and g.expires is not None and wall > g.expires:
            return None
        return g

    def admit(self, g: Grant, now: float) -> bool:
        """Whether one more packet under `g` may pass now (`throttle` rules limit the rate)."""
        return self.throttles.allow(g.decision, g.peer, now)

    # ------------------------------------------------------------------ upkeep

    def revoke_grant(self, peer: bytes, right: Right, h: int) -> Grant | None:
        """Forget one grant (an unsubscribe); returns it."""
        return self._grants.pop((peer, right, h), None)

    def forget_peer(self, peer: bytes) -> list[Grant]:
        """Forget every grant of `peer` (its session ended); returns them."""
        gone = [k for k in self._grants if k[0] == peer]
        return [self._grants.pop(k) for k in gone]

    def revalidate(
        self, wall: float, now: float, only: Callable[[Grant], bool] | None = None
    ) -> list[tuple[Grant, Verdict]]:
        """Decide every grant again (after a policy reload, a revocation or a declaration change).

        With `only`, just the grants it selects. Returns the grants that no longer hold, with
        the new verdict; they are removed.
        """
        lost: list[tuple[Grant, Verdict]] = []
        for key, g in list(self._grants.items()):
            if only is not None and not only(g):
                continue
            verdict = self._decide(
                g.peer,
                g.channel,
                g.right,
                g.chain,
                wall,
                g.session_age_base + now,
                g.trust,
                g.rate,
                g.local,
            )
            if verdict.allowed:
                assert verdict.decision is not None
                g.decision = verdict.decision
                g.expires = verdict.expires
            else:
                del self._grants[key]
                lost.append((g, verdict))
        return lost

    def expire(self, wall: float) -> list[Grant]:
        """Remove grants whose tokens have lapsed; returns them."""
        gone = [k for k, g in self._grants.items() if g.expires is not None and wall > g.expires]
        return [self._grants.pop(k) for k in gone]

    def grants(self) -> Iterator[Grant]:
        """Every live grant (for status displays)."""
        return iter(list(self._grants.values()))

    def __len__(self) -> int:
        return len(self._grants)


_RIGHT_NAMES: Final[dict[str, Rights]] = {
    "publish": Rights.PUBLISH,
    "subscribe": Rights.SUBSCRIBE,
    "admin": Rights.ADMIN,
    "delegate": Rights.DELEGATE,
}


def _hash_or_zero(channel: str) -> int:
    try:
        return channel_hash(channel)
    except ValueError:
        return 0
