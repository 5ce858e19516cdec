"""Tests for cellmesh.identity.tokens."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmesh.errors import (
    AuthenticationError,
    DecodeError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.identity.keys import Identity
from cellmesh.identity.tokens import (
    MAX_TOKEN_LEN,
    REVOCATION_CONTEXT,
    TOKEN_CONTEXT,
    ZERO_TOKEN_ID,
    RevocationSet,
    Rights,
    Token,
    TokenError,
    channel_matches,
    decode_revocation,
    decode_token,
    encode_revocation,
    encode_token,
    issue_token,
    pattern_covers,
    revocation_signing_message,
    revoke_token,
    token_id,
    token_signing_message,
    verify_chain,
)

T0 = 1_800_000_000
HOUR = 3600
ALL = Rights.PUBLISH | Rights.SUBSCRIBE | Rights.ADMIN | Rights.DELEGATE


@pytest.fixture(scope="module")
def ids() -> list[Identity]:
    return [Identity.generate() for _ in range(7)]


def nonce(i: int) -> bytes:
    return bytes([i]) * 16


def resign(tok: Token, signer: Identity, **changes: object) -> Token:
    """Change fields and re-sign honestly (to build tokens `issue_token` refuses to make)."""
    changed = dataclasses.replace(tok, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(changed, signature=signer.sign(token_signing_message(changed)))


def chain_of(ids: list[Identity], n: int, rights: Rights = ALL) -> list[Token]:
    """Root by ids[0] for ids[1], then ids[i] delegates to ids[i+1]; n tokens in all."""
    toks = [
        issue_token(ids[0], ids[1].cell_id, "telemetry/**", rights, T0, T0 + 10 * HOUR, nonce(0))
    ]
    for i in range(1, n):
        toks.append(
            issue_token(
                ids[i],
                ids[i + 1].cell_id,
                "telemetry/**",
                rights,
                T0,
                T0 + 10 * HOUR,
                nonce(i),
                parent=toks[-1],
            )
        )
    return toks


def check(
    chain: list[Token],
    ids: list[Identity],
    *,
    now: int = T0 + HOUR,
    channel: str = "telemetry/engine-3",
    right: Rights = Rights.PUBLISH,
    **kw: object,
) -> Token:
    return verify_chain(
        chain,
        now=now,
        trusted_roots={ids[0].public_key},
        channel=channel,
        right=right,
        **kw,  # type: ignore[arg-type]
    )


def reason_of(chain: list[Token], ids: list[Identity], **kw: object) -> str:
    with pytest.raises(TokenError) as info:
        check(chain, ids, **kw)  # type: ignore[arg-type]
    return info.value.reason


# --- patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "inner", "covered"),
    [
        ("telemetry/engine-3", "telemetry/engine-3", True),
        ("telemetry/engine-3", "telemetry/engine-4", False),
        ("telemetry/*", "telemetry/engine-3", True),
        ("telemetry/*", "telemetry/*", True),
        ("telemetry/engine-3", "telemetry/*", False),
        ("telemetry/*", "telemetry/engine-3/rpm", False),
        ("telemetry/**", "telemetry/engine-3/rpm", True),
        ("telemetry/**", "telemetry/*", True),
        ("telemetry/**", "telemetry/*/rpm", True),
        ("telemetry/**", "telemetry/engine-3/**", True),
        ("telemetry/**", "telemetry/**", True),
        ("telemetry/**", "telemetry", False),
        ("telemetry/*", "telemetry/**", False),
        ("telemetry/engine-3/**", "telemetry/**", False),
        ("*/engine-3", "telemetry/engine-3", True),
        ("*/engine-3", "*/*", False),
        ("*/*", "telemetry/engine-3", True),
        ("**", "a/b/c", True),
        ("**", "*", True),
        ("a/**", "b/**", False),
        ("a/*/c", "a/b/c", True),
        ("a/b/c", "a/*/c", False),
    ],
)
def test_pattern_covers(outer: str, inner: str, covered: bool) -> None:
    assert pattern_covers(outer, inner) is covered


@pytest.mark.parametrize(
    "bad", ["", "a//b", "/a", "a/", "a/**/b", "a/x*", "a/***", "é", "a b", "x" * 256]
)
def test_invalid_patterns(bad: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        pattern_covers(bad, "a")
    assert not channel_matches(bad, "a")


def test_channel_matches_rejects_wildcard_channels() -> None:
    assert channel_matches("a/*", "a/b")
    assert not channel_matches("a/*", "a/*")
    assert not channel_matches("a/**", "a/**")


# --- encoding ---------------------------------------------------------------------------------


def test_round_trip_and_id(ids: list[Identity]) -> None:
    chain = chain_of(ids, 2)
    for tok in chain:
        data = encode_token(tok)
        assert decode_token(data) == tok
        assert encode_token(decode_token(data)) == data
        assert len(token_id(tok)) == 32
    assert chain[0].parent == ZERO_TOKEN_ID
    assert chain[1].parent == token_id(chain[0])
    assert token_id(chain[0]) != token_id(chain[1])


def test_signed_message_is_domain_separated(ids: list[Identity]) -> None:
    tok = chain_of(ids, 1)[0]
    msg = token_signing_message(tok)
    assert msg.startswith(TOKEN_CONTEXT)
    assert msg[len(TOKEN_CONTEXT) :] == encode_token(tok)[:-64]


def test_layout_is_as_documented(ids: list[Identity]) -> None:
    tok = chain_of(ids, 1)[0]
    data = encode_token(tok)
    assert data[0] == 1
    assert data[1:33] == ids[0].public_key
    assert data[33:49] == ids[1].cell_id
    assert data[49] == int(ALL)
    assert data[50] == 0
    assert int.from_bytes(data[51:59], "big") == T0
    assert int.from_bytes(data[59:67], "big") == T0 + 10 * HOUR
    assert data[67:83] == nonce(0)
    assert data[83:115] == ZERO_TOKEN_ID
    assert data[115] == len("telemetry/**")
    assert data[116:-64] == b"telemetry/**"
    assert data[-64:] == tok.signature


def test_decode_errors(ids: list[Identity]) -> None:
    data = encode_token(chain_of(ids, 1)[0])
    with pytest.raises(TruncatedError):
        decode_token(data[:-1])
    with pytest.raises(TruncatedError):
        decode_token(b"")
    with pytest.raises(MalformedError):
        decode_token(data + b"\x00")
    with pytest.raises(OversizeError):
        decode_token(data + bytes(MAX_TOKEN_LEN))
    with pytest.raises(VersionError):
        decode_token(b"\x02" + data[1:])
    with pytest.raises(MalformedError):
        decode_token(data[:49] + b"\x10" + data[50:])  # reserved rights bit
    with pytest.raises(MalformedError):
        decode_token(data[:49] + b"\x00" + data[50:])  # no rights
    with pytest.raises(MalformedError):
        decode_token(data[:50] + b"\x01" + data[51:])  # depth 1 with zero parent
    swapped = data[:51] + data[59:67] + data[51:59] + data[67:]
    with pytest.raises(MalformedError):
        decode_token(swapped)  # not_before > not_after
    with pytest.raises(MalformedError):
        decode_token(data[:116] + b"telemetry/*!" + data[-64:])


@given(st.binary(max_size=MAX_TOKEN_LEN + 8))
def test_arbitrary_bytes_decode_or_decode_error(data: bytes) -> None:
    try:
        tok = decode_token(data)
    except DecodeError:
        return
    assert encode_token(tok) == data


@given(header=st.binary(min_size=114, max_size=114), plen=st.integers(1, 40))
def test_random_headers_decode_or_decode_error(header: bytes, plen: int) -> None:
    data = b"\x01" + header + bytes([plen]) + b"a" * plen + bytes(64)
    try:
        tok = decode_token(data)
    except DecodeError:
        return
    assert encode_token(tok) == data


@given(index=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_any_byte_flip_is_refused(ids: list[Identity], index: int, flip: int) -> None:
    tok = chain_of(ids, 1)[0]
    data = bytearray(encode_token(tok))
    data[index % len(data)] ^= flip
    try:
        mutated = decode_token(bytes(data))
    except DecodeError:
        return
    with pytest.raises(TokenError):
        check([mutated], ids)


# --- issuing ----------------------------------------------------------------------------------


def test_issue_refuses_widening_and_bad_delegation(ids: list[Identity]) -> None:
    root = chain_of(ids, 1, rights=Rights.PUBLISH | Rights.DELEGATE)[0]
    sub = ids[2].cell_id

    def delegate(issuer: Identity, **kw: object) -> Token:
        args: dict[str, object] = {
            "pattern": "telemetry/*",
            "rights": Rights.PUBLISH,
            "not_before": T0,
            "not_after": T0 + HOUR,
        }
        args.update(kw)
        return issue_token(issuer, sub, nonce=nonce(9), parent=root, **args)  # type: ignore[arg-type]

    delegate(ids[1])
    cases: list[tuple[Identity, dict[str, object], str]] = [
        (ids[1], {"rights": Rights.SUBSCRIBE}, "widened"),
        (ids[1], {"pattern": "other/*"}, "widened"),
        (ids[1], {"not_after": T0 + 11 * HOUR}, "widened"),
        (ids[1], {"not_before": T0 - 1}, "widened"),
        (ids[3], {}, "broken_chain"),
    ]
    for issuer, kw, reason in cases:
        with pytest.raises(TokenError) as info:
            delegate(issuer, **kw)
        assert info.value.reason == reason
    no_delegate = chain_of(ids, 1, rights=Rights.PUBLISH)[0]
    with pytest.raises(TokenError) as info:
        issue_token(ids[1], sub, "telemetry/a", Rights.PUBLISH, T0, T0 + 1, nonce(1), no_delegate)
    assert info.value.reason == "no_delegate_right"


def test_issue_rejects_bad_arguments(ids: list[Identity]) -> None:
    with pytest.raises(ValueError, match="nonce"):
        issue_token(ids[0], ids[1].cell_id, "a", Rights.PUBLISH, 0, 1, b"short")
    with pytest.raises(ValueError, match="window"):
        issue_token(ids[0], ids[1].cell_id, "a", Rights.PUBLISH, 2, 1, nonce(0))
    with pytest.raises(ValueError, match="rights"):
        issue_token(ids[0], ids[1].cell_id, "a", Rights(0), 0, 1, nonce(0))
    with pytest.raises(ValueError, match="pattern"):
        issue_token(ids[0], ids[1].cell_id, "a/**/b", Rights.PUBLISH, 0, 1, nonce(0))


def test_token_error_is_authentication_error() -> None:
    err = TokenError("x", "expired")
    assert isinstance(err, AuthenticationError)
    assert err.reason == "expired"


# --- verify_chain: acceptance -----------------------------------------------------------------


def test_single_root_token_verifies(ids: list[Identity]) -> None:
    chain = chain_of(ids, 1)
    assert check(chain, ids) == chain[0]


def test_three_link_narrowing_chain_verifies(ids: list[Identity]) -> None:
    root = issue_token(ids[0], ids[1].cell_id, "**", ALL, T0, T0 + 100 * HOUR, nonce(0))
    a = issue_token(
        ids[1],
        ids[2].cell_id,
        "telemetry/**",
        Rights.PUBLISH | Rights.SUBSCRIBE | Rights.DELEGATE,
        T0 + HOUR,
        T0 + 50 * HOUR,
        nonce(1),
        root,
    )
    b = issue_token(
        ids[2],
        ids[3].cell_id,
        "telemetry/*",
        Rights.PUBLISH | Rights.DELEGATE,
        T0 + 2 * HOUR,
        T0 + 40 * HOUR,
        nonce(2),
        a,
    )
    c = issue_token(
        ids[3],
        ids[4].cell_id,
        "telemetry/engine-3",
        Rights.PUBLISH,
        T0 + 3 * HOUR,
        T0 + 30 * HOUR,
        nonce(3),
        b,
    )
    chain = [root, a, b, c]
    leaf = check(chain, ids, now=T0 + 4 * HOUR)
    assert leaf == c
    assert leaf.depth == 3
    assert leaf.subject == ids[4].cell_id
    # The same chain round-trips through the codec and still verifies.
    decoded = [decode_token(encode_token(t)) for t in chain]
    assert check(decoded, ids, now=T0 + 4 * HOUR) == c


# --- verify_chain: every refusal --------------------------------------------------------------


def test_expired(ids: list[Identity]) -> None:
    chain = chain_of(ids, 1)
    assert check(chain, ids, now=T0 + 10 * HOUR + 120) == chain[0]  # within skew
    assert reason_of(chain, ids, now=T0 + 10 * HOUR + 121) == "expired"
    assert reason_of(chain, ids, now=T0 + 10 * HOUR + 1, skew=0) == "expired"


def test_not_yet_valid_with_and_without_skew(ids: list[Identity]) -> None:
    chain = chain_of(ids, 1)
    assert check(chain, ids, now=T0 - 120) == chain[0]  # default skew tolerates 120 s
    assert reason_of(chain, ids, now=T0 - 121) == "not_yet_valid"
    assert reason_of(chain, ids, now=T0 - 1, skew=0) == "not_yet_valid"
    assert check(chain, ids, now=T0, skew=0) == chain[0]
    assert check(chain, ids, now=T0 - 600, skew=600) == chain[0]


def test_bad_signature_wrong_signer(ids: list[Identity]) -> None:
    chain = chain_of(ids, 2)
    # Signed by ids[5], but claims ids[1] as issuer.
    forged = resign(chain[1], ids[5])
    assert reason_of([chain[0], forged], ids) == "bad_signature"
    tampered = dataclasses.replace(chain[0], not_after=T0 + 99 * HOUR)
    assert reason_of([tampered], ids) == "bad_signature"


def test_untrusted_root(ids: list[Identity]) -> None:
    chain = chain_of(ids, 1)
    with pytest.raises(TokenError) as info:
        verify_chain(
            chain,
            now=T0 + HOUR,
            trusted_roots={ids[5].public_key},
            channel="telemetry/engine-3",
            right=Rights.PUBLISH,
        )
    assert info.value.reason == "untrusted_root"


def test_widened_rights(ids: list[Identity]) -> None:
    chain = chain_of(ids, 2, rights=Rights.PUBLISH | Rights.DELEGATE)
    wide = resign(chain[1], ids[1], rights=Rights.PUBLISH | Rights.SUBSCRIBE)
    assert reason_of([chain[0], wide], ids) == "widened"


def test_widened_pattern(ids: list[Identity]) -> None:
    chain = chain_of(ids, 2)
    wide = resign(chain[1], ids[1], pattern="**")
    assert reason_of([chain[0], wide], ids) == "widened"


def test_widened_window(ids: list[Identity]) -> None:
    chain = chain_of(ids, 2)
    late = resign(chain[1], ids[1], not_after=T0 + 11 * HOUR)
    assert reason_of([chain[0], late], ids) == "widened"
    early = resign(chain[1], ids[1], not_before=T0 - 1)
    assert reason_of([chain[0], early], ids) == "widened"


def test_too_deep(ids: list[Identity]) -> None:
    chain = chain_of(ids, 6)  # five delegations
    assert reason_of(chain, ids) == "too_deep"
    assert check(chain, ids, max_depth=5) == chain[-1]
    assert reason_of(chain[:3], ids, max_depth=1) == "too_deep"
    assert check(chain[:2], ids, max_depth=1) == chain[1]


def test_revoked_token_and_revoked_parent(ids: list[Identity]) -> None:
    chain = chain_of(ids, 3)
    revs = RevocationSet()
    assert check(chain, ids, revoked=revs) == chain[-1]
    revs_leaf = RevocationSet()
    assert revs_leaf.add(revoke_token(ids[2], chain[2], T0 + HOUR))
    assert reason_of(chain, ids, revoked=revs_leaf) == "revoked"
    assert check(chain[:2], ids, revoked=revs_leaf) == chain[1]
    revs_parent = RevocationSet()
    revs_parent.add(revoke_token(ids[1], chain[1], T0 + HOUR))
    assert reason_of(chain, ids, revoked=revs_parent) == "revoked"
    assert reason_of(chain[:2], ids, revoked=revs_parent) == "revoked"


def test_missing_delegate_right(ids: list[Identity]) -> None:
    root = chain_of(ids, 1, rights=Rights.PUBLISH | Rights.SUBSCRIBE)[0]
    child = issue_token(ids[0], ids[2].cell_id, "telemetry/a", Rights.PUBLISH, T0, T0 + 1, nonce(1))
    child = resign(child, ids[1], issuer=ids[1].public_key, parent=token_id(root), depth=1)
    assert reason_of([root, child], ids) == "no_delegate_right"


def test_broken_chain(ids: list[Identity]) -> None:
    chain = chain_of(ids, 3)
    other_root = issue_token(
        ids[0], ids[1].cell_id, "telemetry/**", ALL, T0, T0 + 10 * HOUR, nonce(7)
    )
    # Parent id mismatch: chain[1] names chain[0], not other_root.
    assert reason_of([other_root, chain[1], chain[2]], ids) == "broken_chain"
    # Issuer is not the parent's subject (ids[3] signs a link under chain[1], held by ids[2]).
    wrong_issuer = resign(chain[2], ids[3], issuer=ids[3].public_key)
    assert reason_of([chain[0], chain[1], wrong_issuer], ids) == "broken_chain"
    # Links out of order / skipped.
    assert reason_of([chain[0], chain[2]], ids) == "broken_chain"
    assert reason_of([chain[1], chain[2]], ids) == "broken_chain"


def test_wrong_channel(ids: list[Identity]) -> None:
    chain = chain_of(ids, 1)
    assert reason_of(chain, ids, channel="logs/engine-3") == "wrong_channel"
    assert reason_of(chain, ids, channel="telemetry") == "wrong_channel"
    assert reason_of(chain, ids, channel="telemetry/*") == "wrong_channel"


def test_missing_right(ids: list[Identity]) -> None:
    chain = chain_of(ids, 1, rights=Rights.SUBSCRIBE)
    assert check(chain, ids, right=Rights.SUBSCRIBE) == chain[0]
    assert reason_of(chain, ids, right=Rights.PUBLISH) == "missing_right"
    assert reason_of(chain, ids, right=Rights.SUBSCRIBE | Rights.ADMIN) == "missing_right"


def test_malformed(ids: list[Identity]) -> None:
    assert reason_of([], ids) == "malformed"
    bad = dataclasses.replace(chain_of(ids, 1)[0], nonce=b"x")
    assert reason_of([bad], ids) == "malformed"
    assert reason_of([encode_token(chain_of(ids, 1)[0])], ids) == "malformed"  # type: ignore[list-item]
    with pytest.raises(ValueError, match="right"):
        check(chain_of(ids, 1), ids, right=Rights(0))


# --- revocation -------------------------------------------------------------------------------


def test_revocation_round_trip_and_domain(ids: list[Identity]) -> None:
    tok = chain_of(ids, 1)[0]
    rev = revoke_token(ids[0], tok, T0)
    assert rev.token_id == token_id(tok)
    assert revocation_signing_message(rev).startswith(REVOCATION_CONTEXT)
    data = encode_revocation(rev)
    assert len(data) == 1 + 32 + 32 + 8 + 64
    assert decode_revocation(data) == rev
    with pytest.raises(TruncatedError):
        decode_revocation(data[:-1])
    with pytest.raises(OversizeError):
        decode_revocation(data + b"\x00")
    with pytest.raises(VersionError):
        decode_revocation(b"\x09" + data[1:])


@given(st.binary(max_size=200))
def test_arbitrary_bytes_revocation(data: bytes) -> None:
    try:
        rev = decode_revocation(data)
    except DecodeError:
        return
    assert encode_revocation(rev) == data


def test_revocation_only_from_issuer(ids: list[Identity]) -> None:
    tok = chain_of(ids, 1)[0]
    with pytest.raises(TokenError) as info:
        revoke_token(ids[1], tok, T0)
    assert info.value.reason == "not_issuer"
    revs = RevocationSet()
    # Someone else signs a revocation naming the token: accepted as a record of theirs, but
    # it never revokes a token they did not issue.
    honest = revoke_token(ids[0], tok, T0)
    by_other = dataclasses.replace(honest, issuer=ids[5].public_key)
    by_other = dataclasses.replace(
        by_other, signature=ids[5].sign(revocation_signing_message(by_other))
    )
    assert revs.add(by_other)
    assert not revs.is_revoked(tok)
    assert revs.add(honest)
    assert not revs.add(honest)
    assert revs.is_revoked(tok)
    assert len(revs) == 2


def test_revocation_set_rejects_bad_signature_and_is_bounded(ids: list[Identity]) -> None:
    chain = chain_of(ids, 3)
    revs = RevocationSet(max_entries=2)
    forged = dataclasses.replace(revoke_token(ids[0], chain[0], T0), time=T0 + 1)
    with pytest.raises(TokenError) as info:
        revs.add(forged)
    assert info.value.reason == "bad_signature"
    assert revs.add_all(revoke_token(ids[i], chain[i], T0) for i in range(2)) == 2
    # Full of unpinned revocations: the oldest gives way.
    assert revs.add(revoke_token(ids[2], chain[2], T0))
    assert revs.evicted == 1
    assert not revs.is_revoked(chain[0])
    assert revs.is_revoked(chain[1])
    assert revs.is_revoked(chain[2])
    # Revocations by pinned issuers (trusted roots) are never forgotten: a full set of them
    # refuses new ones instead.
    root = ids[0].public_key
    pinned = RevocationSet(max_entries=1, pinned=lambda issuer: issuer == root)
    assert pinned.add(revoke_token(ids[0], chain[0], T0))
    with pytest.raises(TokenError) as info:
        pinned.add(revoke_token(ids[1], chain[1], T0))
    assert info.value.reason == "full"
    assert pinned.is_revoked(chain[0])
    with pytest.raises(ValueError, match="max_entries"):
        RevocationSet(max_entries=0)
