"""The RFC 6206 Trickle timer: doubling, reset, suppression, and the fixed-pulse degenerate case."""

from __future__ import annotations

import itertools
import random

import pytest

from cellmesh.discovery.trickle import Trickle


def run(tr: Trickle, until: float, heard: int = 0) -> list[tuple[float, float, bool]]:
    """Drive `tr` to `until`; before each firing point, `heard` consistent transmissions arrive.
    Returns (time, interval, transmitted) for every firing point."""
    out: list[tuple[float, float, bool]] = []
    while tr.next_fire() <= until:
        now = tr.next_fire()
        was_fire = now == tr.fire_at and now < tr.end
        if was_fire:
            for _ in range(heard):
                tr.hear_consistent()
        interval = tr.interval
        r = tr.poll(now)
        if r is not None:
            assert was_fire
            out.append((now, interval, r))
    return out


def test_interval_doubles_up_to_imax_and_fires_in_the_second_half() -> None:
    tr = Trickle(0.1, 5.0, 3, random.Random(1))
    tr.start(0.0)
    fires = run(tr, 60.0)
    intervals = [i for _, i, _ in fires]
    assert intervals[:7] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert all(i == 5.0 for i in intervals[6:])
    assert all(tx for *_, tx in fires)  # nobody else talks: always transmit
    start = 0.0
    for t, i, _ in fires:
        assert start + i / 2 <= t < start + i
        start += i


def test_suppression_with_k() -> None:
    tr = Trickle(0.1, 5.0, 3, random.Random(2))
    tr.start(0.0)
    assert not any(tx for *_, tx in run(tr, 30.0, heard=3))
    tr2 = Trickle(0.1, 5.0, 3, random.Random(2))
    tr2.start(0.0)
    assert all(tx for *_, tx in run(tr2, 30.0, heard=2))
    tr3 = Trickle(0.1, 5.0, None, random.Random(2))  # k = infinity
    tr3.start(0.0)
    assert all(tx for *_, tx in run(tr3, 30.0, heard=100))


def test_counter_restarts_each_interval() -> None:
    tr = Trickle(1.0, 1.0, 1, random.Random(3))
    tr.start(0.0)
    tr.hear_consistent()
    assert tr.poll(tr.fire_at) is False
    assert tr.poll(tr.end) is None  # interval over: new interval, c = 0
    assert tr.counter == 0
    assert tr.poll(tr.fire_at) is True


def test_reset_goes_back_to_imin_unless_already_there() -> None:
    tr = Trickle(0.1, 5.0, 3, random.Random(4))
    tr.start(0.0)
    assert tr.reset(0.01) is False  # I == Imin: "do nothing" (RFC 6206, 4.2 step 6)
    assert (tr.started_at, tr.interval) == (0.0, 0.1)
    run(tr, 20.0)
    assert tr.interval == 5.0
    assert tr.reset(20.5) is True
    assert (tr.started_at, tr.interval, tr.counter) == (20.5, 0.1, 0)
    assert 20.55 <= tr.next_fire() < 20.6


def test_fixed_pulse_when_imin_equals_imax() -> None:
    tr = Trickle(5.0, 5.0, None, random.Random(5))
    tr.start(0.0)
    assert tr.reset(1.0) is False
    fires = run(tr, 600.0, heard=10)
    assert len(fires) == 120  # one per 5 s interval, never suppressed
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(fires)]
    assert min(gaps) > 2.5
    assert max(gaps) < 7.5


def test_latest_next_fire_bounds_the_next_opportunity() -> None:
    tr = Trickle(0.1, 5.0, 3, random.Random(6))
    tr.start(0.0)
    for _ in range(200):
        now = tr.next_fire()
        was_fire = tr.poll(now) is not None
        if was_fire:
            bound = tr.latest_next_fire()
            while tr.poll(tr.next_fire()) is None:
                pass
            assert tr.started_at <= tr.fire_at <= bound


def test_a_late_poll_skips_missed_intervals() -> None:
    tr = Trickle(0.1, 5.0, 3, random.Random(7))
    tr.start(0.0)
    assert tr.poll(10_000.0) is True
    assert tr.started_at == 10_000.0
    assert tr.next_fire() > 10_000.0


def test_validation() -> None:
    rng = random.Random(0)
    for imin, imax, k in ((0.0, 1.0, 1), (2.0, 1.0, 1), (0.1, 1.0, 0)):
        with pytest.raises(ValueError, match=r"imin|redundancy"):
            Trickle(imin, imax, k, rng)
