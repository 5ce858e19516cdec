"""The discovery core, driven by hand on an ideal link: announcing, joining, admission, drops."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmesh.discovery import (
    DEFAULT_GROUP_V4,
    DEFAULT_GROUP_V6,
    NX0_ALIASES,
    BeaconFields,
    Capabilities,
    DiscoveryCore,
    DiscoverySettings,
    Mesh,
    PeerDiscovered,
    PeerExpired,
    PeerUpdated,
    is_discovery_frame,
    issue_membership_cert,
    nx0_aliases,
    pull_beacon,
    pull_solicit,
    push_beacon,
    push_solicit,
)
from cellmesh.discovery.beacon import FLAG_REPLY
from cellmesh.errors import LocalProtocolError
from cellmesh.identity.keys import Identity
from cellmesh.wire.header import HEADER_LEN, FrameType

Addr = tuple[str, int]
WALL0 = 1_800_000_000.0
GROUP = (DEFAULT_GROUP_V6, 19541)
AUTHORITY = Identity.from_secret(bytes(range(100, 164)))


def ident(i: int) -> Identity:
    return Identity.from_secret(bytes([i % 256, i // 256]) * 32)


class Lan:
    """An ideal link: every multicast datagram reaches every other core at once, in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.cores: dict[Addr, DiscoveryCore] = {}
        self.events: dict[Addr, list[tuple[float, object]]] = defaultdict(list)
        self.sent: list[tuple[float, Addr, bytes, Addr]] = []
        self.down: set[Addr] = set()
        self.tap: Callable[[Addr, bytes, Addr], bool] | None = None
        """``tap(src, data, receiver)``: False loses that copy of the datagram."""

    def wall(self) -> float:
        return WALL0 + self.now

    def add(
        self, i: int, s: DiscoverySettings | None = None, start: bool = True
    ) -> tuple[Addr, DiscoveryCore]:
        addr = (f"198.18.{i // 256}.{i % 256}", 19541)
        core = DiscoveryCore(
            ident(i), s or DiscoverySettings(), self.now, self.wall, random.Random(i)
        )
        self.cores[addr] = core
        if start:
            core.start(self.now)
            self.flush()
        return addr, core

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for src, core in list(self.cores.items()):
                for data, dst in core.datagrams_to_send():
                    moved = True
                    if src in self.down:
                        continue
                    self.sent.append((self.now, src, data, dst))
                    targets = (
                        [a for a in self.cores if a != src]
                        if dst[0] in (DEFAULT_GROUP_V6, DEFAULT_GROUP_V4)
                        else [dst]
                    )
                    for a in targets:
                        if self.tap is not None and not self.tap(src, data, a):
                            continue
                        if a in self.cores and a not in self.down:
                            self.cores[a].receive_datagram(data, src, self.now)
            for addr, core in self.cores.items():
                while (ev := core.next_event()) is not None:
                    self.events[addr].append((self.now, ev))

    def run(self, until: float) -> None:
        while True:
            timers = [
                (t, a)
                for a, c in self.cores.items()
                if a not in self.down and (t := c.get_timer()) is not None
            ]
            if not timers:
                break
            t, a = min(timers)
            if t > until:
                break
            self.now = max(self.now, t)
            self.cores[a].handle_timer(self.now)
            self.flush()
        self.now = until

    def of(self, addr: Addr, kind: type) -> list[tuple[float, object]]:
        return [(t, e) for t, e in self.events[addr] if isinstance(e, kind)]

    def beacons_from(self, addr: Addr, multicast: bool = True) -> list[tuple[float, bytes]]:
        out = []
        for t, src, data, dst in self.sent:
            if src == addr and data[1] == FrameType.BEACON and (dst == GROUP) == multicast:
                out.append((t, data))
        return out


# --- starting and announcing ---------------------------------------------------------------------


