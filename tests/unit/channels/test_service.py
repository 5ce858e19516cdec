"""The channel service over real `Endpoint`s joined by the in-memory `Net` of test_endpoint.py.

Every node runs an `Endpoint`; most also run a `ChannelService`. A "raw" node (no service) lets a
test speak the control protocol by hand: malformed messages, unexpected replies, lying hosts.
Time is virtual: `Mesh.settle` advances the net in small ticks and feeds each endpoint event to
the node's service, the way node/channels.py does.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# Reuse the in-memory network of the endpoint tests (tests/ has no packages, so put its
# directory on the path; pytest imports it under the same module name).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transport"))
from test_endpoint import CONFIG, Addr, Net

from cellmesh.channels import service as service_mod
from cellmesh.channels.protocol import (
    MAX_CHAIN,
    Caps,
    Control,
    Ended,
    Kind,
    Op,
    Reply,
    Request,
    Revoke,
    decode_control,
    encode_control,
)
from cellmesh.channels.service import (
    REQUEST_TIMEOUT,
    ChannelDelivery,
    ChannelReply,
    ChannelService,
    GrantEnded,
    ServiceEvent,
)
from cellmesh.errors import DecodeError, LocalProtocolError, PeerUnreachableError
from cellmesh.filter.access import AccessController
from cellmesh.filter.channels import ChannelTable, channel_hash, parse_channel_spec
from cellmesh.filter.policy import PolicyHolder, parse_policy
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import Identity
from cellmesh.identity.tokens import (
    U64_MAX,
    Revocation,
    Rights,
    Token,
    encode_revocation,
    encode_token,
    issue_token,
    revoke_token,
)
from cellmesh.transport import endpoint as endpoint_mod
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import (
    ChannelMessageReceived,
    Event,
    PeerDisconnected,
)
from cellmesh.wire.messages import CHANNEL_CONTROL

T0 = 1_800_000_000  # Unix time of the mesh's virtual start
START = 1000.0  # Net's monotonic start
HOUR = 3600
CHAT = channel_hash("chat")
ENGINE = "telemetry/engine-3"
HOSTED = (
    "chat open",
    "telemetry/** token",
    "news/* open",
    "hidden/* open local",
)


class CountingService(ChannelService):
    """A ChannelService that counts the revocations it receives from peers."""

    revokes_received = 0

    def _on_revoke(self, peer: bytes, msg: Revoke, now: float, wall: float) -> None:
        self.revokes_received += 1
        super()._on_revoke(peer, msg, now, wall)


@dataclass
class Node:
    ep: Endpoint
    addr: Addr
    service: CountingService | None
    raw: list[ChannelMessageReceived] = field(default_factory=list)
    """Channel messages received by a node without a service."""
    caps: list[tuple[bytes, bytes, float]] = field(default_factory=list)
    seen: int = 0

    @property
    def cell(self) -> CellId:
        return self.ep.identity.cell_id

    @property
    def identity(self) -> Identity:
        return self.ep.identity

    @property
    def svc(self) -> CountingService:
        assert self.service is not None
        return self.service

    @property
    def access(self) -> AccessController:
        return self.svc.access

    def events(self) -> list[ServiceEvent]:
        """Take every service event so far."""
        out = list(self.svc.events)
        self.svc.events.clear()
        return out

    def replies(self) -> list[ChannelReply]:
        return [e for e in self.svc.events if isinstance(e, ChannelReply)]

    def deliveries(self) -> list[ChannelDelivery]:
        return [e for e in self.svc.events if isinstance(e, ChannelDelivery)]

    def ended(self) -> list[GrantEnded]:
        return [e for e in self.svc.events if isinstance(e, GrantEnded)]

    def raw_controls(self) -> list[Control]:
        return [decode_control(m.data) for m in self.raw if m.channel == CHANNEL_CONTROL]


class Mesh:
    """Nodes on one in-memory `Net`, every endpoint event fed to its node's service."""

    def __init__(self) -> None:
        self.net = Net()
        self.nodes: list[Node] = []
        self._ids = itertools.count(1)

    @property
    def now(self) -> float:
        return self.net.now

    @property
    def wall(self) -> float:
        return T0 + (self.net.now - START)

    def add(
        self,
        hosted: tuple[str, ...] = HOSTED,
        policy: str | None = None,
        service: bool = True,
        inspect_all: bool = False,
        trusted: frozenset[bytes] = frozenset(),
    ) -> Node:
        ep, addr = self.net.add(len(self.nodes) + 1, CONFIG)
        node = Node(ep, addr, None)
        if service:
            access = AccessController(
                ChannelTable(tuple(parse_channel_spec(s) for s in hosted)),
                ep.identity.public_key,
                trusted_roots=trusted,
                policy=PolicyHolder(parse_policy(policy)) if policy is not None else None,
            )
            node.service = CountingService(
                ep,
                access,
                self._ids.__next__,
                on_caps=lambda peer, blob, wall: node.caps.append((peer, blob, wall)),
                inspect_all=inspect_all,
            )
        self.nodes.append(node)
        return node

    def connect(self, a: Node, b: Node) -> None:
        a.ep.connect(b.addr, self.now)
        self.settle(0.3)
        assert a.ep.session_for(b.cell) is not None
        assert b.ep.session_for(a.cell) is not None

    def _dispatch(self) -> int:
        n = 0
        for node in self.nodes:
            evs: list[Event] = self.net.events[node.addr]
            while node.seen < len(evs):
                ev = evs[node.seen]
                node.seen += 1
                n += 1
                if node.service is None:
                    if isinstance(ev, ChannelMessageReceived):
                        node.raw.append(ev)
                    continue
                if isinstance(ev, ChannelMessageReceived):
                    node.service.on_message(ev, self.now, self.wall, 0.0)
                elif isinstance(ev, PeerDisconnected):
                    node.service.on_peer_gone(ev.cell_id)
        return n

    def settle(self, seconds: float = 0.5, tick: float = 0.05) -> None:
        """Advance virtual time, running timers, the net and every service."""
        end = self.net.now + seconds
        while True:
            for _ in range(50):
                moved = self.net.step()
                if not moved and not self._dispatch():
                    break
            if self.net.now >= end:
                return
            self.net.now = min(end, self.net.now + tick)
            for ep in self.net.nodes.values():
                t = ep.get_timer()
                if t is not None and t <= self.net.now:
                    ep.handle_timer(self.net.now)

    def send_control(self, src: Node, dst: Node, msg: Control | bytes) -> None:
        """Send a control message by hand (bypassing src's service)."""
        data = msg if isinstance(msg, bytes) else encode_control(msg)
        src.ep.send_message(dst.cell, data, self.now, CHANNEL_CONTROL)


