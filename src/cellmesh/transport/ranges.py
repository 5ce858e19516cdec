"""A bounded set of half-open integer ranges [start, end), kept sorted and merged.

Used for received packet numbers (to build ACK ranges), acknowledged stream bytes and received stream
bytes. `limit` bounds memory: when more disjoint ranges than that exist, the lowest ones are forgotten
(for ACKs that only means very old packets are no longer reported, which the sender already treats as
lost or acknowledged).
"""

from __future__ import annotations

from bisect import bisect_left


class RangeSet:
    """Sorted, merged, bounded half-open ranges."""

    __slots__ = ("_ends", "_starts", "limit")

    def __init__(self, limit: int = 1024) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.limit = limit

    def add(self, start: int, end: int) -> None:
        """Insert [start, end), merging with neighbours."""
        if end <= start:
            return
        starts, ends = self._starts, self._ends
        # Fast path: appending at or just after the top (the common in-order case).
        if starts and start >= starts[-1]:
            if start <= ends[-1]:
                if end > ends[-1]:
                    ends[-1] = end
                return
            starts.append(start)
            ends.append(end)
            self._trim()
            return
        i = bisect_left(ends, start)  # first range whose end >= start
        j = i
        new_start, new_end = start, end
        while j < len(starts) and starts[j] <= end:
            new_start = min(new_start, starts[j])
            new_end = max(new_end, ends[j])
            j += 1
        starts[i:j] = [new_start]
        ends[i:j] = [new_end]
        self._trim()

    def add_one(self, x: int) -> None:
        """Insert x, i.e. [x, x + 1): the in-order case (x extends the top range) in O(1)."""
        ends = self._ends
        if ends and ends[-1] == x:
            ends[-1] = x + 1
        else:
            self.add(x, x + 1)

    def _trim(self) -> None:
        excess = len(self._starts) - self.limit
        if excess > 0:
            del self._starts[:excess]
            del self._ends[:excess]

    def __contains__(self, x: int) -> bool:
        i = bisect_left(self._ends, x + 1)
        return i < len(self._starts) and self._starts[i] <= x

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        """All ranges, ascending."""
        return list(zip(self._starts, self._ends, strict=True))

    def descending(self, limit: int) -> list[tuple[int, int]]:
        """The highest `limit` ranges, highest first (what an ACK reports)."""
        n = len(self._starts)
        return [(self._starts[i], self._ends[i]) for i in range(n - 1, max(-1, n - 1 - limit), -1)]

    @property
    def lowest(self) -> int | None:
        """Start of the lowest range."""
        return self._starts[0] if self._starts else None

    @property
    def highest_end(self) -> int | None:
        """End (exclusive) of the highest range."""
        return self._ends[-1] if self._ends else None

    def first_gap_from(self, x: int) -> int:
        """The smallest value >= x that is not in the set."""
        i = bisect_left(self._ends, x + 1)
        if i < len(self._starts) and self._starts[i] <= x:
            return self._ends[i]
        return x

    def next_start_after(self, x: int) -> int | None:
        """The start of the first range that begins after x, or None."""
        from bisect import bisect_right

        i = bisect_right(self._starts, x)
        return self._starts[i] if i < len(self._starts) else None

    def remove_below(self, x: int) -> None:
        """Forget everything below x."""
        while self._starts and self._ends[0] <= x:
            del self._starts[0]
            del self._ends[0]
        if self._starts and self._starts[0] < x:
            self._starts[0] = x