def test_start_sends_a_solicit_and_a_beacon_to_every_group() -> None:
    s = DiscoverySettings(group_hosts=(DEFAULT_GROUP_V6, DEFAULT_GROUP_V4), group_port=7000)
    core = DiscoveryCore(ident(1), s, 0.0, lambda: WALL0, random.Random(1))
    assert core.get_timer() is None
    core.start(0.0)
    out = core.datagrams_to_send()
    assert [(d[1], dst) for d, dst in out] == [
        (FrameType.BEACON, ("ff02::1", 7000)),
        (FrameType.BEACON, ("224.0.0.1", 7000)),
        (FrameType.SOLICIT, ("ff02::1", 7000)),
        (FrameType.SOLICIT, ("224.0.0.1", 7000)),
    ]
    first = pull_beacon(out[0][0], Mesh())
    assert first.fields.interval_ms == 300_000  # knowing no peer yet, it promises the longest
    assert all(is_discovery_frame(d) for d, _ in out)
    assert core.datagrams_to_send() == []
    timer = core.get_timer()
    assert timer is not None
    assert timer == 0.1  # the start beacon was the first Trickle interval's transmission
    with pytest.raises(LocalProtocolError):
        core.start(1.0)
    st = core.statistics()
    assert (st.beacons_sent, st.solicits_sent, st.peers) == (2, 2, 0)


def test_two_nodes_discover_each_other_with_everything_they_announce() -> None:
    lan = Lan()
    s = DiscoverySettings(
        name="Alpha",
        node_type="Bridge",
        zone="Command",
        ego=100,
        caps=Capabilities(relay=True, bandwidth_class=3),
        tags=(("rack", "b2"),),
    )
    a_addr, a = lan.add(1, s)
    b_addr, b = lan.add(2)
    lan.run(1.0)
    ((t, ev),) = lan.of(b_addr, PeerDiscovered)
    assert isinstance(ev, PeerDiscovered)
    rec = ev.peer
    assert rec.cell_id == a.cell_id
    assert (rec.name, rec.node_type, rec.zone, rec.ego) == ("Alpha", "Bridge", "Command", 100)
    assert rec.caps == Capabilities(relay=True, bandwidth_class=3)
    assert rec.tags == (("rack", "b2"),)
    assert rec.public_key == a.identity.public_key
    assert rec.noise_static == a.identity.noise_static_public
    assert rec.observed_addr == a_addr
    assert t <= 0.2  # a's answer to b's SOLICIT, after at most the reply jitter
    assert [e.peer.cell_id for _, e in lan.of(a_addr, PeerDiscovered)] == [b.cell_id]  # type: ignore[attr-defined]
    # an address change reaches b as an update, quickly
    a.set_addresses([("fe80::1", 19541), ("198.18.0.1", 19541)], lan.now)
    lan.run(2.0)
    (tu, upd) = lan.of(b_addr, PeerUpdated)[0]
    assert isinstance(upd, PeerUpdated)
    assert upd.changed == frozenset({"addresses"})
    assert upd.peer.addresses == (("fe80::1", 19541), ("198.18.0.1", 19541))
    assert tu < 1.0 + 0.1  # Trickle reset: the next firing point is within Imin
    peer = b.peer(a.cell_id)
    assert peer is not None
    assert peer.addresses == upd.peer.addresses
    assert [p.cell_id for p in b.peers()] == [a.cell_id]
    assert len(b) == 1


def test_a_new_node_hears_a_stable_mesh_within_the_reply_jitter() -> None:
    lan = Lan()
    for i in range(1, 21):
        lan.add(i)
    lan.run(60.0)
    replies_before = sum(c.statistics().replies_sent for c in lan.cores.values())
    n_addr, n = lan.add(99)
    joined = lan.now
    lan.run(joined + 0.3)
    found = lan.of(n_addr, PeerDiscovered)
    assert len(found) == 20
    assert max(t for t, _ in found) - joined <= 0.2
    replies = [d for _, src, d, dst in lan.sent if dst == n_addr]
    assert len(replies) == 20
    assert all(d[HEADER_LEN + 1] & FLAG_REPLY for d in replies)
    assert all(pull_beacon(d, Mesh()).reply for d in replies)
    st = n.statistics()
    assert st.beacons_accepted >= 20
    assert sum(c.statistics().replies_sent for c in lan.cores.values()) - replies_before == 20


def test_replies_are_signed_once_and_reused_within_a_second() -> None:
    lan = Lan()
    a_addr, _a = lan.add(1, DiscoverySettings(adaptive=False))  # no multicast in between
    lan.run(30.1)
    x_addr, x = lan.add(2, start=False)
    y_addr, y = lan.add(3, start=False)
    x.start(lan.now)
    y.start(lan.now)
    lan.flush()
    lan.run(lan.now + 0.5)
    to_x = [d for _, s, d, dst in lan.sent if s == a_addr and dst == x_addr]
    to_y = [d for _, s, d, dst in lan.sent if s == a_addr and dst == y_addr]
    assert to_x == to_y
    assert len(to_x) == 1


