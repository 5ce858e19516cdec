"""The rule as pure functions, and the epoch-key primitives (sealing, MACs, subkeys)."""

from __future__ import annotations

import blake3
import pytest
from anchor_bus import ident
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.anchor import AnchorSettings
from cellmesh.anchor.keys import (
    EPOCH_MAC_CONTEXT,
    PULSE_MAC_CONTEXT,
    SEALED_KEY_LEN,
    EpochKey,
    KeyOpener,
    compute_mac,
    derive_subkey,
    mac_matches,
    seal_epoch_key,
    sealing_box,
)
from cellmesh.anchor.rule import (
    TIEBREAK_CONTEXT,
    Member,
    cap_ego,
    claim_outranks,
    election_order,
    election_top,
    seniority_level,
    tiebreak,
)
from cellmesh.errors import AuthenticationError
from cellmesh.identity.cellid import CellId

IDS = [ident(i).cell_id for i in range(1, 41)]


def member(i: int, ego: int = 0, first_seen: float = 0.0) -> Member:
    who = ident(i)
    return Member(who.cell_id, who.public_key, who.noise_static_public, ego, first_seen)


# ------------------------------------------------------------------------------ the tie-break


def test_tiebreak_is_blake3_derive_key_of_cell_id_and_epoch() -> None:
    cid = IDS[0]
    want = blake3.blake3(
        cid + (5).to_bytes(8, "big"), derive_key_context="cellmesh anchor tiebreak v1"
    ).digest()
    assert TIEBREAK_CONTEXT == "cellmesh anchor tiebreak v1"
    assert tiebreak(cid, 5) == want
    assert tiebreak(cid, 6) != want


def test_no_cell_id_wins_the_tiebreak_at_every_epoch() -> None:
    """Grinding a key that wins once does not make it win forever: over 200 epochs, 40 equal
    members each win some elections and none wins them all."""
    wins: dict[bytes, int] = {}
    for epoch in range(1, 201):
        best = min(IDS, key=lambda c: tiebreak(c, epoch))
        wins[best] = wins.get(best, 0) + 1
    assert max(wins.values()) < 40
    assert len(wins) > 20


# ------------------------------------------------------------------------------ ego, seniority


def test_ego_is_capped_both_ways() -> None:
    assert cap_ego(10**9, 100) == 100
    assert cap_ego(-5, 100) == 0
    assert cap_ego(42, 100) == 42


def test_seniority_levels_are_quantised_and_capped() -> None:
    assert [seniority_level(a, 60.0, 3) for a in (0, 59.9, 60, 119, 120, 180, 10**6)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        3,
    ]
    assert seniority_level(-1.0, 60.0, 3) == 0
    assert seniority_level(float("nan"), 60.0, 3) == 0


def test_first_seen_times_a_little_apart_give_the_same_level() -> None:
    """Two nodes that saw the same member 0.4 s apart agree on its level except in the 0.4 s
    after each boundary; once the cap is reached they always agree."""
    disagree = 0
    for tenth in range(0, 4000):
        now = tenth / 10.0
        a = seniority_level(now - 0.0, 60.0, 3)
        b = seniority_level(now - 0.4, 60.0, 3)
        disagree += a != b
    assert disagree == 3 * 4  # 3 boundaries, 4 tenths of a second each
    assert seniority_level(10_000.0, 60.0, 3) == seniority_level(10_000.0 - 0.4, 60.0, 3)


# ------------------------------------------------------------------------------ election order


def test_election_order_is_ego_then_seniority_then_tiebreak() -> None:
    now = 1000.0
    high_ego = member(1, ego=90, first_seen=999.0)  # newest, but the highest ego
    senior = member(2, ego=50, first_seen=0.0)  # level 3
    juniors = [member(i, ego=50, first_seen=950.0) for i in range(3, 8)]  # level 0
    order = election_order([*juniors, senior, high_ego], now, 4, 60.0, 3)
    assert order[0] is high_ego
    assert order[1] is senior
    assert [m.cell_id for m in order[2:]] == sorted(
        (m.cell_id for m in juniors), key=lambda c: tiebreak(c, 4)
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300)), min_size=1, max_size=25),
    st.integers(1, 50),
)
def test_election_top_is_the_head_of_election_order(
    specs: list[tuple[int, int]], epoch: int
) -> None:
    members = [member(i + 1, ego=e, first_seen=float(f)) for i, (e, f) in enumerate(specs)]
    top = election_top(members, 400.0, epoch, 60.0, 3)
    assert top is election_order(members, 400.0, epoch, 60.0, 3)[0]


