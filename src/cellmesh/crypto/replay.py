"""Sliding anti-replay window over 64-bit packet numbers (RFC 6479 semantics).

The window remembers the highest packet number accepted so far (``highest``) and, for the `size`
packet numbers ``highest - size + 1 .. highest``, whether each was seen. A packet number is
accepted iff it is in ``[0, 2**64-1]``, it is not older than that range, and it has not been seen;
a packet number above ``highest`` slides the window forward, forgetting everything that falls out.

Unlike RFC 6479's ring of blocks (which only guarantees ``size - 64`` packets of reorder
tolerance), the tolerance here is exactly `size`: the bitmap is a single Python int where bit ``i``
stands for ``highest - i``. CPython does the shift, OR and mask of a few-kilobit int in a
handful of word loops, which is far cheaper than any per-word Python code would be.
"""

from __future__ import annotations

from typing import Final

from cellmesh.errors import LocalProtocolError, ReplayError

__all__ = ["MAX_PACKET_NUMBER", "MIN_WINDOW_SIZE", "ReplayWindow"]

MAX_PACKET_NUMBER: Final = 2**64 - 1
"""The largest packet number the window accepts."""
MIN_WINDOW_SIZE: Final = 2048
"""The smallest window size allowed."""


class ReplayWindow:
    """Anti-replay window of `size` packet numbers (>= 2048, a multiple of 64).

    `check` asks without recording; `accept` records or raises `ReplayError`. Call `accept` only
    after the packet has authenticated, so forged packets cannot move the window.
    """

    __slots__ = ("_bits", "_highest", "_mask", "_size")

    def __init__(self, size: int = 4096) -> None:
        """Create an empty window (nothing seen yet, every packet number acceptable)."""
        if size < MIN_WINDOW_SIZE or size % 64 != 0:
            raise LocalProtocolError(
                f"replay window size must be a multiple of 64 and >= {MIN_WINDOW_SIZE}, got {size}"
            )
        self._size = size
        self._mask = (1 << size) - 1
        self._bits = 0  # bit i set <=> packet number (highest - i) was accepted
        self._highest = -1  # -1: nothing accepted yet

    @property
    def size(self) -> int:
        """How many packet numbers, ending at `highest`, the window remembers."""
        return self._size

    @property
    def highest(self) -> int | None:
        """The highest packet number accepted so far, or None if none has been."""
        return self._highest if self._highest >= 0 else None

    def check(self, pn: int) -> bool:
        """True if `accept(pn)` would succeed; records nothing."""
        if not 0 <= pn <= MAX_PACKET_NUMBER:
            return False
        diff = self._highest - pn
        if diff < 0:
            return True
        return diff < self._size and not (self._bits >> diff) & 1

    def accept(self, pn: int) -> None:
        """Record `pn` as received.

        Raises `ReplayError` if `pn` is outside ``[0, 2**64-1]``, was already accepted, or is
        `size` or more below `highest`.
        """
        if not 0 <= pn <= MAX_PACKET_NUMBER:
            raise ReplayError(f"packet number {pn} out of range")
        diff = self._highest - pn
        if diff < 0:
            # Newer than anything seen: slide the window forward by -diff.
            shift = -diff
            if shift >= self._size:
                self._bits = 1
            else:
                self._bits = ((self._bits << shift) | 1) & self._mask
            self._highest = pn
            return
        if diff >= self._size:
            raise ReplayError(f"packet number {pn} is older than the replay window")
        bit = 1 << diff
        if self._bits & bit:
            raise ReplayError(f"packet number {pn} was already received")
        self._bits |= bit

    def check_and_accept(self, pn: int) -> None:
        """Same as `accept`: record `pn` or raise `ReplayError`."""
        self.accept(pn)

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self._size}, highest={self.highest})"