# --- repairing lost introductions -----------------------------------------------------------------


def _stable(n: int = 5) -> Lan:
    lan = Lan()
    for i in range(1, n + 1):
        lan.add(i)
    lan.run(60.0)
    return lan


def _newcomer_addr(i: int = 99) -> Addr:
    return (f"198.18.{i // 256}.{i % 256}", 19541)


def test_a_repeated_solicit_lists_known_peers_and_only_the_others_answer_twice() -> None:
    lan = _stable()
    victim = next(iter(lan.cores))
    n_addr = _newcomer_addr()
    lost = {"n": 0}

    def tap(src: Addr, data: bytes, to: Addr) -> bool:
        # the victim loses the newcomer's start beacon and first SOLICIT, and the newcomer the
        # victim's multicast beacons until the repeat
        if src == n_addr and to == victim and lost["n"] < 2:
            lost["n"] += 1
            return False
        return not (src == victim and to == n_addr and lan.now < start + 2.4)

    start = lan.now
    lan.tap = tap
    known_before = {a: c.statistics().solicits_known for a, c in lan.cores.items()}
    _, n = lan.add(99)
    lan.run(start + 2.0)
    assert len(n) == 4  # everyone but the victim answered
    lan.run(start + 4.0)  # the repeat at +2.5 s
    assert len(n) == 5
    assert lan.cores[victim].peer(n.cell_id) is not None
    solicits = [d for t, s, d, dst in lan.sent if s == n_addr and d[1] == FrameType.SOLICIT]
    multicast = [d for d in solicits if not d[HEADER_LEN + 1] & FLAG_REPLY]
    assert len(multicast) == 2
    repeat = pull_solicit(multicast[1], Mesh())
    assert repeat.known is not None
    others = [a for a in lan.cores if a not in (victim, n_addr)]
    for a in others:  # listed in the repeat's filter: no second answer
        assert lan.cores[a].statistics().solicits_known == known_before[a] + 1
    answers = [d for t, s, d, dst in lan.sent if s == victim and dst == n_addr and t >= start + 2.5]
    assert len(answers) == 2  # the repeat is answered twice, with the same signed bytes
    assert answers[0] == answers[1]
    lan.run(start + 60.0)
    # two repeats (+2.5 s, +7.5 s); the second found nothing missing, so no third
    mine = [
        d for d in lan.sent if d[1] == n_addr and d[3] == GROUP and d[2][1] == FrameType.SOLICIT
    ]
    assert [t - start for t, *_ in mine] == pytest.approx([0.0, 2.5, 7.5])


def test_retries_continue_only_while_they_find_missing_peers() -> None:
    lan = _stable(3)
    victim = next(iter(lan.cores))
    n_addr = _newcomer_addr()

    def tap(src: Addr, data: bytes, to: Addr) -> bool:
        # every answer from the victim to the newcomer is lost until t = 70
        return not (src == victim and to == n_addr and lan.now < 70.0)

    lan.tap = tap
    start = lan.now
    _, n = lan.add(99)
    lan.run(start + 30.0)
    assert len(n) == 3
    times = [t - start for t, s, d, dst in lan.sent if s == n_addr and dst == GROUP and d[1] == 7]
    # start, +2.5 s, +7.5 s; the victim's answers were lost, so nothing new came: no third try
    assert times == pytest.approx([0.0, 2.5, 7.5])


def test_an_old_node_introduces_itself_to_a_peer_that_missed_it() -> None:
    lan = _stable()
    victim = next(iter(lan.cores))
    n_addr = _newcomer_addr()

    def tap(src: Addr, data: bytes, to: Addr) -> bool:
        return not (src == n_addr and to == victim and data[1] == FrameType.SOLICIT)

    lan.tap = tap
    start = lan.now
    _, n = lan.add(99)
    lan.run(start + 0.5)
    assert len(n) == 5  # the victim never got a SOLICIT, but answered the new beacon
    assert lan.cores[victim].statistics().introductions == 1
    assert all(c.statistics().introductions == 0 for a, c in lan.cores.items() if a != victim)


