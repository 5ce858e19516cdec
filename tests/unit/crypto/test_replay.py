"""Unit tests for `cellmesh.crypto.replay`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.crypto.replay import MAX_PACKET_NUMBER, ReplayWindow
from cellmesh.errors import LocalProtocolError, ReplayError

SIZE = 2048


def _accepts(w: ReplayWindow, pn: int) -> bool:
    """Check, then accept; assert that check predicted accept's outcome."""
    predicted = w.check(pn)
    try:
        w.accept(pn)
    except ReplayError:
        assert not predicted
        return False
    assert predicted
    return True


def test_in_order() -> None:
    w = ReplayWindow()
    assert w.highest is None
    assert w.size == 4096
    for pn in range(10_000):
        w.accept(pn)
    assert w.highest == 9_999


def test_duplicate() -> None:
    w = ReplayWindow(SIZE)
    w.accept(0)
    w.accept(5)
    assert not w.check(5)
    assert not w.check(0)
    with pytest.raises(ReplayError):
        w.accept(5)
    with pytest.raises(ReplayError):
        w.check_and_accept(0)
    assert w.highest == 5


def test_check_does_not_record() -> None:
    w = ReplayWindow(SIZE)
    assert w.check(3)
    assert w.check(3)
    assert w.highest is None
    w.check_and_accept(3)
    assert not w.check(3)


def test_window_edge() -> None:
    w = ReplayWindow(SIZE)
    top = 10_000
    w.accept(top)
    # Exactly `size` packet numbers are remembered: top - size + 1 .. top.
    assert w.check(top - SIZE + 1)
    assert not w.check(top - SIZE)
    with pytest.raises(ReplayError):
        w.accept(top - SIZE)
    w.accept(top - SIZE + 1)
    with pytest.raises(ReplayError):
        w.accept(top - SIZE + 1)
    # Advancing by one pushes the edge packet out.
    w.accept(top + 1)
    assert not w.check(top - SIZE + 1)
    assert w.check(top - SIZE + 2)


def test_old_beyond_window() -> None:
    w = ReplayWindow(SIZE)
    w.accept(100_000)
    for pn in (0, 1, 100_000 - SIZE, 50_000):
        assert not w.check(pn)
        with pytest.raises(ReplayError):
            w.accept(pn)


def test_reorder_within_window() -> None:
    w = ReplayWindow(SIZE)
    order = [10, 3, 7, 0, 1000, 999, 11, 5, 2000, 1999, 1500]
    for pn in order:
        w.accept(pn)
    for pn in order:
        assert not w.check(pn)
    for pn in (4, 6, 8, 998, 1001, 1998):
        assert w.check(pn)
    assert w.highest == 2000


def test_far_future_jump_forgets_old_bits() -> None:
    w = ReplayWindow(SIZE)
    for pn in range(0, 3 * SIZE, 3):
        w.accept(pn)
    jump = 10**12
    w.accept(jump)
    assert w.highest == jump
    # Everything before the new window is too old, even numbers never seen.
    assert not w.check(3 * SIZE - 1)
    assert not w.check(jump - SIZE)
    # Inside the new window nothing but `jump` is marked.
    for pn in (jump - SIZE + 1, jump - 3, jump - 1):
        assert w.check(pn)
    w.accept(jump - 1)
    assert not w.check(jump - 1)


def test_jump_of_exactly_window_size() -> None:
    w = ReplayWindow(SIZE)
    w.accept(0)
    w.accept(SIZE - 1)
    w.accept(2 * SIZE - 1)  # shift == size: the old bitmap is dropped entirely
    assert not w.check(SIZE - 1)
    assert w.check(SIZE)
    assert not w.check(2 * SIZE - 1)


def test_limits_near_2_64() -> None:
    w = ReplayWindow(SIZE)
    w.accept(MAX_PACKET_NUMBER - 1)
    w.accept(MAX_PACKET_NUMBER)
    assert w.highest == MAX_PACKET_NUMBER
    with pytest.raises(ReplayError):
        w.accept(MAX_PACKET_NUMBER)
    assert w.check(MAX_PACKET_NUMBER - 2)
    w.accept(MAX_PACKET_NUMBER - SIZE + 1)
    assert not w.check(MAX_PACKET_NUMBER - SIZE)
    for pn in (MAX_PACKET_NUMBER + 1, 2**65):
        assert not w.check(pn)
        with pytest.raises(ReplayError):
            w.accept(pn)
    assert w.highest == MAX_PACKET_NUMBER


def test_negative() -> None:
    w = ReplayWindow(SIZE)
    for pn in (-1, -(2**64)):
        assert not w.check(pn)
        with pytest.raises(ReplayError):
            w.accept(pn)
    assert w.highest is None
    w.accept(0)
    assert w.highest == 0


@pytest.mark.parametrize("size", [0, 64, 1024, 2047, 2049, 2048 + 32, -4096])
def test_size_validation(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        ReplayWindow(size)


@pytest.mark.parametrize("size", [2048, 2048 + 64, 4096, 65536])
def test_valid_sizes(size: int) -> None:
    w = ReplayWindow(size)
    w.accept(size)
    assert w.check(1)
    assert not w.check(0)


class _Model:
    """The obviously-correct reference: a set of everything seen plus the highest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest: int | None = None

    def accept(self, pn: int) -> bool:
        if not 0 <= pn <= MAX_PACKET_NUMBER or pn in self.seen:
            return False
        if self.highest is not None and pn <= self.highest - self.size:
            return False
        self.seen.add(pn)
        self.highest = pn if self.highest is None else max(self.highest, pn)
        return True


_steps = st.one_of(
    st.integers(-3, 40),  # small moves, mostly forward
    st.integers(-2 * 2048 - 5, -2000),  # back near and beyond the window edge
    st.integers(2000, 5000),  # forward jumps around the window size
    st.just(2**62),  # huge jump
)


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([2048, 2112, 4096]),
    start=st.one_of(st.integers(0, 100), st.just(MAX_PACKET_NUMBER - 3000)),
    steps=st.lists(_steps, max_size=120),
    absolute=st.lists(st.integers(-5, MAX_PACKET_NUMBER + 5), max_size=5),
)
def test_matches_set_model(size: int, start: int, steps: list[int], absolute: list[int]) -> None:
    w, model = ReplayWindow(size), _Model(size)
    pn = start
    for step in steps:
        pn += step
        assert _accepts(w, pn) == model.accept(pn), pn
        assert w.highest == model.highest
    for pn in absolute:
        assert _accepts(w, pn) == model.accept(pn), pn
        assert w.highest == model.highest
