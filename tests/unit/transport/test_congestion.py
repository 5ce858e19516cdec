"""Unit tests for `cellmesh.transport.congestion`: NewReno, BbrLite and `make_controller` (pure)."""

from __future__ import annotations

import pytest

from cellmesh.transport.congestion import (
    AGGREGATION_FLOOR,
    BW_WINDOW_ROUNDS,
    EXTRA_ACKED_MAX_TIME,
    INITIAL_WINDOW_PACKETS,
    LOSS_THRESHOLD,
    MIN_RTT_EXPIRY,
    MIN_WINDOW_PACKETS,
    QUEUE_RTT_FACTOR,
    STARTUP_GAIN,
    STARTUP_LOSS_PACKETS,
    BbrLite,
    CongestionController,
    NewReno,
    RateSample,
    make_controller,
)
from cellmesh.transport.rtt import RttEstimator

MSS = 1200


# ---------------------------------------------------------------------------------- NewReno


def test_reno_initial_state() -> None:
    cc = NewReno(MSS)
    assert cc.name == "reno"
    assert cc.cwnd == INITIAL_WINDOW_PACKETS * MSS
    assert cc.ssthresh == float("inf")


def test_reno_slow_start_grows_by_each_acked_packet() -> None:
    cc = NewReno(MSS)
    start = cc.cwnd
    for i in range(10):
        cc.on_acked(MSS, sent_time=1.0 + i * 0.001, sample=None, now=1.1, in_flight=0)
    assert cc.cwnd == start + 10 * MSS  # doubles per round trip of acknowledged window


def test_reno_halves_once_per_congestion_event() -> None:
    cc = NewReno(MSS)
    cc.cwnd = 100 * MSS
    cc.on_lost(MSS, sent_time=1.0, now=2.0)
    assert cc.cwnd == 50 * MSS
    assert cc.ssthresh == 50 * MSS
    # More losses from the same flight (sent before the recovery started): no further cut.
    for sent in (1.0, 1.5, 1.99, 2.0):
        cc.on_lost(MSS, sent_time=sent, now=2.1)
    assert cc.cwnd == 50 * MSS
    # A packet sent after the recovery began is a new congestion event.
    cc.on_lost(MSS, sent_time=2.05, now=3.0)
    assert cc.cwnd == 25 * MSS
    assert cc.ssthresh == 25 * MSS


def test_reno_never_goes_below_the_minimum_window() -> None:
    cc = NewReno(MSS)
    for i in range(10):
        cc.on_lost(MSS, sent_time=10.0 + i, now=10.5 + i)
    assert cc.cwnd == MIN_WINDOW_PACKETS * MSS


def test_reno_acks_from_before_the_recovery_do_not_grow_the_window() -> None:
    cc = NewReno(MSS)
    cc.cwnd = 40 * MSS
    cc.on_lost(MSS, sent_time=1.0, now=2.0)
    after = cc.cwnd
    for _ in range(50):
        cc.on_acked(MSS, sent_time=1.5, sample=None, now=2.2, in_flight=0)
    assert cc.cwnd == after


def test_reno_congestion_avoidance_adds_one_mss_per_window() -> None:
    cc = NewReno(MSS)
    cc.cwnd = 20 * MSS
    cc.on_lost(MSS, sent_time=1.0, now=2.0)
    assert cc.cwnd == cc.ssthresh == 10 * MSS
    for _ in range(9):
        cc.on_acked(MSS, sent_time=3.0, sample=None, now=3.1, in_flight=0)
    assert cc.cwnd == 10 * MSS  # not a full window acknowledged yet
    cc.on_acked(MSS, sent_time=3.0, sample=None, now=3.1, in_flight=0)
    assert cc.cwnd == 11 * MSS


def test_reno_pacing_rate() -> None:
    cc = NewReno(MSS)
    rtt = RttEstimator()
    rtt.update(0.05, 0.0, 0.025)
    assert cc.pacing_rate(rtt) == pytest.approx(1.25 * cc.cwnd / 0.05)


# ---------------------------------------------------------------------------------- BbrLite


