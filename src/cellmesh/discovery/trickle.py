"""The Trickle algorithm (RFC 6206): announce fast when things change, rarely when they do not.

Theory of operation (RFC 6206, section 4.2, with the RFC's step numbers)
------------------------------------------------------------------------
Trickle keeps an interval length I between `imin` and `imax`, a counter c and a time t in the
current interval:

1. `start`: I = Imin, and an interval begins (step 2).
2. At the start of an interval, c = 0 and t is drawn uniformly from [I/2, I) (the first half is
   listen-only, which solves the "short-listen" problem of unsynchronised nodes).
3. `hear_consistent`: a transmission that agrees with what we know increments c.
4. At time t, transmit if c < k (the redundancy constant); otherwise the transmission is
   *suppressed*: k neighbours already said the same thing during this interval.
5. When the interval ends, I doubles (capped at Imax) and a new interval begins (step 2).
6. `reset`: on an inconsistency, if I > Imin, set I = Imin and begin a new interval. If I is
   already Imin, do nothing.

Differences from the RFC's wording: `imax` is given in seconds (the RFC gives a number of
doublings of Imin; here Imax need not be Imin times a power of two, the last doubling is capped),
and `k = None` means "never suppress" (the RFC's k = infinity). With `imin == imax` and
`k = None`, Trickle degenerates into a fixed pulse: one transmission per interval at a random
point in its second half, which is how the discovery core implements its non-adaptive baseline.

The object is pure: time is passed in, randomness comes from an injected `random.Random`.
`next_fire` says when `poll` must next be called; `poll(now)` runs every step due by `now` and
reports whether a transmission is due.
"""

from __future__ import annotations

import random

__all__ = ["Trickle"]


class Trickle:
    """One RFC 6206 Trickle timer. See the module docstring."""

    __slots__ = (
        "_fired",
        "_rng",
        "counter",
        "end",
        "fire_at",
        "imax",
        "imin",
        "interval",
        "k",
        "started_at",
    )

    def __init__(self, imin: float, imax: float, k: int | None, rng: random.Random) -> None:
        """`imin`, `imax` in seconds (0 < imin <= imax); `k` >= 1, or None for no suppression."""
        if not 0 < imin <= imax:
            raise ValueError("Trickle needs 0 < imin <= imax")
        if k is not None and k < 1:
            raise ValueError("Trickle's redundancy constant k must be >= 1 (or None)")
        self.imin = imin
        self.imax = imax
        self.k = k
        self._rng = rng
        self.interval = imin
        """The current interval length I."""
        self.started_at = 0.0
        self.end = 0.0
        """When the current interval ends."""
        self.fire_at = 0.0
        """The time t of the current interval."""
        self.counter = 0
        """The counter c: consistent transmissions heard during this interval."""
        self._fired = True

    def start(self, now: float, transmitted: bool = False) -> None:
        """Step 1: begin with I = Imin.

        `transmitted` says the caller has just transmitted (a node announcing itself as it
        starts): that counts as this first interval's transmission, so its firing point is
        spent and the next opportunity is in the second interval.
        """
        self._begin(now, self.imin)
        self._fired = transmitted

    def _begin(self, now: float, interval: float) -> None:
        """Step 2: a new interval of length `interval` starting at `now`."""
        self.interval = interval
        self.started_at = now
        self.end = now + interval
        self.fire_at = now + self._rng.uniform(interval / 2, interval)
        self.counter = 0
        self._fired = False

    def hear_consistent(self) -> None:
        """Step 3: a consistent transmission was heard."""
        self.counter += 1

    def reset(self, now: float) -> bool:
        """Step 6: an inconsistency. Returns True if the timer was reset (I was above Imin)."""
        if self.interval > self.imin:
            self._begin(now, self.imin)
            return True
        return False

    def next_fire(self) -> float:
        """When `poll` must next be called: t, or the end of the interval once t has passed."""
        return self.end if self._fired else self.fire_at

    def latest_next_fire(self) -> float:
        """The latest time at which the *next* transmission opportunity can come, assuming no
        reset (a reset only brings it sooner). Used to keep a liveness promise."""
        if not self._fired:
            return self.fire_at
        return self.end + min(2 * self.interval, self.imax)

    def poll(self, now: float) -> bool | None:
        """Steps 4 and 5 for everything due by `now`.

        Returns None when no time t was reached, True when a transmission is due (c < k at t),
        False when it was suppressed. If `now` is more than an interval late (a driver that
        slept), the missed intervals are skipped rather than replayed.
        """
        result: bool | None = None
        while True:
            if not self._fired and now >= self.fire_at:
                self._fired = True
                fire = self.k is None or self.counter < self.k
                result = fire if result is None else (result or fire)
            if self._fired and now >= self.end:
                nxt = min(2 * self.interval, self.imax)
                start = self.end if now - self.end < nxt else now
                self._begin(start, nxt)
                continue
            return result
