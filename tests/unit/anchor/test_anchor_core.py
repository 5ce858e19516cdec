"""The anchor core driven on an ideal bus: election, epoch keys, REQ_EPOCH, failover, hysteresis."""

from __future__ import annotations

import pytest
from anchor_bus import Bus, Wire

from cellmesh.anchor import (
    AnchorChanged,
    AnchorCore,
    AnchorFailed,
    AnchorSettings,
    EpochGrant,
    EpochKeyInstalled,
    Role,
    decode_message,
    election_top,
)
from cellmesh.anchor.messages import make_request
from cellmesh.anchor.rule import Member
from cellmesh.errors import LocalProtocolError
from cellmesh.identity.cellid import CellId

S = AnchorSettings()


def as_member(c: AnchorCore) -> Member:
    return Member(c.cell_id, c.identity.public_key, c.identity.noise_static_public, c.ego, 0.0)


def expected_top(cores: list[AnchorCore], epoch: int, now: float = 0.0) -> AnchorCore:
    top = election_top([as_member(c) for c in cores], now, epoch, 60.0, 3)
    assert top is not None
    return next(c for c in cores if c.cell_id == top.cell_id)


def grants(bus: Bus, to: AnchorCore | None = None) -> list[Wire]:
    return [w for w in bus.sent if w.data[2] == 2 and (to is None or w.dst == to.cell_id)]


# ------------------------------------------------------------------------------ election


def test_cold_start_elects_the_top_ranked_member_and_delivers_its_key_to_all() -> None:
    bus = Bus()
    cores = bus.mesh(6, egos=[10, 80, 80, 30, 0, 80])
    assert all(c.role is Role.LISTENING for c in cores)
    assert not bus.run_until(14.9, bus.converged)  # nobody promotes while listening
    assert bus.run_until(15.1, bus.converged)
    anchor = bus.anchors()[0]
    assert anchor is expected_top(cores, epoch=1)  # ego 80, then the tie-break at epoch 1
    assert anchor.ego == 80
    assert (anchor.term, anchor.epoch) == (1, 1)
    for c in cores:
        assert c.anchor == anchor.cell_id
        assert c.drops == {}
        if c is not anchor:
            assert [type(e) for _, e in bus.events[c.cell_id]] == [
                AnchorChanged,
                EpochKeyInstalled,
            ]
    assert len(grants(bus)) == 5  # one sealed EPOCH per member, unicast


def test_epoch_key_never_travels_in_the_clear_nor_shows_in_status() -> None:
    bus = Bus()
    cores = bus.mesh(4)
    keys: set[bytes] = set()
    for _ in range(4):
        bus.run_for(61.0)
        for c in cores:
            k = c.export_epoch_key()
            assert k is not None
            keys.add(k[1])
    assert len(keys) == 4  # a fresh key each epoch
    for wire in bus.sent:
        for key in keys:
            assert key not in wire.data
            assert key.hex() not in repr(wire)
    for c in cores:
        text = repr(c.status(bus.now))
        assert all(k.hex() not in text for k in keys)


def test_keys_rotate_every_epoch_and_the_previous_one_stays_usable_for_the_grace() -> None:
    bus = Bus()
    cores = bus.mesh(3)
    bus.run_until(16.0)
    anchor = bus.anchors()[0]
    follower = next(c for c in cores if c is not anchor)
    mac = follower.epoch_mac(b"hello")
    assert mac is not None
    assert mac[0] == 1
    assert anchor.check_epoch_mac(1, b"hello", mac[1], bus.now)
    assert not anchor.check_epoch_mac(1, b"hellO", mac[1], bus.now)
    bus.run_until(75.1)  # the anchor rotated at 75
    assert [c.epoch for c in cores] == [2, 2, 2]
    installed = [t for t, e in bus.of(follower, EpochKeyInstalled)]
    assert installed == pytest.approx([15.001, 75.001])
    assert follower.check_epoch_mac(1, b"hello", mac[1], bus.now)  # in grace
    bus.run_until(75.0 + S.key_grace + 0.1)
    assert not follower.check_epoch_mac(1, b"hello", mac[1], bus.now)  # grace over
    assert follower.drops == {}


# ------------------------------------------------------------------------------ joining