class BbrDriver:
    """Feeds a BbrLite whole rounds of acknowledgements with a given delivery rate and RTT.

    The first ack of each round carries a `prior_delivered` at or beyond what was delivered when
    the previous round ended, so each `round()` call is exactly one BBR round.
    """

    def __init__(self, mss: int = MSS) -> None:
        self.cc = BbrLite(mss)
        self.mss = mss
        self.delivered = 0
        self.now = 0.0

    def round(
        self,
        rate: float,
        rtt: float,
        acks: int = 20,
        lost: int = 0,
        in_flight: int = 0,
        app_limited: bool = False,
    ) -> None:
        for i in range(acks):
            prior = self.delivered if i == 0 else 0
            self.delivered += self.mss
            self.now += rtt / acks
            sample = RateSample(rate, self.delivered, prior, app_limited, rtt)
            self.cc.on_acked(self.mss, self.now - rtt, sample, self.now, in_flight)
            if i == 0:
                for _ in range(lost):
                    self.cc.on_lost(self.mss, self.now - rtt, self.now)


def test_bbr_initial_state() -> None:
    cc = BbrLite(MSS)
    assert cc.name == "bbr"
    assert cc.state == "startup"
    assert cc.cwnd == INITIAL_WINDOW_PACKETS * MSS
    rtt = RttEstimator()
    rtt.update(0.1, 0.0, 0.025)
    # Without a bandwidth sample it paces the initial window over an RTT, with the startup gain.
    assert cc.pacing_rate(rtt) == pytest.approx(STARTUP_GAIN * cc.cwnd / 0.1)


def test_bbr_one_round_per_driver_round() -> None:
    d = BbrDriver()
    for k in range(1, 6):
        d.round(1e6, 0.02)
        assert d.cc.round == k


def test_bbr_bandwidth_is_the_max_over_the_last_ten_rounds() -> None:
    d = BbrDriver()
    rates = [1e6, 2e6, 1.5e6, 5e6] + [1e6] * 14 + [3e6, 0.5e6, 0.5e6]
    for k, rate in enumerate(rates):
        d.round(rate, 0.02)
        window = rates[max(0, k - BW_WINDOW_ROUNDS + 1) : k + 1]
        assert d.cc.btl_bw == max(window), k


def test_bbr_bandwidth_forgets_a_peak_after_exactly_ten_rounds() -> None:
    d = BbrDriver()
    d.round(8e6, 0.02)
    for _ in range(BW_WINDOW_ROUNDS - 1):
        d.round(1e6, 0.02)
        assert d.cc.btl_bw == 8e6
    d.round(1e6, 0.02)
    assert d.cc.btl_bw == 1e6


def test_bbr_app_limited_samples_do_not_lower_the_estimate_but_may_raise_it() -> None:
    d = BbrDriver()
    d.round(4e6, 0.02)
    for _ in range(15):
        d.round(1e6, 0.02, app_limited=True)
    assert d.cc.btl_bw == 4e6  # app-limited samples below the estimate are ignored
    d.round(6e6, 0.02, app_limited=True)
    assert d.cc.btl_bw == 6e6


def test_bbr_leaves_startup_when_bandwidth_stops_growing_and_cruises() -> None:
    d = BbrDriver()
    for _ in range(10):
        d.round(10e6, 0.05)
    assert d.cc.state == "probe_bw"


def test_bbr_cwnd_is_two_bdp_in_probe_bw() -> None:
    d = BbrDriver()
    for _ in range(12):
        d.round(10e6, 0.05)
    assert d.cc.state == "probe_bw"
    assert d.cc.min_rtt == pytest.approx(0.05)
    bdp = 10e6 * 0.05
    # ACKs arrive smoothly here: the aggregation allowance is one acknowledgement's worth.
    assert d.cc.extra_acked <= MSS
    assert d.cc.cwnd == pytest.approx(2 * bdp + d.cc.extra_acked, rel=1e-6)
    rtt = RttEstimator()
    gain = d.cc.pacing_rate(rtt) / 10e6
    assert any(gain == pytest.approx(g) for g in (0.75, 1.0, 1.25))


def test_bbr_cwnd_has_the_aggregation_floor_on_tiny_bdp_paths() -> None:
    d = BbrDriver()
    for _ in range(12):
        d.round(100_000.0, 0.001)  # BDP = 100 bytes
    assert d.cc.state == "probe_bw"
    assert d.cc.cwnd == AGGREGATION_FLOOR


