"""Unit tests for `cellmesh.filter.access`: channel access verdicts, grant caching and upkeep."""

from __future__ import annotations

import dataclasses

import pytest

from cellmesh.filter import access as access_mod
from cellmesh.filter.access import AccessController, Grant, Verdict
from cellmesh.filter.channels import ChannelSpec, ChannelTable, channel_hash
from cellmesh.filter.policy import PolicyHolder, parse_policy
from cellmesh.identity.keys import Identity
from cellmesh.identity.tokens import (
    DEFAULT_SKEW,
    Rights,
    Token,
    issue_token,
    revoke_token,
)

T0 = 1_800_000_000
HOUR = 3600
NOW = 50.0  # monotonic clock of the caller

OWNER = Identity.generate()  # the node that hosts the channels
ROOT = Identity.generate()  # another trusted token issuer
STRANGER = Identity.generate()  # an issuer nobody trusts
PEER = Identity.generate()
OTHER = Identity.generate()
THIRD = Identity.generate()

SUB = Rights.SUBSCRIBE
PUB = Rights.PUBLISH
BOTH = Rights.PUBLISH | Rights.SUBSCRIBE

DECLARATIONS = (
    ChannelSpec("telemetry/**", "token", "mesh"),
    ChannelSpec("chat", "open", "mesh"),
    ChannelSpec("secret/**", "token", "local"),
    ChannelSpec("lobby/*", "open", "local"),
)


def token(
    subject: Identity = PEER,
    pattern: str = "telemetry/**",
    rights: Rights = BOTH,
    issuer: Identity = OWNER,
    not_before: int = T0,
    not_after: int = T0 + HOUR,
    n: int = 0,
    parent: Token | None = None,
) -> Token:
    return issue_token(
        issuer,
        subject.cell_id,
        pattern,
        rights,
        not_before,
        not_after,
        bytes([n]) * 16,
        parent=parent,
    )


def controller(policy: str | None = None, **kwargs: object) -> AccessController:
    holder = PolicyHolder(parse_policy(policy)) if policy is not None else None
    return AccessController(
        ChannelTable(DECLARATIONS),
        OWNER.public_key,
        policy=holder,
        **kwargs,  # type: ignore[arg-type]
    )


def ask(
    ac: AccessController,
    channel: str = "telemetry/engine-3",
    chain: tuple[Token, ...] | None = None,
    right: access_mod.Right = "subscribe",
    peer: Identity = PEER,
    wall: float = T0 + 10,
    **kwargs: object,
) -> Verdict:
    if chain is None:
        chain = (token(peer),)
    return ac.request(peer.cell_id, channel, right, chain, wall=wall, now=NOW, **kwargs)  # type: ignore[arg-type]


def refused(v: Verdict, reason: str) -> None:
    assert not v.allowed
    assert v.reason == reason, v
    assert v.expires is None


# --- refusals, each with its own reason ---------------------------------------------------------


@pytest.mark.parametrize("channel", ["", "telemetry/*", "telemetry/**", "bad name", "x" * 300])
def test_invalid_channel(channel: str) -> None:
    ac = controller()
    v = ask(ac, channel)
    refused(v, "invalid_channel")
    assert v.channel == channel
    assert v.detail  # says what is wrong with the name
    assert ac.refusals == {"invalid_channel": 1}
    assert len(ac) == 0


def test_unknown_channel() -> None:
    ac = controller()
    v = ask(ac, "weather/today")
    refused(v, "unknown_channel")
    assert ac.refusals == {"unknown_channel": 1}


def test_local_channel_looks_missing_to_a_peer() -> None:
    ac = controller()
    missing = ask(ac, "nothing/here", chain=())
    hidden_open = ask(ac, "lobby/main", chain=())
    hidden_token = ask(ac, "secret/plans", chain=(token(pattern="secret/**"),))
    for v in (hidden_open, hidden_token):
        refused(v, "unknown_channel")
        # Word for word the same answer as a channel that does not exist.
        assert (v.reason, v.detail) == (missing.reason, missing.detail)
    assert ac.refusals == {"unknown_channel": 3}
    assert len(ac) == 0