def test_a_node_starting_up_does_not_introduce_itself() -> None:
    lan = _stable()
    _, n = lan.add(99)
    lan.run(lan.now + 10.0)
    assert n.statistics().introductions == 0
    assert n.statistics().asks == 0


# --- SOLICIT limits -------------------------------------------------------------------------------


def test_solicits_are_limited_per_source_and_globally() -> None:
    lan = Lan()
    _a_addr, a = lan.add(1, DiscoverySettings(solicit_rate=0.001, solicit_burst=3))
    src = ("198.18.9.9", 19541)
    for i in (50, 51, 52, 53):  # known peers, so no SOLICIT is asked back
        f = BeaconFields(seq=1, timestamp_ms=int(lan.wall() * 1000), interval_ms=10**6)
        a.receive_datagram(push_beacon(ident(i), f, Mesh()), (f"198.18.8.{i}", 1), lan.now)
    assert len(a) == 4

    def solicit(i: int, seq: int, addr: Addr = src) -> None:
        a.receive_datagram(
            push_solicit(ident(i), seq, int(lan.wall() * 1000), Mesh()), addr, lan.now
        )

    solicit(50, 1)
    solicit(50, 2)  # same CellID, same address, within 2 s
    solicit(51, 1)  # new CellID, same address
    assert a.statistics().drops == {"solicit_limited": 2}
    lan.now += 2.1
    solicit(50, 3)  # the per-source limit has refilled
    solicit(52, 1, ("198.18.9.10", 1))
    solicit(53, 1, ("198.18.9.11", 1))  # global budget (burst 3) exhausted
    st = a.statistics()
    assert st.solicits_accepted == 3
    assert st.drops == {"solicit_limited": 2, "solicit_budget": 1}
    solicit(53, 1, ("198.18.9.12", 1))
    assert a.statistics().drops["solicit_replay"] == 1


def test_own_solicits_are_rate_limited() -> None:
    core = DiscoveryCore(ident(1), DiscoverySettings(), 0.0, lambda: WALL0, random.Random(1))
    with pytest.raises(LocalProtocolError):
        core.solicit(0.0)
    core.start(0.0)
    assert not core.solicit(1.0)
    assert core.solicit(2.0)


# --- freshness and replay --------------------------------------------------------------------------


def test_replayed_stale_and_future_beacons_are_dropped() -> None:
    lan = Lan()
    _a_addr, a = lan.add(1)
    ts = int(lan.wall() * 1000)
    f = BeaconFields(seq=10, timestamp_ms=ts, interval_ms=5000)
    x = ident(7)
    frame = push_beacon(x, f, Mesh())
    a.receive_datagram(frame, ("198.18.7.7", 1), lan.now)
    a.receive_datagram(frame, ("198.18.7.7", 1), lan.now)
    a.receive_datagram(push_beacon(x, replace(f, seq=9), Mesh()), ("198.18.7.7", 1), lan.now)
    old = replace(f, seq=11, timestamp_ms=ts - 120_001)
    a.receive_datagram(push_beacon(x, old, Mesh()), ("198.18.7.7", 1), lan.now)
    new = replace(f, seq=12, timestamp_ms=ts + 120_001)
    a.receive_datagram(push_beacon(x, new, Mesh()), ("198.18.7.7", 1), lan.now)
    sol = push_solicit(x, 5, ts - 200_000, Mesh())
    a.receive_datagram(sol, ("198.18.7.7", 1), lan.now)
    drops = a.statistics().drops
    assert drops == {"duplicate": 1, "replay": 1, "stale": 2, "future": 1}
    assert len(a) == 1


def test_own_frames_reflected_back_and_frames_before_start() -> None:
    core = DiscoveryCore(ident(1), DiscoverySettings(), 0.0, lambda: WALL0, random.Random(1))
    core.receive_datagram(b"x" * 100, ("198.18.0.2", 1), 0.0)
    assert core.statistics().drops == {"not_started": 1}
    core.start(0.0)
    for data, _ in core.datagrams_to_send():
        core.receive_datagram(data, ("198.18.0.1", 19541), 0.0)
    assert core.statistics().drops == {"not_started": 1, "reflected": 2}


# --- admission ------------------------------------------------------------------------------------


