"""`ScriptedCore`: a minimal sans-IO core for exercising the simulator itself.

It sends exactly what the script tells it to, records every datagram it receives (and reports it
as a `Received` event), optionally echoes datagrams back to their sender, and fires scripted
timers. Use it to test link models and topologies without a protocol in the way, or as a traffic
source (a flooder, a silent host) next to real cores.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from cellmesh.sim.protocol import Addr

__all__ = ["Received", "ScriptedCore", "TimerFired"]


@dataclass(frozen=True, slots=True)
class Received:
    """A datagram reached a `ScriptedCore`."""

    time: float
    data: bytes
    addr: Addr


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A scripted timer that was due at `due` fired at `time`."""

    time: float
    due: float


class ScriptedCore:
    """A core that does only what it is told. See the module docstring."""

    def __init__(self, *, echo: bool = False) -> None:
        self.echo = echo
        """When True, every received datagram is sent straight back to its sender."""
        self.received: list[Received] = []
        self.fired: list[TimerFired] = []
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[Received | TimerFired] = deque()
        self._timers: list[float] = []

    def send(self, data: bytes, addr: Addr) -> None:
        """Queue `data` for `addr` (call through `SimNode.act` so the network picks it up)."""
        self._out.append((data, addr))

    def add_timer(self, when: float) -> None:
        """Ask for `handle_timer` at absolute time `when`."""
        bisect.insort(self._timers, when)

    # ------------------------------------------------------------------ the sans-IO interface

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Record the datagram; echo it when `echo` is set."""
        rec = Received(now, data, addr)
        self.received.append(rec)
        self._events.append(rec)
        if self.echo:
            self._out.append((data, addr))

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """Everything queued by `send` (and echoes)."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """The earliest scripted timer, if any."""
        return self._timers[0] if self._timers else None

    def handle_timer(self, now: float) -> None:
        """Fire every scripted timer due at `now`."""
        while self._timers and self._timers[0] <= now:
            due = self._timers.pop(0)
            fired = TimerFired(now, due)
            self.fired.append(fired)
            self._events.append(fired)

    def next_event(self) -> Received | TimerFired | None:
        """The next `Received` or `TimerFired`, or None."""
        return self._events.popleft() if self._events else None
