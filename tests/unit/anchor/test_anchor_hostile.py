"""Hostile cases: outsiders, forgers, replayers, stale and rogue anchors, garbage."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from anchor_bus import Bus, ident

from cellmesh.anchor import (
    AnchorChanged,
    AnchorCore,
    AnchorFailed,
    AnchorSettings,
    EpochKeyInstalled,
    Role,
)
from cellmesh.anchor.keys import (
    PULSE_MAC_CONTEXT,
    SEALED_KEY_LEN,
    compute_mac,
    derive_subkey,
    seal_epoch_key,
    sealing_box,
)
from cellmesh.anchor.messages import (
    PULSE_MAC_OFFSET,
    SIGNING_CONTEXT,
    Pulse,
    encode_message,
    make_grant,
    make_pulse,
    make_request,
)
from cellmesh.anchor.rule import tiebreak
from cellmesh.identity.keys import Identity, verify_signature

S = AnchorSettings()


def ms(bus: Bus) -> int:
    return int(bus.wall() * 1000)


def counting_verifier() -> tuple[Callable[[bytes, bytes, bytes], None], list[bytes]]:
    """A verifier that records which public keys it was asked about."""
    seen: list[bytes] = []

    def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
        seen.append(public_key)
        verify_signature(public_key, message, signature)

    return verify, seen


def formed(n: int = 4, egos: list[int] | None = None) -> tuple[Bus, list[AnchorCore], AnchorCore]:
    bus = Bus()
    cores = bus.mesh(n, egos=egos)
    assert bus.run_until(20.0, bus.converged) or bus.run_until(20.0)
    assert bus.converged()
    return bus, cores, bus.anchors()[0]


# ------------------------------------------------------------------------------ outsiders


def test_a_non_member_claiming_a_huge_ego_is_never_considered() -> None:
    bus = Bus()
    cores = bus.mesh(3, egos=[10, 20, 30])
    verify, seen = counting_verifier()
    for c in cores:
        c._verify = verify  # count every signature check members make from here on
    outsider = bus.add(66, ego=10**9)  # started, never admitted by anyone
    assert outsider.ego == S.ego_cap  # capped even in its own core
    bus.start(outsider)
    bus.run_until(60.0)
    assert outsider.is_anchor  # it believes itself anchor of a mesh of one ...
    anchor = bus.anchors(cores)[0]
    assert anchor.ego == 30  # ... but the members elected among themselves
    assert all(c.anchor == anchor.cell_id for c in cores)
    for c in cores:
        assert c.drops["not_member"] >= 9  # its pulses and request, all refused
        assert outsider.cell_id not in c
    assert outsider.identity.public_key not in seen  # never a signature check for it


def test_an_admitted_member_announcing_a_huge_ego_counts_as_the_cap() -> None:
    bus = Bus()
    cores = bus.mesh(3, egos=[100, 100, 5])
    loud = bus.add(9, ego=10**9)
    for c in cores:
        bus.admit(c, loud, ego=10**9)  # announces a billion
        bus.admit(loud, c)
    bus.start(loud)
    assert bus.run_until(20.0, bus.converged)
    assert cores[0].status(bus.now)["members"] == 4
    assert loud.ego == 100
    # Capped to 100, the loud member only ties with the two genuine 100s: the tie-break at
    # epoch 1 decides, exactly as for them.
    anchor = bus.anchors()[0]
    contenders = [cores[0], cores[1], loud]
    assert anchor is min(contenders, key=lambda c: tiebreak(c.cell_id, 1))


# ------------------------------------------------------------------------------ forgery


def test_a_member_forging_the_anchors_pulse_fails_the_signature() -> None:
    bus, cores, anchor = formed()
    forger = next(c for c in cores if c is not anchor)
    victim = next(c for c in cores if c not in (anchor, forger))
    epoch, key = forger.export_epoch_key() or (0, b"")
    subkey = derive_subkey(key, PULSE_MAC_CONTEXT)

    def forge(seq: int) -> bytes:
        """A pulse in the anchor's name with a valid MAC (the forger holds the epoch key),
        signed with the forger's own key (it cannot sign with the anchor's)."""
        draft = Pulse(anchor.cell_id, ms(bus), 1, epoch, seq, bytes(16), bytes(64))
        body = encode_message(draft)[:PULSE_MAC_OFFSET]
        mac = compute_mac(subkey, body)
        sig = forger.identity.sign(SIGNING_CONTEXT + body + mac)
        return body + mac + sig

    bus.inject(victim, forge(2**62))
    assert victim.drops == {"bad_signature": 1}
    # Killing the real anchor while the forger keeps forging: the followers still fail over.
    bus.kill(anchor)
    for i in range(6):
        bus.run_for(S.pulse_interval)
        bus.inject(victim, forge(2**62 + 1 + i))
    assert [e.reason for _, e in bus.of(victim, AnchorFailed)] == ["silent"]
    assert victim.anchor != anchor.cell_id
    assert bus.converged()


def test_a_pulse_with_a_wrong_mac_is_dropped_before_its_signature_is_checked() -> None:
    bus, cores, anchor = formed()
    follower = next(c for c in cores if c is not anchor)
    verify, seen = counting_verifier()
    follower._verify = verify
    epoch = anchor.epoch or 0
    bad = make_pulse(anchor.identity, ms(bus), 1, epoch, 2**62, derive_subkey(b"k" * 32, "x"))
    bus.inject(follower, bad)
    assert follower.drops == {"bad_mac": 1}
    assert seen == []  # the cheap check stopped it


# ------------------------------------------------------------------------------ replays


def test_replayed_epoch_messages_are_dropped() -> None:
    bus, cores, anchor = formed()
    follower = next(c for c in cores if c is not anchor)
    first = next(w for w in bus.sent if w.data[2] == 2 and w.dst == follower.cell_id)
    bus.inject(follower, first.data)  # the same EPOCH again
    assert follower.drops == {"duplicate_epoch": 1}
    bus.run_until(76.0)  # epoch 2 installed
    assert follower.epoch == 2
    bus.inject(follower, first.data)  # an hour later its timestamp is out of the window
    assert follower.drops["stale"] == 1
    # Even re-signed with a fresh timestamp (by the anchor itself), epoch 1 after epoch 2 is
    # going backwards, and refused.
    sealed = seal_epoch_key(b"O" * 32, sealing_box(follower.identity.noise_static_public))
    old = make_grant(anchor.identity, ms(bus), 1, 1, ms(bus), follower.cell_id, bytes(16), sealed)
    bus.inject(follower, old)
    assert follower.drops["stale_epoch"] == 1
    assert follower.epoch == 2
    assert follower.export_epoch_key() == anchor.export_epoch_key()


def test_a_replayed_answer_and_a_replayed_pulse_are_dropped() -> None:
    bus, cores, anchor = formed()
    follower = next(c for c in cores if c is not anchor)
    ask = make_request(follower.identity, ms(bus), anchor.cell_id, b"q" * 16)
    follower._nonces[b"q" * 16] = None  # as if the follower itself had asked
    bus.inject(anchor, ask)
    bus.run_for(0.01)
    answer = next(w for w in bus.sent if w.data[2] == 2 and w.data[68:84] == b"q" * 16)
    bus.inject(follower, answer.data)
    assert follower.drops == {"unrequested": 1}  # the first copy used the nonce up
    bus.inject(anchor, ask)  # the same request again
    assert anchor.drops == {"replay": 1}
    pulse = next(w for w in reversed(bus.sent) if w.data[2] == 1)
    bus.inject(follower, pulse.data)
    assert follower.drops["replay"] == 1


def test_a_forged_request_is_refused_and_does_not_spend_the_members_allowance() -> None:
    bus, cores, anchor = formed()
    member = next(c for c in cores if c is not anchor)
    forged = bytearray(make_request(ident(99), ms(bus), anchor.cell_id, b"f" * 16))
    forged[4:20] = member.cell_id  # claims to be the member, signed by someone else
    bus.inject(anchor, bytes(forged))
    assert anchor.drops == {"bad_signature": 1}
    bus.inject(anchor, make_request(member.identity, ms(bus) + 1, anchor.cell_id, b"g" * 16))
    assert anchor.statistics().requests_answered == 1  # the genuine one is still answered


# ------------------------------------------------------------------------------ rogue anchors


def test_a_member_that_is_not_anchor_by_the_rule_cannot_issue_keys() -> None:
    bus, cores, anchor = formed(4, egos=[10, 90, 20, 30])
    rogue = next(c for c in cores if c.ego == 10)
    victim = next(c for c in cores if c.ego == 20)
    key_before = victim.export_epoch_key()
    sealed = seal_epoch_key(b"R" * 32, sealing_box(victim.identity.noise_static_public))
    grant = make_grant(rogue.identity, ms(bus), 50, 50, ms(bus), victim.cell_id, bytes(16), sealed)
    bus.inject(victim, grant)
    assert victim.drops == {"not_anchor": 1}
    assert victim.export_epoch_key() == key_before
    # The rogue goes further and claims the role outright: nobody follows it, it yields.
    rogue._promote(bus.now, "hostile")
    bus.pump(rogue)
    bus.run_for(30.0)
    assert victim.anchor == anchor.cell_id
    assert victim.export_epoch_key() == anchor.export_epoch_key()
    assert victim.drops["not_anchor"] >= 2
    assert anchor.drops["not_anchor"] >= 2
    assert rogue.role is Role.FOLLOWER  # it heard the real anchor outrank it and stepped down
    assert not any(e.anchor == rogue.cell_id for _, e in bus.of(victim, EpochKeyInstalled))


def test_a_better_claimants_key_is_not_installed_before_its_hold() -> None:
    bus, cores, anchor = formed(3, egos=[10, 20, 30])
    usurper = next(c for c in cores if c.ego == 10)
    bystander = next(c for c in cores if c.ego == 20)
    for c in cores:
        c.admit(
            usurper.cell_id,
            usurper.identity.public_key,
            usurper.identity.noise_static_public,
            99,
            bus.now,
        )
    start = bus.now
    usurper._self.ego = 99  # announces a higher ego and claims at once, skipping its delay
    usurper._promote(bus.now, "impatient")
    bus.pump(usurper)
    bus.run_for(S.hold_time - 0.5)
    assert bystander.anchor == anchor.cell_id  # heard, verified, kept aside: not installed
    assert bystander.export_epoch_key() == anchor.export_epoch_key()
    assert bus.run_for(S.pulse_interval, lambda: bystander.anchor == usurper.cell_id)
    assert bus.now - start >= S.hold_time  # by the rule, after its hold, not before


def test_a_stale_anchor_after_a_partition_is_resolved_by_the_rule() -> None:
    bus, cores, anchor = formed(5, egos=[90, 50, 40, 30, 20])
    buddy = next(c for c in cores if c.ego == 20)
    rest = [c for c in cores if c not in (anchor, buddy)]
    bus.partition([anchor, buddy], rest)
    bus.run_for(40.0)  # the rest elect ego 50; the old anchor keeps its own side
    assert {c.ego for c in bus.anchors()} == {90, 50}
    bus.heal()
    assert bus.run_for(S.hold_time + S.pulse_interval + 0.1, bus.converged)
    assert bus.anchors() == [anchor]  # it outranks, served its (first, unpenalised) hold
    assert len({c.export_epoch_key() for c in cores}) == 1


def test_an_anchor_that_stops_rotating_is_failed_over_and_not_taken_back() -> None:
    bus = Bus()
    lazy = bus.add(1, AnchorSettings(epoch_period=10**6), ego=90)
    others = [bus.add(i, ego=50 - i) for i in range(2, 5)]
    bus.admit_all()
    bus.start_all()
    bus.run_until(20.0)
    assert bus.anchors() == [lazy]
    bus.run_until(15.0 + S.stale_after + 1.0)
    for c in others:
        assert [e.reason for _, e in bus.of(c, AnchorFailed)] == ["stale_key"]
    successor = bus.anchors(others)
    assert len(successor) == 1
    # The lazy anchor keeps pulsing with its old key and outranks the successor, yet nobody
    # switches back to it while its key is stale: no flapping.
    bus.run_for(120.0)
    assert all(c.anchor == successor[0].cell_id for c in others)
    assert all(len(bus.of(c, AnchorChanged)) == 3 for c in others if c is not successor[0])


# ------------------------------------------------------------------------------ garbage


@pytest.mark.parametrize("role", ["listening", "follower", "anchor"])
def test_garbage_never_raises_in_any_role(role: str) -> None:
    bus, cores, anchor = formed()
    target = {
        "listening": bus.add(50),
        "follower": next(c for c in cores if c is not anchor),
        "anchor": anchor,
    }[role]
    if role == "listening":
        for c in cores:
            bus.admit(target, c)
        bus.start(target)
    rng = random.Random(3)
    real = [w.data for w in bus.sent[:50]]
    for _ in range(3000):
        kind = rng.randrange(3)
        if kind == 0:
            data = rng.randbytes(rng.randrange(200))
        elif kind == 1:
            base = bytearray(rng.choice(real))
            base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
            data = bytes(base)
        else:
            data = bytes([0xCA, 1, rng.randrange(5), 0]) + rng.randbytes(rng.randrange(240))
        target.receive_message(data, bus.now)
    bus.pump(target)
    assert sum(target.drops.values()) > 0


def test_a_grant_for_someone_else_or_with_a_bad_seal_is_refused() -> None:
    bus, cores, anchor = formed()
    a, b = [c for c in cores if c is not anchor][:2]
    to_b = next(w for w in bus.sent if w.data[2] == 2 and w.dst == b.cell_id)
    bus.inject(a, to_b.data)
    assert a.drops == {"not_for_us": 1}
    junk = make_grant(
        anchor.identity, ms(bus), 1, 9, ms(bus), a.cell_id, bytes(16), b"\x00" * SEALED_KEY_LEN
    )
    bus.inject(a, junk)
    assert a.drops["bad_seal"] == 1
    assert a.epoch == 1


def test_a_flood_from_one_member_is_limited_before_any_signature() -> None:
    bus, cores, anchor = formed()
    flooder = next(c for c in cores if c is not anchor)
    member = Identity.from_secret(flooder.identity.secret_bytes())
    for i in range(40):
        bus.inject(anchor, make_request(member, ms(bus) + 1 + i, anchor.cell_id, bytes([i]) * 16))
    assert anchor.drops["rate_limited"] >= 30
    assert anchor.statistics().requests_answered == 1


def test_forged_claims_cannot_churn_the_claimant_table() -> None:
    """Claimant records are made only once a claim verifies: forged pulses in the names of
    many members (an on-path attacker can write any CellID) leave the table alone."""
    bus = Bus()
    cores = bus.mesh(12, egos=[10] + [90] * 11)
    bus.run_until(20.0)
    low = next(c for c in cores if c.ego == 10)
    before = dict(low._claimants)
    for i, c in enumerate(cores):
        if c is low:
            continue
        forged = bytearray(
            make_pulse(ident(500 + i), ms(bus), 1, 9, 2**62, derive_subkey(b"x" * 32, "y"))
        )
        forged[4:20] = c.cell_id
        bus.inject(low, bytes(forged))
    assert low._claimants == before
    assert low.drops["unknown_epoch"] + low.drops.get("stale_epoch", 0) >= 1
