"""Anchor: security/control traffic, join-to-key latency and failover against vote-based election.

Ours: `AnchorCore` with its defaults, one per simulated member: the anchor pulses every 5 s (a
132-byte PULSE, MACed and signed, broadcast) and every 60 s seals a fresh epoch key to each member
(a 228-byte EPOCH, unicast); members send nothing unless they miss a key (REQ_EPOCH).

Baseline, in the same invocation and simulator: vote-based election, what NEXUS-0 says its
deterministic rule replaces ("security gossip"). Every member, every epoch, sends a signed
116-byte VOTE for the member it ranks best among those it heard vote last round (the same
ego + BLAKE3 tie-break ranking, the same Ed25519 signatures); each member tallies the votes and
the winner seals that epoch's key to each member exactly as ours does (the same EPOCH message).
Votes double as proof of life, so no pulses. Two fan-outs: flood (one multicast per vote, every
member receives every vote) and unicast (one datagram per vote per member, "to every other
member").

Figures, all in virtual time on a 2 ms LAN, everything counted by the simulator at the sockets:

* traffic per node per minute at 100 and 1,000 members (``--quick``: 100 only), over whole epochs
  after formation: messages and bytes sent, messages and bytes received;
* join-to-key latency: a newcomer starts in a stable mesh of 100; the time until it holds the
  current epoch key (ours: the anchor's delivery on admission, or REQ_EPOCH; baseline: the
  next epoch's delivery), on a clean LAN and with 5% loss;
* failover: the anchor's cable is pulled at a random moment; the time until every live member
  holds a key from its successor (ours: 3 missed pulses; baseline: the next vote rounds).

Signature checks go through one shared `CachedVerifier` on both sides (each distinct signature is
verified once per process), which changes how fast the simulation runs, never what is sent.
"""

from __future__ import annotations

import functools
import gc
import random
import statistics
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.public

from _common import Metric, Result, Target, exit_on_sigterm, machine_line, parse_args, report
from cellmesh.anchor import AnchorCore, AnchorSettings, EpochKeyInstalled, decode_message
from cellmesh.anchor.keys import KeyOpener, seal_epoch_key, sealing_box
from cellmesh.anchor.messages import EpochGrant, make_grant, signed_bytes
from cellmesh.anchor.rule import tiebreak
from cellmesh.discovery.verifier import CachedVerifier
from cellmesh.errors import AuthenticationError, DecodeError
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import Identity
from cellmesh.sim import LinkModel, SimNetwork, SimNode, sim_identity, sim_random_bytes
from cellmesh.sim.anchor import ANCHOR_GROUP, WALL0, AnchorMesh
from cellmesh.sim.protocol import Addr

BENCH = "bench_anchor"
LAN = LinkModel(latency=0.002, jitter=0.0005)
LOSSY = LinkModel(latency=0.002, jitter=0.001, loss=0.05)
EPOCH = 60.0
S = AnchorSettings()

# ------------------------------------------------------------------------------ the baseline

_VOTE = struct.Struct("!BBBB16sQQ16s64s")
VOTE_LEN = _VOTE.size  # 116
_VOTE_CONTEXT = b"cellmesh/bench vote\x00"
TALLY_AFTER = 2.0
"""Seconds after its own vote a member counts the round's votes."""


@dataclass
class _Peer:
    public_key: bytes
    x25519: bytes
    ego: int
    box: nacl.public.SealedBox[nacl.public.PublicKey] | None = None
    heard: float = -1e9