def token(
    issuer: Node | Identity,
    subject: Node,
    pattern: str = "telemetry/**",
    rights: Rights = Rights.SUBSCRIBE | Rights.PUBLISH,
    not_after: int = T0 + HOUR,
    n: int = 0,
) -> Token:
    who = issuer.identity if isinstance(issuer, Node) else issuer
    not_before = min(T0 - 10, not_after)
    return issue_token(who, subject.cell, pattern, rights, not_before, not_after, bytes([n]) * 16)


def two(**host: object) -> tuple[Mesh, Node, Node]:
    """A mesh with a client `a` connected to a host `b`."""
    mesh = Mesh()
    a = mesh.add()
    b = mesh.add(**host)  # type: ignore[arg-type]
    mesh.connect(a, b)
    return mesh, a, b


def subscribed(
    mesh: Mesh, client: Node, host: Node, name: str = "chat", chain: tuple[Token, ...] = ()
) -> ChannelReply:
    rid = client.svc.subscribe(host.cell, name, chain, mesh.now)
    mesh.settle()
    (reply,) = [r for r in client.replies() if r.request_id == rid]
    return reply


# --- subscribe ---------------------------------------------------------------------------------


def test_subscribe_to_an_open_channel() -> None:
    mesh, a, b = two()
    reply = subscribed(mesh, a, b)
    assert reply == ChannelReply(reply.request_id, b.cell, "chat", Op.SUBSCRIBE, True, "ok", "")
    assert a.svc.subscriptions() == [(b.cell, "chat")]
    assert list(b.svc.subscribers()) == [("chat", a.cell)]
    assert b.access.grant(a.cell, "subscribe", CHAT, mesh.wall) is not None
    assert a.svc.drops == {}
    assert b.svc.drops == {}


def test_subscribe_with_a_token_from_the_host() -> None:
    mesh, a, b = two()
    reply = subscribed(mesh, a, b, ENGINE, (token(b, a),))
    assert reply.allowed
    assert reply.reason == "ok"
    assert a.svc.subscriptions() == [(b.cell, ENGINE)]


