"""Sequence-number arithmetic, the feasibility condition and the link cost formula."""

from __future__ import annotations

import math

import pytest

from cellmesh.routing.metric import (
    INFINITY,
    MAX_RTT,
    add_metric,
    feasible,
    link_cost,
    seqno_add,
    seqno_newer,
    seqno_not_older,
)
from cellmesh.routing.settings import RoutingSettings

S = RoutingSettings()


def cost(rtt: float | None, loss: float = 0.0, **kw: float) -> int:
    args: dict[str, float] = {
        "hop_cost": S.hop_cost,
        "default_rtt": S.default_rtt,
        "max_link_cost": S.max_link_cost,
        "max_loss": S.max_loss,
    }
    args.update(kw)
    return link_cost(
        rtt,
        loss,
        hop_cost=int(args["hop_cost"]),
        default_rtt=args["default_rtt"],
        max_link_cost=int(args["max_link_cost"]),
        max_loss=args["max_loss"],
    )


@pytest.mark.parametrize(
    ("a", "b", "newer"),
    [
        (1, 0, True),
        (0, 1, False),
        (5, 5, False),
        (0, 0xFFFF, True),  # wraps: 0 comes right after 65535
        (0xFFFF, 0, False),
        (0x7FFF, 0, True),  # the far edge of "newer"
        (0x8000, 0, False),  # exactly half the circle apart: neither is newer
        (0, 0x8000, False),
        (100, 0xFF00, True),
    ],
)
def test_seqno_comparison_wraps_around(a: int, b: int, newer: bool) -> None:
    assert seqno_newer(a, b) is newer
    assert seqno_not_older(a, b) is (newer or a == b)


def test_seqno_add_wraps() -> None:
    assert seqno_add(0xFFFF, 1) == 0
    assert seqno_add(0xFFFE, 3) == 1
    assert seqno_newer(seqno_add(0xFFFF, 1), 0xFFFF)


def test_feasibility_condition() -> None:
    # No feasibility distance yet: anything goes.
    assert feasible(7, 500, None, INFINITY)
    # Same seqno: strictly smaller metric only.
    assert feasible(7, 99, 7, 100)
    assert not feasible(7, 100, 7, 100)
    assert not feasible(7, 101, 7, 100)
    # A newer seqno is feasible whatever its metric; an older one never.
    assert feasible(8, 60000, 7, 100)
    assert not feasible(6, 1, 7, 100)
    # Across the wrap.
    assert feasible(0, 5000, 0xFFFF, 10)
    assert not feasible(0xFFFF, 1, 0, 10)
    # Retractions are always feasible (they only remove routes).
    assert feasible(6, INFINITY, 7, 100)


def test_add_metric_saturates_at_infinity() -> None:
    assert add_metric(100, 20) == 120
    assert add_metric(INFINITY - 5, 5) == INFINITY
    assert add_metric(INFINITY - 5, 4000) == INFINITY
    assert add_metric(INFINITY, 1) == INFINITY


def test_link_cost_is_etx_weighted_rtt_plus_hop_cost() -> None:
    # cost = ceil((hop_cost + 1000 * rtt) / (1 - loss))
    assert cost(0.020) == 10 + 20
    assert cost(0.020, 0.5) == 60
    assert cost(0.0201) == math.ceil(10 + 20.1)
    assert cost(0.0) == 10
    assert cost(0.0, hop_cost=0) == 1  # never below 1: every hop costs something
    assert cost(None) == 10 + 50  # default_rtt
    assert cost(1000.0) == min(S.max_link_cost, math.ceil(10 + 1000 * MAX_RTT))  # clamped


def test_link_cost_bounds() -> None:
    assert cost(2.0, 0.8) == S.max_link_cost  # saturates, still usable
    assert cost(0.01, 0.9) == INFINITY  # at max_loss: unusable
    assert cost(0.01, 1.0) == INFINITY
    for bad_rtt in (-0.001, math.nan):
        with pytest.raises(ValueError, match="rtt"):
            cost(bad_rtt)
    for bad_loss in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="loss"):
            cost(0.01, bad_loss)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"update_interval": 0.0},
        {"update_interval": 7000.0},
        {"hold_factor": 1.0},
        {"triggered_delay": 30.0},
        {"max_hops": 0},
        {"max_hops": 256},
        {"max_link_cost": INFINITY},
        {"max_loss": 0.0},
        {"max_message_size": 40},
        {"max_routes": 0},
        {"request_retries": 0},
        {"update_jitter": 0.95},
    ],
)
def test_settings_reject_out_of_range_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        RoutingSettings(**kwargs)  # type: ignore[arg-type]


def test_default_settings_are_consistent() -> None:
    assert S.hold_time == pytest.approx(105.0)
    assert S.source_gc == 300.0
    # Long intervals (the node accepts up to an hour) raise the source GC time, never refuse.
    slow = RoutingSettings(update_interval=3600.0)
    assert slow.source_gc == pytest.approx(2 * 3.5 * 3600.0)
