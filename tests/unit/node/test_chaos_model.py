"""Tests for the pure impairment model in cellmesh.node.chaos."""

from __future__ import annotations

import itertools
import random

import pytest

from cellmesh.errors import ConfigError
from cellmesh.node.chaos import (
    DROP_LOSS,
    DROP_QUEUE,
    BurstLoss,
    ChaosModel,
    Decision,
    Impairment,
)

N = 20_000


def _run(
    imp: Impairment, seed: int = 1, n: int = N, gap: float = 0.001, size: int = 1000
) -> list[Decision]:
    model = ChaosModel.seeded(imp, seed)
    return [model.decide(i * gap, size) for i in range(n)]


def _delivered(decisions: list[Decision]) -> list[tuple[float, int]]:
    """(delivery time, send index) of every copy, sorted by delivery time (stable)."""
    out = [(t, i) for i, d in enumerate(decisions) for t in d.times]
    return sorted(out, key=lambda x: x[0])


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"loss": 1.5}, "loss"),
        ({"loss": -0.1}, "loss"),
        ({"duplicate": 2.0}, "duplicate"),
        ({"reorder": -1.0}, "reorder"),
        ({"delay": -0.001}, "delay"),
        ({"delay": float("nan")}, "delay"),
        ({"jitter": 61.0}, "jitter"),
        ({"reorder_gap": float("inf")}, "reorder_gap"),
        ({"rate": 0.0}, "rate"),
        ({"rate": float("inf")}, "rate"),
        ({"queue_bytes": 0}, "queue_bytes"),
    ],
)
def test_invalid_impairment_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Impairment(**kwargs)  # type: ignore[arg-type]


def test_burst_loss_validation_and_average() -> None:
    with pytest.raises(ConfigError, match="p_good_to_bad"):
        BurstLoss(1.2, 0.5)
    with pytest.raises(ConfigError, match="burst length"):
        BurstLoss.from_average(0.05, 0.5)
    b = BurstLoss.from_average(0.05, 4.0)
    assert b.p_bad_to_good == pytest.approx(0.25)
    assert b.average_loss == pytest.approx(0.05)
    assert BurstLoss.from_average(1.0, 3.0).average_loss == 1.0


def test_describe() -> None:
    assert Impairment().describe() == "none"
    text = Impairment(loss=0.05, delay=0.01, rate=1e6).describe()
    assert "loss 5%" in text
    assert "delay 10 ms" in text
    assert "rate 1 MB/s" in text


# --- transparency and determinism ------------------------------------------------------------


def test_zero_impairment_passes_everything_unchanged_in_order() -> None:
    rng = random.Random(7)
    state = rng.getstate()
    model = ChaosModel(Impairment(), rng)
    times = [0.0, 0.0, 0.5, 0.5, 1.25, 3.0]
    decisions = [model.decide(t, 100 + i) for i, t in enumerate(times)]
    assert [d.times for d in decisions] == [(t,) for t in times]
    assert all(d.dropped is None and not d.duplicated and not d.reordered for d in decisions)
    assert rng.getstate() == state  # no randomness consumed


def test_same_seed_same_decisions_different_seed_different() -> None:
    imp = Impairment(loss=0.1, delay=0.01, jitter=0.003, duplicate=0.05, reorder=0.05, rate=2e6)
    a = _run(imp, seed=42, n=3000)
    b = _run(imp, seed=42, n=3000)
    c = _run(imp, seed=43, n=3000)
    assert a == b
    assert a != c


# --- loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.5])
def test_loss_rate_within_tolerance(p: float) -> None:
    decisions = _run(Impairment(loss=p), seed=int(p * 1000))
    lost = sum(d is DROP_LOSS for d in decisions)
    sigma = (N * p * (1 - p)) ** 0.5
    assert abs(lost - N * p) < 5 * sigma
    assert all(d.times == (i * 0.001,) for i, d in enumerate(decisions) if d is not DROP_LOSS)


def test_total_loss_drops_everything() -> None:
    assert all(d is DROP_LOSS for d in _run(Impairment(loss=1.0), n=500))


def test_burst_loss_average_and_burstiness() -> None:
    b = BurstLoss.from_average(0.05, 5.0)
    decisions = _run(Impairment(burst_loss=b), seed=3, n=40_000)
    lost = [d is DROP_LOSS for d in decisions]
    rate = sum(lost) / len(lost)
    assert 0.03 < rate < 0.07
    runs: list[int] = []
    current = 0
    for x in lost:
        if x:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    mean_run = sum(runs) / len(runs)
    assert 3.5 < mean_run < 6.5  # independent 5% loss would give runs of about 1.05


# --- delay, jitter, reordering, duplication --------------------------------------------------


def test_constant_delay() -> None:
    for i, d in enumerate(_run(Impairment(delay=0.02), n=1000)):
        assert d.times == pytest.approx((i * 0.001 + 0.02,))