def test_bbr_startup_cwnd_uses_the_startup_gain() -> None:
    d = BbrDriver()
    d.round(10e6, 0.05)
    d.round(20e6, 0.05)
    assert d.cc.state == "startup"
    assert d.cc.extra_acked <= MSS
    assert d.cc.cwnd == pytest.approx(STARTUP_GAIN * 20e6 * 0.05 + d.cc.extra_acked, rel=1e-6)


def test_bbr_random_loss_below_threshold_does_not_reduce_cwnd() -> None:
    clean, lossy = BbrDriver(), BbrDriver()
    for _ in range(30):
        clean.round(10e6, 0.05, acks=20)
        lossy.round(10e6, 0.05, acks=20, lost=2)  # 2 / 22 ~ 9% < 15%
    assert LOSS_THRESHOLD > 2 / 22
    assert lossy.cc.inflight_hi == float("inf")
    assert lossy.cc.cwnd == clean.cc.cwnd
    assert lossy.cc.btl_bw == clean.cc.btl_bw


def test_bbr_heavy_loss_round_caps_inflight_and_leaves_startup() -> None:
    d = BbrDriver()
    d.round(10e6, 0.05)
    d.round(20e6, 0.05)
    assert d.cc.state == "startup"
    before = d.cc.cwnd
    d.round(20e6, 0.05, acks=30, lost=9)  # 9 / 39 ~ 23% > 15%, and at least 8 lost
    d.round(20e6, 0.05)  # the round with the losses ends here
    assert d.cc.inflight_hi == pytest.approx(0.7 * before)
    assert d.cc.cwnd <= d.cc.inflight_hi
    assert d.cc.state in {"drain", "probe_bw"}
    # Once losses subside the ceiling grows back multiplicatively (x1.25 per clean round, BBRv2
    # style), and the pacing cap lifted with it, until neither binds any more. (A cut in
    # startup does not wait: its overshoot squeezed nobody yet.)
    hi = d.cc.inflight_hi
    assert d.cc.hold_rounds == 0
    d.round(20e6, 0.05)
    assert d.cc.inflight_hi in (pytest.approx(1.25 * hi), float("inf"))
    for _ in range(20):
        d.round(20e6, 0.05)
    assert d.cc.inflight_hi == float("inf")
    assert d.cc.bw_lo == float("inf")


def test_bbr_a_few_losses_in_a_small_round_are_not_congestion() -> None:
    # 2 of 10 lost is 20%, but random loss of 5% does that to one round in twelve: not evidence.
    d = BbrDriver()
    d.round(10e6, 0.05)
    d.round(20e6, 0.05, acks=8, lost=2)
    d.round(20e6, 0.05)
    assert d.cc.inflight_hi == float("inf")
    assert d.cc.bw_lo == float("inf")
    assert d.cc.state == "startup"


def test_bbr_in_startup_losses_cut_only_while_a_queue_shows() -> None:
    # Random loss on a path whose RTT stays at its minimum: startup probes on, uncapped.
    clean = BbrDriver()
    clean.round(10e6, 0.05)
    clean.round(20e6, 0.05, acks=12, lost=4)  # 25%, 4 lost, RTT unchanged
    clean.round(20e6, 0.05)
    assert clean.cc.state == "startup"
    assert clean.cc.inflight_hi == float("inf")
    assert clean.cc.bw_lo == float("inf")
    # The same losses while the RTT has grown (a queue filling up): the ceilings are cut...
    queue = BbrDriver()
    queue.round(10e6, 0.05)
    queue.round(20e6, 0.05 * QUEUE_RTT_FACTOR * 1.2, acks=12, lost=4)
    queue.round(20e6, 0.05)
    assert queue.cc.inflight_hi != float("inf")
    assert queue.cc.bw_lo != float("inf")
    assert queue.cc.state == "startup"  # ...but 4 losses do not end startup (8 do)
    assert STARTUP_LOSS_PACKETS == 8