def test_a_joiner_gets_the_key_in_one_round_trip_by_req_epoch() -> None:
    bus = Bus(latency=0.004)
    cores = bus.mesh(5)
    bus.run_until(30.0)
    anchor = bus.anchors()[0]
    epoch_before = anchor.epoch
    installs_before = {c.cell_id: c.statistics().keys_installed for c in cores}
    # Lose the anchor's unrequested delivery (the push on admission): only REQ_EPOCH is left.
    bus.tap = lambda w, to: not (w.data[2] == 2 and w.data[68:84] == bytes(16))
    joiner = bus.add(42)
    for c in cores:
        bus.admit(joiner, c)
        bus.admit(c, joiner)
    t0 = bus.now
    bus.start(joiner)
    assert bus.run_for(1.0, lambda: joiner.epoch is not None)
    (t_key, ev), *_ = bus.of(joiner, EpochKeyInstalled)
    assert t_key - t0 == pytest.approx(2 * bus.latency)  # one round trip
    assert ev.anchor == anchor.cell_id
    assert joiner.anchor == anchor.cell_id
    assert joiner.role is Role.FOLLOWER  # followed at once, without listening it out
    assert anchor.epoch == epoch_before  # a request never rotates the key
    assert anchor.statistics().requests_answered == 1
    assert {c.cell_id: c.statistics().keys_installed for c in cores} == installs_before


def test_the_anchor_delivers_the_key_when_it_admits_a_member() -> None:
    bus = Bus()
    cores = bus.mesh(3)
    bus.run_until(20.0)
    joiner = bus.add(9, AnchorSettings(request_on_start=False))
    bus.start(joiner)
    for c in cores:
        bus.admit(joiner, c)  # the joiner knows everyone first ...
    t0 = bus.now
    for c in cores:
        bus.admit(c, joiner)  # ... and the anchor pushes the key when it admits the joiner
    assert bus.run_for(0.5, lambda: joiner.epoch is not None)
    assert bus.of(joiner, EpochKeyInstalled)[0][0] - t0 == pytest.approx(bus.latency)


def test_a_message_that_overtakes_admission_is_processed_once_admitted() -> None:
    bus = Bus()
    bus.mesh(3)
    bus.run_until(20.0)
    anchor = bus.anchors()[0]
    joiner = bus.add(9, AnchorSettings(request_on_start=False))
    bus.start(joiner)
    bus.admit(anchor, joiner)  # the push leaves before the joiner has admitted the anchor
    bus.run_for(0.1)
    assert joiner.drops == {"not_member": 1}
    assert joiner.epoch is None
    bus.admit(joiner, anchor)  # ... and is processed now
    assert joiner.epoch == anchor.epoch
    assert joiner.drops == {}


def test_a_lost_epoch_message_is_recovered_at_the_next_pulse() -> None:
    bus = Bus()
    cores = bus.mesh(4)
    bus.run_until(20.0)
    anchor = bus.anchors()[0]
    victim = next(c for c in cores if c is not anchor)
    # The rotation's EPOCH to the victim is lost (the unrequested one, nonce all zero).
    bus.tap = lambda w, to: not (to == victim.cell_id and w.data[2] == 2 and w.data[68] == 0)
    bus.run_until(74.9)
    assert victim.epoch == 1
    bus.run_until(75.1)  # rotation at 75, and the pulse of 75 carries epoch 2: it asks
    assert victim.epoch == 2
    assert victim.drops == {"unknown_epoch": 1}
    t_key = bus.of(victim, EpochKeyInstalled)[-1][0]
    assert t_key == pytest.approx(75.0 + 3 * bus.latency)  # pulse, REQ_EPOCH, answer
    assert not bus.of(victim, AnchorFailed)


# ------------------------------------------------------------------------------ requests


def test_req_epoch_is_answered_once_per_two_seconds_per_requester() -> None:
    bus = Bus()
    cores = bus.mesh(3)
    bus.run_until(20.0)
    anchor = bus.anchors()[0]
    member = next(c for c in cores if c is not anchor)
    epoch = anchor.epoch

    def ask(nonce: bytes) -> None:
        ms = int(bus.wall() * 1000)
        bus.inject(anchor, make_request(member.identity, ms, anchor.cell_id, nonce))

    ask(b"a" * 16)
    bus.run_for(0.5)
    ask(b"b" * 16)
    bus.run_for(1.6)
    ask(b"c" * 16)
    answers = [
        decode_message(w.data)
        for w in grants(bus, member)
        if w.data[68:84] in (b"a" * 16, b"b" * 16, b"c" * 16)
    ]
    assert [a.nonce for a in answers if isinstance(a, EpochGrant)] == [b"a" * 16, b"c" * 16]
    assert anchor.drops == {"request_limited": 1}
    assert anchor.epoch == epoch


