"""The channel service: subscribe, publish and grant bookkeeping over an `Endpoint` (sans-IO).

Theory of operation: a node hosts channels (declarations in an `AccessController`'s table) and
uses channels other nodes host. Four relations are kept, each keyed by (peer, channel hash):

- `_subscribers`: peers subscribed to a channel *we* host. `publish` sends to them.
- `access` publish grants: peers allowed to publish *into* a channel we host. What they send is
  delivered here and passed on to our subscribers of that channel (a hub), never back to them.
- `_subscriptions`: channels *we* subscribed to at a peer. What that peer sends on them is ours.
- `_may_publish`: channels a peer granted *us* to publish into. `publish` sends to it too.

Every decision about a peer's request is made once, by `AccessController.request` (tokens and
policy), and cached; afterwards each message costs a dictionary lookup here (reliable messages,
after decryption) or in the endpoint's ring 0 gate (channel-tagged datagrams, before
decryption: `Endpoint.allow_channel` is kept in step with the two relations that receive).

Control messages (channels.protocol) travel on the reserved control channel. A refusal is
answered with a stable reason word and a detail sentence, so the requester can say exactly why.
Time is passed in: `now` (monotonic, for buckets and sessions) and `wall` (Unix, for tokens).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from cellmesh.channels.protocol import (
    MAX_CHAIN,
    Caps,
    Control,
    Ended,
    Op,
    Reply,
    Request,
    Revoke,
    decode_control,
    encode_control,
)
from cellmesh.errors import DecodeError, LocalProtocolError, PeerUnreachableError
from cellmesh.filter.access import AccessController, Grant, Right
from cellmesh.filter.buckets import KeyedBuckets
from cellmesh.filter.channels import channel_hash
from cellmesh.identity.tokens import Revocation as TokenRevocation
from cellmesh.identity.tokens import (
    Token,
    TokenError,
    decode_revocation,
    decode_token,
    encode_revocation,
    encode_token,
    token_id,
)
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import ChannelMessageReceived
from cellmesh.wire.messages import CHANNEL_CONTROL

MAX_PENDING_REQUESTS: Final = 1024
MAX_SUBSCRIPTIONS: Final = 65536
REQUEST_TIMEOUT: Final = 10.0
MAX_FORWARD_FANOUT: Final = 4096
REVOKE_RATE: Final = 10.0  # revocations accepted per peer per second
REVOKE_BURST: Final = 100.0
_U64_MAX: Final = 2**64 - 1
_MAX_DETAIL: Final = 200

_RIGHT_OF: Final[dict[Op, Right]] = {Op.SUBSCRIBE: "subscribe", Op.PUBLISH: "publish"}


def _clip(text: str, limit: int = _MAX_DETAIL) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 (on a character boundary): REPLY texts are
    length-prefixed by one byte, and a policy rule's name may be any Unicode."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


@dataclass(frozen=True, slots=True)
class ChannelReply:
    """A peer answered our request `request_id` for `op` on `name`."""

    request_id: int
    peer: bytes
    name: str
    op: Op
    allowed: bool
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ChannelDelivery:
    """A message on channel `name` for this node's applications."""

    peer: bytes
    name: str
    data: bytes
    reliable: bool
    tag: str | None = None
    mirror: str | None = None
    inspect: bool = False
    """Ring 2 must pass it before it is delivered (and forwarded: see `ChannelService.forward`).

    Set when the policy said redirect-to-inspection or the service inspects everything."""
    forward: bool = False
    """It came in under a publish grant: after inspection, pass it on to our subscribers."""


@dataclass(frozen=True, slots=True)
class GrantEnded:
    """A relation ended: a peer withdrew our grant or subscription, or we withdrew one."""

    peer: bytes
    name: str
    op: Op
    reason: str
    by_peer: bool


ServiceEvent = ChannelReply | ChannelDelivery | GrantEnded


@dataclass(slots=True)
class _Pending:
    peer: bytes
    op: Op
    name: str
    sent: float


