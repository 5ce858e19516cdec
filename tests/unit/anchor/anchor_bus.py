"""A tiny deterministic driver for a handful of `AnchorCore`s: the unit tests' network.

Every message takes `latency` seconds; broadcasts reach every other core that is up and in the
same partition group. Timers and deliveries run in time order (ties: deliveries first, then
timers, in insertion order). Everything a core sends is kept in `sent` so a test can look at
the bytes on the "wire" (e.g. to prove an epoch key never appears in them).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cellmesh.anchor import AnchorCore, AnchorEvent, AnchorSettings
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import Identity

WALL0 = 1_800_000_000.0
E = TypeVar("E")


def ident(i: int) -> Identity:
    """A fixed identity per index (tests only: the secret is public)."""
    return Identity.from_secret(bytes([i % 256, i // 256, 0xA7]) * 21 + b"\x01")


@dataclass(frozen=True)
class Wire:
    """One message as it was sent."""

    time: float
    src: CellId
    dst: CellId | None
    data: bytes


@dataclass
class Bus:
    """A handful of cores on an ideal link (see the module docstring)."""

    latency: float = 0.001
    now: float = 0.0
    cores: dict[CellId, AnchorCore] = field(default_factory=dict)
    down: set[CellId] = field(default_factory=set)
    group: dict[CellId, int] = field(default_factory=dict)
    sent: list[Wire] = field(default_factory=list)
    events: dict[CellId, list[tuple[float, AnchorEvent]]] = field(default_factory=dict)
    tap: Callable[[Wire, CellId], bool] | None = None
    """``tap(wire, receiver)``: return False to lose that copy."""
    _queue: list[tuple[float, int, CellId, bytes]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def wall(self) -> float:
        return WALL0 + self.now

    def add(
        self,
        i: int,
        settings: AnchorSettings | None = None,
        *,
        ego: int = 0,
        eligible: bool = True,
    ) -> AnchorCore:
        core = AnchorCore(
            ident(i),
            settings or AnchorSettings(),
            self.now,
            self.wall,
            random.Random(i).randbytes,
            ego=ego,
            eligible=eligible,
        )
        self.cores[core.cell_id] = core
        self.events[core.cell_id] = []
        return core

    def admit(self, at: AnchorCore, member: AnchorCore, ego: int | None = None) -> None:
        at.admit(
            member.cell_id,
            member.identity.public_key,
            member.identity.noise_static_public,
            member.ego if ego is None else ego,
            self.now,
            eligible=member.eligible,
        )
        self.pump(at)

    def admit_all(self) -> None:
        for a in self.cores.values():
            for b in self.cores.values():
                if a is not b:
                    self.admit(a, b)

    def start(self, core: AnchorCore) -> None:
        core.start(self.now)
        self.pump(core)

    def start_all(self) -> None:
        for core in self.cores.values():
            self.start(core)

    def mesh(
        self, n: int, egos: list[int] | None = None, settings: AnchorSettings | None = None
    ) -> list[AnchorCore]:
        """`n` cores (identities 1..n) that all admit each other, started."""
        cores = [self.add(i + 1, settings, ego=egos[i] if egos else 0) for i in range(n)]
        self.admit_all()
        self.start_all()
        return cores

    # ---------------------------------------------------------------- the wire

    def pump(self, core: AnchorCore) -> None:
        """Collect what `core` queued: messages go on the wire, events into `events`."""
        for dst, data in core.messages_to_send():
            self.transmit(core.cell_id, dst, data)
        while (ev := core.next_event()) is not None:
            self.events[core.cell_id].append((self.now, ev))

    def transmit(self, src: CellId, dst: CellId | None, data: bytes) -> None:
        wire = Wire(self.now, src, dst, data)
        self.sent.append(wire)
        if src in self.down:
            return
        targets = [c for c in self.cores if c != src] if dst is None else [dst]
        for t in targets:
            if t not in self.cores or t in self.down:
                continue
            if self.group.get(t, 0) != self.group.get(src, 0):
                continue
            if self.tap is not None and not self.tap(wire, t):
                continue
            heapq.heappush(self._queue, (self.now + self.latency, next(self._seq), t, data))

    def inject(self, dst: AnchorCore, data: bytes) -> None:
        """Deliver crafted bytes to `dst` right now (an attacker on the link)."""
        dst.receive_message(data, self.now)
        self.pump(dst)

    def partition(self, *groups: list[AnchorCore]) -> None:
        self.group = {c.cell_id: gi for gi, g in enumerate(groups, 1) for c in g}

    def heal(self) -> None:
        self.group = {}

    def kill(self, core: AnchorCore) -> None:
        self.down.add(core.cell_id)

    def revive(self, core: AnchorCore) -> None:
        self.down.discard(core.cell_id)
        self.pump(core)

    # ---------------------------------------------------------------- time

    def _next_timer(self) -> tuple[float, AnchorCore] | None:
        best: tuple[float, AnchorCore] | None = None
        for cid, core in self.cores.items():
            if cid in self.down:
                continue
            t = core.get_timer()
            if t is not None and (best is None or t < best[0]):
                best = (t, core)
        return best

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance to `until` (or until `stop()` holds); returns whether `stop` held."""
        for _ in range(1_000_000):
            if stop is not None and stop():
                return True
            timer = self._next_timer()
            msg_t = self._queue[0][0] if self._queue else None
            t_timer = timer[0] if timer is not None else None
            nxt = min(x for x in (msg_t, t_timer, until + 1.0) if x is not None)
            if nxt > until:
                self.now = until
                return stop() if stop is not None else False
            self.now = max(self.now, nxt)
            if msg_t is not None and msg_t <= nxt:
                _, _, dst, data = heapq.heappop(self._queue)
                if dst not in self.down:
                    core = self.cores[dst]
                    core.receive_message(data, self.now)
                    self.pump(core)
            else:
                assert timer is not None
                timer[1].handle_timer(self.now)
                self.pump(timer[1])
        raise RuntimeError("the bus ran a million steps: a core is spinning")

    def run_for(self, dt: float, stop: Callable[[], bool] | None = None) -> bool:
        return self.run_until(self.now + dt, stop)

    # ---------------------------------------------------------------- inspection

    def live(self) -> list[AnchorCore]:
        return [c for cid, c in self.cores.items() if cid not in self.down]

    def anchors(self, among: list[AnchorCore] | None = None) -> list[AnchorCore]:
        return [c for c in (among if among is not None else self.live()) if c.is_anchor]

    def converged(self, among: list[AnchorCore] | None = None) -> bool:
        """One anchor among `among` (default: the live cores), all following it and holding
        its current key."""
        group = among if among is not None else self.live()
        anchors = self.anchors(group)
        if len(anchors) != 1:
            return False
        key = anchors[0].export_epoch_key()
        return key is not None and all(
            c.anchor == anchors[0].cell_id and c.export_epoch_key() == key for c in group
        )

    def of(self, core: AnchorCore, kind: type[E]) -> list[tuple[float, E]]:
        return [(t, e) for t, e in self.events[core.cell_id] if isinstance(e, kind)]