def test_bbr_a_lossy_first_round_before_any_sample_changes_nothing() -> None:
    # Data sent ahead of a lost handshake message is lost together; nothing was measured yet.
    cc = BbrLite(MSS)
    for i in range(13):
        if i:
            cc.on_lost(MSS, 0.0, 0.01)
        else:
            cc.on_acked(MSS, 0.0, None, 0.01, 0)
    cc.on_acked(MSS, 0.0, RateSample(1e6, 14 * MSS, 13 * MSS, False, 0.02), 0.02, 0)
    assert cc.state == "startup"
    assert cc.inflight_hi == float("inf")
    assert cc.bw_lo == float("inf")


def test_bbr_few_packets_in_a_round_are_not_judged_for_loss() -> None:
    d = BbrDriver()
    d.round(1e6, 0.05, acks=2, lost=3)  # 5 packets < 8: too few to call it congestion
    d.round(1e6, 0.05, acks=2)
    assert d.cc.inflight_hi == float("inf")


def test_bbr_min_rtt_tracks_the_minimum_and_expires() -> None:
    d = BbrDriver()
    d.round(1e6, 0.05)
    d.round(1e6, 0.03)
    d.round(1e6, 0.08)
    assert d.cc.min_rtt == pytest.approx(0.03)
    d.now += MIN_RTT_EXPIRY + 1
    d.round(1e6, 0.08)
    assert d.cc.min_rtt == pytest.approx(0.08)


def test_bbr_on_acked_without_a_sample_only_counts() -> None:
    cc = BbrLite(MSS)
    cwnd = cc.cwnd
    cc.on_acked(MSS, 0.0, None, 0.1, 0)
    assert cc.cwnd == cwnd
    assert cc.btl_bw == 0.0


def test_bbr_cwnd_never_below_minimum_window() -> None:
    d = BbrDriver()
    for _ in range(5):
        d.round(1000.0, 0.001, acks=20, lost=10)
    assert d.cc.cwnd >= MIN_WINDOW_PACKETS * MSS


# ---------------------------------------------------------------------------------- factory


@pytest.mark.parametrize(("name", "cls"), [("reno", NewReno), ("bbr", BbrLite)])
def test_make_controller(name: str, cls: type) -> None:
    cc: CongestionController = make_controller(name, 1400)
    assert isinstance(cc, cls)
    assert cc.name == name
    assert cc.mss == 1400
    assert cc.cwnd == INITIAL_WINDOW_PACKETS * 1400


@pytest.mark.parametrize("name", ["", "cubic", "BBR", "Reno", "bbr "])
def test_make_controller_unknown_name(name: str) -> None:
    with pytest.raises(ValueError, match="unknown congestion controller"):
        make_controller(name, 1200)


def _bursty_rounds(cc: BbrLite, rounds: int, rate: float, rtt: float, burst: int) -> float:
    """Rounds whose acknowledgements come in bursts of `burst` packets at one instant, the
    bursts spaced so that the average delivery rate is `rate` (an event loop draining a batch)."""
    now, delivered = 0.0, 0
    per_round = 4 * burst
    for _ in range(rounds):
        for i in range(per_round):
            if i % burst == 0:
                now += burst * MSS / rate  # the next burst, on average at the bandwidth
            prior = delivered if i == 0 else 0
            delivered += MSS
            cc.on_acked(MSS, now - rtt, RateSample(rate, delivered, prior, False, rtt), now, 0)
    return now


def test_bbr_adds_what_arrives_in_ack_bursts_to_the_window() -> None:
    smooth, bursty = BbrDriver(), BbrLite(MSS)
    for _ in range(12):
        smooth.round(10e6, 0.05, acks=80)
    _bursty_rounds(bursty, 12, 10e6, 0.05, burst=40)
    assert bursty.state == smooth.cc.state == "probe_bw"
    # A burst of 40 packets acknowledged at once, beyond what the bandwidth explains.
    assert bursty.extra_acked >= 30 * MSS
    assert bursty.cwnd >= smooth.cc.cwnd + 30 * MSS
    assert bursty.extra_acked <= 10e6 * EXTRA_ACKED_MAX_TIME


def test_bbr_ack_aggregation_allowance_is_capped_and_forgotten() -> None:
    cc = BbrLite(MSS)
    _bursty_rounds(cc, 12, 1e6, 0.01, burst=400)  # bursts far beyond 0.1 s of bandwidth
    assert cc.extra_acked <= 1e6 * EXTRA_ACKED_MAX_TIME + 1e-6
    assert cc.extra_acked <= cc.cwnd
    cc.on_persistent_congestion(100.0)
    assert cc.extra_acked == 0.0