@pytest.mark.parametrize(
    ("name", "chain_of", "reason"),
    [
        (ENGINE, lambda a, b: (), "token_required"),
        ("weather", lambda a, b: (), "unknown_channel"),
        ("hidden/room", lambda a, b: (), "unknown_channel"),
        (ENGINE, lambda a, b: (token(Identity.generate(), a),), "untrusted_root"),
        (ENGINE, lambda a, b: (token(b, b),), "wrong_subject"),
        (ENGINE, lambda a, b: (token(b, a, rights=Rights.PUBLISH),), "missing_right"),
        (ENGINE, lambda a, b: (token(b, a, pattern="news/*"),), "wrong_channel"),
        (ENGINE, lambda a, b: (token(b, a, not_after=T0 - 1000),), "expired"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_subscribe_refusals_carry_the_reason(name: str, chain_of: object, reason: str) -> None:
    mesh, a, b = two()
    chain = chain_of(a, b)  # type: ignore[operator]
    reply = subscribed(mesh, a, b, name, chain)
    assert not reply.allowed
    assert reply.reason == reason
    assert reply.op == Op.SUBSCRIBE
    assert reply.name == name
    assert a.svc.subscriptions() == []
    assert list(b.svc.subscribers()) == []
    assert b.access.refusals == {reason: 1}


def test_subscribe_refused_by_policy() -> None:
    mesh, a, b = two(policy='rule "closed": channel chat -> drop\ndefault -> pass\n')
    reply = subscribed(mesh, a, b)
    assert (reply.allowed, reply.reason) == (False, "policy_drop")
    assert "closed" in reply.detail


def test_subscribe_with_an_undecodable_token_is_refused_as_malformed() -> None:
    mesh = Mesh()
    raw = mesh.add(service=False)
    b = mesh.add()
    mesh.connect(raw, b)
    mesh.send_control(raw, b, Request(77, Op.SUBSCRIBE, "chat", (b"not a token",)))
    mesh.settle()
    (reply,) = raw.raw_controls()
    assert isinstance(reply, Reply)
    assert (reply.request_id, reply.allowed, reply.reason) == (77, False, "malformed")
    assert list(b.svc.subscribers()) == []


def test_local_requests_are_checked_before_anything_is_sent() -> None:
    mesh, a, b = two()
    with pytest.raises(ValueError, match="channel"):
        a.svc.subscribe(b.cell, "bad name", (), mesh.now)
    with pytest.raises(LocalProtocolError, match="longer than"):
        a.svc.subscribe(b.cell, "chat", (token(b, a),) * (MAX_CHAIN + 1), mesh.now)
    with pytest.raises(PeerUnreachableError):
        a.svc.subscribe(bytes(16), "chat", (), mesh.now)
    assert a.svc._pending == {}


def test_pending_requests_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "MAX_PENDING_REQUESTS", 2)
    mesh, a, b = two()
    a.svc.subscribe(b.cell, "chat", (), mesh.now)
    a.svc.subscribe(b.cell, "news/x", (), mesh.now)
    with pytest.raises(LocalProtocolError, match="already pending"):
        a.svc.subscribe(b.cell, "news/y", (), mesh.now)
    mesh.settle()
    assert len(a.replies()) == 2
    a.svc.subscribe(b.cell, "news/y", (), mesh.now)  # answered requests free their slot


def test_request_ids_are_unique_among_pending_requests() -> None:
    mesh = Mesh()
    a = mesh.add()
    b = mesh.add()
    mesh.connect(a, b)
    a.svc._request_ids = lambda: 5
    ids = [a.svc.subscribe(b.cell, n, (), mesh.now) for n in ("chat", "news/1", "news/2")]
    assert ids == [5, 6, 7]
    mesh.settle()
    assert sorted(r.request_id for r in a.replies() if r.allowed) == [5, 6, 7]


def test_subscriber_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "MAX_SUBSCRIPTIONS", 1)
    mesh = Mesh()
    b = mesh.add()
    a = mesh.add()
    c = mesh.add()
    mesh.connect(a, b)
    mesh.connect(c, b)
    assert subscribed(mesh, a, b).allowed
    reply = subscribed(mesh, c, b)
    assert (reply.allowed, reply.reason) == (False, "full")
    assert b.access.grant(c.cell, "subscribe", CHAT, mesh.wall) is None
    assert list(b.svc.subscribers()) == [("chat", a.cell)]
    # A refusal for another channel leaves no (empty) entry behind for that channel.
    assert subscribed(mesh, c, b, "news/1").reason == "full"
    assert channel_hash("news/1") not in b.svc._subscribers
    # A subscriber already in the table may ask again at the bound.
    assert subscribed(mesh, a, b).allowed


# --- publish -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reliable", [True, False])
def test_publish_reaches_subscribers(reliable: bool) -> None:
    mesh = Mesh()
    b = mesh.add()
    a = mesh.add()
    c = mesh.add()
    mesh.connect(a, b)
    mesh.connect(c, b)
    assert subscribed(mesh, a, b).allowed
    assert subscribed(mesh, c, b, "news/1").allowed
    assert b.svc.publish("chat", b"hello", mesh.now, reliable=reliable) == 1
    mesh.settle()
    assert a.deliveries() == [ChannelDelivery(b.cell, "chat", b"hello", reliable)]
    assert c.deliveries() == []  # subscribed to another channel
    assert a.svc.delivered == 1
    assert "channel_denied" not in a.ep.drops


def test_publish_without_subscribers_sends_nothing() -> None:
    mesh, _a, b = two()
    mesh.net.log.clear()
    assert b.svc.publish("chat", b"into the void", mesh.now) == 0
    mesh.settle()
    assert b.svc.drops == {}


def test_publish_skips_peers_that_are_gone() -> None:
    mesh, a, b = two()
    assert subscribed(mesh, a, b).allowed
    b.ep._drop_peer(b.ep._peers[a.cell], "test")  # the session vanishes under the service
    assert b.svc.publish("chat", b"x", mesh.now) == 0
    assert b.svc.drops["peer_gone"] == 1


def test_publish_that_cannot_be_sent_is_counted() -> None:
    mesh, a, b = two()
    assert subscribed(mesh, a, b).allowed
    conn = b.ep.connection(a.cell)
    assert conn is not None
    assert b.svc.publish("chat", bytes(conn.max_message), mesh.now) == 0  # + 4 for the hash
    assert b.svc.publish("chat", bytes(conn.max_control_record), mesh.now, reliable=False) == 0
    # Larger than any record body: still a refusal counted per peer, not an exception.
    assert b.svc.publish("chat", bytes(70_000), mesh.now) == 0
    assert b.svc.publish("chat", bytes(70_000), mesh.now, reliable=False) == 0
    assert b.svc.drops["send_refused"] == 4
    mesh.settle()
    assert a.deliveries() == []


def test_publish_grant_and_hub_forwarding() -> None:
    mesh = Mesh()
    hub = mesh.add()
    a = mesh.add()
    c = mesh.add()
    mesh.connect(a, hub)
    mesh.connect(c, hub)
    assert subscribed(mesh, a, hub).allowed
    assert subscribed(mesh, c, hub).allowed
    rid = c.svc.request_publish(hub.cell, "chat", (), mesh.now)
    mesh.settle()
    (reply,) = [r for r in c.replies() if r.request_id == rid]
    assert (reply.op, reply.allowed) == (Op.PUBLISH, True)
    assert c.svc.publish_grants_held() == [(hub.cell, "chat")]
    assert hub.access.grant(c.cell, "publish", CHAT, mesh.wall) is not None

    for reliable in (True, False):
        c.svc.events.clear()
        a.svc.events.clear()
        hub.svc.events.clear()
        assert c.svc.publish("chat", b"from c", mesh.now, reliable=reliable) == 1
        mesh.settle()
        (d,) = hub.deliveries()
        assert d == ChannelDelivery(c.cell, "chat", b"from c", reliable, forward=True)
        # The hub passes it on to its other subscribers, never back to the origin.
        assert a.deliveries() == [ChannelDelivery(hub.cell, "chat", b"from c", reliable)]
        assert c.deliveries() == []
    assert hub.svc.forwarded == 2


def test_hub_publish_goes_to_subscribers_and_to_hosts_that_granted_us() -> None:
    mesh = Mesh()
    hub = mesh.add()
    a = mesh.add()
    c = mesh.add()
    mesh.connect(a, hub)
    mesh.connect(c, hub)
    assert subscribed(mesh, a, hub).allowed
    c.svc.request_publish(hub.cell, "chat", (), mesh.now)
    mesh.settle()
    # C publishes "chat" to the hub (a grant it holds) and to its own subscribers (none).
    assert c.svc.publish("chat", b"x", mesh.now) == 1
    # The hub publishes only to its subscriber A: C holds a publish grant, not a subscription.
    assert hub.svc.publish("chat", b"y", mesh.now) == 1
    mesh.settle()
    assert sorted(d.data for d in a.deliveries()) == [b"x", b"y"]
    assert c.deliveries() == []


def test_refused_publish_rerequest_closes_the_ring0_gate() -> None:
    """A publisher refused on a second request loses the grant, and ring 0 admits nothing more.

    Otherwise each refused re-request would leave a gate entry behind: a peer could fill the
    endpoint's bounded gate with entries that no grant backs.
    """
    mesh, a, b = two()
    a.svc.request_publish(b.cell, "news/1", (), mesh.now)
    mesh.settle()
    assert a.svc.publish_grants_held() == [(b.cell, "news/1")]
    # Ask again with a chain that does not verify: refused, and the grant is gone.
    rid = a.svc.request_publish(b.cell, "news/1", (token(Identity.generate(), a),), mesh.now)
    mesh.settle()
    assert [(r.request_id, r.reason) for r in a.replies()][-1] == (rid, "untrusted_root")
    assert b.access.grant(a.cell, "publish", channel_hash("news/1"), mesh.wall) is None
    a.ep.send_channel_datagram(b.cell, channel_hash("news/1"), b"x", mesh.now)
    mesh.settle()
    assert b.ep.drops["channel_denied"] == 1  # dropped before decryption
    assert b.deliveries() == []


def test_a_full_ring0_gate_refuses_publish_grants_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(endpoint_mod, "MAX_CHANNEL_GATE", 1)
    mesh, a, b = two()
    a.svc.request_publish(b.cell, "news/1", (), mesh.now)
    mesh.settle()
    rid = a.svc.request_publish(b.cell, "news/2", (), mesh.now)
    mesh.settle()  # must not raise out of B's on_message
    (reply,) = [r for r in a.replies() if r.request_id == rid]
    assert (reply.allowed, reply.reason) == (False, "full")
    assert a.svc.publish_grants_held() == [(b.cell, "news/1")]
    assert b.access.grant(a.cell, "publish", channel_hash("news/2"), mesh.wall) is None


def test_a_full_ring0_gate_on_the_subscriber_side_does_not_raise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(endpoint_mod, "MAX_CHANNEL_GATE", 1)
    mesh, a, b = two()
    assert subscribed(mesh, a, b, "news/1").allowed
    reply = subscribed(mesh, a, b, "news/2")  # B grants it, A cannot admit it at ring 0
    assert (reply.allowed, reply.reason) == (False, "full")
    assert a.svc.subscriptions() == [(b.cell, "news/1")]
    # A told B it is not taking the subscription, so B does not keep sending.
    assert list(b.svc.subscribers()) == [("news/1", a.cell)]


def test_long_unicode_refusal_details_fit_the_reply() -> None:
    """A refusal's detail is cut to the REPLY's 255-byte field by bytes, not characters."""
    rule = "\u89c4\u5219" * 60  # 120 characters, 360 bytes of UTF-8
    mesh, a, b = two(policy=f'rule "{rule}": channel chat -> drop\ndefault -> pass\n')
    reply = subscribed(mesh, a, b)  # must not raise out of B's on_message
    assert (reply.allowed, reply.reason) == (False, "policy_drop")
    assert reply.detail.startswith("rule '\u89c4\u5219")
    assert len(reply.detail.encode("utf-8")) <= 200


def test_publish_into_a_token_channel_needs_the_publish_right() -> None:
    mesh, a, b = two()
    rid = a.svc.request_publish(b.cell, ENGINE, (token(b, a, rights=Rights.SUBSCRIBE),), mesh.now)
    mesh.settle()
    (reply,) = a.replies()
    assert (reply.request_id, reply.allowed, reply.reason) == (rid, False, "missing_right")
    assert a.svc.publish_grants_held() == []


def test_publication_without_a_grant_is_dropped() -> None:
    mesh, a, b = two()
    # Reliable: decrypted, then refused by the service.
    a.ep.send_message(b.cell, b"uninvited", mesh.now, CHAT)
    mesh.settle()
    assert b.svc.drops["channel_denied"] == 1
    assert b.deliveries() == []
    # Unreliable: refused by the endpoint's ring 0 gate, before decryption.
    a.ep.send_channel_datagram(b.cell, CHAT, b"uninvited", mesh.now)
    mesh.settle()
    assert b.ep.drops["channel_denied"] == 1
    assert b.deliveries() == []


def test_throttled_publisher() -> None:
    policy = 'rule "slow": channel chat right publish -> throttle(1/s)\ndefault -> pass\n'
    mesh, a, b = two(policy=policy, hosted=("chat token",))
    a.svc.request_publish(b.cell, "chat", (token(b, a, pattern="chat"),), mesh.now)
    mesh.settle()
    assert a.svc.publish_grants_held() == [(b.cell, "chat")]
    for i in range(3):
        a.svc.publish("chat", bytes([i]), mesh.now)
    mesh.settle(0.2)
    assert [d.data for d in b.deliveries()] == [b"\x00"]
    assert b.svc.drops["throttled"] == 2


@pytest.mark.parametrize(
    ("action", "field_", "value"),
    [("tag(hot)", "tag", "hot"), ("mirror(audit)", "mirror", "audit")],
)
def test_tag_and_mirror_decisions_mark_deliveries(action: str, field_: str, value: str) -> None:
    mesh, a, b = two(policy=f'rule "r": channel chat -> {action}\ndefault -> pass\n')
    a.svc.request_publish(b.cell, "chat", (), mesh.now)
    mesh.settle()
    a.svc.publish("chat", b"x", mesh.now)
    mesh.settle()
    (d,) = b.deliveries()
    assert getattr(d, field_) == value
    assert not d.inspect


@pytest.mark.parametrize("how", ["policy", "inspect_all"])
def test_inspected_publications_are_not_forwarded_until_passed(how: str) -> None:
    mesh = Mesh()
    if how == "policy":
        hub = mesh.add(policy='rule "r": channel chat -> redirect-to-inspection\ndefault -> pass\n')
    else:
        hub = mesh.add(inspect_all=True)
    a = mesh.add()
    c = mesh.add()
    mesh.connect(a, hub)
    mesh.connect(c, hub)
    assert subscribed(mesh, a, hub).allowed
    c.svc.request_publish(hub.cell, "chat", (), mesh.now)
    mesh.settle()
    c.svc.publish("chat", b"check me", mesh.now)
    mesh.settle()
    (d,) = hub.deliveries()
    assert d.inspect
    assert d.forward
    assert a.deliveries() == []
    assert hub.svc.forwarded == 0
    # Ring 2 passed it: the node forwards it explicitly.
    assert hub.svc.forward(d.name, d.peer, d.data, mesh.now, d.reliable) == 1
    mesh.settle()
    assert [x.data for x in a.deliveries()] == [b"check me"]


# --- unsubscribe and Ended -----------------------------------------------------------------------


def test_unsubscribe() -> None:
    mesh, a, b = two()
    assert subscribed(mesh, a, b).allowed
    assert a.svc.unsubscribe(b.cell, "chat", mesh.now)
    assert not a.svc.unsubscribe(b.cell, "chat", mesh.now)
    mesh.settle()
    assert a.svc.subscriptions() == []
    assert list(b.svc.subscribers()) == []
    assert b.access.grant(a.cell, "subscribe", CHAT, mesh.wall) is None
    assert b.svc.publish("chat", b"x", mesh.now) == 0
    # A's ring 0 gate is closed again for B's chat datagrams.
    b.ep.send_channel_datagram(a.cell, CHAT, b"late", mesh.now)
    mesh.settle()
    assert a.ep.drops["channel_denied"] == 1
    assert a.deliveries() == []


def test_unsubscribe_request_op_removes_the_subscriber() -> None:
    mesh = Mesh()
    raw = mesh.add(service=False)
    b = mesh.add()
    mesh.connect(raw, b)
    mesh.send_control(raw, b, Request(1, Op.SUBSCRIBE, "chat"))
    mesh.settle()
    assert list(b.svc.subscribers()) == [("chat", raw.cell)]
    mesh.send_control(raw, b, Request(2, Op.UNSUBSCRIBE, "chat"))
    mesh.settle()
    assert list(b.svc.subscribers()) == []
    assert len(b.access) == 0
    assert len(raw.raw_controls()) == 1  # only the first request was answered


def test_host_ending_a_subscription_tells_the_subscriber() -> None:
    mesh, a, b = two(policy="default -> pass\n")
    assert subscribed(mesh, a, b).allowed
    assert b.access.policy is not None
    assert b.access.policy.reload('rule "x": channel chat -> drop\ndefault -> pass\n') is None
    ended = b.svc.revalidate(mesh.wall, mesh.now)
    assert ended == [GrantEnded(a.cell, "chat", Op.SUBSCRIBE, "policy_drop", False)]
    assert b.ended() == ended
    mesh.settle()
    assert a.ended() == [GrantEnded(b.cell, "chat", Op.SUBSCRIBE, "policy_drop", True)]
    assert a.svc.subscriptions() == []
    assert list(b.svc.subscribers()) == []
    b.ep.send_channel_datagram(a.cell, CHAT, b"late", mesh.now)
    mesh.settle()
    assert a.ep.drops["channel_denied"] == 1


def test_host_ending_a_publish_grant_tells_the_publisher() -> None:
    mesh, a, b = two(policy="default -> pass\n")
    a.svc.request_publish(b.cell, "chat", (), mesh.now)
    mesh.settle()
    assert a.svc.publish_grants_held() == [(b.cell, "chat")]
    assert b.access.policy is not None
    assert b.access.policy.reload("default -> drop\n") is None
    b.svc.revalidate(mesh.wall, mesh.now)
    mesh.settle()
    assert a.ended() == [GrantEnded(b.cell, "chat", Op.PUBLISH, "policy_drop", True)]
    assert a.svc.publish_grants_held() == []
    assert a.svc.publish("chat", b"x", mesh.now) == 0
    # B's gate no longer admits A's chat datagrams.
    a.ep.send_channel_datagram(b.cell, CHAT, b"late", mesh.now)
    mesh.settle()
    assert b.ep.drops["channel_denied"] == 1


def test_ended_for_relations_we_do_not_have_is_ignored() -> None:
    mesh = Mesh()
    raw = mesh.add(service=False)
    b = mesh.add()
    mesh.connect(raw, b)
    for op in Op:
        mesh.send_control(raw, b, Ended(op, CHAT, "chat", "whatever"))
    mesh.send_control(raw, b, Ended(Op.SUBSCRIBE, 1, "bad name!", "x"))
    mesh.settle()
    assert b.svc.events == type(b.svc.events)()
    assert b.svc.drops == {}


# --- expiry and timeouts -----------------------------------------------------------------------


def test_unanswered_requests_time_out() -> None:
    mesh = Mesh()
    a = mesh.add()
    silent = mesh.add(service=False)
    mesh.connect(a, silent)
    sent = mesh.now
    rid = a.svc.subscribe(silent.cell, "chat", (), sent)
    mesh.settle()
    assert a.svc.expire(mesh.wall, sent + REQUEST_TIMEOUT) == []
    assert a.replies() == []
    a.svc.expire(mesh.wall, sent + REQUEST_TIMEOUT + 0.01)
    assert a.replies() == [
        ChannelReply(rid, silent.cell, "chat", Op.SUBSCRIBE, False, "timeout", "no answer")
    ]
    # A late answer is now unexpected.
    mesh.send_control(silent, a, Reply(rid, True, CHAT, 0, "ok"))
    mesh.settle()
    assert a.svc.drops["unexpected_reply"] == 1
    assert a.svc.subscriptions() == []


def test_grants_end_when_their_tokens_lapse() -> None:
    mesh, a, b = two()
    t = token(b, a, not_after=T0 + 60)
    assert subscribed(mesh, a, b, ENGINE, (t,)).allowed
    skew = b.access.skew
    assert b.svc.expire(T0 + 60 + skew, mesh.now) == []
    ended = b.svc.expire(T0 + 61 + skew, mesh.now)
    assert ended == [GrantEnded(a.cell, ENGINE, Op.SUBSCRIBE, "expired", False)]
    mesh.settle()
    assert a.ended() == [GrantEnded(b.cell, ENGINE, Op.SUBSCRIBE, "expired", True)]
    assert a.svc.subscriptions() == []
    assert b.svc.publish(ENGINE, b"x", mesh.now) == 0


def test_a_token_that_never_expires_is_answered() -> None:
    """not_after = 2**64 - 1 is a valid token; its expiry must still fit the REPLY field."""
    mesh, a, b = two()
    reply = subscribed(mesh, a, b, ENGINE, (token(b, a, not_after=U64_MAX),))
    assert reply.allowed
    assert b.svc.drops == {}


# --- revocations -------------------------------------------------------------------------------


def _revocation_setup() -> tuple[Mesh, Node, Node, Token, Revocation]:
    mesh, a, b = two()
    t = token(b, a)
    assert subscribed(mesh, a, b, ENGINE, (t,)).allowed
    return mesh, a, b, t, revoke_token(b.identity, t, T0)


def test_revocation_ends_grants_and_is_passed_on_once() -> None:
    mesh, a, b, _t, rev = _revocation_setup()
    assert b.svc.add_revocation(rev, mesh.wall, mesh.now)
    assert b.ended() == [GrantEnded(a.cell, ENGINE, Op.SUBSCRIBE, "revoked", False)]
    mesh.settle(2.0)
    # B told A; A, learning it, told B; B already knew it and stopped there.
    assert a.svc.revokes_received == 1
    assert b.svc.revokes_received == 1
    assert len(a.access.revocations) == 1
    assert a.svc.subscriptions() == []
    assert a.ended() == [GrantEnded(b.cell, ENGINE, Op.SUBSCRIBE, "revoked", True)]
    # Nothing left in flight: the two nodes do not bounce it forever.
    mesh.net.log.clear()
    mesh.settle(1.0)
    assert a.svc.revokes_received == 1
    assert b.svc.revokes_received == 1
    # Known already: no second round.
    assert not b.svc.add_revocation(rev, mesh.wall, mesh.now)


def test_revocation_floods_a_triangle_and_stops() -> None:
    mesh = Mesh()
    x, y, z = mesh.add(), mesh.add(), mesh.add()
    mesh.connect(x, y)
    mesh.connect(y, z)
    mesh.connect(z, x)
    t = token(x, y)
    assert x.svc.add_revocation(revoke_token(x.identity, t, T0), mesh.wall, mesh.now)
    mesh.settle(2.0)
    for n in (x, y, z):
        assert len(n.access.revocations) == 1
    # Each node passes it to its two peers once: at most six receptions in all.
    total = sum(n.svc.revokes_received for n in (x, y, z))
    assert 2 <= total <= 6
    mesh.settle(2.0)
    assert sum(n.svc.revokes_received for n in (x, y, z)) == total


@pytest.mark.parametrize("kind", ["junk", "bad_signature"])
def test_invalid_revocations_are_counted(kind: str) -> None:
    mesh, a, b, _t, rev = _revocation_setup()
    if kind == "junk":
        blob = b"junk"
    else:
        blob = encode_revocation(Revocation(rev.token_id, rev.issuer, rev.time, bytes(64)))
    mesh.send_control(a, b, Revoke(blob))
    mesh.settle()
    assert b.svc.drops["revocation_invalid"] == 1
    assert len(b.access.revocations) == 0
    assert a.svc.subscriptions() == [(b.cell, ENGINE)]


def test_a_refused_resubscription_does_not_outlive_the_grant() -> None:
    """The subscriber list and the grant table stay in step when a second request is refused.

    A subscriber with a valid token asks again with a bad chain: the controller drops the grant
    (the latest verdict wins). If the subscriber stayed in the list, it would keep receiving with
    no grant that expiry or revocation could ever end.
    """
    mesh, a, b, _t, rev = _revocation_setup()
    reply = subscribed(mesh, a, b, ENGINE, ())
    assert reply.reason == "token_required"
    assert b.access.grant(a.cell, "subscribe", channel_hash(ENGINE), mesh.wall) is None
    assert b.svc.add_revocation(rev, mesh.wall, mesh.now)
    mesh.settle()
    a.svc.events.clear()
    b.svc.publish(ENGINE, b"secret", mesh.now)
    mesh.settle()
    assert a.deliveries() == []
    assert list(b.svc.subscribers()) == []


# --- peers going away --------------------------------------------------------------------------


def test_on_peer_gone_clears_every_relation_and_fails_pending_requests() -> None:
    mesh = Mesh()
    a = mesh.add()
    b = mesh.add()
    mesh.connect(a, b)
    # Relations both ways: A subscribes to and may publish into B's chat; B does the same at A.
    for x, y in ((a, b), (b, a)):
        assert subscribed(mesh, x, y).allowed
        x.svc.request_publish(y.cell, "chat", (), mesh.now)
    mesh.settle()
    assert len(a.access) == 2
    assert len(b.access) == 2
    a.svc.events.clear()
    pending = a.svc.subscribe(b.cell, "news/1", (), mesh.now)  # not answered yet

    a.svc.on_peer_gone(b.cell)
    assert a.svc.subscriptions() == []
    assert a.svc.publish_grants_held() == []
    assert list(a.svc.subscribers()) == []
    assert len(a.access) == 0
    assert a.replies() == [
        ChannelReply(pending, b.cell, "news/1", Op.SUBSCRIBE, False, "peer_gone", "session ended")
    ]
    assert a.svc.publish("chat", b"x", mesh.now) == 0
    # Ring 0 forgets the admissions too: B's datagrams on chat are dropped before decryption.
    b.ep.send_channel_datagram(a.cell, CHAT, b"late", mesh.now)
    mesh.settle()
    assert a.ep.drops["channel_denied"] == 1
    assert a.deliveries() == []


def test_session_end_reaches_the_service_through_the_endpoint() -> None:
    mesh, a, b = two()
    assert subscribed(mesh, a, b).allowed
    a.svc.request_publish(b.cell, "chat", (), mesh.now)
    mesh.settle()
    a.ep.close_peer(b.cell, mesh.now)
    mesh.settle()
    assert a.svc.subscriptions() == []
    assert a.svc.publish_grants_held() == []
    assert list(b.svc.subscribers()) == []
    assert len(b.access) == 0
    assert b.svc.publish("chat", b"x", mesh.now) == 0


def test_on_peer_gone_leaves_other_peers_alone() -> None:
    mesh = Mesh()
    hub = mesh.add()
    a = mesh.add()
    c = mesh.add()
    mesh.connect(a, hub)
    mesh.connect(c, hub)
    assert subscribed(mesh, a, hub).allowed
    assert subscribed(mesh, c, hub).allowed
    hub.svc.on_peer_gone(a.cell)
    assert list(hub.svc.subscribers()) == [("chat", c.cell)]
    assert hub.svc.publish("chat", b"x", mesh.now) == 1


# --- malformed and unexpected control messages ---------------------------------------------------


@pytest.fixture(scope="module")
def lone() -> tuple[Mesh, Node, Node]:
    """A service and a raw peer, for feeding messages straight into `on_message`."""
    mesh = Mesh()
    raw = mesh.add(service=False)
    b = mesh.add()
    mesh.connect(raw, b)
    return mesh, raw, b


def test_malformed_control_messages_are_counted(lone: tuple[Mesh, Node, Node]) -> None:
    mesh, raw, b = lone
    before = b.svc.drops["control_malformed"]
    for junk in (
        b"",
        b"\x00",
        b"\x09junk",
        b"\x01\x00",
        encode_control(Request(1, Op.SUBSCRIBE, "c"))[:-1],
    ):
        mesh.send_control(raw, b, junk)
    mesh.settle()
    assert b.svc.drops["control_malformed"] - before == 5
    assert raw.raw_controls() == []


def test_control_messages_must_be_reliable(lone: tuple[Mesh, Node, Node]) -> None:
    mesh, raw, b = lone
    ev = ChannelMessageReceived(raw.cell, CHANNEL_CONTROL, encode_control(Caps(b"x")), False)
    before = b.svc.drops["control_unreliable"]
    b.svc.on_message(ev, mesh.now, mesh.wall, 0.0)
    assert b.svc.drops["control_unreliable"] == before + 1
    assert raw.cell not in [c[0] for c in b.caps]


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=120),
        st.builds(
            lambda k, body: bytes([k]) + body,
            st.sampled_from(list(Kind)),
            st.binary(max_size=80),
        ),
    )
)
def test_arbitrary_control_bytes_never_raise(lone: tuple[Mesh, Node, Node], data: bytes) -> None:
    mesh, raw, b = lone
    ev = ChannelMessageReceived(raw.cell, CHANNEL_CONTROL, data, True)
    before = b.svc.drops["control_malformed"]
    b.svc.on_message(ev, mesh.now, mesh.wall, 0.0)  # must not raise, whatever the bytes
    b.svc.events.clear()
    try:
        decode_control(data)
    except DecodeError:
        assert b.svc.drops["control_malformed"] == before + 1
    else:
        assert b.svc.drops["control_malformed"] == before


