"""Unit tests for `RttEstimator` (RFC 9002 section 5) and the `PhiAccrual` failure detector."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.transport.failure import MIN_STD, WINDOW, PhiAccrual
from cellmesh.transport.rtt import GRANULARITY, INITIAL_RTT, RttEstimator

MAD = 0.025  # max ack delay the connection uses

# ---------------------------------------------------------------------------------- RttEstimator


def test_rtt_before_any_sample() -> None:
    r = RttEstimator()
    assert r.samples == 0
    assert r.smoothed == INITIAL_RTT
    assert r.latest == INITIAL_RTT
    assert r.rttvar == INITIAL_RTT / 2
    assert r.min_rtt == float("inf")
    assert r.pto(MAD) == pytest.approx(INITIAL_RTT + 4 * INITIAL_RTT / 2 + MAD)


def test_rtt_custom_initial() -> None:
    r = RttEstimator(initial=0.5)
    assert (r.smoothed, r.rttvar) == (0.5, 0.25)


def test_rtt_first_sample_replaces_the_initial_values_and_ignores_ack_delay() -> None:
    r = RttEstimator()
    r.update(0.05, ack_delay=0.02, max_ack_delay=MAD)
    assert r.samples == 1
    assert r.latest == 0.05
    assert r.smoothed == 0.05
    assert r.rttvar == 0.025
    assert r.min_rtt == 0.05


def test_rtt_smoothing_constants() -> None:
    r = RttEstimator()
    r.update(0.05, 0.0, MAD)
    r.update(0.1, 0.0, MAD)
    assert r.rttvar == pytest.approx(0.75 * 0.025 + 0.25 * 0.05)
    assert r.smoothed == pytest.approx(0.875 * 0.05 + 0.125 * 0.1)
    assert r.latest == 0.1
    assert r.min_rtt == 0.05


def test_rtt_ack_delay_subtracted_when_it_stays_above_min_rtt() -> None:
    r = RttEstimator()
    r.update(0.05, 0.0, MAD)
    r.update(0.07, 0.01, MAD)  # 0.07 - 0.01 = 0.06 >= min_rtt 0.05: subtract
    assert r.smoothed == pytest.approx(0.875 * 0.05 + 0.125 * 0.06)
    assert r.latest == 0.07  # latest is the raw sample


def test_rtt_ack_delay_not_subtracted_below_min_rtt() -> None:
    r = RttEstimator()
    r.update(0.05, 0.0, MAD)
    r.update(0.055, 0.01, MAD)  # 0.045 < min_rtt: use the raw sample
    assert r.smoothed == pytest.approx(0.875 * 0.05 + 0.125 * 0.055)


def test_rtt_ack_delay_is_capped_at_max_ack_delay() -> None:
    r = RttEstimator()
    r.update(0.05, 0.0, MAD)
    r.update(0.2, 0.1, MAD)  # the peer claims 100 ms of delay; at most 25 ms counts
    assert r.smoothed == pytest.approx(0.875 * 0.05 + 0.125 * 0.175)


def test_rtt_min_rtt_uses_raw_samples() -> None:
    r = RttEstimator()
    for s in (0.08, 0.05, 0.09, 0.06):
        r.update(s, 0.01, MAD)
    assert r.min_rtt == 0.05


@pytest.mark.parametrize("sample", [0.0, -1.0])
def test_rtt_non_positive_sample_is_clamped(sample: float) -> None:
    r = RttEstimator()
    r.update(sample, 0.0, MAD)
    assert r.latest == GRANULARITY / 10
    assert r.smoothed > 0
    assert r.min_rtt > 0


def test_rtt_pto_formula_and_granularity_floor() -> None:
    r = RttEstimator()
    r.update(0.04, 0.0, MAD)
    assert r.pto(MAD) == pytest.approx(0.04 + 4 * 0.02 + MAD)
    assert r.pto(0.0) == pytest.approx(0.04 + 4 * 0.02)
    for _ in range(200):  # a perfectly stable path: variance decays to ~0
        r.update(0.04, 0.0, MAD)
    assert 4 * r.rttvar < GRANULARITY
    assert r.pto(MAD) == pytest.approx(r.smoothed + GRANULARITY + MAD)


def test_rtt_loss_delay_is_nine_eighths_of_the_larger_of_smoothed_and_latest() -> None:
    r = RttEstimator()
    r.update(0.08, 0.0, MAD)
    assert r.loss_delay() == pytest.approx(9 / 8 * 0.08)
    r.update(0.2, 0.0, MAD)  # latest above smoothed
    assert r.loss_delay() == pytest.approx(9 / 8 * 0.2)
    r.update(0.01, 0.0, MAD)  # smoothed above latest
    assert r.loss_delay() == pytest.approx(9 / 8 * r.smoothed)
    tiny = RttEstimator(initial=1e-6)
    assert tiny.loss_delay() == GRANULARITY


@given(st.lists(st.tuples(st.floats(1e-4, 5.0), st.floats(0.0, 0.1)), min_size=1, max_size=50))
@settings(max_examples=100, deadline=None)
def test_rtt_estimates_stay_within_the_sample_range(samples: list[tuple[float, float]]) -> None:
    r = RttEstimator()
    for s, delay in samples:
        r.update(s, delay, MAD)
    raw = [s for s, _ in samples]
    assert r.min_rtt == min(raw)
    assert min(raw) - MAD - 1e-9 <= r.smoothed <= max(raw) + 1e-9
    assert r.rttvar >= 0
    assert r.pto(MAD) >= r.smoothed + GRANULARITY
    assert r.loss_delay() >= 9 / 8 * r.smoothed - 1e-12


# ---------------------------------------------------------------------------------- PhiAccrual


def regular(period: float, n: int, pause: float = 0.0, start: float = 0.0) -> PhiAccrual:
    d = PhiAccrual(start, pause)
    for i in range(1, n + 1):
        d.heartbeat(start + i * period)
    return d


def test_phi_is_about_zero_right_after_a_heartbeat() -> None:
    d = regular(1.0, 50)
    assert d.last_heartbeat == 50.0
    assert d.phi(50.0) < 0.05


def test_phi_fresh_detector_is_calm() -> None:
    d = PhiAccrual(10.0, 1.0)
    assert d.phi(10.0) < 0.05
    assert d.last_heartbeat == 10.0


def test_phi_grows_with_silence() -> None:
    d = regular(1.0, 50)
    values = [d.phi(50.0 + t / 10) for t in range(0, 200)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[0] < 0.05
    assert d.phi(52.0) > 1.0  # two seconds late with std floored at 0.5
    assert d.phi(55.0) > 8.0
    assert d.phi(10_000.0) > 100.0


def test_phi_resets_on_the_next_heartbeat() -> None:
    d = regular(1.0, 20)
    assert d.phi(30.0) > 8.0
    d.heartbeat(30.0)
    assert d.phi(30.0) < 0.5


def test_phi_acceptable_pause_extends_the_expected_gap() -> None:
    strict, lenient = regular(1.0, 20, pause=0.0), regular(1.0, 20, pause=5.0)
    assert strict.phi(23.0) > 4.0
    assert lenient.phi(23.0) < 0.5


def test_phi_regular_heartbeats_make_silence_more_suspicious_than_irregular_ones() -> None:
    reg = regular(1.0, 60)
    irr = PhiAccrual(0.0, 0.0)
    t = 0.0
    rng = random.Random(4)
    for _ in range(60):
        t += rng.choice((0.1, 0.5, 1.5, 1.9))  # mean ~1 s, std ~0.7 s > MIN_STD
        irr.heartbeat(t)
    for late in (2.0, 3.0, 4.0):
        assert reg.phi(60.0 + late) > irr.phi(t + late)


def test_phi_std_floor_keeps_a_perfect_clock_from_being_suspected_on_jitter() -> None:
    d = regular(0.01, 100)  # std 0 without the floor
    assert d.phi(1.0 + 0.05) < 0.5  # 40 ms late is nothing against the 0.5 s floor
    assert MIN_STD == 0.5


def test_phi_window_forgets_old_intervals() -> None:
    d = regular(10.0, 50)  # long gaps first
    t = 500.0
    for _ in range(WINDOW):
        t += 0.1
        d.heartbeat(t)
    fresh = regular(0.1, WINDOW, start=t - WINDOW * 0.1)
    assert fresh.last_heartbeat == pytest.approx(t)
    assert d.phi(t + 2.0) == pytest.approx(fresh.phi(t + 2.0), rel=1e-6)


def test_phi_time_going_backwards_never_raises() -> None:
    d = regular(1.0, 10)
    d.heartbeat(5.0)  # earlier than the last heartbeat: ignored as an interval
    d.heartbeat(5.0)  # zero gap
    for now in (-1e9, 0.0, 5.0, 11.0):
        p = d.phi(now)
        assert p >= 0.0
        assert not math.isnan(p)


@pytest.mark.parametrize(
    "now", [-1e308, -1e18, 0.0, 1e18, 1e308, float("inf"), float("-inf"), float("nan")]
)
def test_phi_at_extreme_times_never_raises(now: float) -> None:
    d = regular(1.0, 10)
    p = d.phi(now)
    assert p >= 0.0 or math.isnan(p)


@given(st.lists(st.floats(-1e6, 1e6), max_size=30), st.floats(-1e7, 1e7))
@settings(max_examples=200, deadline=None)
def test_phi_never_raises_for_plausible_times(beats: list[float], now: float) -> None:
    d = PhiAccrual(0.0, 1.0)
    for b in beats:
        d.heartbeat(b)
    p = d.phi(now)
    assert p >= 0.0
    assert math.isfinite(p)


def test_phi_after_a_huge_heartbeat_gap_never_raises() -> None:
    d = PhiAccrual(0.0, 1.0)
    d.heartbeat(1e200)
    assert d.phi(1e200 + 1.0) >= 0.0


def test_phi_a_burst_of_packets_counts_as_one_heartbeat() -> None:
    from cellmesh.transport.failure import BURST_GAP

    bursty = regular(1.0, 20)
    t = 20.0
    for burst in range(5):
        t = 20.0 + (burst + 1) * 1.0
        for k in range(1000):  # a transfer: a thousand packets within a millisecond
            bursty.heartbeat(t + k * 1e-6)
    calm = regular(1.0, 25)
    # The bursts added one one-second interval each, not a thousand microsecond ones.
    assert bursty.phi(t + 3.0) == pytest.approx(calm.phi(25.0 + 3.0), rel=1e-3, abs=1e-3)
    assert bursty.last_heartbeat == pytest.approx(t + 999e-6)
    assert BURST_GAP < 0.5 * MIN_STD  # far below what the detector can tell apart anyway