def test_a_request_to_a_member_that_is_not_anchor_is_refused() -> None:
    bus = Bus()
    cores = bus.mesh(3)
    bus.run_until(20.0)
    anchor = bus.anchors()[0]
    a, b = [c for c in cores if c is not anchor]
    bus.inject(b, make_request(a.identity, int(bus.wall() * 1000), b.cell_id, b"n" * 16))
    assert b.drops == {"not_anchor": 1}
    assert not grants(bus, a)[1:]  # only the one from the anchor at the start


# ------------------------------------------------------------------------------ failover


def test_a_silent_anchor_is_replaced_after_three_missed_pulses() -> None:
    bus = Bus()
    cores = bus.mesh(5, egos=[50, 90, 70, 70, 10])
    bus.run_until(100.0)
    old = bus.anchors()[0]
    assert old.ego == 90
    last_pulse = max(w.time for w in bus.sent if w.src == old.cell_id and w.data[2] == 1)
    old_epoch = old.epoch
    assert old_epoch is not None
    bus.kill(old)
    assert bus.run_for(30.0, bus.converged)
    new = bus.anchors()[0]
    rest = [c for c in cores if c is not old]
    assert new is expected_top(rest, epoch=old_epoch + 1, now=bus.now)
    assert new.ego == 70
    assert new.term == old_epoch + 1  # a new term starts a new epoch
    promoted = bus.of(new, AnchorChanged)[-1][0]
    assert promoted - last_pulse == pytest.approx(S.silence_timeout, abs=0.01)
    for c in rest:
        if c is not new:
            assert [e.reason for _, e in bus.of(c, AnchorFailed)] == ["silent"]


def test_a_dead_successor_is_passed_over_after_one_more_silence_timeout() -> None:
    bus = Bus()
    cores = bus.mesh(5, egos=[10, 90, 80, 20, 30])
    bus.run_until(40.0)
    assert bus.anchors()[0].ego == 90
    for c in cores:
        if c.ego in (90, 80):
            bus.kill(c)
    assert bus.run_for(40.0, bus.converged)
    assert bus.anchors()[0].ego == 30
    assert 28.0 < bus.now - 40.0 < 35.0  # two silence timeouts, not one


def test_a_dead_anchor_stays_out_of_elections_after_its_strikes_are_forgotten() -> None:
    """Strike counts decay (`strike_memory`), but a failed anchor never heard again is not
    expected to take over in later elections: each failover still takes one silence timeout."""
    settings = AnchorSettings(strike_memory=30.0)
    bus = Bus()
    bus.mesh(6, egos=[90, 80, 70, 60, 50, 40], settings=settings)
    bus.run_until(20.0)
    for expected_ego in (80, 70, 60):
        bus.run_for(60.0)  # well past strike_memory since the previous failover
        dead = bus.anchors()[0]
        last = max(w.time for w in bus.sent if w.src == dead.cell_id and w.data[2] == 1)
        bus.kill(dead)
        assert bus.run_for(20.0, bus.converged)
        new = bus.anchors()[0]
        assert new.ego == expected_ego
        promoted = bus.of(new, AnchorChanged)[-1][0]
        assert promoted - last == pytest.approx(settings.silence_timeout, abs=0.01)


def test_a_forgotten_then_readmitted_member_is_electable_again() -> None:
    bus = Bus()
    cores = bus.mesh(3, egos=[90, 50, 10])
    bus.run_until(20.0)
    best, mid, low = cores
    bus.kill(best)
    bus.run_for(20.0)
    assert low.anchor == mid.cell_id
    assert low.rank(bus.now) == 2  # best is a suspect: out of the ranking
    low.forget(best.cell_id, bus.now)
    bus.admit(low, best)  # discovery saw it leave and come back
    assert low.rank(bus.now) == 3


def test_forgetting_the_anchor_counts_as_its_failure() -> None:
    bus = Bus()
    cores = bus.mesh(3, egos=[10, 20, 30])
    bus.run_until(20.0)
    anchor = bus.anchors()[0]
    follower = next(c for c in cores if c.ego == 20)
    follower.forget(anchor.cell_id, bus.now)
    bus.pump(follower)
    assert [e.reason for _, e in bus.of(follower, AnchorFailed)] == ["forgotten"]
    assert follower.is_anchor  # it tops what is left of its view (ego 20 > 10)