def test_arbitrary_data_on_unknown_channels_is_counted(lone: tuple[Mesh, Node, Node]) -> None:
    mesh, raw, b = lone
    before = b.svc.drops["channel_denied"]
    for h in (1, CHAT, 0xFFFFFFFE):
        b.svc.on_message(ChannelMessageReceived(raw.cell, h, b"x", True), mesh.now, mesh.wall, 0.0)
    assert b.svc.drops["channel_denied"] - before == 3
    assert not any(isinstance(e, ChannelDelivery) for e in b.svc.events)


def test_unexpected_replies_are_counted() -> None:
    mesh = Mesh()
    a = mesh.add()
    b = mesh.add()
    liar = mesh.add(service=False)
    mesh.connect(a, b)
    mesh.connect(liar, a)
    # A reply to nothing.
    mesh.send_control(liar, a, Reply(4242, True, CHAT, 0, "ok"))
    mesh.settle()
    assert a.svc.drops["unexpected_reply"] == 1
    # A reply to a request A sent to B, but from someone else: refused, and B's answer still counts.
    rid = a.svc.subscribe(b.cell, "chat", (), mesh.now)
    mesh.send_control(liar, a, Reply(rid, False, 0, 0, "no"))
    mesh.settle()
    assert a.svc.drops["unexpected_reply"] == 2
    (reply,) = a.replies()
    assert (reply.request_id, reply.peer, reply.allowed) == (rid, b.cell, True)
    assert a.svc.subscriptions() == [(b.cell, "chat")]
    assert a.svc.subscriptions() != [(liar.cell, "chat")]