class ChannelService:
    """Channel protocol engine for one node. See the module docstring."""

    def __init__(
        self,
        endpoint: Endpoint,
        access: AccessController,
        request_ids: Callable[[], int],
        on_caps: Callable[[bytes, bytes, float], None] | None = None,
        inspect_all: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.inspect_all = inspect_all
        """Every publication received goes to ring 2 first (inspectors are installed)."""
        self.access = access
        self._request_ids = request_ids
        self._on_caps = on_caps
        self._pending: dict[int, _Pending] = {}
        self._subscribers: dict[int, dict[bytes, str]] = {}
        self._subscriptions: dict[tuple[bytes, int], str] = {}
        self._may_publish: dict[tuple[bytes, int], str] = {}
        self.events: deque[ServiceEvent] = deque()
        self.drops: Counter[str] = Counter()
        self._revoke_budget: KeyedBuckets[bytes] = KeyedBuckets(REVOKE_RATE, REVOKE_BURST, 1024)
        self.delivered = 0
        self.forwarded = 0

    # ------------------------------------------------------------------ local API

    def subscribe(self, peer: bytes, name: str, chain: tuple[Token, ...], now: float) -> int:
        """Ask `peer` to let us subscribe to its channel `name`; returns the request id."""
        return self._request(peer, Op.SUBSCRIBE, name, chain, now)

    def request_publish(self, peer: bytes, name: str, chain: tuple[Token, ...], now: float) -> int:
        """Ask `peer` to let us publish into its channel `name`; returns the request id."""
        return self._request(peer, Op.PUBLISH, name, chain, now)

    def unsubscribe(self, peer: bytes, name: str, now: float) -> bool:
        """Leave a subscription; True if we had it."""
        h = channel_hash(name)
        if self._subscriptions.pop((peer, h), None) is None:
            return False
        self.endpoint.disallow_channel(peer, h)
        # A REQUEST, not an ENDED: ENDED always means "the host withdrew", so two nodes that
        # subscribe to each other's channel of the same name never confuse the two directions.
        rid = self._request_ids() & 0xFFFFFFFF
        self._send_control(peer, Request(rid, Op.UNSUBSCRIBE, name), now)
        return True

    def publish(self, name: str, data: bytes, now: float, reliable: bool = True) -> int:
        """Send `data` on channel `name` to every peer entitled to it; returns how many."""
        h = channel_hash(name)
        # Matched by name too: two names may share a 32-bit hash, and a subscriber of one must
        # never receive the other's publications.
        targets = {p for p, n in self._subscribers.get(h, {}).items() if n == name}
        targets.update(p for (p, ch), n in self._may_publish.items() if ch == h and n == name)
        return self._send_to(targets, h, data, now, reliable)

    def _send_to(self, targets: set[bytes], h: int, data: bytes, now: float, reliable: bool) -> int:
        sent = 0
        for peer in targets:
            try:
                if reliable:
                    self.endpoint.send_message(peer, data, now, h)
                else:
                    self.endpoint.send_channel_datagram(peer, h, data, now)
            except PeerUnreachableError:
                self.drops["peer_gone"] += 1
                continue
            except LocalProtocolError:
                # A full send queue or a datagram too big for this path: this peer misses it.
                self.drops["send_refused"] += 1
                continue
            sent += 1
        return sent

    def _request(self, peer: bytes, op: Op, name: str, chain: tuple[Token, ...], now: float) -> int:
        h = channel_hash(name)  # validates, raising ValueError
        held = (self._subscriptions if op == Op.SUBSCRIBE else self._may_publish).get((peer, h))
        if held is not None and held != name:
            # Relations are kept per (peer, hash): a second name with the same hash would be
            # confused with the first one. Astronomically rare unless someone chose the names.
            raise LocalProtocolError(
                f"{name} has the same channel hash as {held}, which we already hold at this "
                "peer; leave that one first"
            )
        if len(chain) > MAX_CHAIN:
            raise LocalProtocolError(f"a token chain of {len(chain)} is longer than {MAX_CHAIN}")
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            raise LocalProtocolError(f"{MAX_PENDING_REQUESTS} channel requests already pending")
        rid = self._request_ids() & 0xFFFFFFFF
        while rid in self._pending:
            rid = (rid + 1) & 0xFFFFFFFF
        msg = Request(rid, op, name, tuple(encode_token(t) for t in chain))
        self._send_control(peer, msg, now, strict=True)
        self._pending[rid] = _Pending(peer, op, name, now)
        return rid

    def _send_control(self, peer: bytes, msg: Control, now: float, strict: bool = False) -> None:
        try:
            self.endpoint.send_message(peer, encode_control(msg), now, CHANNEL_CONTROL)
        except (PeerUnreachableError, LocalProtocolError):
            if strict:
                raise
            self.drops["control_unsent"] += 1

    def announce(self, peer: bytes, control: Control, now: float) -> None:
        """Send a control message (a capability advert or a revocation) to one peer."""
        self._send_control(peer, control, now)

    def add_revocation(self, rev: TokenRevocation, wall: float, now: float) -> bool:
        """Honour a revocation: record it, re-decide grants, pass it to every peer once.

        Returns False if it was already known. Raises `TokenError` if it does not verify.
        """
        if not self.access.revocations.add(rev):
            return False
        # Only grants whose chain holds the revoked token can change: re-decide just those.
        self.revalidate(wall, now, lambda g: any(token_id(t) == rev.token_id for t in g.chain))
        blob = encode_revocation(rev)
        for info in self.endpoint.peers(now):
            self._send_control(info.cell_id, Revoke(blob), now)
        return True

    # ------------------------------------------------------------------ input

    def on_message(
        self,
        ev: ChannelMessageReceived,
        now: float,
        wall: float,
        session_age: float,
        rate: float = 0.0,
    ) -> None:
        """Handle one channel message from the endpoint."""
        if ev.channel == CHANNEL_CONTROL:
            if not ev.reliable:
                self.drops["control_unreliable"] += 1
                return
            try:
                msg = decode_control(ev.data)
            except DecodeError:
                self.drops["control_malformed"] += 1
                return
            self._on_control(ev.cell_id, msg, now, wall, session_age, rate)
            return
        key = (ev.cell_id, ev.channel)
        name = self._subscriptions.get(key)
        if name is not None:
            self.delivered += 1
            self.events.append(ChannelDelivery(ev.cell_id, name, ev.data, ev.reliable))
            return
        grant = self.access.grant(ev.cell_id, "publish", ev.channel, wall)
        if grant is None:
            self.drops["channel_denied"] += 1
            if self._may_forget_gate(key):
                self.endpoint.disallow_channel(ev.cell_id, ev.channel)
            return
        if not self.access.admit(grant, now):
            self.drops["throttled"] += 1
            return
        self._deliver_published(grant, ev, now)

    def _may_forget_gate(self, key: tuple[bytes, int]) -> bool:
        return key not in self._subscriptions

    def _deliver_published(self, grant: Grant, ev: ChannelMessageReceived, now: float) -> None:
        d = grant.decision
        inspect = self.inspect_all or d.action == "redirect-to-inspection"
        self.delivered += 1
        self.events.append(
            ChannelDelivery(
                ev.cell_id,
                grant.channel,
                ev.data,
                ev.reliable,
                tag=d.argument if d.action == "tag" and isinstance(d.argument, str) else None,
                mirror=d.argument if d.action == "mirror" and isinstance(d.argument, str) else None,
                inspect=inspect,
                forward=True,
            )
        )
        if not inspect:
            self.forward(grant.channel, ev.cell_id, ev.data, now, ev.reliable)

    def forward(self, name: str, origin: bytes, data: bytes, now: float, reliable: bool) -> int:
        """Pass a publication we accepted on to our subscribers of `name`, except its origin."""
        h = channel_hash(name)
        targets = {p for p, n in self._subscribers.get(h, {}).items() if p != origin and n == name}
        if len(targets) > MAX_FORWARD_FANOUT:
            targets = set(sorted(targets)[:MAX_FORWARD_FANOUT])
        n = self._send_to(targets, h, data, now, reliable)
        self.forwarded += n
        return n

    def _on_control(
        self,
        peer: bytes,
        msg: Control,
        now: float,
        wall: float,
        session_age: float,
        rate: float = 0.0,
    ) -> None:
        if isinstance(msg, Request):
            self._on_request(peer, msg, now, wall, session_age, rate)
        elif isinstance(msg, Reply):
            self._on_reply(peer, msg, now)
        elif isinstance(msg, Ended):
            self._on_ended(peer, msg)
        elif isinstance(msg, Caps):
            if self._on_caps is not None:
                self._on_caps(peer, msg.advert, wall)
        else:
            self._on_revoke(peer, msg, now, wall)

    def _on_request(
        self,
        peer: bytes,
        req: Request,
        now: float,
        wall: float,
        session_age: float,
        rate: float = 0.0,
    ) -> None:
        if req.op == Op.UNSUBSCRIBE:
            self._remove_subscriber(peer, req.name)
            return
        right = _RIGHT_OF[req.op]
        try:
            chain = tuple(decode_token(t) for t in req.chain)
        except DecodeError as exc:
            self._reply(peer, Reply(req.request_id, False, 0, 0, "malformed", _clip(str(exc))), now)
            return
        held = self._colliding_grant(peer, right, req.name, wall)
        if held is not None:
            # Grants are kept per (peer, right, hash): a second name with the hash of one the
            # peer holds would take its place and be confused with it. Refuse it, keep the first.
            detail = f"{req.name} has the channel hash of {held}, which you hold here"
            self._reply(
                peer, Reply(req.request_id, False, 0, 0, "hash_collision", _clip(detail)), now
            )
            return
        verdict = self.access.request(
            peer, req.name, right, chain, wall=wall, now=now, session_age=session_age, rate=rate
        )
        if not verdict.allowed:
            # The controller dropped any grant the peer held for this: end the relation with
            # it, so nothing flows without a grant that expiry or revocation could still end.
            if req.op == Op.SUBSCRIBE:
                self._remove_subscriber(peer, req.name)
            else:
                self._close_publish_gate(peer, req.name)
            self._reply(
                peer,
                Reply(req.request_id, False, 0, 0, verdict.reason, _clip(verdict.detail)),
                now,
            )
            return
        h = channel_hash(req.name)
        if req.op == Op.SUBSCRIBE:
            subs = self._subscribers.get(h)
            if (subs is None or peer not in subs) and self._subscriber_count() >= MAX_SUBSCRIPTIONS:
                self.access.revoke_grant(peer, right, h)
                self._reply(peer, Reply(req.request_id, False, 0, 0, "full", ""), now)
                return
            self._subscribers.setdefault(h, {})[peer] = req.name
        else:
            try:
                self.endpoint.allow_channel(peer, h)
            except LocalProtocolError as exc:  # the endpoint's bounded gate is full
                self.access.revoke_grant(peer, right, h)
                self._reply(peer, Reply(req.request_id, False, 0, 0, "full", _clip(str(exc))), now)
                return
        # A token may run to 2**64 - 1; with the skew added, clamp to what REPLY can carry.
        expires = min(int(verdict.expires), _U64_MAX) if verdict.expires is not None else 0
        self._reply(peer, Reply(req.request_id, True, h, expires, "ok", ""), now)

    def _colliding_grant(self, peer: bytes, right: Right, name: str, wall: float) -> str | None:
        """The name of another channel with `name`'s hash that `peer` holds `right` on."""
        try:
            h = channel_hash(name)
        except ValueError:
            return None  # the access controller refuses the name itself
        g = self.access.grant(peer, right, h, wall)
        return g.channel if g is not None and g.channel != name else None

    def _close_publish_gate(self, peer: bytes, name: str) -> None:
        """Stop admitting `peer`'s datagrams on `name` at ring 0 (unless we subscribed there)."""
        try:
            h = channel_hash(name)
        except ValueError:
            return
        if self._may_forget_gate((peer, h)):
            self.endpoint.disallow_channel(peer, h)

    def _subscriber_count(self) -> int:
        return sum(len(v) for v in self._subscribers.values())

    def _reply(self, peer: bytes, reply: Reply, now: float) -> None:
        self._send_control(peer, reply, now)

    def _on_reply(self, peer: bytes, reply: Reply, now: float) -> None:
        pending = self._pending.get(reply.request_id)
        if pending is None or pending.peer != peer:
            self.drops["unexpected_reply"] += 1
            return
        del self._pending[reply.request_id]
        allowed = reply.allowed
        reason = reply.reason
        if allowed:
            h = channel_hash(pending.name)
            if reply.channel != h:
                allowed = False
                reason = "reply_mismatch"
                self.drops["reply_mismatch"] += 1
            elif pending.op == Op.SUBSCRIBE:
                try:
                    self.endpoint.allow_channel(peer, h)
                except LocalProtocolError:  # the endpoint's bounded gate is full: decline
                    allowed = False
                    reason = "full"
                    rid = self._request_ids() & 0xFFFFFFFF
                    self._send_control(peer, Request(rid, Op.UNSUBSCRIBE, pending.name), now)
                else:
                    self._subscriptions[(peer, h)] = pending.name
            else:
                self._may_publish[(peer, h)] = pending.name
        else:
            # Refused: whatever we held for this channel at that peer is over too (a re-request
            # after a revocation or a policy change must not leave the old relation alive).
            h = channel_hash(pending.name)
            if pending.op == Op.SUBSCRIBE:
                if self._subscriptions.pop((peer, h), None) is not None:
                    self.endpoint.disallow_channel(peer, h)
            else:
                self._may_publish.pop((peer, h), None)
        self.events.append(
            ChannelReply(
                reply.request_id,
                peer,
                pending.name,
                pending.op,
                allowed,
                reason,
                reply.detail,
            )
        )

    def _on_ended(self, peer: bytes, msg: Ended) -> None:
        if msg.op == Op.SUBSCRIBE:
            # The host withdrew our subscription (subscribers leave with REQUEST(UNSUBSCRIBE)).
            if self._subscriptions.pop((peer, msg.channel), None) is not None:
                self.endpoint.disallow_channel(peer, msg.channel)
                self.events.append(GrantEnded(peer, msg.name, msg.op, msg.reason, True))
            return
        if self._may_publish.pop((peer, msg.channel), None) is not None:
            self.events.append(GrantEnded(peer, msg.name, msg.op, msg.reason, True))

    def _remove_subscriber(self, peer: bytes, name: str) -> bool:
        try:
            h = channel_hash(name)
        except ValueError:
            return False
        subs = self._subscribers.get(h)
        if subs is None or subs.pop(peer, None) is None:
            return False
        if not subs:
            del self._subscribers[h]
        self.access.revoke_grant(peer, "subscribe", h)
        return True

    def _on_revoke(self, peer: bytes, msg: Revoke, now: float, wall: float) -> None:
        if not self._revoke_budget.take(peer, now):
            self.drops["revocation_rate"] += 1
            return
        try:
            rev = decode_revocation(msg.revocation)
        except DecodeError:
            self.drops["revocation_invalid"] += 1
            return
        try:
            self.add_revocation(rev, wall, now)
        except TokenError:
            self.drops["revocation_invalid"] += 1

    # ------------------------------------------------------------------ upkeep

    def revalidate(
        self, wall: float, now: float, only: Callable[[Grant], bool] | None = None
    ) -> list[GrantEnded]:
        """Re-decide grants (all, or those `only` selects); tell peers whose grant ended."""
        ended: list[GrantEnded] = []
        for grant, verdict in self.access.revalidate(wall, now, only):
            ended.append(self._end_grant(grant, verdict.reason, now))
        return ended

    def expire(self, wall: float, now: float) -> list[GrantEnded]:
        """End grants whose tokens lapsed, and forget requests that were never answered."""
        for rid, p in list(self._pending.items()):
            if now - p.sent > REQUEST_TIMEOUT:
                del self._pending[rid]
                self.events.append(
                    ChannelReply(rid, p.peer, p.name, p.op, False, "timeout", "no answer")
                )
        return [self._end_grant(g, "expired", now) for g in self.access.expire(wall)]

    def _end_grant(self, grant: Grant, reason: str, now: float) -> GrantEnded:
        op = Op.SUBSCRIBE if grant.right == "subscribe" else Op.PUBLISH
        if op == Op.SUBSCRIBE:
            subs = self._subscribers.get(grant.hash)
            if subs is not None:
                subs.pop(grant.peer, None)
                if not subs:
                    del self._subscribers[grant.hash]
        elif (grant.peer, grant.hash) not in self._subscriptions:
            self.endpoint.disallow_channel(grant.peer, grant.hash)
        self._send_control(grant.peer, Ended(op, grant.hash, grant.channel, reason), now)
        ev = GrantEnded(grant.peer, grant.channel, op, reason, False)
        self.events.append(ev)
        return ev

    def on_peer_gone(self, peer: bytes) -> None:
        """The session with `peer` ended: every relation with it ends too."""
        for grant in self.access.forget_peer(peer):
            if grant.right == "subscribe":
                subs = self._subscribers.get(grant.hash)
                if subs is not None:
                    subs.pop(peer, None)
                    if not subs:
                        del self._subscribers[grant.hash]
            self.endpoint.disallow_channel(peer, grant.hash)
        for key in [k for k in self._subscriptions if k[0] == peer]:
            del self._subscriptions[key]
            self.endpoint.disallow_channel(peer, key[1])
        for key in [k for k in self._may_publish if k[0] == peer]:
            del self._may_publish[key]
        for rid in [r for r, p in self._pending.items() if p.peer == peer]:
            p = self._pending.pop(rid)
            self.events.append(
                ChannelReply(rid, peer, p.name, p.op, False, "peer_gone", "session ended")
            )

    # ------------------------------------------------------------------ status

    def subscribers(self) -> Iterator[tuple[str, bytes]]:
        """(channel, peer) for every peer subscribed to a channel we host."""
        for subs in list(self._subscribers.values()):
            for peer, name in subs.items():
                yield name, peer

    def subscribed_at(self, peer: bytes, name: str) -> bool:
        """True if we are subscribed at `peer` to the channel `name` itself. O(1).

        Compares the name, not only its 32-bit hash: two names with one hash are two channels,
        and a grant on one must never open the other (a collision is a 2**32 search away).
        """
        try:
            h = channel_hash(name)
        except ValueError:
            return False
        return self._subscriptions.get((peer, h)) == name

    def peer_granted(self, peer: bytes, right: Right, name: str, wall: float) -> bool:
        """True if `peer` holds a live `right` grant on the channel `name` here (name-checked,
        as `subscribed_at`). O(1)."""
        try:
            h = channel_hash(name)
        except ValueError:
            return False
        grant = self.access.grant(peer, right, h, wall)
        return grant is not None and grant.channel == name

    def subscriptions(self) -> list[tuple[bytes, str]]:
        """(host peer, channel) for every subscription we hold."""
        return [(peer, name) for (peer, _), name in self._subscriptions.items()]

    def publish_grants_held(self) -> list[tuple[bytes, str]]:
        """(host peer, channel) for every channel a peer lets us publish into."""
        return [(peer, name) for (peer, _), name in self._may_publish.items()]