def test_local_channels_serve_this_nodes_own_applications() -> None:
    ac = controller()
    me = OWNER.cell_id
    v = ac.request(me, "lobby/main", "subscribe", (), wall=T0, now=NOW, local=True)
    assert v.allowed
    assert v.reason == "ok"
    # Token channels need no token locally either.
    v2 = ac.request(me, "secret/plans", "publish", (), wall=T0, now=NOW, local=True)
    assert v2.allowed
    assert ac.grant(me, "publish", channel_hash("secret/plans"), T0) is not None


def test_token_required() -> None:
    ac = controller()
    v = ask(ac, chain=())
    refused(v, "token_required")
    assert "telemetry/**" in v.detail
    assert "subscribe" in v.detail
    v = ask(ac, chain=(), right="publish")
    assert v.reason == "token_required"
    assert "publish" in v.detail
    assert ac.refusals == {"token_required": 2}


def test_open_channel_needs_no_token() -> None:
    ac = controller()
    v = ask(ac, "chat", chain=())
    assert v.allowed
    assert v.reason == "ok"
    assert v.expires is None  # no token, so the grant does not lapse by itself
    assert v.decision is not None
    assert v.decision.action == "pass"
    assert ac.refusals == {}


def test_a_presented_chain_is_checked_even_on_an_open_channel() -> None:
    ac = controller()
    v = ask(ac, "chat", chain=(token(pattern="chat", issuer=STRANGER),))
    refused(v, "untrusted_root")


def _tampered(t: Token) -> Token:
    return dataclasses.replace(t, not_after=t.not_after + 1)


@pytest.mark.parametrize(
    ("chain", "right", "wall", "reason"),
    [
        ((token(),), "subscribe", T0 + HOUR + DEFAULT_SKEW + 1, "expired"),
        ((token(),), "subscribe", T0 - DEFAULT_SKEW - 1, "not_yet_valid"),
        ((token(issuer=STRANGER),), "subscribe", T0 + 10, "untrusted_root"),
        ((token(rights=SUB),), "publish", T0 + 10, "missing_right"),
        ((token(rights=PUB),), "subscribe", T0 + 10, "missing_right"),
        ((token(pattern="chat"),), "subscribe", T0 + 10, "wrong_channel"),
        ((token(pattern="telemetry/other"),), "subscribe", T0 + 10, "wrong_channel"),
        ((_tampered(token()),), "subscribe", T0 + 10, "bad_signature"),
    ],
)
def test_token_refusals_carry_verify_chain_reasons(
    chain: tuple[Token, ...], right: access_mod.Right, wall: float, reason: str
) -> None:
    ac = controller()
    v = ask(ac, chain=chain, right=right, wall=wall)
    refused(v, reason)
    assert v.detail.startswith(reason)  # the TokenError message, reason first
    assert ac.refusals == {reason: 1}
    assert len(ac) == 0


def test_revoked_token_is_refused() -> None:
    ac = controller()
    t = token()
    assert ac.revocations.add(revoke_token(OWNER, t, T0))
    refused(ask(ac, chain=(t,)), "revoked")
    # A different token for the same peer is unaffected.
    assert ask(ac, chain=(token(n=1),)).allowed


def test_delegation_chain_too_deep() -> None:
    people = [PEER, OTHER, THIRD, *(Identity.generate() for _ in range(4))]
    chain = [token(people[0], rights=BOTH | Rights.DELEGATE)]
    for i in range(1, len(people)):
        chain.append(
            token(people[i], rights=BOTH | Rights.DELEGATE, issuer=people[i - 1], parent=chain[-1])
        )
    ac = controller()
    refused(ask(ac, chain=tuple(chain), peer=people[-1]), "too_deep")
    # Two delegations are within the default depth.
    assert ask(ac, chain=tuple(chain[:3]), peer=people[2]).allowed