def test_a_grant_for_another_channel_is_not_believed() -> None:
    mesh = Mesh()
    a = mesh.add()
    host = mesh.add(service=False)
    mesh.connect(a, host)
    rid = a.svc.subscribe(host.cell, "chat", (), mesh.now)
    mesh.settle()
    mesh.send_control(host, a, Reply(rid, True, channel_hash("news/1"), 0, "ok"))
    mesh.settle()
    (reply,) = a.replies()
    assert (reply.allowed, reply.reason) == (False, "reply_mismatch")
    assert a.svc.drops["reply_mismatch"] == 1
    assert a.svc.subscriptions() == []
    host.ep.send_channel_datagram(a.cell, channel_hash("news/1"), b"x", mesh.now)
    mesh.settle()
    assert a.ep.drops["channel_denied"] == 1


def test_a_refusal_from_the_host_is_reported_with_its_words() -> None:
    mesh = Mesh()
    a = mesh.add()
    host = mesh.add(service=False)
    mesh.connect(a, host)
    rid = a.svc.request_publish(host.cell, "chat", (), mesh.now)
    mesh.settle()
    (req,) = host.raw_controls()
    assert req == Request(rid, Op.PUBLISH, "chat", ())
    mesh.send_control(host, a, Reply(rid, False, 0, 0, "policy_drop", "rule 'x' (line 1)"))
    mesh.settle()
    assert a.replies() == [
        ChannelReply(rid, host.cell, "chat", Op.PUBLISH, False, "policy_drop", "rule 'x' (line 1)")
    ]
    assert a.svc.publish_grants_held() == []


