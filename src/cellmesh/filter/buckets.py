"""Token buckets for ring 0: per-source and global rate limits, with time passed in.

A bucket holds up to `burst` tokens and refills at `rate` tokens per second. `take(now)` spends one
token if there is one. `KeyedBuckets` keeps one bucket per key (an address, a CellID) in a bounded LRU
so a flood of distinct sources cannot grow memory without limit: the least recently used key is evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class TokenBucket:
    """A classic token bucket. Pure: the caller passes `now` (seconds, monotonic)."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("token bucket needs rate >= 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if available; True when allowed."""
        # _refill, inline: ring 0 takes from a bucket for every packet.
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def available(self, now: float) -> float:
        """Tokens available at `now` (refills as a side effect)."""
        self._refill(now)
        return self._tokens


class KeyedBuckets(Generic[K]):
    """One `TokenBucket` per key, at most `capacity` keys (LRU eviction)."""

    def __init__(self, rate: float, burst: float, capacity: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()

    def take(self, key: K, now: float, cost: float = 1.0) -> bool:
        """Spend from `key`'s bucket, creating it (full) on first sight."""
        b = self._buckets.get(key)
        if b is None:
            b = TokenBucket(self.rate, self.burst, now)
            self._buckets[key] = b
            if len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return b.take(now, cost)

    def __len__(self) -> int:
        return len(self._buckets)