def test_wrong_subject() -> None:
    ac = controller()
    v = ask(ac, chain=(token(subject=OTHER),), peer=PEER)
    refused(v, "wrong_subject")
    assert "another CellID" in v.detail
    assert ac.refusals == {"wrong_subject": 1}


def test_policy_drop_names_the_rule() -> None:
    ac = controller('rule "no telemetry": channel telemetry/** -> drop\ndefault -> pass\n')
    v = ask(ac)
    refused(v, "policy_drop")
    assert v.decision is not None
    assert v.decision.rule == "no telemetry"
    assert "no telemetry" in v.detail
    assert "line 1" in v.detail
    assert ask(ac, "chat", chain=()).allowed  # the default passes other channels


def test_policy_sees_token_rights_capabilities_trust_and_rate() -> None:
    policy = (
        'rule "tokens": right subscribe -> pass\n'
        'rule "storage": capability storage -> pass\n'
        'rule "trusted": trust > 0.5 rate < 10/s -> pass\n'
        "default -> drop\n"
    )
    caps = {OTHER.cell_id: frozenset({"storage"})}
    ac = controller(policy, capabilities_of=lambda c: caps.get(c, frozenset()))
    with_token = ask(ac, "chat", chain=(token(pattern="chat", rights=SUB),))
    assert with_token.allowed
    assert with_token.decision is not None
    assert with_token.decision.rule == "tokens"
    assert ask(ac, "chat", chain=(), peer=OTHER).decision == dataclasses.replace(
        with_token.decision,
        rule="storage",
        line=2,
        index=1,
        reasons=(),  # the controller asks without explanations (they cost more than matching)
    )
    refused(ask(ac, "chat", chain=()), "policy_drop")
    assert ask(ac, "chat", chain=(), trust=0.9, rate=1.0).allowed
    refused(ask(ac, "chat", chain=(), trust=0.9, rate=50.0), "policy_drop")


def test_own_key_is_always_a_trusted_root_and_extra_roots_are_honoured() -> None:
    ac = controller(trusted_roots=frozenset({ROOT.public_key}))
    assert ask(ac, chain=(token(issuer=OWNER),)).allowed
    assert ask(ac, chain=(token(issuer=ROOT),)).allowed
    refused(ask(ac, chain=(token(issuer=STRANGER),)), "untrusted_root")
    assert ac.trusted_roots == frozenset({OWNER.public_key, ROOT.public_key})


# --- grants ------------------------------------------------------------------------------------


def test_positive_verdict_is_cached_as_a_grant() -> None:
    ac = controller()
    t = token()
    v = ask(ac, chain=(t,), session_age=5.0)
    assert v.allowed
    assert v.expires == T0 + HOUR + DEFAULT_SKEW
    h = channel_hash("telemetry/engine-3")
    g = ac.grant(PEER.cell_id, "subscribe", h, T0 + 20)
    assert isinstance(g, Grant)
    assert (g.peer, g.right, g.channel, g.hash) == (
        PEER.cell_id,
        "subscribe",
        "telemetry/engine-3",
        h,
    )
    assert g.chain == (t,)
    assert g.expires == v.expires
    assert g.session_age_base == 5.0 - NOW
    # Keyed by right, peer and channel.
    assert ac.grant(PEER.cell_id, "publish", h, T0 + 20) is None
    assert ac.grant(OTHER.cell_id, "subscribe", h, T0 + 20) is None
    assert ac.grant(PEER.cell_id, "subscribe", channel_hash("telemetry/other"), T0 + 20) is None
    assert len(ac) == 1
    assert list(ac.grants()) == [g]