def test_election_top_of_nobody_is_none() -> None:
    assert election_top([], 0.0, 1, 60.0, 3) is None


# ------------------------------------------------------------------------------ claim order


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 39),
    st.integers(0, 39),
    st.integers(0, 2),
    st.integers(0, 2),
    st.integers(1, 100),
    st.integers(1, 100),
)
def test_claim_order_is_a_strict_total_order_seen_alike_from_both_sides(
    a: int, b: int, ego_a: int, ego_b: int, term_a: int, term_b: int
) -> None:
    if a == b:  # one member has one ego: it never outranks itself
        assert not claim_outranks(ego_a, IDS[a], term_a, ego_a, IDS[a], term_b)
        return
    ab = claim_outranks(ego_a, IDS[a], term_a, ego_b, IDS[b], term_b)
    ba = claim_outranks(ego_b, IDS[b], term_b, ego_a, IDS[a], term_a)
    assert ab != ba  # exactly one outranks the other, whoever evaluates it


def test_claim_order_uses_the_older_term_so_a_new_claim_cannot_reshuffle() -> None:
    """The tie-break epoch is min(term_a, term_b): a claimant that re-claims with a newer term
    is compared exactly as before against an incumbent of the older term."""
    for t_new in (8, 9, 50):
        assert claim_outranks(5, IDS[0], t_new, 5, IDS[1], 7) == (
            tiebreak(IDS[0], 7) < tiebreak(IDS[1], 7)
        )
    assert claim_outranks(6, IDS[0], 1, 5, IDS[1], 1)  # ego first


# ------------------------------------------------------------------------------ settings


def test_settings_validate_and_derive() -> None:
    s = AnchorSettings()
    assert s.silence_timeout == 15.25
    assert s.stale_after == 180.0
    assert [s.hold_for(k) for k in range(7)] == [10, 10, 20, 40, 80, 160, 160]
    with pytest.raises(ValueError, match="pulse_interval"):
        AnchorSettings(pulse_interval=0)
    with pytest.raises(ValueError, match="silence"):
        AnchorSettings(silence_pulses=0)
    with pytest.raises(ValueError, match="stale"):
        AnchorSettings(epoch_period=1.0, stale_epochs=2.0)
    with pytest.raises(ValueError, match="ego_cap"):
        AnchorSettings(ego_cap=1000)


# ------------------------------------------------------------------------------ keys


def test_sealed_key_opens_only_for_its_recipient() -> None:
    alice, bob = ident(1), ident(2)
    key = bytes(range(32))
    sealed = seal_epoch_key(key, sealing_box(alice.noise_static_public))
    assert len(sealed) == SEALED_KEY_LEN
    assert key not in sealed
    assert KeyOpener(alice).open(sealed) == key
    with pytest.raises(AuthenticationError):
        KeyOpener(bob).open(sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(AuthenticationError):
        KeyOpener(alice).open(bytes(tampered))
    # A sealed box that holds anything but 32 bytes is refused too.
    odd = bytes(sealing_box(alice.noise_static_public).encrypt(b"short"))
    with pytest.raises(AuthenticationError, match="32-byte"):
        KeyOpener(alice).open(odd)
    with pytest.raises(ValueError, match="32 bytes"):
        seal_epoch_key(b"short", sealing_box(alice.noise_static_public))
    with pytest.raises(ValueError, match="X25519"):
        sealing_box(b"x")


def test_sealing_twice_gives_different_bytes() -> None:
    box = sealing_box(ident(1).noise_static_public)
    assert seal_epoch_key(bytes(32), box) != seal_epoch_key(bytes(32), box)


def test_subkeys_are_domain_separated_and_macs_checked_in_constant_time() -> None:
    key = bytes(range(32))
    pulse, app = derive_subkey(key, PULSE_MAC_CONTEXT), derive_subkey(key, EPOCH_MAC_CONTEXT)
    assert len({key, pulse, app}) == 3
    tag = compute_mac(pulse, b"data")
    assert len(tag) == 16
    assert mac_matches(pulse, b"data", tag)
    assert not mac_matches(app, b"data", tag)
    assert not mac_matches(pulse, b"datb", tag)
    assert not mac_matches(pulse, b"data", tag[:-1])


def test_epoch_key_never_shows_its_secret_and_ages() -> None:
    ek = EpochKey(CellId(bytes(16)), 1, 1, 0, 100.0, 2.5, b"\xab" * 32)
    assert "ab" * 4 not in repr(ek)
    assert ek.age(110.0) == 12.5
    assert ek.usable(1e9, 10.0)
    ek.superseded_at = 120.0
    assert ek.usable(130.0, 10.0)
    assert not ek.usable(130.1, 10.0)