def test_a_forgotten_member_is_cut_off_by_a_prompt_rotation() -> None:
    bus = Bus()
    cores = bus.mesh(4)
    bus.run_until(30.0)
    anchor = bus.anchors()[0]
    leaver = next(c for c in cores if c is not anchor)
    anchor.forget(leaver.cell_id, bus.now)
    bus.pump(anchor)
    bus.run_for(S.pulse_interval + 0.1)
    assert anchor.epoch == 2  # new epoch within a pulse interval, not 60 s later
    assert leaver.epoch == 1
    assert all(c.epoch == 2 for c in cores if c is not leaver)


# ------------------------------------------------------------------------------ conflicts


def test_two_anchors_that_meet_resolve_within_two_pulses_by_the_claim_order() -> None:
    bus = Bus()
    cores = bus.mesh(6)
    left, right = cores[:3], cores[3:]
    bus.partition(left, right)
    # Each side waits for its top-ranked members that sit on the other side, passing over one
    # per silence timeout, so the slower side has its anchor within 15 s + 3 x 15 s.
    bus.run_until(61.0)
    assert len(bus.anchors()) == 2
    assert bus.converged(left)
    assert bus.converged(right)
    heal = bus.now
    bus.heal()
    assert bus.run_for(20.0, bus.converged)
    took = bus.now - heal
    assert took <= S.hold_time + S.pulse_interval + 0.1  # hear it (< 1 pulse), then the hold
    winner = bus.anchors()[0]
    loser = next(c for c in cores if c.statistics().step_downs)
    assert [c for c in cores if c.statistics().step_downs] == [loser]
    assert winner.cell_id != loser.cell_id
    # Everybody agrees, and they agree with the claim order evaluated by anyone.
    assert all(c.anchor == winner.cell_id for c in cores)


def test_a_returning_old_anchor_must_serve_a_growing_hold() -> None:
    """Hysteresis: the best member flaps; each return costs it a longer hold, and a member that
    only ever comes back briefly never takes the role back."""
    bus = Bus()
    cores = bus.mesh(4, egos=[90, 50, 40, 30])
    best = cores[0]
    rest = cores[1:]
    bus.run_until(30.0)
    assert bus.anchors() == [best]

    def away(seconds: float) -> None:
        bus.partition([best], rest)
        bus.run_for(seconds)
        bus.heal()

    away(30.0)  # the rest fail over (strike 1)
    assert bus.anchors(rest) == [rest[0]]
    back = bus.now
    assert bus.run_for(30.0, lambda: bus.converged() and bus.anchors() == [best])
    first_return = bus.now - back
    assert S.hold_time <= first_return <= S.hold_time + S.pulse_interval + 0.1
    away(30.0)  # strike 2: the hold doubles
    back = bus.now
    assert bus.run_for(60.0, lambda: bus.converged() and bus.anchors() == [best])
    second_return = bus.now - back
    assert 2 * S.hold_time <= second_return <= 2 * S.hold_time + S.pulse_interval + 0.1
    # Flapping: gone 30 s, back 12 s, repeatedly. With 3 strikes it needs a 40 s hold, so the
    # rest never switch back to it.
    away(30.0)
    switches_before = len(bus.of(rest[1], AnchorChanged))
    for _ in range(4):
        bus.run_for(12.0)
        away(30.0)
    assert len(bus.of(rest[1], AnchorChanged)) == switches_before
    assert bus.anchors(rest) == [rest[0]]


def test_a_higher_ego_newcomer_challenges_only_after_it_settled() -> None:
    bus = Bus()
    cores = bus.mesh(3, egos=[10, 20, 30])
    bus.run_until(30.0)
    incumbent = bus.anchors()[0]
    assert incumbent.ego == 30
    newcomer = bus.add(77, ego=95)
    for c in cores:
        bus.admit(newcomer, c)
        bus.admit(c, newcomer)
    joined = bus.now
    bus.start(newcomer)
    bus.run_for(1.0)
    assert newcomer.anchor == incumbent.cell_id  # it follows first
    assert bus.run_for(90.0, lambda: bus.converged() and newcomer.is_anchor)
    took = bus.now - joined
    assert S.challenge_delay + S.hold_time <= took <= S.challenge_delay + S.hold_time + 0.1
    assert incumbent.statistics().step_downs == 1