def test_grant_lookup_does_no_token_or_policy_work(monkeypatch: pytest.MonkeyPatch) -> None:
    ac = controller("default -> pass\n")
    assert ask(ac).allowed
    calls: list[str] = []

    def no_verify(*args: object, **kwargs: object) -> Token:
        calls.append("verify")
        raise AssertionError("verify_chain on the per-packet path")

    assert ac.policy is not None
    monkeypatch.setattr(access_mod, "verify_chain", no_verify)
    monkeypatch.setattr(ac.policy, "decide", lambda ctx: calls.append("policy"))
    h = channel_hash("telemetry/engine-3")
    for i in range(1000):
        g = ac.grant(PEER.cell_id, "subscribe", h, T0 + i)
        assert g is not None
        assert ac.admit(g, NOW + i)
    assert calls == []


def test_refusal_replaces_a_cached_grant() -> None:
    ac = controller()
    h = channel_hash("telemetry/engine-3")
    assert ask(ac).allowed
    assert ac.grant(PEER.cell_id, "subscribe", h, T0) is not None
    refused(ask(ac, chain=(token(issuer=STRANGER),)), "untrusted_root")
    assert ac.grant(PEER.cell_id, "subscribe", h, T0) is None
    assert len(ac) == 0


def test_grant_expires_at_token_not_after_plus_skew() -> None:
    ac = controller(skew=30)
    t = token(not_after=T0 + 100)
    v = ask(ac, chain=(t,))
    assert v.expires == T0 + 130
    h = channel_hash("telemetry/engine-3")
    assert ac.grant(PEER.cell_id, "subscribe", h, T0 + 130) is not None  # still inside
    assert ac.grant(PEER.cell_id, "subscribe", h, T0 + 130.001) is None
    assert len(ac) == 1  # kept until `expire`, so the peer is told once
    assert [g.channel for g in ac.expire(T0 + 130.001)] == ["telemetry/engine-3"]
    assert len(ac) == 0
    # Requesting again inside the skew window works, past it does not.
    assert ask(ac, chain=(t,), wall=T0 + 129).allowed
    refused(ask(ac, chain=(t,), wall=T0 + 131), "expired")


def test_grant_expiry_uses_the_earliest_token_in_the_chain() -> None:
    parent = token(PEER, rights=BOTH | Rights.DELEGATE, not_after=T0 + 500)
    child = token(OTHER, issuer=PEER, parent=parent, not_after=T0 + 200)
    ac = controller()
    v = ask(ac, chain=(parent, child), peer=OTHER)
    assert v.allowed
    assert v.expires == T0 + 200 + DEFAULT_SKEW


def test_expire_removes_only_lapsed_grants() -> None:
    ac = controller(skew=0)
    assert ask(ac, chain=(token(not_after=T0 + 100),)).allowed
    assert ask(ac, chain=(token(OTHER, not_after=T0 + 1000),), peer=OTHER).allowed
    assert ask(ac, "chat", chain=(), peer=THIRD).allowed  # no token: never lapses
    assert ac.expire(T0 + 100) == []
    gone = ac.expire(T0 + 101)
    assert [g.peer for g in gone] == [PEER.cell_id]
    assert len(ac) == 2
    assert [g.peer for g in ac.expire(T0 + 10**9)] == [OTHER.cell_id]
    assert [g.peer for g in ac.grants()] == [THIRD.cell_id]


def test_grant_table_full() -> None:
    ac = controller(max_grants=2)
    assert ask(ac, peer=PEER, chain=(token(PEER),)).allowed
    assert ask(ac, peer=OTHER, chain=(token(OTHER),)).allowed
    v = ask(ac, peer=THIRD, chain=(token(THIRD),))
    refused(v, "grant_table_full")
    assert "2 grants" in v.detail
    assert ac.refusals == {"grant_table_full": 1}
    assert ac.grant(THIRD.cell_id, "subscribe", channel_hash("telemetry/engine-3"), T0) is None
    # Asking again for a grant already held is not a new entry, so it still works at the bound.
    assert ask(ac, peer=PEER, chain=(token(PEER),)).allowed
    assert len(ac) == 2
    # Forgetting one makes room.
    ac.forget_peer(OTHER.cell_id)
    assert ask(ac, peer=THIRD, chain=(token(THIRD),)).allowed