class VoteCore:
    """Vote-based election, sans-IO, for the benchmark only (see the module docstring)."""

    def __init__(
        self,
        identity: Identity,
        now: float,
        wall: Callable[[], float],
        random_bytes: Callable[[int], bytes],
        rng: random.Random,
        *,
        ego: int,
        unicast: bool,
        verify: Callable[[bytes, bytes, bytes], None],
    ) -> None:
        self.identity = identity
        self.cell_id = identity.cell_id
        self.ego = ego
        self.unicast = unicast
        self._wall = wall
        self._random_bytes = random_bytes
        self._rng = rng
        self._verify = verify
        self._opener = KeyOpener(identity)
        self.peers: dict[CellId, _Peer] = {}
        self.epoch = 0
        self.key: tuple[int, bytes] | None = None
        self.key_from: CellId | None = None
        self._tally: dict[int, Counter[bytes]] = {}
        self._next_vote = float("inf")
        self._next_tally = float("inf")
        self._out: list[tuple[CellId | None, bytes]] = []
        self._events: list[object] = []

    def admit(self, peer: VoteCore) -> None:
        i = peer.identity
        self.peers[peer.cell_id] = _Peer(i.public_key, i.noise_static_public, peer.ego)

    def start(self, now: float, first_vote: float) -> None:
        self._next_vote = first_vote
        self._next_tally = float("inf")

    def _candidate(self, now: float, epoch: int) -> bytes:
        alive = [(self.ego, self.cell_id)] + [
            (p.ego, cid) for cid, p in self.peers.items() if now - p.heard < 1.5 * EPOCH
        ]
        return min(alive, key=lambda e: (-e[0], tiebreak(e[1], epoch)))[1]

    def handle_timer(self, now: float) -> None:
        if now >= self._next_vote:
            self.epoch += 1
            cand = self._candidate(now, self.epoch)
            body = _VOTE.pack(
                0xCB, 1, 1, 0, self.cell_id, int(self._wall() * 1000), self.epoch, cand, bytes(64)
            )[:-64]
            vote = body + self.identity.sign(_VOTE_CONTEXT + body)
            self._count(self.epoch, cand)
            if self.unicast:
                for cid in self.peers:
                    self._out.append((cid, vote))
            else:
                self._out.append((None, vote))
            self._next_vote += EPOCH
            self._next_tally = now + TALLY_AFTER
        if now >= self._next_tally:
            self._next_tally = float("inf")
            tally = self._tally.pop(self.epoch, Counter())
            winner = min(tally, key=lambda c: (-tally[c], tiebreak(c, self.epoch)))
            if winner == self.cell_id:
                self._issue(now)

    def _issue(self, now: float) -> None:
        secret = self._random_bytes(32)
        self.key = (self.epoch, secret)
        self.key_from = self.cell_id
        self._events.append(EpochKeyInstalled(self.cell_id, self.epoch, self.epoch))
        ms = int(self._wall() * 1000)
        for cid, p in self.peers.items():
            if p.box is None:
                p.box = sealing_box(p.x25519)
            sealed = seal_epoch_key(secret, p.box)
            grant = make_grant(
                self.identity, ms, self.epoch, self.epoch, ms, cid, bytes(16), sealed
            )
            self._out.append((cid, grant))

    def _count(self, epoch: int, candidate: bytes) -> None:
        self._tally.setdefault(epoch, Counter())[candidate] += 1

    def receive_message(self, data: bytes, now: float) -> None:
        if len(data) == VOTE_LEN and data[0] == 0xCB:
            _m, _v, _t, _f, voter, _ts, epoch, cand, sig = _VOTE.unpack(data)
            peer = self.peers.get(CellId(voter))
            if peer is None:
                return
            try:
                self._verify(peer.public_key, _VOTE_CONTEXT + data[:-64], sig)
            except AuthenticationError:
                return
            peer.heard = now
            if epoch > self.epoch + 1 and now < self._next_vote:
                self.epoch = epoch - 1  # a newcomer learns the round number from the votes
            if epoch >= self.epoch:
                self._count(epoch, cand)
            return
        try:
            grant = decode_message(data)
        except DecodeError:
            return
        if not isinstance(grant, EpochGrant) or grant.recipient != self.cell_id:
            return
        peer = self.peers.get(grant.sender)
        if peer is None or (self.key is not None and grant.epoch <= self.key[0]):
            return
        try:
            self._verify(peer.public_key, signed_bytes(data), grant.signature)
            secret = self._opener.open(grant.sealed_key)
        except AuthenticationError:
            return
        self.key = (grant.epoch, secret)
        self.key_from = grant.sender
        self._events.append(EpochKeyInstalled(grant.sender, grant.term, grant.epoch))

    # The sans-IO shape the simulator drives (through `VoteSimCore`).
    def messages_to_send(self) -> list[tuple[CellId | None, bytes]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        t = min(self._next_vote, self._next_tally)
        return None if t == float("inf") else t

    def next_event(self) -> object | None:
        return self._events.pop(0) if self._events else None


class VoteSimCore:
    """Addresses for a `VoteCore` (the same job `AnchorSimCore` does for ours)."""

    def __init__(self, core: VoteCore, directory: dict[CellId, Addr]) -> None:
        self.core = core
        self.directory = directory

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        self.core.receive_message(data, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        return [
            (data, ANCHOR_GROUP if dst is None else self.directory[dst])
            for dst, data in self.core.messages_to_send()
        ]

    def get_timer(self) -> float | None:
        return self.core.get_timer()

    def handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)

    def next_event(self) -> object | None:
        return self.core.next_event()


@dataclass
class VoteMesh:
    """N vote cores on one segment, admitting each other; the first vote round at t = 1 s."""

    net: SimNetwork
    unicast: bool
    verifier: CachedVerifier = field(default_factory=lambda: CachedVerifier(capacity=1 << 20))
    nodes: list[SimNode[VoteSimCore]] = field(default_factory=list)
    directory: dict[CellId, Addr] = field(default_factory=dict)
    installed: list[tuple[float, str]] = field(default_factory=list)

    def _on_event(self, node: SimNode[VoteSimCore], ev: object) -> None:
        if isinstance(ev, EpochKeyInstalled):
            self.installed.append((self.net.now, node.name))

    def add(self, label: str, ego: int, first_vote: float) -> SimNode[VoteSimCore]:
        net = self.net
        core = VoteCore(
            sim_identity(net, label),
            net.now,
            lambda: WALL0 + net.now,
            sim_random_bytes(random.Random(net.derive_seed(f"vote/{label}/bytes"))),
            random.Random(net.derive_seed(f"vote/{label}")),
            ego=ego,
            unicast=self.unicast,
            verify=self.verifier,
        )
        node = net.add_node(
            VoteSimCore(core, self.directory),
            name=label,
            on_event=self._on_event,
            record_events=False,
        )
        self.directory[core.cell_id] = node.addr
        for other in self.nodes:
            other.core.core.admit(core)
            core.admit(other.core.core)
        self.nodes.append(node)
        node.act(lambda c, now: c.core.start(now, first_vote))
        return node

    def form(self, n: int, egos: Callable[[int], int]) -> None:
        rng = random.Random(self.net.derive_seed("phases"))
        for i in range(n):
            self.add(f"v{i}", egos(i), 1.0 + rng.uniform(0.0, 0.5))

    def keyed(self) -> bool:
        """Every live member holds the same key, issued by a live member."""
        live = [n for n in self.nodes if n.up]
        keys = {n.core.core.key for n in live}
        return len(keys) == 1 and None not in keys


# ------------------------------------------------------------------------------ measurements


@dataclass(frozen=True)
class Traffic:
    """Per node per minute, averaged over every member."""

    sent: float
    bytes_sent: float
    received: float
    bytes_received: float
    wall: float


def _count(nodes: Sequence[SimNode[Any]]) -> tuple[int, int, int, int]:
    """Datagrams and bytes sent and received by `nodes`, as the simulator counted them."""
    return (
        sum(n.sent for n in nodes),
        sum(n.bytes_sent for n in nodes),
        sum(n.received for n in nodes),
        sum(n.bytes_received for n in nodes),
    )


def _rate(before: tuple[int, ...], after: tuple[int, ...], n: int, window: float) -> Traffic:
    per = [(a - b) / n / (window / 60.0) for a, b in zip(after, before, strict=True)]
    return Traffic(per[0], per[1], per[2], per[3], 0.0)


def ours_traffic(n: int, epochs: int, seed: int) -> Traffic:
    t0 = time.perf_counter()
    net = SimNetwork(seed, default_link=LAN)
    mesh = AnchorMesh(net, AnchorSettings(request_on_start=False))
    rng = random.Random(seed)
    mesh.form(n, egos=lambda i: rng.randrange(101))
    if not net.run_until(mesh.converged, 20.0):
        raise RuntimeError("the anchor mesh did not converge")
    net.run_for(EPOCH - 0.5)  # start the window just before a rotation
    nodes = mesh.nodes
    before = _count(nodes)
    net.run_for(epochs * EPOCH)
    t = _rate(before, _count(nodes), n, epochs * EPOCH)
    return Traffic(t.sent, t.bytes_sent, t.received, t.bytes_received, time.perf_counter() - t0)


def vote_traffic(n: int, epochs: int, seed: int, unicast: bool) -> Traffic:
    t0 = time.perf_counter()
    net = SimNetwork(seed, default_link=LAN)
    mesh = VoteMesh(net, unicast)
    rng = random.Random(seed)
    mesh.form(n, egos=lambda i: rng.randrange(101))
    net.run_until(1.0 + EPOCH - 0.5)  # one round done: every member holds a key
    if not mesh.keyed():
        raise RuntimeError("the vote mesh did not converge")
    nodes = mesh.nodes
    before = _count(nodes)
    net.run_for(epochs * EPOCH)
    t = _rate(before, _count(nodes), n, epochs * EPOCH)
    return Traffic(t.sent, t.bytes_sent, t.received, t.bytes_received, time.perf_counter() - t0)


def _has_key(core: AnchorCore) -> bool:
    return core.epoch is not None


def _vote_has_key(core: VoteCore) -> bool:
    return core.key is not None


def ours_joins(trials: int, link: LinkModel, seed: int) -> list[float]:
    net = SimNetwork(seed, default_link=link)
    mesh = AnchorMesh(net)
    rng = random.Random(seed)
    mesh.form(100, egos=lambda i: rng.randrange(101))
    net.run_for(70.0)
    out = []
    for k in range(trials):
        net.run_for(rng.uniform(0.0, EPOCH))
        node = mesh.add(f"new{k}", ego=0)
        start = net.now
        if not net.run_until(functools.partial(_has_key, node.core.core), 30.0):
            raise RuntimeError("a newcomer got no key within 30 s")
        out.append(net.now - start)
    return out


def vote_joins(trials: int, link: LinkModel, seed: int) -> list[float]:
    net = SimNetwork(seed, default_link=link)
    mesh = VoteMesh(net, unicast=False)
    rng = random.Random(seed)
    mesh.form(100, egos=lambda i: rng.randrange(101))
    net.run_for(70.0)
    out = []
    for k in range(trials):
        net.run_for(rng.uniform(0.0, EPOCH))
        # It votes in the mesh's next round, just after the others (whose votes tell it the
        # round number).
        phase = (net.now - 1.0) % EPOCH
        node = mesh.add(f"new{k}", 0, net.now + (EPOCH - phase) + 0.6)
        start = net.now
        if not net.run_until(functools.partial(_vote_has_key, node.core.core), 3 * EPOCH):
            raise RuntimeError("a vote newcomer got no key within three epochs")
        out.append(net.now - start)
    return out


def ours_failovers(trials: int, seed: int) -> list[float]:
    net = SimNetwork(seed, default_link=LAN)
    mesh = AnchorMesh(net)
    rng = random.Random(seed)
    mesh.form(100 + trials, egos=lambda i: rng.randrange(101))
    net.run_until(mesh.converged, 20.0)
    out = []
    for _ in range(trials):
        net.run_for(rng.uniform(20.0, 80.0))  # a random moment relative to pulses and epochs
        mesh.kill(mesh.anchors()[0])
        start = net.now
        if not net.run_until(mesh.converged, 60.0):
            raise RuntimeError("no successor within 60 s")
        out.append(net.now - start)
    return out


def vote_failovers(trials: int, seed: int) -> list[float]:
    net = SimNetwork(seed, default_link=LAN)
    mesh = VoteMesh(net, unicast=False)
    rng = random.Random(seed)
    mesh.form(100 + trials, egos=lambda i: rng.randrange(101))
    net.run_for(70.0)
    out = []
    for _ in range(trials):
        net.run_for(rng.uniform(20.0, 80.0))
        issuer = next(n for n in mesh.nodes if n.up and n.core.core.key_from == n.core.core.cell_id)
        net.set_node_down(issuer)
        dead = issuer.core.core.cell_id
        start = net.now

        def recovered(dead: CellId = dead) -> bool:
            live = [n for n in mesh.nodes if n.up]
            return mesh.keyed() and all(n.core.core.key_from != dead for n in live)

        if not net.run_until(recovered, 5 * EPOCH):
            raise RuntimeError("the vote mesh found no successor within five epochs")
        out.append(net.now - start)
    return out


# ------------------------------------------------------------------------------ output


def _dist(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else xs * 99
    return (
        f"min {min(xs) * 1000:.1f} ms, median {statistics.median(xs) * 1000:.1f} ms, "
        f"p99 {q[98] * 1000:.1f} ms, max {max(xs) * 1000:.1f} ms (n={len(xs)})"
    )


def _traffic_result(
    n: int, ours: Traffic, base: Traffic, fanout: str, epochs: int, base_epochs: int
) -> Result:
    cut = 1.0 - ours.bytes_received / base.bytes_received
    cut_sent = 1.0 - ours.bytes_sent / base.bytes_sent
    return Result(
        bench=BENCH,
        case=f"security/control traffic per node per minute, {n} members ({fanout} votes)",
        ours="AnchorCore defaults: 5 s PULSE (132 B, broadcast) + 60 s EPOCH per member (228 B)",
        baseline=f"a signed 116 B VOTE per member per epoch, {fanout}, + the same EPOCH delivery",
        metrics=[
            Metric("messages sent /node/min", ours.sent, base.sent, "/min", "lower"),
            Metric("bytes sent /node/min", ours.bytes_sent, base.bytes_sent, "B/min", "lower"),
            Metric("messages received /node/min", ours.received, base.received, "/min", "lower"),
            Metric(
                "bytes received /node/min",
                ours.bytes_received,
                base.bytes_received,
                "B/min",
                "lower",
            ),
        ],
        targets=[
            Target("NEXUS-0's claim: ~95% less security traffic (bytes received)", cut >= 0.95)
        ],
        notes=[
            f"measured: {cut:.1%} fewer bytes received per node, {cut_sent:.1%} fewer bytes "
            f"sent per node; windows of whole epochs after formation: ours {epochs}, "
            f"baseline {base_epochs} (every epoch of either is the same)",
            f"wall: ours {ours.wall:.1f} s, baseline {base.wall:.1f} s",
        ],
    )


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH)
    sizes = (100,) if args.quick else (100, 1000)
    epochs = 1 if args.quick else 3
    trials = 5 if args.quick else 20
    print(f"{BENCH}: {machine_line()}; sizes {', '.join(map(str, sizes))}, 2 ms LAN")
    t_start = time.monotonic()
    gc.disable()  # large object graphs without cycles; the collector only costs time here
    for n in sizes:
        ours = ours_traffic(n, epochs, seed=n)
        for unicast in (False, True):
            if unicast and n > 100 and args.quick:
                continue
            base_epochs = epochs if n <= 100 else 1  # a million votes per epoch at 1,000
            base = vote_traffic(n, base_epochs, seed=n, unicast=unicast)
            fanout = "unicast" if unicast else "flooded (multicast)"
            report(
                _traffic_result(n, ours, base, fanout, epochs, base_epochs), args.json, args.quick
            )

    for label, link in (("clean 2 ms LAN", LAN), ("5% loss, 2 +- 1 ms", LOSSY)):
        ours_j = ours_joins(trials, link, seed=7)
        base_j = vote_joins(trials if not args.quick else 3, link, seed=7)
        report(
            Result(
                bench=BENCH,
                case=f"join-to-key latency, newcomer in a mesh of 100, {label}",
                ours="key delivered by the anchor on admission, or REQ_EPOCH (one round trip)",
                baseline="vote-based: the key comes with the next epoch's delivery",
                metrics=[
                    Metric(
                        "median",
                        statistics.median(ours_j),
                        statistics.median(base_j),
                        "ms",
                        "lower",
                    ),
                    Metric("worst", max(ours_j), max(base_j), "ms", "lower"),
                ],
                targets=[Target("every join under 500 ms (NEXUS-0)", max(ours_j) < 0.5)],
                notes=[f"ours: {_dist(ours_j)}", f"baseline: {_dist(base_j)}"],
            ),
            args.json,
            args.quick,
        )

    ours_f = ours_failovers(trials, seed=11)
    base_f = vote_failovers(max(3, trials // 4), seed=11)
    report(
        Result(
            bench=BENCH,
            case="failover: the anchor's cable is pulled at a random moment, 100+ members",
            ours="3 missed pulses (15 s + 0.25 s slack), then the next member by the rule",
            baseline="vote-based: members stop voting for a member not heard last round",
            metrics=[
                Metric(
                    "until all hold the successor's key (median)",
                    statistics.median(ours_f),
                    statistics.median(base_f),
                    "s",
                    "lower",
                ),
                Metric("worst", max(ours_f), max(base_f), "s", "lower"),
            ],
            targets=[
                Target(
                    "every failover within 15 s of the last pulse + slack",
                    max(ours_f) <= S.silence_timeout + 0.1,
                )
            ],
            notes=[
                "ours: " + ", ".join(f"{x:.2f}" for x in sorted(ours_f)) + " s",
                "baseline: " + ", ".join(f"{x:.1f}" for x in sorted(base_f)) + " s",
            ],
        ),
        args.json,
        args.quick,
    )
    gc.enable()
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