def test_a_wrong_mesh_key_learns_nothing_and_is_learnt_by_nobody() -> None:
    lan = Lan()
    good = DiscoverySettings(mesh_key=b"k" * 32)
    for i in range(1, 4):
        lan.add(i, good)
    bad_addr, bad = lan.add(9, DiscoverySettings(mesh_key=b"x" * 32))
    lan.run(30.0)
    assert len(bad) == 0
    assert all(len(c) == 2 for a, c in lan.cores.items() if a != bad_addr)
    assert bad.statistics().drops["bad_mac"] > 0
    assert all(
        c.statistics().drops.get("bad_mac", 0) >= 2 for a, c in lan.cores.items() if a != bad_addr
    )


def test_open_and_keyed_nodes_ignore_each_other() -> None:
    lan = Lan()
    _k_addr, k = lan.add(1, DiscoverySettings(mesh_key=b"k" * 16))
    _o_addr, o = lan.add(2)
    _x_addr, x = lan.add(3, DiscoverySettings(mesh_name="elsewhere"))
    lan.run(20.0)
    assert (len(k), len(o), len(x)) == (0, 0, 0)
    assert k.statistics().drops.keys() == {"unkeyed", "other_mesh"}
    assert o.statistics().drops.keys() == {"keyed", "other_mesh"}
    assert x.statistics().drops.keys() == {"other_mesh"}


def test_allowlist_admission() -> None:
    lan = Lan()
    allow = frozenset({ident(1).cell_id, ident(2).cell_id})
    s = DiscoverySettings(allowlist=allow)
    _a_addr, a = lan.add(1, s)
    _b_addr, b = lan.add(2, s)
    lan.add(3)  # not on the list
    lan.run(20.0)
    assert {p.cell_id for p in a.peers()} == {ident(2).cell_id}
    assert {p.cell_id for p in b.peers()} == {ident(1).cell_id}
    assert a.statistics().drops["not_allowed"] >= 2  # its beacon and its SOLICIT


def _cert_settings(i: int, not_after: float, authority: Identity = AUTHORITY) -> DiscoverySettings:
    cert = issue_membership_cert(authority, ident(i).cell_id, "cellmesh", int(not_after * 1000))
    return DiscoverySettings(authority_keys=frozenset({AUTHORITY.public_key}), membership_cert=cert)


def test_certificate_admission() -> None:
    lan = Lan()
    far = WALL0 + 10_000
    _a_addr, a = lan.add(1, _cert_settings(1, far))
    lan.add(2, _cert_settings(2, far))
    lan.add(3, _cert_settings(3, WALL0 - 1))  # expired
    lan.add(4, _cert_settings(4, far, authority=Identity.from_secret(bytes(64))))  # rogue
    lan.add(5, DiscoverySettings(authority_keys=frozenset({AUTHORITY.public_key})))  # none
    lan.run(20.0)
    assert {p.cell_id for p in a.peers()} == {ident(2).cell_id}
    drops = a.statistics().drops
    assert drops["cert_expired"] >= 2
    assert drops["cert_authority"] >= 2
    assert drops["no_cert"] >= 2


def test_allowlist_or_certificate_admits() -> None:
    lan = Lan()
    s = replace(_cert_settings(1, WALL0 + 1e4), allowlist=frozenset({ident(3).cell_id}))
    _a_addr, a = lan.add(1, s)
    lan.add(2, _cert_settings(2, WALL0 + 1e4))  # admitted by its certificate
    lan.add(3, DiscoverySettings(authority_keys=s.authority_keys))  # admitted by the allowlist
    lan.add(4)  # neither
    lan.run(20.0)
    assert {p.cell_id for p in a.peers()} == {ident(2).cell_id, ident(3).cell_id}
    assert a.statistics().drops["no_cert"] >= 2


def test_a_peer_whose_certificate_runs_out_is_refused_and_expires() -> None:
    lan = Lan()
    a_addr, a = lan.add(1, _cert_settings(1, WALL0 + 1e4))
    lan.add(2, _cert_settings(2, WALL0 + 30))
    lan.run(29.0)
    assert len(a) == 1
    lan.run(100.0)
    assert len(a) == 0
    assert a.statistics().drops["cert_expired"] > 0
    ((_, ev),) = lan.of(a_addr, PeerExpired)
    assert isinstance(ev, PeerExpired)
    assert ev.reason == "expired"