def test_admit_applies_throttle_decisions() -> None:
    ac = controller('rule "slow": channel chat -> throttle(2/s)\ndefault -> pass\n')
    assert ask(ac, "chat", chain=()).allowed
    g = ac.grant(PEER.cell_id, "subscribe", channel_hash("chat"), T0)
    assert g is not None
    assert g.decision.action == "throttle"
    assert [ac.admit(g, 10.0) for _ in range(4)] == [True, True, False, False]
    assert ac.admit(g, 10.5)  # refilled one token at 2/s
    assert not ac.admit(g, 10.5)
    # Unthrottled grants always pass.
    assert ask(ac, chain=(token(),)).allowed
    g2 = ac.grant(PEER.cell_id, "subscribe", channel_hash("telemetry/engine-3"), T0)
    assert g2 is not None
    assert all(ac.admit(g2, 10.0) for _ in range(100))


def test_throttle_buckets_are_per_peer() -> None:
    ac = controller('rule "slow": channel chat -> throttle(1/s)\ndefault -> pass\n')
    assert ask(ac, "chat", chain=(), peer=PEER).allowed
    assert ask(ac, "chat", chain=(), peer=OTHER).allowed
    h = channel_hash("chat")
    ga = ac.grant(PEER.cell_id, "subscribe", h, T0)
    gb = ac.grant(OTHER.cell_id, "subscribe", h, T0)
    assert ga is not None
    assert gb is not None
    assert ac.admit(ga, 1.0)
    assert not ac.admit(ga, 1.0)
    assert ac.admit(gb, 1.0)  # another peer's bucket is untouched


def test_revoke_grant_and_forget_peer() -> None:
    ac = controller()
    for right in ("subscribe", "publish"):
        assert ask(ac, right=right).allowed
        assert ask(ac, "telemetry/b", right=right).allowed
    assert ask(ac, peer=OTHER, chain=(token(OTHER),)).allowed
    assert len(ac) == 5
    h = channel_hash("telemetry/b")
    g = ac.revoke_grant(PEER.cell_id, "publish", h)
    assert g is not None
    assert (g.right, g.channel) == ("publish", "telemetry/b")
    assert ac.revoke_grant(PEER.cell_id, "publish", h) is None
    gone = ac.forget_peer(PEER.cell_id)
    assert {(g.right, g.channel) for g in gone} == {
        ("subscribe", "telemetry/engine-3"),
        ("subscribe", "telemetry/b"),
        ("publish", "telemetry/engine-3"),
    }
    assert ac.forget_peer(PEER.cell_id) == []
    assert [g.peer for g in ac.grants()] == [OTHER.cell_id]


# --- revalidation ------------------------------------------------------------------------------


def test_revalidate_after_policy_reload() -> None:
    ac = controller("default -> pass\n")
    assert ask(ac).allowed
    assert ask(ac, "chat", chain=(), peer=OTHER).allowed
    assert ac.policy is not None
    assert ac.revalidate(T0 + 20, NOW) == []  # nothing changed

    # A broken file keeps the policy in force: nothing is lost.
    err = ac.policy.reload("rule oops\n")
    assert err is not None
    assert ac.revalidate(T0 + 20, NOW) == []
    assert len(ac) == 2

    # A new policy that drops telemetry ends exactly that grant, with the new verdict.
    assert ac.policy.reload('rule "t": channel telemetry/** -> drop\ndefault -> pass\n') is None
    lost = ac.revalidate(T0 + 20, NOW)
    assert len(lost) == 1
    g, v = lost[0]
    assert (g.peer, g.channel) == (PEER.cell_id, "telemetry/engine-3")
    refused(v, "policy_drop")
    assert [g.channel for g in ac.grants()] == ["chat"]


