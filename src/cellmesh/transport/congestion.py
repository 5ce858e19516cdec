"""Congestion control: a small interface, a BBR-like model-based controller and NewReno.

Theory of operation. The connection asks the controller two things before sending: may another
packet go out (`bytes_in_flight < cwnd`), and how fast (`pacing_rate`). It reports every packet
sent, every packet acknowledged with a delivery-rate sample, and every congestion event (loss).

`BbrLite` (the default) models the path instead of reacting to each loss: it estimates the bottleneck
bandwidth (a windowed maximum of delivery-rate samples over the last 10 round trips) and the minimum
RTT, paces at that bandwidth, and keeps about two bandwidth-delay products in flight. Random loss on a
lossy radio link therefore does not halve the rate the way loss-based TCP does. Under real congestion
the delivery rate falls, the bandwidth filter forgets its old maximum within ten rounds, and when a
round loses more than `LOSS_THRESHOLD` of its packets the in-flight ceiling is cut, so it yields to
competing flows. It is deliberately simpler than BBRv2 (no PROBE_RTT phase; the min-RTT filter expires
after 10 s instead).

`NewReno` (RFC 9002 section 7) is the classic loss-based controller, for comparison and for paths
where a conservative sender is wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cellmesh.transport.rtt import RttEstimator

INITIAL_WINDOW_PACKETS = 10
MIN_WINDOW_PACKETS = 4
# BBR's cwnd also covers acknowledgement aggregation (delayed and batched ACKs, an event loop that
# drains a socket in bursts). On sub-millisecond paths the bandwidth-delay product is a few packets,
# which would leave the sender idle between batches; this floor keeps a batch in flight.
AGGREGATION_FLOOR = 128 * 1024
# ACK aggregation (Linux BBR's `extra_acked`): when acknowledgements arrive in bursts (a receiver
# that drains its socket in batches, an event loop, delayed ACKs), more is acknowledged in a burst
# than the bandwidth estimate explains, and a window of just 2 x BDP would leave the sender idle
# until the next burst. The largest such excess seen over the last EXTRA_ACKED_ROUNDS rounds is
# added to the window, capped at EXTRA_ACKED_MAX_TIME of bandwidth and at the window itself.
EXTRA_ACKED_ROUNDS = 10
EXTRA_ACKED_MAX_TIME = 0.1
EPOCH_RESET_BYTES = 1 << 30  # an aggregation epoch this long is restarted (a counter bound)
LOSS_THRESHOLD = 0.15
QUEUED_LOSS_THRESHOLD = 0.02
HOLD_ROUNDS_MAX = 63
RANDOM_LOSS_ROUNDS = 16  # the random-loss estimate is the median over this many rounds
# A queued round counts as congestion when it loses this many times the path's random loss.
# Losses are counted when declared, so one round's count can be twice another's by chance
# alone (57 of 516 packets against a 5.2% median was seen on the lossy bench path).
RANDOM_LOSS_MARGIN = 3.0
# Evidence needed before a lossy round counts as congestion: with few packets per round, random
# loss alone often crosses the ratio (5% loss, 13 packets: two lost is 15.4%, about one round in
# seven), and one such round at the very start used to end startup at a few hundred KB/s, from
# where probing up takes seconds. A round needs LOSS_MIN_PACKETS lost to cut the ceilings, and
# STARTUP_LOSS_PACKETS (BBRv2's full_loss_cnt) to end startup.
LOSS_MIN_PACKETS = 3
STARTUP_LOSS_PACKETS = 8
QUEUE_RTT_FACTOR = 1.25  # a round whose RTT exceeds min_rtt by this factor is queueing
BW_WINDOW_ROUNDS = 10
MIN_RTT_EXPIRY = 10.0
STARTUP_GAIN = 2.885
PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@dataclass(slots=True)
class RateSample:
    """A delivery-rate sample taken when a packet is acknowledged (draft-cheng-iccrg-delivery-rate)."""

    delivery_rate: float  # bytes per second
    delivered: int  # total bytes delivered at the time of the ack
    prior_delivered: int  # total delivered when the acked packet was sent
    app_limited: bool
    rtt: float


class CongestionController(Protocol):
    """What the connection needs from a congestion controller."""

    name: str
    cwnd: int
    mss: int

    def pacing_rate(self, rtt: RttEstimator) -> float:
        """Bytes per second the sender should pace at."""

    def on_sent(self, size: int, now: float) -> None:
        """A packet of `size` bytes left."""

    def on_acked(
        self,
        size: int,
        sent_time: float,
        sample: RateSample | None,
        now: float,
        in_flight: int,
        packets: int = 1,
    ) -> None:
        """An acknowledgement covered `packets` packets of `size` bytes in all, the newest sent
        at `sent_time`; `sample` is the delivery rate its newest packet measured; `in_flight`
        bytes remain."""

    def on_lost(self, size: int, sent_time: float, now: float) -> None:
        """A packet was declared lost."""

    def on_persistent_congestion(self, now: float) -> None:
        """Nothing got through for several probe timeouts: forget what we knew of the path."""


class NewReno:
    """RFC 9002 NewReno: slow start, additive increase, halve on a congestion event."""

    name = "reno"

    def __init__(self, mss: int) -> None:
        self.mss = mss
        self.cwnd = INITIAL_WINDOW_PACKETS * mss
        self.ssthresh = float("inf")
        self._recovery_start = -1.0
        self._acked_in_ca = 0

    def pacing_rate(self, rtt: RttEstimator) -> float:
        return 1.25 * self.cwnd / max(rtt.smoothed, 1e-4)

    def on_sent(self, size: int, now: float) -> None:
        return

    def on_acked(
        self,
        size: int,
        sent_time: float,
        sample: RateSample | None,
        now: float,
        in_flight: int,
        packets: int = 1,
    ) -> None:
        # (RFC 9002 skips each packet sent before recovery began; an acknowledgement whose
        # newest packet was sent after it counts whole, a difference of one ACK per episode.)
        if sent_time <= self._recovery_start:
            return
        if self.cwnd < self.ssthresh:
            self.cwnd += size
        else:
            self._acked_in_ca += size
            if self._acked_in_ca >= self.cwnd:
                self._acked_in_ca -= self.cwnd
                self.cwnd += self.mss

    def on_lost(self, size: int, sent_time: float, now: float) -> None:
        if sent_time <= self._recovery_start:
            return  # one reduction per congestion event
        self._recovery_start = now
        self.cwnd = max(self.cwnd // 2, MIN_WINDOW_PACKETS * self.mss)
        self.ssthresh = self.cwnd

    def on_persistent_congestion(self, now: float) -> None:
        # RFC 9002 section 7.6.2: collapse to the minimum window.
        self._recovery_start = now
        self.cwnd = MIN_WINDOW_PACKETS * self.mss


class _RoundMax:
    """The largest value seen over the last `rounds` rounds: one (round, max) entry per round,
    updated in O(1) per sample (the full maximum is recomputed only when an old round expires)."""

    __slots__ = ("_rounds", "_samples", "value")

    def __init__(self, rounds: int) -> None:
        self._rounds = rounds
        self._samples: list[tuple[int, float]] = []
        self.value = 0.0

    def update(self, rnd: int, v: float) -> None:
        s = self._samples
        if s and s[-1][0] == rnd:
            if v > s[-1][1]:
                s[-1] = (rnd, v)
        else:
            s.append((rnd, v))
        if v > self.value:
            self.value = v
        floor = rnd - self._rounds
        if s[0][0] <= floor:
            while s and s[0][0] <= floor:
                s.pop(0)
            self.value = max(x for _, x in s) if s else 0.0

    def clear(self) -> None:
        self._samples.clear()
        self.value = 0.0


class BbrLite:
    """A model-based controller in the spirit of BBR. See the module docstring."""

    name = "bbr"

    def __init__(self, mss: int) -> None:
        self.mss = mss
        self.cwnd = INITIAL_WINDOW_PACKETS * mss
        self.state = "startup"
        self._bw_filter = _RoundMax(BW_WINDOW_ROUNDS)  # delivery rates, max per round
        self.btl_bw = 0.0
        self.min_rtt = float("inf")
        self._min_rtt_stamp = 0.0
        self.round = 0
        self._next_round_delivered = 0
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._cycle_index = 0
        self._cycle_stamp = 0.0
        self._round_lost = 0
        self._round_acked = 0
        self.inflight_hi = float("inf")
        self.bw_lo = float("inf")  # lowered on lossy rounds so the pacing rate yields too
        self.hold_rounds = 0  # clean rounds to wait after a cut before probing up again
        self.random_loss = 0.0  # the loss the path shows anyway (see _end_round)
        self.congestion_rounds = 0  # rounds taken as congestion (the ceilings were cut)
        self._round_losses: list[float] = []  # loss ratio of the last RANDOM_LOSS_ROUNDS rounds
        self._delivered = 0
        self._round_max_rtt = 0.0  # the largest RTT sample this round (a queue shows there)
        self._epoch_start = -1.0  # the current ACK-aggregation epoch (-1: none yet)
        self._epoch_acked = 0
        self._extra_filter = _RoundMax(EXTRA_ACKED_ROUNDS)  # ACK-aggregation excess per round
        self.extra_acked = 0.0

    # --- model

    def _bw(self) -> float:
        return min(self.btl_bw, self.bw_lo)

    def _bdp(self) -> float:
        if self.btl_bw <= 0 or self.min_rtt == float("inf"):
            return float(INITIAL_WINDOW_PACKETS * self.mss)
        return self._bw() * self.min_rtt

    def _gains(self) -> tuple[float, float]:
        if self.state == "startup":
            return STARTUP_GAIN, STARTUP_GAIN
        if self.state == "drain":
            return 1 / STARTUP_GAIN, STARTUP_GAIN
        return PROBE_GAINS[self._cycle_index], 2.0

    def pacing_rate(self, rtt: RttEstimator) -> float:
        gain, _ = self._gains()
        if self.btl_bw <= 0:
            return gain * self.cwnd / max(rtt.smoothed, 1e-4)
        return gain * self._bw()

    def on_sent(self, size: int, now: float) -> None:
        return

    def on_acked(
        self,
        size: int,
        sent_time: float,
        sample: RateSample | None,
        now: float,
        in_flight: int,
        packets: int = 1,
    ) -> None:
        self._delivered += size
        self._round_acked += packets  # (packets, to weigh against packets lost in the round)
        if sample is None:
            return
        if sample.prior_delivered >= self._next_round_delivered:
            self._end_round(sample.delivered)
        if sample.rtt > self._round_max_rtt:
            self._round_max_rtt = sample.rtt
        if sample.rtt > 0 and (
            sample.rtt <= self.min_rtt or now - self._min_rtt_stamp > MIN_RTT_EXPIRY
        ):
            self.min_rtt = sample.rtt
            self._min_rtt_stamp = now
        if not sample.app_limited or sample.delivery_rate > self.btl_bw:
            # Windowed max over the last BW_WINDOW_ROUNDS rounds.
            self._bw_filter.update(self.round, sample.delivery_rate)
            self.btl_bw = self._bw_filter.value
        self._update_ack_aggregation(size, now)
        self._advance_state(now, in_flight)
        _, cwnd_gain = self._gains()
        target = max(
            cwnd_gain * self._bdp() + self.extra_acked,
            MIN_WINDOW_PACKETS * self.mss,
            AGGREGATION_FLOOR,
        )
        self.cwnd = int(min(target, self.inflight_hi))
        self.cwnd = max(self.cwnd, MIN_WINDOW_PACKETS * self.mss)

    def _update_ack_aggregation(self, size: int, now: float) -> None:
        """Track how much more was acknowledged in the current burst than the bandwidth
        estimate explains (see EXTRA_ACKED_ROUNDS)."""
        bw = self._bw()
        if bw <= 0 or bw == float("inf"):
            return
        expected = bw * (now - self._epoch_start)
        if (
            self._epoch_start < 0
            or self._epoch_acked <= expected
            or self._epoch_acked + size > EPOCH_RESET_BYTES
        ):
            # Acknowledgements are keeping pace with the bandwidth: a new epoch starts here.
            self._epoch_start = now
            self._epoch_acked = 0
            expected = 0.0
        self._epoch_acked += size
        extra = min(self._epoch_acked - expected, float(self.cwnd), bw * EXTRA_ACKED_MAX_TIME)
        self._extra_filter.update(self.round, extra)
        self.extra_acked = self._extra_filter.value

    def _end_round(self, delivered: int) -> None:
        self.round += 1
        self._next_round_delivered = delivered
        total = self._round_lost + self._round_acked
        lost = self._round_lost
        queued = self._round_max_rtt > QUEUE_RTT_FACTOR * self.min_rtt
        # A round that loses clearly more than the path loses anyway is congestion: out of
        # startup and with a queue showing, more than 2% (BBRv2's threshold); without a queue
        # (or in startup, which fills one by design) more than 15%; and on a lossy path, in
        # either case, more than three times its random loss (10% random loss used to cut the
        # rate every few rounds).
        floor = QUEUED_LOSS_THRESHOLD if queued and self.state != "startup" else LOSS_THRESHOLD
        threshold = max(floor, RANDOM_LOSS_MARGIN * self.random_loss)
        congested = (
            self.btl_bw > 0  # a round before any bandwidth sample (e.g. data sent ahead of a
            # handshake message that was lost) says nothing about the path's capacity
            and total >= 8
            and lost >= LOSS_MIN_PACKETS
            and lost / total > threshold
        )
        if total >= 8 and not (congested and queued) and self.state != "startup":
            # What the path loses anyway (random loss, a radio link): the median loss of recent
            # rounds. Congestion loses in bursts, when a queue overflows, and leaves most
            # rounds clean; random loss takes its share of every round. Rounds that lost too
            # much while a queue showed (and startup's, which overshoots by design) are left
            # out, so loss that persists under congestion never becomes the norm the threshold
            # is measured against; heavy loss without a queue is the link's own and counts.
            recent = self._round_losses
            recent.append(lost / total)
            if len(recent) > RANDOM_LOSS_ROUNDS:
                del recent[0]
            # (Trusted once half the rounds are in: a few rounds say little.)
            if len(recent) >= RANDOM_LOSS_ROUNDS // 2:
                self.random_loss = sorted(recent)[(len(recent) - 1) // 2]
        if congested:
            # Real congestion (BBRv2 style): cap what we keep in flight and the rate we pace at,
            # so a flow that filled a shallow queue yields to the others; and leave startup once
            # the evidence is strong. In startup, losses count only while a queue shows (the
            # round's RTT grew): random loss on a clean path would otherwise cap the rate at
            # what a few rounds measured (0.5 MB/s on a 5% lossy path), to grow 10% a round.
            if self.state != "startup" or queued or lost >= STARTUP_LOSS_PACKETS:
                self.congestion_rounds += 1
                self.inflight_hi = max(0.7 * self.cwnd, MIN_WINDOW_PACKETS * self.mss)
                self.bw_lo = max(0.85 * self._bw(), 1.0)
                if self.state != "startup" and len(self._round_losses) >= RANDOM_LOSS_ROUNDS // 2:
                    # Probe back up only after about as many rounds as a loss-based flow takes
                    # to regrow its window (one packet a round), as BBRv2 does to coexist with
                    # Reno and CUBIC: probing again at once would take back what they yielded.
                    # Not for startup's own overshoot (nobody else was squeezed by it yet), nor
                    # before the path's random loss is known (it may be all this loss was).
                    self.hold_rounds = min(max(int(self.cwnd / self.mss) // 2, 1), HOLD_ROUNDS_MAX)
            if self.state == "startup" and lost >= STARTUP_LOSS_PACKETS:
                self.state = "drain"
        elif self.hold_rounds > 0:
            self.hold_rounds -= 1  # a clean round, but too soon after a cut to probe up
        else:
            # A clean round: probe back up multiplicatively, and drop the caps once past them.
            if self.inflight_hi != float("inf"):
                self.inflight_hi *= 1.25
                if self.inflight_hi > 4 * self._bdp() + AGGREGATION_FLOOR:
                    self.inflight_hi = float("inf")
            if self.bw_lo != float("inf"):
                self.bw_lo *= 1.1
                if self.bw_lo >= self.btl_bw:
                    self.bw_lo = float("inf")
        self._round_lost = 0
        self._round_acked = 0
        self._round_max_rtt = 0.0
        if self.state == "startup":
            if self.btl_bw >= self._full_bw * 1.25:
                self._full_bw = self.btl_bw
                self._full_bw_rounds = 0
            else:
                self._full_bw_rounds += 1
                if self._full_bw_rounds >= 3:
                    self.state = "drain"

    def _advance_state(self, now: float, in_flight: int) -> None:
        if self.state == "drain" and in_flight <= self._bdp():
            # The queue startup built is gone: cruise.
            self.state = "probe_bw"
            self._cycle_stamp = now
            self._cycle_index = 2
        elif (
            self.state == "probe_bw"
            and self.min_rtt != float("inf")
            and now - self._cycle_stamp >= self.min_rtt
        ):
            self._cycle_stamp = now
            self._cycle_index = (self._cycle_index + 1) % len(PROBE_GAINS)

    def on_lost(self, size: int, sent_time: float, now: float) -> None:
        self._round_lost += 1

    def on_persistent_congestion(self, now: float) -> None:
        # The path went away: whatever we measured is stale. Start over, conservatively.
        self.state = "startup"
        self._bw_filter.clear()
        self.btl_bw = 0.0
        self.bw_lo = float("inf")
        self.inflight_hi = float("inf")
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self.min_rtt = float("inf")
        self._extra_filter.clear()
        self.extra_acked = 0.0
        self.hold_rounds = 0
        self._round_losses.clear()
        self.random_loss = 0.0
        self._epoch_start = -1.0
        self._epoch_acked = 0
        self.cwnd = INITIAL_WINDOW_PACKETS * self.mss


def make_controller(name: str, mss: int) -> CongestionController:
    """The controller called `name` ("bbr" or "reno")."""
    if name == "reno":
        return NewReno(mss)
    if name == "bbr":
        return BbrLite(mss)
    raise ValueError(f"unknown congestion controller {name!r} (use bbr or reno)")
