"""Anchor cores in the simulator: an address adapter and a mesh harness for many of them.

`AnchorCore` speaks in CellIDs (a destination CellID, or None for "everyone on the link");
`SimNetwork` speaks in addresses. `AnchorSimCore` is the thin driver between the two, exactly
what the asyncio node will do: unicast messages go to the address the directory holds for the
CellID, broadcasts to the link-local multicast group, and every received datagram is fed to the
core with its source address (which keys the core's per-sender budget).

`AnchorMesh` builds N such nodes on one broadcast segment with deterministic identities and
seeded randomness, admits every node into every other's membership (what discovery would do),
and offers the operations the sim tests and the benchmark need: kill a node, partition, heal,
and the convergence checks (one anchor, every live member following it and holding its key).

FOR SIMULATION ONLY: identities and epoch keys come from the seed, so they are public knowledge.
All cores share one `CachedVerifier` (each distinct signature is verified once per process),
which changes how fast a run goes, never what it computes.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cellmesh.anchor.core import AnchorCore
from cellmesh.anchor.events import AnchorEvent
from cellmesh.anchor.settings import AnchorSettings
from cellmesh.discovery.verifier import CachedVerifier
from cellmesh.identity.cellid import CellId
from cellmesh.sim.endpoints import sim_identity, sim_random_bytes
from cellmesh.sim.network import SimNetwork, SimNode
from cellmesh.sim.protocol import Addr

__all__ = ["ANCHOR_GROUP", "WALL0", "AnchorMesh", "AnchorSimCore", "Sighting"]

ANCHOR_GROUP: Addr = ("ff02::1", 19541)
"""Where broadcasts go: the link-local all-nodes group (every node on the segment)."""
WALL0 = 1_800_000_000.0
"""The simulated wall clock at virtual time 0 (Unix seconds, 2027)."""


class AnchorSimCore:
    """Drives one `AnchorCore` with addresses: the `SansIOCore` shape `SimNetwork` needs."""

    def __init__(
        self, core: AnchorCore, directory: dict[CellId, Addr], group: Addr = ANCHOR_GROUP
    ) -> None:
        self.core = core
        self.directory = directory
        """CellID -> address, shared by every node of a mesh (what discovery learns)."""
        self.group = group
        self.unroutable = 0
        """Unicast messages for a CellID the directory does not know (dropped)."""

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Feed an anchor message; the source address keys the per-sender budget."""
        self.core.receive_message(data, now, addr)

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """The core's messages, with CellIDs resolved to addresses."""
        out: list[tuple[bytes, Addr]] = []
        for dst, data in self.core.messages_to_send():
            if dst is None:
                out.append((data, self.group))
                continue
            addr = self.directory.get(dst)
            if addr is None:
                self.unroutable += 1
            else:
                out.append((data, addr))
        return out

    def get_timer(self) -> float | None:
        """The core's timer."""
        return self.core.get_timer()

    def handle_timer(self, now: float) -> None:
        """Fire the core's timer."""
        self.core.handle_timer(now)

    def next_event(self) -> AnchorEvent | None:
        """The core's next event."""
        return self.core.next_event()


ANode = SimNode[AnchorSimCore]


def _forget_all(gone: list[CellId], core: AnchorSimCore, now: float) -> None:
    for cell_id in gone:
        core.core.forget(cell_id, now)


@dataclass(frozen=True, slots=True)
class Sighting:
    """An event one node reported, at virtual time `time`."""

    time: float
    node: str
    event: AnchorEvent