def test_certificate_for_another_node_is_a_local_error() -> None:
    s = _cert_settings(2, WALL0)
    with pytest.raises(ValueError, match="another CellID"):
        DiscoveryCore(ident(1), s, 0.0, lambda: WALL0, random.Random(1))


# --- pacing, liveness, expiry ------------------------------------------------------------------------


def test_trickle_suppresses_and_the_liveness_promise_holds() -> None:
    lan = Lan()
    for i in range(1, 13):
        lan.add(i)
    lan.run(600.0)
    for addr, core in lan.cores.items():
        st = core.statistics()
        assert st.peers == 11
        assert st.suppressed > 0
        assert st.announce_interval == pytest.approx(5.0 * 12 / 3)
        times = [t for t, _ in lan.beacons_from(addr)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) <= max(st.announce_interval, 7.5) + 1e-9
        per_min = len([t for t in times if t >= 60.0]) / 9.0
        assert per_min < 12.0  # fewer than a fixed 5 s pulse
    assert not any(lan.of(a, PeerExpired) for a in lan.cores)


@pytest.mark.parametrize("seed_node", range(1, 6))
def test_a_longer_promise_takes_effect_one_beacon_late(seed_node: int) -> None:
    """A receiver that loses the beacon announcing a longer interval must not expire us."""
    lan = Lan()
    a_addr, a = lan.add(seed_node)
    b_addr, _ = lan.add(100)
    lan.run(60.0)  # two nodes: both promise 5 s
    lost: list[float] = []

    def tap(src: Addr, data: bytes, to: Addr) -> bool:
        if src != a_addr or to != b_addr or data[1] != FrameType.BEACON:
            return True
        interval = int.from_bytes(data[HEADER_LEN + 12 : HEADER_LEN + 16], "big")
        if lost or interval <= 5000 or data[HEADER_LEN + 1] & FLAG_REPLY:
            return True
        lost.append(lan.now)  # b loses a's first beacon promising more than 5 s
        return False

    lan.tap = tap
    for i in range(200, 220):  # twenty nodes join at once: a's promise jumps to 36.7 s
        lan.add(i, start=False)
    for c in list(lan.cores.values())[2:]:
        c.start(lan.now)
    lan.flush()
    lan.run(lan.now + 300.0)
    assert lost
    assert a.announce_interval == pytest.approx(5.0 * 22 / 3)
    assert not lan.of(b_addr, PeerExpired)


def test_fixed_pulse_without_trickle() -> None:
    lan = Lan()
    s = DiscoverySettings(adaptive=False, solicit_on_start=False)
    for i in range(1, 6):
        lan.add(i, s)
    lan.run(300.0)
    for addr, core in lan.cores.items():
        assert core.statistics().suppressed == 0
        assert core.announce_interval == 5.0
        n = len([t for t, _ in lan.beacons_from(addr) if t > 0])
        assert 58 <= n <= 60  # 12 per minute


def test_a_silent_peer_expires_after_three_announced_intervals() -> None:
    lan = Lan()
    for i in range(1, 4):
        lan.add(i)
    lan.run(100.0)
    gone_addr = next(iter(lan.cores))
    gone = lan.cores[gone_addr]
    lan.down.add(gone_addr)
    lan.run(200.0)
    for addr, core in lan.cores.items():
        if addr == gone_addr:
            continue
        ((t, ev),) = lan.of(addr, PeerExpired)
        assert isinstance(ev, PeerExpired)
        assert ev.peer.cell_id == gone.cell_id
        assert t == pytest.approx(ev.peer.last_seen + 3 * ev.peer.interval)
        assert ev.peer.interval == 5.0  # a 3-node mesh announces Imax
        assert len(core) == 1


def test_eviction_from_a_full_table() -> None:
    lan = Lan()
    a_addr, a = lan.add(1, DiscoverySettings(max_peers=2))
    for i in range(2, 5):
        lan.add(i)
    lan.run(1.0)
    assert len(a) == 2
    reasons = [e.reason for _, e in lan.of(a_addr, PeerExpired)]  # type: ignore[attr-defined]
    assert reasons
    assert set(reasons) == {"evicted"}