def _cruising() -> BbrDriver:
    d = BbrDriver()
    for _ in range(6):
        d.round(20e6, 0.05)  # bandwidth stops growing: startup ends, drain, then probe_bw
    assert d.cc.state == "probe_bw"
    for _ in range(8):
        d.round(20e6, 0.05)  # enough clean rounds for the path's random loss (0) to be known
    assert d.cc.random_loss == 0.0
    return d


def test_bbr_a_queue_with_more_than_2_percent_loss_is_congestion() -> None:
    # A loss-based flow filling the bottleneck queue: the RTT grows and ~4% is lost. That is
    # congestion (BBRv2's 2% threshold), and ours yields: both ceilings are cut.
    queue = _cruising()
    queue.round(20e6, 0.05 * QUEUE_RTT_FACTOR * 1.2, acks=96, lost=4)
    queue.round(20e6, 0.05)
    assert queue.cc.inflight_hi != float("inf")
    assert queue.cc.bw_lo != float("inf")
    # It probes up again only after about as many rounds as a loss-based flow takes to regrow
    # (half the window in packets, at most 63).
    hold, hi = queue.cc.hold_rounds, queue.cc.inflight_hi
    assert 1 <= hold <= 63
    for _ in range(hold):
        queue.round(20e6, 0.05)
        assert queue.cc.inflight_hi == hi
    queue.round(20e6, 0.05)
    assert queue.cc.inflight_hi in (pytest.approx(1.25 * hi), float("inf"))
    # The same loss with the RTT at its minimum (no queue to overflow): random loss, no cut.
    clean = _cruising()
    clean.round(20e6, 0.05, acks=96, lost=4)
    clean.round(20e6, 0.05)
    assert clean.cc.inflight_hi == float("inf")
    assert clean.cc.bw_lo == float("inf")


def test_bbr_on_a_lossy_path_a_queue_must_lose_three_times_the_random_loss() -> None:
    d = _cruising()
    for _ in range(30):
        d.round(20e6, 0.05, acks=95, lost=5)  # 5% random loss, no queue
    assert d.cc.random_loss == pytest.approx(0.05, abs=0.005)
    assert d.cc.inflight_hi == float("inf")
    # Our own probing shows a queue now and then; 11% lost then (declared losses bunch up) is
    # not congestion...
    d.round(20e6, 0.05 * QUEUE_RTT_FACTOR * 1.2, acks=89, lost=11)
    d.round(20e6, 0.05)
    assert d.cc.inflight_hi == float("inf")
    assert d.cc.bw_lo == float("inf")
    # ...but well over three times the path's random loss while queueing is.
    d.round(20e6, 0.05 * QUEUE_RTT_FACTOR * 1.2, acks=80, lost=20)
    d.round(20e6, 0.05)
    assert d.cc.inflight_hi != float("inf")


def test_bbr_keeps_yielding_when_congestion_loses_in_every_round() -> None:
    # A queue that stays full and loses 6% of every round (many loss-based flows): that loss must
    # not become the "random" loss the threshold is measured against, or ours would stop yielding.
    d = _cruising()
    for _ in range(40):
        d.round(20e6, 0.05 * QUEUE_RTT_FACTOR * 1.2, acks=94, lost=6)
    assert d.cc.random_loss == 0.0
    assert d.cc.congestion_rounds >= 10
    assert d.cc.inflight_hi != float("inf")


def test_bbr_persistent_congestion_forgets_the_path_it_learned() -> None:
    d = _cruising()
    for _ in range(20):
        d.round(20e6, 0.05, acks=95, lost=5)
    d.round(20e6, 0.05 * QUEUE_RTT_FACTOR * 1.2, acks=70, lost=30)
    d.round(20e6, 0.05)
    assert d.cc.random_loss > 0
    assert d.cc.hold_rounds > 0
    d.cc.on_persistent_congestion(d.now)
    assert d.cc.random_loss == 0.0
    assert d.cc.hold_rounds == 0
    assert d.cc.state == "startup"