def test_an_ineligible_member_takes_keys_but_never_claims() -> None:
    bus = Bus()
    a = bus.add(1, ego=100, eligible=False)
    b = bus.add(2, ego=5)
    bus.admit_all()
    bus.start_all()
    bus.run_until(20.0)
    assert b.is_anchor
    assert a.anchor == b.cell_id
    assert a.epoch == b.epoch
    assert a.rank(bus.now) is None
    bus.kill(b)
    bus.run_for(60.0)
    assert not a.is_anchor
    assert a.role is Role.ELECTING


# ------------------------------------------------------------------------------ API


def test_status_shows_the_choice_and_its_reason() -> None:
    bus = Bus()
    cores = bus.mesh(4, egos=[10, 90, 20, 30])
    assert cores[0].status(0.0)["role"] == "listening"
    bus.run_until(20.0)
    anchor = bus.anchors()[0]
    st = anchor.status(bus.now)
    assert st["role"] == "anchor"
    assert st["anchor"] == anchor.cell_id.hex()
    assert (st["term"], st["epoch"], st["rank"], st["members"]) == (1, 1, 1, 4)
    assert st["key_age_s"] == pytest.approx(5.0)
    assert "ranked first by the rule" in str(st["reason"])
    follower = cores[0].status(bus.now)
    assert follower["rank"] == 4
    assert follower["anchor"] == anchor.cell_id.hex()
    assert "best-ranked live claimant" in str(follower["reason"])
    assert set(follower) >= {"role", "anchor", "epoch", "key_age_s", "rank", "reason"}


def test_the_timer_contract() -> None:
    bus = Bus()
    core = bus.add(1)
    assert core.get_timer() is None
    core.handle_timer(5.0)  # nothing due: nothing happens
    assert core.status(5.0)["role"] == "idle"
    core.start(0.0)
    assert core.get_timer() == S.listen_time
    core.handle_timer(1.0)
    assert core.status(1.0)["role"] == "listening"
    core.handle_timer(15.0)
    assert core.is_anchor  # alone: it tops its own ranking
    assert core.get_timer() == 15.0 + S.pulse_interval
    sent = core.messages_to_send()
    assert [d[2] for _, d in sent] == [3, 1]  # REQ_EPOCH at start, the first PULSE
    assert all(dst is None for dst, _ in sent)  # both broadcast


def test_api_misuse_is_refused() -> None:
    bus = Bus()
    a, b = bus.add(1), bus.add(2)
    a.start(0.0)
    with pytest.raises(LocalProtocolError):
        a.start(0.0)
    with pytest.raises(LocalProtocolError):
        a.forget(a.cell_id, 0.0)
    with pytest.raises(ValueError, match="CellID"):
        a.admit(CellId(bytes(16)), b.identity.public_key, b.identity.noise_static_public, 1, 0.0)
    with pytest.raises(ValueError, match="X25519"):
        a.admit(b.cell_id, b.identity.public_key, b"x", 1, 0.0)
    assert not a.admit(a.cell_id, a.identity.public_key, a.identity.noise_static_public, 1, 0.0)
    assert not a.forget(b.cell_id, 0.0)
    tiny = bus.add(3, AnchorSettings(max_members=1))
    assert tiny.admit(a.cell_id, a.identity.public_key, a.identity.noise_static_public, 1, 0.0)
    assert not tiny.admit(b.cell_id, b.identity.public_key, b.identity.noise_static_public, 1, 0.0)
    assert len(tiny) == 2
    assert a.cell_id in tiny
    c = bus.add(4)
    c.receive_message(b"junk", 0.0)
    assert c.drops == {"not_started": 1}


def test_re_admission_updates_ego_and_keys_without_resetting_seniority() -> None:
    bus = Bus()
    a, b = bus.add(1), bus.add(2)
    a.admit(b.cell_id, b.identity.public_key, b.identity.noise_static_public, 10**6, 0.0)
    a.admit(b.cell_id, b.identity.public_key, b.identity.noise_static_public, 40, 500.0)
    a.start(0.0)
    assert a.members() == [a.cell_id, b.cell_id]
    # Seniority comes from the first admission (t=0): at t=500 b is at the top level already.
    order_rank = a.rank(500.0)
    assert order_rank == 2  # b: ego 40 > a's 0