def test_sequence_numbers_survive_a_restart() -> None:
    c1 = DiscoveryCore(ident(1), DiscoverySettings(), 0.0, lambda: WALL0, random.Random(1))
    c1.start(0.0)
    seqs1 = [int.from_bytes(d[48:56], "big") for d, _ in c1.datagrams_to_send()]
    c2 = DiscoveryCore(ident(1), DiscoverySettings(), 0.0, lambda: WALL0 + 1, random.Random(1))
    c2.start(0.0)
    seqs2 = [int.from_bytes(d[48:56], "big") for d, _ in c2.datagrams_to_send()]
    assert min(seqs2) > max(seqs1)


# --- robustness ---------------------------------------------------------------------------------


_FEED = DiscoveryCore(ident(1), DiscoverySettings(), 0.0, lambda: WALL0, random.Random(1))
_FEED.start(0.0)
_VALID = [
    push_beacon(
        ident(2), BeaconFields(seq=5, timestamp_ms=int(WALL0 * 1000), interval_ms=9), Mesh()
    ),
    push_solicit(ident(3), 5, int(WALL0 * 1000), Mesh()),
]


def _mutate(frame_and_edits: tuple[bytes, list[tuple[int, int]]]) -> bytes:
    frame, edits = frame_and_edits
    buf = bytearray(frame)
    for pos, value in edits:
        if pos < len(buf):
            buf[pos] = value
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=1300),
        st.tuples(
            st.sampled_from(_VALID),
            st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
        ).map(_mutate),
    )
)
def test_receive_never_raises(data: bytes) -> None:
    before = _FEED.statistics()
    _FEED.receive_datagram(data, ("198.18.0.9", 1), 0.0)
    _FEED.handle_timer(0.0)
    after = _FEED.statistics()
    counted = sum(after.drops.values()) - sum(before.drops.values())
    accepted = (
        after.beacons_accepted
        + after.solicits_accepted
        + after.solicits_known
        - before.beacons_accepted
        - before.solicits_accepted
        - before.solicits_known
    )
    assert counted + accepted == 1  # every datagram is accounted for exactly once


# --- settings -------------------------------------------------------------------------------------


def test_nx0_aliases() -> None:
    env = {"NX0_NAME": "Alpha", "NX0_TYPE": "Bridge", "NX0_EGO": "100", "NX0_PORT": "19541"}
    env["HOME"] = "/root"
    assert nx0_aliases(env) == {
        "name": "Alpha",
        "node_type": "Bridge",
        "ego": "100",
        "group_port": "19541",
    }
    assert nx0_aliases({}) == {}
    fields = set(DiscoverySettings.__dataclass_fields__)
    assert set(NX0_ALIASES.values()) <= fields


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mesh_name": ""}, "empty"),
        ({"mesh_key": b"short"}, "16 to 32"),
        ({"allowlist": frozenset({b"x"})}, "allowlist"),
        ({"authority_keys": frozenset({b"x"})}, "authority"),
        ({"name": "x" * 65}, "limit"),
        ({"zone": "bad\x00"}, "control"),
        ({"ego": 300}, "ego"),
        ({"tags": (("", "v"),)}, "empty"),
        ({"group_hosts": ()}, "group"),
        ({"group_hosts": ("198.18.0.1",)}, "multicast"),
        ({"group_hosts": ("not an ip",)}, "IP address"),
        ({"group_port": 0}, "group_port"),
        ({"imin": 0.0}, "imin"),
        ({"imin": 10.0}, "imin"),
        ({"k": 0}, "k must"),
        ({"expiry_multiplier": 0.5}, "expiry_multiplier"),
        ({"skew": float("nan")}, "skew"),
        ({"solicit_burst": 0.5}, "burst"),
        ({"max_peers": 0}, "max_peers"),
        ({"reply_reuse": -1.0}, "reply_reuse"),
    ],
)
def test_settings_validation(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiscoverySettings(**kw)  # type: ignore[arg-type]


def test_settings_hide_the_key_and_name_the_groups() -> None:
    s = DiscoverySettings(mesh_key=b"s" * 16, group_hosts=("ff02::1", "224.0.0.1"), group_port=1)
    assert "ssss" not in repr(s)
    assert s.groups == (("ff02::1", 1), ("224.0.0.1", 1))
    assert s.mesh == Mesh("cellmesh", b"s" * 16)
