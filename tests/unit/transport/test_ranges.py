"""Unit tests for `cellmesh.transport.ranges.RangeSet`: sorted, merged, bounded half-open ranges."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.transport.ranges import RangeSet


def make(*ranges: tuple[int, int], limit: int = 1024) -> RangeSet:
    rs = RangeSet(limit=limit)
    for a, b in ranges:
        rs.add(a, b)
    return rs


def test_empty() -> None:
    rs = RangeSet()
    assert not rs
    assert len(rs) == 0
    assert rs.ranges() == []
    assert rs.descending(10) == []
    assert rs.lowest is None
    assert rs.highest_end is None
    assert 0 not in rs
    assert rs.first_gap_from(5) == 5


@pytest.mark.parametrize(("start", "end"), [(5, 5), (5, 4), (0, -1)])
def test_empty_or_inverted_range_is_ignored(start: int, end: int) -> None:
    rs = RangeSet()
    rs.add(start, end)
    assert not rs
    assert rs.ranges() == []


def test_single_range_is_half_open() -> None:
    rs = make((10, 20))
    assert rs.ranges() == [(10, 20)]
    assert 9 not in rs
    assert 10 in rs
    assert 19 in rs
    assert 20 not in rs
    assert rs.lowest == 10
    assert rs.highest_end == 20
    assert bool(rs)


def test_disjoint_ranges_stay_sorted_whatever_the_insertion_order() -> None:
    rs = make((50, 60), (10, 20), (30, 40), (0, 5))
    assert rs.ranges() == [(0, 5), (10, 20), (30, 40), (50, 60)]
    assert len(rs) == 4


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        # adjacent ranges merge (half-open: [0,10) + [10,20) = [0,20))
        ([(0, 10), (10, 20)], [(0, 20)]),
        ([(10, 20), (0, 10)], [(0, 20)]),
        # overlap on either side
        ([(0, 10), (5, 15)], [(0, 15)]),
        ([(5, 15), (0, 10)], [(0, 15)]),
        # contained and containing
        ([(0, 100), (10, 20)], [(0, 100)]),
        ([(10, 20), (0, 100)], [(0, 100)]),
        # bridging several ranges at once
        ([(0, 2), (4, 6), (8, 10), (12, 14), (1, 13)], [(0, 14)]),
        # filling a gap exactly
        ([(0, 5), (10, 15), (5, 10)], [(0, 15)]),
        # one short of adjacent stays separate
        ([(0, 5), (6, 10)], [(0, 5), (6, 10)]),
        # the in-order fast path: extending the top range, appending after it
        ([(0, 1), (1, 2), (2, 3), (5, 6)], [(0, 3), (5, 6)]),
        # starting inside the top range without extending it
        ([(0, 10), (3, 7)], [(0, 10)]),
        # duplicate
        ([(3, 7), (3, 7)], [(3, 7)]),
    ],
)
def test_add_merges(ranges: list[tuple[int, int]], expected: list[tuple[int, int]]) -> None:
    assert make(*ranges).ranges() == expected


def test_contains_at_every_boundary() -> None:
    rs = make((0, 3), (5, 8), (10, 11))
    inside = {0, 1, 2, 5, 6, 7, 10}
    for x in range(-2, 14):
        assert (x in rs) == (x in inside), x


def test_descending_returns_the_highest_ranges_highest_first() -> None:
    rs = make((0, 1), (2, 3), (4, 5), (6, 7))
    assert rs.descending(10) == [(6, 7), (4, 5), (2, 3), (0, 1)]
    assert rs.descending(4) == [(6, 7), (4, 5), (2, 3), (0, 1)]
    assert rs.descending(2) == [(6, 7), (4, 5)]
    assert rs.descending(1) == [(6, 7)]
    assert rs.descending(0) == []


@pytest.mark.parametrize(
    ("x", "expected"),
    [(0, 5), (3, 5), (5, 5), (6, 6), (10, 20), (15, 20), (20, 20), (25, 25), (-3, -3)],
)
def test_first_gap_from(x: int, expected: int) -> None:
    rs = make((0, 5), (10, 20))
    assert rs.first_gap_from(x) == expected


def test_remove_below() -> None:
    rs = make((0, 5), (10, 20), (30, 40))
    rs.remove_below(3)
    assert rs.ranges() == [(3, 5), (10, 20), (30, 40)]
    rs.remove_below(5)  # the whole first range goes
    assert rs.ranges() == [(10, 20), (30, 40)]
    rs.remove_below(25)  # below a gap: the range under it goes, the next is untouched
    assert rs.ranges() == [(30, 40)]
    rs.remove_below(10)  # lower than what is left: nothing changes
    assert rs.ranges() == [(30, 40)]
    rs.remove_below(40)
    assert not rs
    assert rs.lowest is None


def test_limit_forgets_the_lowest_ranges() -> None:
    rs = RangeSet(limit=3)
    for i in range(6):
        rs.add(10 * i, 10 * i + 1)
    assert rs.ranges() == [(30, 31), (40, 41), (50, 51)]
    assert 0 not in rs
    # Inserting below everything (slow path) also trims from the bottom: the new range goes first.
    rs.add(0, 1)
    assert rs.ranges() == [(30, 31), (40, 41), (50, 51)]
    # A merge that reduces the count makes room again.
    rs.add(31, 40)
    assert rs.ranges() == [(30, 41), (50, 51)]
    rs.add(5, 6)
    assert rs.ranges() == [(5, 6), (30, 41), (50, 51)]


def test_limit_one_keeps_only_the_highest() -> None:
    rs = RangeSet(limit=1)
    rs.add(0, 5)
    rs.add(10, 15)
    assert rs.ranges() == [(10, 15)]
    rs.add(12, 20)
    assert rs.ranges() == [(10, 20)]


def test_many_in_order_single_values_stay_one_range() -> None:
    rs = RangeSet(limit=4)
    for pn in range(10_000):
        rs.add(pn, pn + 1)
    assert rs.ranges() == [(0, 10_000)]


# --- a model-based property test -------------------------------------------------------------------

Op = tuple[str, int, int]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 200), st.integers(0, 30)),
        st.tuples(st.just("remove_below"), st.integers(0, 230), st.just(0)),
    ),
    max_size=60,
)


def model_ranges(model: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for x in sorted(model):
        if out and out[-1][1] == x:
            out[-1] = (out[-1][0], x + 1)
        else:
            out.append((x, x + 1))
    return out


@given(ops)
@settings(max_examples=300, deadline=None)
def test_rangeset_matches_a_set_model(script: list[Op]) -> None:
    rs = RangeSet(limit=10_000)  # large enough that nothing is forgotten
    model: set[int] = set()
    for op, a, n in script:
        if op == "add":
            rs.add(a, a + n)
            model.update(range(a, a + n))
        else:
            rs.remove_below(a)
            model = {x for x in model if x >= a}
        expected = model_ranges(model)
        assert rs.ranges() == expected
        assert len(rs) == len(expected)
        assert rs.lowest == (expected[0][0] if expected else None)
        assert rs.highest_end == (expected[-1][1] if expected else None)
        assert rs.descending(3) == expected[::-1][:3]
    for x in range(-1, 235):
        assert (x in rs) == (x in model)
        gap = x
        while gap in model:
            gap += 1
        assert rs.first_gap_from(x) == gap


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(1, 20)), max_size=80), st.integers(1, 6))
@settings(max_examples=200, deadline=None)
def test_limit_keeps_exactly_the_highest_ranges_of_the_sequence(
    adds: list[tuple[int, int]], limit: int
) -> None:
    """With a limit, the set never holds more ranges than that, always sorted and disjoint, and
    whatever it holds was added (forgetting never invents values)."""
    rs = RangeSet(limit=limit)
    model: set[int] = set()
    for a, n in adds:
        rs.add(a, a + n)
        model.update(range(a, a + n))
        got = rs.ranges()
        assert len(got) <= limit
        for (s1, e1), (s2, e2) in itertools.pairwise(got):
            assert s1 < e1 < s2 < e2  # sorted, non-empty, not even adjacent
        for s, e in got:
            assert set(range(s, e)) <= model
        # The highest added value is always remembered.
        assert rs.highest_end == max(model) + 1