@dataclass
class AnchorMesh:
    """N anchor cores on one segment, every one admitting every other. See the module doc."""

    net: SimNetwork
    settings: AnchorSettings = field(default_factory=AnchorSettings)
    verifier: CachedVerifier = field(default_factory=lambda: CachedVerifier(capacity=1 << 18))
    nodes: list[ANode] = field(default_factory=list)
    directory: dict[CellId, Addr] = field(default_factory=dict)
    log: list[Sighting] = field(default_factory=list)
    """Every event of every node, in order (kept small: a few per node per epoch)."""
    on_event: Callable[[ANode, AnchorEvent], None] | None = None

    def wall(self) -> float:
        """The simulated wall clock."""
        return WALL0 + self.net.now

    def _record(self, node: ANode, ev: object) -> None:
        assert isinstance(ev, AnchorEvent)
        self.log.append(Sighting(self.net.now, node.name, ev))
        if self.on_event is not None:
            self.on_event(node, ev)

    def add(
        self,
        label: str,
        *,
        ego: int = 0,
        eligible: bool = True,
        settings: AnchorSettings | None = None,
        admit: bool = True,
        start: bool = True,
    ) -> ANode:
        """Create a node; with `admit`, it and every existing node admit each other; with
        `start`, its core starts now."""
        net = self.net
        identity = sim_identity(net, label)
        core = AnchorCore(
            identity,
            settings or self.settings,
            net.now,
            self.wall,
            sim_random_bytes(random.Random(net.derive_seed(f"anchor/{label}/bytes"))),
            ego=ego,
            eligible=eligible,
            verify=self.verifier,
        )
        node = net.add_node(
            AnchorSimCore(core, self.directory),
            name=label,
            on_event=self._record,
            record_events=False,
        )
        self.directory[core.cell_id] = node.addr
        if admit:
            for other in self.nodes:
                self.admit(node, other)
                self.admit(other, node)
        self.nodes.append(node)
        if start:
            node.act(lambda c, now: c.core.start(now))
        return node

    def admit(self, at: ANode, member: ANode) -> None:
        """Make `at` admit `member` (as its discovery would on hearing its beacon)."""
        m = member.core.core
        at.act(
            lambda c, now: c.core.admit(
                m.cell_id,
                m.identity.public_key,
                m.identity.noise_static_public,
                m.ego,
                now,
                eligible=m.eligible,
            )
        )

    def form(self, n: int, egos: Callable[[int], int] | None = None, prefix: str = "n") -> None:
        """Add and start `n` nodes now (`egos(i)` gives node i's ego; default 0 for all).

        Admission is done in bulk (O(n^2) admits, no messages) before anyone starts."""
        created = [
            self.add(f"{prefix}{i}", ego=egos(i) if egos else 0, admit=False, start=False)
            for i in range(n)
        ]
        everyone = self.nodes
        new = {id(node) for node in created}
        for node in created:
            core = node.core.core
            for other in everyone:
                if other is not node:
                    o = other.core.core
                    core.admit(
                        o.cell_id,
                        o.identity.public_key,
                        o.identity.noise_static_public,
                        o.ego,
                        self.net.now,
                    )
                    if id(other) not in new:
                        o.admit(
                            core.cell_id,
                            core.identity.public_key,
                            core.identity.noise_static_public,
                            core.ego,
                            self.net.now,
                        )
        for node in created:
            node.act(lambda c, now: c.core.start(now))

    # ------------------------------------------------------------------ inspection

    def live(self) -> list[ANode]:
        """The nodes that are up."""
        return [n for n in self.nodes if n.up]

    def anchors(self, among: Iterable[ANode] | None = None) -> list[ANode]:
        """The nodes (of `among`, default the live ones) that claim the anchor role."""
        group = self.live() if among is None else list(among)
        return [n for n in group if n.core.core.is_anchor]

    def converged(self, among: Iterable[ANode] | None = None) -> bool:
        """Exactly one anchor among `among` (default: the live nodes), every one of them
        following it and holding its current epoch key."""
        group = self.live() if among is None else list(among)
        anchors = self.anchors(group)
        if len(anchors) != 1:
            return False
        anchor = anchors[0].core.core
        key = anchor.export_epoch_key()
        if key is None:
            return False
        for n in group:
            core = n.core.core
            if core.anchor != anchor.cell_id or core.export_epoch_key() != key:
                return False
        return True

    def by_cell(self, cell_id: CellId) -> ANode:
        """The node whose CellID is `cell_id`."""
        addr = self.directory[cell_id]
        return next(n for n in self.nodes if n.addr == addr)

    def kill(self, node: ANode) -> None:
        """Pull a node's cable: it stops sending and receiving, its core is frozen."""
        self.net.set_node_down(node)

    # ------------------------------------------------------------------ discovery, emulated

    def partition(
        self, groups: Sequence[Iterable[ANode]], forget_after: float | None = 15.0
    ) -> None:
        """Split the mesh. With `forget_after`, every node then forgets the members it can no
        longer reach after that many seconds, as its discovery would expire them (15 s: three
        5 s announcement intervals of a small mesh)."""
        self.net.partition(groups)
        if forget_after is not None:
            self.net.call_later(forget_after, self.forget_unreachable)

    def heal(self, readmit_after: float | None = 0.2) -> None:
        """End the partition. With `readmit_after`, every live node re-admits the members it
        forgot that many seconds later (discovery hears their beacons again)."""
        self.net.heal()
        if readmit_after is not None:
            self.net.call_later(readmit_after, self.readmit_reachable)

    def forget_unreachable(self) -> None:
        """Each live node forgets every member it cannot reach now."""
        net = self.net
        for node in self.live():
            gone = [
                o.core.core.cell_id
                for o in self.nodes
                if o is not node
                and not net.can_reach(node, o)
                and o.core.core.cell_id in node.core.core
            ]
            if gone:
                node.act(functools.partial(_forget_all, gone))

    def readmit_reachable(self) -> None:
        """Each live node admits every node it can reach and does not know."""
        net = self.net
        for node in self.live():
            for other in self.nodes:
                if (
                    other is not node
                    and net.can_reach(node, other)
                    and other.core.core.cell_id not in node.core.core
                ):
                    self.admit(node, other)