def test_requests_carry_encoded_token_chains() -> None:
    mesh = Mesh()
    a = mesh.add()
    host = mesh.add(service=False)
    mesh.connect(a, host)
    t = token(host, a)
    rid = a.svc.subscribe(host.cell, ENGINE, (t,), mesh.now)
    mesh.settle()
    assert host.raw_controls() == [Request(rid, Op.SUBSCRIBE, ENGINE, (encode_token(t),))]


def test_capability_adverts_are_handed_to_the_callback() -> None:
    mesh, a, b = two()
    sent = mesh.wall
    a.svc.announce(b.cell, Caps(b"advert bytes"), mesh.now)
    mesh.settle()
    ((peer, blob, wall),) = b.caps
    assert (peer, blob) == (a.cell, b"advert bytes")
    assert sent <= wall <= mesh.wall  # the wall clock of its arrival


def test_announce_to_an_unknown_peer_is_counted_not_raised() -> None:
    mesh, a, _b = two()
    a.svc.announce(bytes(16), Caps(b"x"), mesh.now)
    assert a.svc.drops["control_unsent"] == 1


def test_host_ending_a_subscription_between_mutual_subscribers() -> None:
    """A and B both host "chat" and subscribe to each other's. B withdraws A's subscription.

    A reads B's ENDED(SUBSCRIBE, chat) as "B left my chat": it drops B as *its* subscriber and
    keeps its own (dead) subscription at B. Proposed fix: the subscriber leaves with
    REQUEST(UNSUBSCRIBE) (already handled by hosts), so ENDED(SUBSCRIBE) only ever means "the
    host withdrew your subscription" (or give ENDED a direction bit).
    """
    mesh = Mesh()
    a = mesh.add(policy="default -> pass\n")
    b = mesh.add(policy="default -> pass\n")
    mesh.connect(a, b)
    assert subscribed(mesh, a, b).allowed
    assert subscribed(mesh, b, a).allowed
    assert b.access.policy is not None
    assert b.access.policy.reload('rule "x": channel chat -> drop\ndefault -> pass\n') is None
    b.svc.revalidate(mesh.wall, mesh.now)
    mesh.settle()
    assert a.svc.subscriptions() == []  # A's subscription at B ended ...
    assert list(a.svc.subscribers()) == [("chat", b.cell)]  # ... B's at A did not