def test_revalidate_updates_the_decision_and_expiry_of_kept_grants() -> None:
    ac = controller("default -> pass\n")
    assert ask(ac, "chat", chain=()).allowed
    assert ac.policy is not None
    assert ac.policy.reload('rule "slow": channel chat -> throttle(1/s)\ndefault -> pass\n') is None
    assert ac.revalidate(T0, NOW) == []
    g = ac.grant(PEER.cell_id, "subscribe", channel_hash("chat"), T0)
    assert g is not None
    assert g.decision.action == "throttle"
    assert ac.admit(g, 1.0)
    assert not ac.admit(g, 1.0)


def test_revalidate_after_a_revocation() -> None:
    ac = controller()
    parent = token(PEER, rights=BOTH | Rights.DELEGATE)
    child = token(OTHER, issuer=PEER, parent=parent)
    assert ask(ac, chain=(parent,)).allowed
    assert ask(ac, chain=(child,), peer=OTHER).reason == "broken_chain"  # needs its root
    assert ask(ac, chain=(parent, child), peer=OTHER).allowed
    assert ask(ac, chain=(token(THIRD),), peer=THIRD).allowed
    assert len(ac) == 3
    # Revoking the parent ends the parent's grant and every grant delegated from it.
    assert ac.revocations.add(revoke_token(OWNER, parent, T0))
    lost = ac.revalidate(T0 + 20, NOW)
    assert {g.peer for g, _ in lost} == {PEER.cell_id, OTHER.cell_id}
    assert all(v.reason == "revoked" for _, v in lost)
    assert [g.peer for g in ac.grants()] == [THIRD.cell_id]


def test_revalidate_after_a_declaration_change() -> None:
    ac = controller()
    assert ask(ac).allowed
    assert ask(ac, "chat", chain=()).allowed
    assert ac.channels.remove("telemetry/**")
    ac.channels.declare(ChannelSpec("chat", "token"))  # chat now needs a token
    lost = ac.revalidate(T0, NOW)
    assert sorted((g.channel, v.reason) for g, v in lost) == [
        ("chat", "token_required"),
        ("telemetry/engine-3", "unknown_channel"),
    ]
    assert len(ac) == 0


def test_revalidate_ends_grants_whose_tokens_lapsed() -> None:
    ac = controller(skew=0)
    assert ask(ac, chain=(token(not_after=T0 + 100),)).allowed
    (lost,) = ac.revalidate(T0 + 101, NOW)
    assert lost[1].reason == "expired"


def test_revalidate_counts_session_age_from_the_request() -> None:
    # Granted at session age 100 (monotonic now=NOW). The new policy wants an age above 150 s.
    policy = 'rule "old": session-age > 150s -> pass\ndefault -> drop\n'
    for later, kept in ((NOW + 20, False), (NOW + 60, True)):
        ac = controller("default -> pass\n")
        assert ask(ac, session_age=100.0).allowed
        assert ac.policy is not None
        assert ac.policy.reload(policy) is None
        lost = ac.revalidate(T0 + 20, later)
        assert (lost == []) is kept
        assert len(ac) == (1 if kept else 0)


def test_revalidate_keeps_grants_of_this_nodes_own_applications() -> None:
    """A local request (own application) must survive a re-decision: it was never a peer's."""
    ac = controller("default -> pass\n")
    me = OWNER.cell_id
    assert ac.request(me, "secret/plans", "subscribe", (), wall=T0, now=NOW, local=True).allowed
    assert ac.request(me, "telemetry/x", "publish", (), wall=T0, now=NOW, local=True).allowed
    assert ac.revalidate(T0, NOW) == []
    assert len(ac) == 2


def test_revalidate_decides_with_the_trust_and_rate_of_the_request() -> None:
    """The policy is asked again with what the request said, not with zeros."""
    policy = 'rule "trusted": trust > 0.5 -> pass\ndefault -> drop\n'
    ac = controller(policy)
    assert ask(ac, "chat", chain=(), trust=0.9).allowed
    assert ac.revalidate(T0, NOW) == []
    assert len(ac) == 1