def test_jitter_bounds_and_order() -> None:
    delay, jitter = 0.010, 0.004
    decisions = _run(Impairment(delay=delay, jitter=jitter), n=5000)
    extras = [d.times[0] - i * 0.001 for i, d in enumerate(decisions)]
    assert min(extras) >= delay - jitter - 1e-12
    # keep_order may push a packet later than its own draw, but never past the previous one's max
    assert max(extras) <= delay + jitter + 1e-12
    assert max(extras) - min(extras) > jitter  # the spread is really used
    times = [d.times[0] for d in decisions]
    assert times == sorted(times)  # jitter alone does not reorder by default


def test_jitter_without_keep_order_reorders_and_never_goes_negative() -> None:
    decisions = _run(Impairment(delay=0.001, jitter=0.004, keep_order=False), n=5000)
    times = [d.times[0] for d in decisions]
    assert times != sorted(times)
    assert all(d.times[0] >= i * 0.001 for i, d in enumerate(decisions))


def test_reorder_causes_overtaking() -> None:
    imp = Impairment(delay=0.01, reorder=0.1, reorder_gap=0.005)
    decisions = _run(imp, n=5000)
    reordered = [i for i, d in enumerate(decisions) if d.reordered]
    assert 350 < len(reordered) < 650
    for i in reordered:
        assert decisions[i].times[0] == pytest.approx(i * 0.001 + 0.015)
    order = [i for _, i in _delivered(decisions)]
    position = {i: k for k, i in enumerate(order)}
    for i in reordered:
        if i + 1 < len(decisions) and not decisions[i + 1].reordered:
            # 1 ms spacing, 5 ms gap: the next packet (if not held back itself) overtakes it
            assert position[i + 1] < position[i]
    # packets that were not held back stay in order among themselves
    normal = [i for i in order if not decisions[i].reordered]
    assert normal == sorted(normal)


def test_duplication() -> None:
    decisions = _run(Impairment(duplicate=0.1, delay=0.002), n=N)
    dups = [d for d in decisions if d.duplicated]
    assert abs(len(dups) - 2000) < 5 * (N * 0.1 * 0.9) ** 0.5
    assert all(len(d.times) == 2 and d.times[0] == d.times[1] for d in dups)
    assert all(len(d.times) == 1 for d in decisions if not d.duplicated)


def test_duplicate_with_jitter_second_copy_after_first() -> None:
    decisions = _run(Impairment(duplicate=0.5, jitter=0.002, delay=0.005), n=2000)
    for d in decisions:
        if d.duplicated:
            assert d.times[0] <= d.times[1] <= d.times[0] + 0.002


# --- rate limit ------------------------------------------------------------------------------


def test_rate_limit_serialises_and_tail_drops() -> None:
    rate, size = 100_000.0, 1000  # 10 ms per packet
    model = ChaosModel.seeded(Impairment(rate=rate, queue_bytes=5000), 1)
    decisions = [model.decide(0.0, size) for _ in range(10)]  # a burst of 10 at once
    ok = [d for d in decisions if d.dropped is None]
    assert len(ok) == 5  # queue holds 5000 bytes including the one being sent
    assert [d.times[0] for d in ok] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert decisions[5:] == [DROP_QUEUE] * 5
    assert model.queued_bytes(0.0) == pytest.approx(5000)
    assert model.queued_bytes(0.025) == pytest.approx(2500)
    # once the queue has drained, packets pass again
    later = model.decide(0.05, size)
    assert later.times == pytest.approx((0.06,))
    assert model.queued_bytes(1.0) == 0.0


@pytest.mark.parametrize("now", [0.0, 1911.0684952, 123456.789, 7.1])
def test_rate_limit_exact_fit_is_not_lost_to_rounding(now: float) -> None:
    model = ChaosModel.seeded(Impairment(rate=100_000.0, queue_bytes=10_000), 0)
    decisions = [model.decide(now, 1000) for _ in range(11)]
    assert [d.dropped for d in decisions] == [None] * 10 + ["queue"]


def test_rate_limit_long_run_throughput() -> None:
    rate = 1_000_000.0
    # offer 2 MB/s for 2 s: half must be dropped, and deliveries never exceed the rate
    decisions = _run(Impairment(rate=rate, queue_bytes=50_000), n=4000, gap=0.0005, size=1000)
    passed = [d for d in decisions if d.dropped is None]
    assert abs(len(passed) - 2050) < 60
    times = [d.times[0] for d in passed]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.001 - 1e-9


def test_rate_limit_then_delay() -> None:
    model = ChaosModel.seeded(Impairment(rate=1e6, delay=0.02), 0)
    assert model.decide(1.0, 10_000).times == pytest.approx((1.0 + 0.01 + 0.02,))


def test_reconfigure_keeps_stream() -> None:
    model = ChaosModel.seeded(Impairment(loss=0.5), 9)
    first = [model.decide(i, 10) for i in range(10)]
    model.impairment = Impairment()
    assert all(model.decide(10 + i, 10).times == (10 + i,) for i in range(10))
    model.impairment = Impairment(loss=1.0)
    assert model.decide(30, 10) is DROP_LOSS
    assert any(d is DROP_LOSS for d in first)