# --- channel names that share a hash ----------------------------------------------------------

# Found by a birthday search over 2**16 names: the 32-bit channel hash is not a name.
COLLIDING = ("chat/a109094", "secret/b12049")


def test_colliding_names_never_stand_for_each_other() -> None:
    assert channel_hash(COLLIDING[0]) == channel_hash(COLLIDING[1])
    mesh = Mesh()
    host = mesh.add(hosted=("chat/** open", "secret/** open"))
    reader, other = mesh.add(), mesh.add()
    mesh.connect(reader, host)
    mesh.connect(other, host)
    assert subscribed(mesh, reader, host, COLLIDING[0]).allowed
    assert subscribed(mesh, other, host, COLLIDING[1]).allowed
    # A publication on one name reaches the subscribers of that name only.
    assert host.svc.publish(COLLIDING[1], b"for secret", mesh.now) == 1
    assert host.svc.forward(COLLIDING[0], other.cell, b"for chat", mesh.now, True) == 1
    mesh.settle()
    assert [d.data for d in reader.deliveries()] == [b"for chat"]
    assert [d.data for d in other.deliveries()] == [b"for secret"]
    # The requester refuses to hold two colliding names at one peer...
    with pytest.raises(LocalProtocolError, match="same channel hash"):
        reader.svc.subscribe(host.cell, COLLIDING[1], (), mesh.now)
    # ...and the host refuses a request for the second one sent by hand, keeping the first.
    replies: list[Reply] = []
    send_reply = host.svc._reply

    def spy(peer: bytes, reply: Reply, now: float) -> None:
        replies.append(reply)
        send_reply(peer, reply, now)

    host.svc._reply = spy  # type: ignore[method-assign]
    mesh.send_control(reader, host, Request(99, Op.SUBSCRIBE, COLLIDING[1], ()))
    mesh.settle()
    assert [(r.allowed, r.reason) for r in replies] == [(False, "hash_collision")]
    assert reader.svc.drops["unexpected_reply"] == 1  # the host's refusal of request 99
    grant = host.access.grant(reader.cell, "subscribe", channel_hash(COLLIDING[0]), mesh.wall)
    assert grant is not None
    assert grant.channel == COLLIDING[0]
    assert list(host.svc.subscribers()).count((COLLIDING[0], reader.cell)) == 1
    assert (COLLIDING[1], reader.cell) not in list(host.svc.subscribers())
