"""The discovery core: signed beacons, Trickle-paced announcements and a peer table, sans-IO.

Theory of operation
-------------------
The driver (cellmesh.node, or cellmesh.sim) feeds `receive_datagram(data, addr, now)` with every
BEACON and SOLICIT it receives (`is_discovery_frame` tells them apart from transport frames),
calls `handle_timer(now)` at `get_timer()`, sends what `datagrams_to_send()` returns (multicast
frames are addressed to the configured groups, ``("ff02::1", 19541)`` by default; answers go
unicast to the address a SOLICIT or beacon came from) and reads `next_event()`: `PeerDiscovered`,
`PeerUpdated`, `PeerExpired`. No sockets, no clocks: monotonic `now` is passed in, the wall clock
(for frame timestamps) is the injected `wall()`, randomness (jitter) the injected `random.Random`.

Announcing. `start(now)` multicasts a beacon and a SOLICIT at once and starts a Trickle timer
(`trickle.py`) at Imin, the start beacon counting as the first interval's transmission. At each
later Trickle firing point the node multicasts a beacon unless the interval already carried k
consistent beacons from neighbours (suppression), so in a stable mesh only a few beacons per
interval go out *in total*, whatever the number of nodes. Trickle resets to Imin on an
inconsistency: a new peer or a peer whose announcement changed (heard by multicast), or an accepted
SOLICIT, at most once per `reset_holdoff`, so a join storm cannot pin every node at Imin; a
change of our own announcement resets it and forces the next firing to transmit.

The liveness promise. Every beacon carries the interval its sender promises not to exceed between
two multicast beacons; receivers expire a peer after `expiry_multiplier` (3) such intervals. The
promise is ``imax * max(1, (peers + 1) / k)``, capped at `max_announce_interval`: 5 s in a small
mesh, longer as the mesh grows, so that the forced beacons alone also add up to about k per Imax.
A node whose beacons were suppressed for so long that its next Trickle firing could come later
than a random point late in its promised interval transmits anyway (`forced`); the random point
(drawn afresh after every multicast beacon, like Trickle's own t) keeps the forced beacons of
nodes that started together from staying in lock-step. Multicast beacons are therefore at most
``max(interval, 1.5 * imax)`` apart (1.5 Imax being the longest gap between two Trickle firing
points), and the beacon load per node *falls* as the mesh grows, against 12 per minute for a
fixed 5 s pulse (`adaptive=False`: Trickle with Imin = Imax and no suppression, the benchmark's
baseline). A promise may shrink at once but grows one beacon late: until the next multicast
beacon we owe the shortest interval announced by the last one, the one before it or any answer
in between, so a receiver that lost the beacon announcing a longer interval does not expire us.
The start beacon, sent before we know any peer, promises the cap; answers never promise less
than our last multicast beacon did.

Joining. A SOLICIT asks every neighbour to announce itself now. Each answers with a beacon sent
*unicast* to the solicitor's address, after a random delay of up to `solicit_reply_jitter`
(200 ms), so a new node hears a whole stable mesh in well under half a second without a multicast
storm. The answer carries the reply flag (its receiver does not count it as a transmission the
whole link heard) and is signed once and re-sent to further solicitors for up to `reply_reuse`
(1 s), so a join storm costs about one signature per second, not one per newcomer. Answers are
limited per CellID and per address (one per `solicit_interval`, two copies at most) and
globally (`solicit_rate`).

Repair on lossy links (Wi-Fi multicast has no retransmission). A starting node repeats its
SOLICIT `solicit_retry` (2.5 s) and 7.5 s after starting, and once more 10 s later if the second
repeat still found missing peers, each time with a Bloom filter of the peers it has heard, so
only the neighbours it lacks answer (twice); a neighbour listed in the filter ignores the repeat
without verifying it. A neighbour that gets a SOLICIT from a node whose beacon it never heard
sends it a SOLICIT back (unicast, reply-flagged so it is not asked back in turn). And once past
its own start-up, a node answers the first multicast beacon of an unknown peer as if solicited
(an introduction: either the peer is new and its SOLICIT follows, which then counts as answered,
or it never heard us either).

Receiving, cheapest check first, every refusal counted by reason in `statistics().drops`:
structure (`read_frame`), our own frame reflected back, mesh tag, MAC (before anything costly),
the allowlist (when it is the only membership rule), a per-address budget (before any
signature), timestamp skew and sequence number (the table's `check`), the content (parsed only
when it differs from the peer's last beacon), membership (allowlist or certificate), the Ed25519
signature, the certificate's signature. Only then does the table change. Nothing raises out of
`receive_datagram`.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable

from cellmesh.discovery.beacon import (
    FLAG_KNOWN,
    FLAG_REPLY,
    MAX_ADDRESSES,
    STATIC_OFFSET,
    Addr,
    BeaconFields,
    FrameView,
    check_mesh,
    check_signature,
    filter_contains,
    known_filter,
    normalize_addr,
    parse_beacon,
    parse_solicit,
    peek_known,
    push_beacon,
    push_solicit,
    read_frame,
    signed_message,
)
from cellmesh.discovery.events import (
    DiscoveryEvent,
    DiscoveryStats,
    PeerDiscovered,
    PeerExpired,
    PeerUpdated,
)
from cellmesh.discovery.mesh import AdmissionError, MembershipCert, check_cert, verify_cert
from cellmesh.discovery.settings import DiscoverySettings
from cellmesh.discovery.table import PeerRecord, PeerTable
from cellmesh.discovery.trickle import Trickle
from cellmesh.errors import (
    DecodeError,
    LocalProtocolError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.filter.buckets import KeyedBuckets, TokenBucket
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import Identity, verify_signature
from cellmesh.wire.header import HEADER_LEN, FrameType

__all__ = ["DiscoveryCore"]

MIN_SOLICIT_RETRIES = 2
MAX_SOLICIT_RETRIES = 3
"""How often a starting node repeats its SOLICIT: twice, and a third time only if the second
still brought news (see `DiscoveryCore._retry`)."""

_BEACON = int(FrameType.BEACON)
_SOLICIT = int(FrameType.SOLICIT)
_DECODE_REASONS: dict[type[DecodeError], str] = {
    TruncatedError: "truncated",
    OversizeError: "oversize",
    VersionError: "bad_version",
    MalformedError: "malformed",
}


def _decode_reason(exc: DecodeError) -> str:
    return _DECODE_REASONS.get(type(exc), "malformed")


class DiscoveryCore:
    """Zero-configuration discovery for one node. See the module docstring."""

    def __init__(
        self,
        identity: Identity,
        settings: DiscoverySettings,
        now: float,
        wall: Callable[[], float],
        rng: random.Random,
        verify: Callable[[bytes, bytes, bytes], None] = verify_signature,
    ) -> None:
        """`wall()` returns Unix time in seconds (beacon timestamps); `rng` draws jitter only;
        `verify` checks Ed25519 signatures (the default, or a shared `CachedVerifier`)."""
        cert = settings.membership_cert
        if cert is not None and cert.cell_id != identity.cell_id:
            raise ValueError("the membership certificate was issued for another CellID")
        self.identity = identity
        self.cell_id: CellId = identity.cell_id
        self.settings = settings
        self._mesh = settings.mesh
        self._groups = settings.groups
        self._wall = wall
        self._rng = rng
        self._verify = verify
        s = settings
        self._table = PeerTable(
            s.max_peers, s.expiry_multiplier, s.skew, min(0.01, s.imin), s.max_peer_interval
        )
        if s.adaptive:
            self._trickle = Trickle(s.imin, s.imax, s.k, rng)
        else:
            self._trickle = Trickle(s.imax, s.imax, None, rng)
        self._allow_only = s.allowlist is not None and not s.authority_keys
        self._open_membership = s.allowlist is None and not s.authority_keys
        self._addr_budget: KeyedBuckets[Addr] = KeyedBuckets(
            s.beacon_source_rate, s.beacon_source_burst, capacity=s.max_peers
        )
        # CellID -> (when we last answered it, whether unasked, how many copies)
        self._answered: OrderedDict[bytes, tuple[float, bool, int]] = OrderedDict()
        self._asked: OrderedDict[bytes, float] = OrderedDict()  # CellID -> last ask-back
        self._ask_frame: tuple[bytes, float] | None = None
        self._solicit_by_addr: KeyedBuckets[Addr] = KeyedBuckets(
            1.0 / s.solicit_interval, 1.0, s.max_peers
        )
        self._ask_by_addr: KeyedBuckets[Addr] = KeyedBuckets(
            1.0 / s.solicit_interval, 1.0, s.max_peers
        )
        self._solicit_budget = TokenBucket(s.solicit_rate, s.solicit_burst, now)
        self._solicit_seen: OrderedDict[bytes, int] = OrderedDict()
        self._replies: dict[Addr, tuple[float, int]] = {}  # address -> (when, copies left)
        self._retry_at: float | None = None
        self._intro_after = float("inf")  # no introductions while we are starting up
        self._retry_gap = 0.0
        self._retries = 0
        self._answers_new = 0  # peers first learnt from answers since the last SOLICIT
        self._reply_frame: tuple[bytes, float] | None = None
        self._addresses: tuple[Addr, ...] = ()
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[DiscoveryEvent] = deque()
        self._started = False
        # Sequence numbers start from the wall clock (ms * 256), so a restarted node normally
        # continues above the numbers its previous life used.
        self._seq = max(0, int(wall() * 1000)) << 8
        self._dirty = False
        self._last_multicast = now
        # The liveness promise (module docstring): `_promised` is the longest we may now go
        # without a multicast beacon; `_gap_min` the shortest interval announced since the last
        # one (that beacon included); `_mc_interval` the interval that beacon announced.
        self._promised = s.imax
        self._gap_min = s.imax
        self._mc_interval = s.imax
        self._force_jitter = 0.0
        self._last_reset = -float("inf")
        self._last_solicit = -float("inf")
        # get_timer's answer, recomputed only when Trickle, the pending answers or the expiry
        # heap (its `version`) changed.
        self._timer = 0.0
        self._timer_version = -1
        self._timer_stale = True
        self.drops: Counter[str] = Counter()
        self._beacons_sent = 0
        self._replies_sent = 0
        self._solicits_sent = 0
        self._suppressed = 0
        self._forced = 0
        self._received = 0
        self._beacons_accepted = 0
        self._solicits_accepted = 0
        self._introductions = 0
        self._solicits_known = 0
        self._asks = 0

    # ----------------------------------------------------------------- public API (sans-IO)

    def start(self, now: float) -> None:
        """Begin: a SOLICIT (unless disabled) and a beacon go out at once; Trickle starts."""
        if self._started:
            raise LocalProtocolError("discovery core already started")
        self._started = True
        self._timer_stale = True
        self._trickle.start(now, transmitted=True)  # the beacon below is interval 1's
        s = self.settings
        # We know no peer yet, so the first beacon promises the longest interval (a promise may
        # shrink at once, but must grow carefully); the next one, sent as soon as Trickle
        # allows, says what the mesh we have found calls for.
        if s.introduce:
            # While we start, every beacon is new to us: the senders heard our own start beacon
            # or SOLICIT (and our repeats), so introducing ourselves would only repeat that.
            self._intro_after = now + max(s.solicit_retry, s.solicit_interval)
        first = max(s.imax, s.max_announce_interval) if s.adaptive else s.imax
        self._gap_min = first
        self._send_multicast(now, first)  # first, so a SOLICIT never comes from a stranger
        if s.solicit_on_start:
            self.solicit(now)
            if s.solicit_retry > 0:
                self._retry_gap = max(s.solicit_retry, s.solicit_interval)
                self._retry_at = now + self._retry_gap

    def solicit(self, now: float) -> bool:
        """Ask the neighbours to announce themselves now (e.g. after a link came up).

        The SOLICIT carries a Bloom filter of the peers we already know, so only the others
        answer. Returns False, sending nothing, within `solicit_interval` of the previous
        SOLICIT (neighbours would refuse it anyway).
        """
        if not self._started:
            raise LocalProtocolError("start the discovery core first")
        if now - self._last_solicit < self.settings.solicit_interval:
            return False
        self._last_solicit = now
        self._seq += 1
        known = None
        if self._table:
            known = known_filter(self._table.cell_ids(), self._seq)
        frame = push_solicit(
            self.identity,
            self._seq,
            self._wall_ms(),
            self._mesh,
            self.settings.membership_cert,
            known,
        )
        for g in self._groups:
            self._out.append((frame, g))
        self._solicits_sent += len(self._groups)
        return True

    def set_addresses(self, addresses: Iterable[Addr], now: float) -> None:
        """Set the addresses announced in our beacons (IP literals and ports, at most 8).

        A change is announced promptly: Trickle resets and the next firing transmits.
        Raises `ValueError` for an invalid address or more than 8 of them.
        """
        addrs = tuple(normalize_addr(a) for a in addresses)
        if len(addrs) > MAX_ADDRESSES:
            raise ValueError(f"at most {MAX_ADDRESSES} addresses can be announced")
        if addrs == self._addresses:
            return
        self._addresses = addrs
        self._reply_frame = None
        if self._started:
            self._dirty = True
            self._trickle.reset(now)
            self._timer_stale = True

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Feed one received datagram. Never raises for bad input: it is dropped and counted."""
        self._received += 1
        if not self._started:
            self.drops["not_started"] += 1
            return
        if len(data) < HEADER_LEN:
            self.drops["truncated"] += 1
            return
        if type(data) is not bytes:
            data = bytes(data)
        ftype = data[1]
        try:
            if ftype == _BEACON:
                self._on_beacon(data, addr, now)
            elif ftype == _SOLICIT:
                self._on_solicit(data, addr, now)
            else:
                self.drops["not_discovery"] += 1
        except DecodeError as exc:
            self.drops[_decode_reason(exc)] += 1
        except AdmissionError as exc:
            self.drops[exc.reason] += 1

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """Take every datagram the core wants sent, with its destination."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> DiscoveryEvent | None:
        """The next peer event, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called (absolute), or None before `start`."""
        if not self._started:
            return None
        table = self._table
        if not self._timer_stale and self._timer_version == table.version:
            return self._timer  # nothing that decides it has moved (the common case)
        t = self._trickle.next_fire()
        if self._retry_at is not None and self._retry_at < t:
            t = self._retry_at
        for due, _ in self._replies.values():
            if due < t:
                t = due
        expiry = table.next_expiry()
        if expiry is not None and expiry < t:
            t = expiry
        self._timer = t
        self._timer_version = table.version
        self._timer_stale = False
        return t

    def handle_timer(self, now: float) -> None:
        """Answer SOLICITs, announce (or not) and expire peers, whatever is due at `now`."""
        if not self._started:
            return
        self._timer_stale = True
        if self._retry_at is not None and now >= self._retry_at:
            self._retry(now)
        if self._replies:
            due = [(a, c) for a, (t, c) in self._replies.items() if t <= now]
            jitter = self.settings.solicit_reply_jitter
            for a, copies in due:
                del self._replies[a]
                self._out.append((self._reply(now), a))
                self._replies_sent += 1
                if copies > 1:
                    again = now + jitter + self._rng.uniform(0.0, jitter)
                    self._replies[a] = (again, copies - 1)
        decision = self._trickle.poll(now)
        if decision is not None:
            if decision or self._dirty:
                self._send_multicast(now)
            elif self._trickle.latest_next_fire() - self._last_multicast > self._force_after():
                self._forced += 1
                self._send_multicast(now)
            else:
                self._suppressed += 1
        for rec in self._table.expire(now):
            self._events.append(PeerExpired(rec, "expired"))

    # ----------------------------------------------------------------- reading

    def peers(self) -> tuple[PeerRecord, ...]:
        """Snapshots of every known peer, in order of first contact."""
        return tuple(self._table.records())

    def peer(self, cell_id: bytes) -> PeerRecord | None:
        """The snapshot of one peer, or None."""
        return self._table.get(cell_id)

    def __len__(self) -> int:
        """The number of known peers."""
        return len(self._table)

    @property
    def announce_interval(self) -> float:
        """The liveness interval we would announce now, seconds."""
        s = self.settings
        if not s.adaptive:
            return s.imax
        n = len(self._table)
        return min(s.imax * max(1.0, (n + 1) / s.k), max(s.imax, s.max_announce_interval))

    def statistics(self) -> DiscoveryStats:
        """A frozen snapshot of the counters."""
        return DiscoveryStats(
            peers=len(self._table),
            beacons_sent=self._beacons_sent,
            replies_sent=self._replies_sent,
            solicits_sent=self._solicits_sent,
            suppressed=self._suppressed,
            forced=self._forced,
            datagrams_received=self._received,
            beacons_accepted=self._beacons_accepted,
            solicits_accepted=self._solicits_accepted,
            introductions=self._introductions,
            solicits_known=self._solicits_known,
            asks=self._asks,
            trickle_interval=self._trickle.interval,
            announce_interval=self.announce_interval,
            drops=dict(self.drops + self._table.drops),
        )

    # ----------------------------------------------------------------- sending

    def _wall_ms(self) -> int:
        return max(0, int(self._wall() * 1000))

    def _make_beacon(self, interval: float, reply: bool = False) -> bytes:
        s = self.settings
        self._seq += 1
        fields = BeaconFields(
            seq=self._seq,
            timestamp_ms=self._wall_ms(),
            interval_ms=max(1, round(interval * 1000)),
            name=s.name,
            node_type=s.node_type,
            zone=s.zone,
            ego=s.ego,
            caps=s.caps,
            tags=s.tags,
            addresses=self._addresses,
            cert=s.membership_cert,
        )
        return push_beacon(self.identity, fields, self._mesh, reply)

    def _send_multicast(self, now: float, interval: float | None = None) -> None:
        # Until the next multicast beacon we owe the shortest interval announced by this beacon,
        # the previous one or any answer in between: a receiver that lost this beacon still goes
        # by what it heard before, so a longer promise only takes effect one beacon later.
        if interval is None:
            interval = self.announce_interval
        self._promised = min(self._gap_min, interval)
        self._gap_min = self._mc_interval = interval
        frame = self._make_beacon(interval)
        for g in self._groups:
            self._out.append((frame, g))
        self._beacons_sent += len(self._groups)
        self._last_multicast = now
        self._dirty = False
        self._reply_frame = None  # answers must not carry an older seq than this beacon
        self._force_jitter = self._rng.random()

    def _retry(self, now: float) -> None:
        """Repeat the start SOLICIT, listing the peers heard so far, the gap doubling each time.
        The first `MIN_SOLICIT_RETRIES` repeats always go out (a repeat lost on the way to the
        one neighbour that needed it would otherwise end the repair); one more, up to
        `MAX_SOLICIT_RETRIES`, only if the previous repeat still brought answers from unknown
        peers, i.e. if the link is losing frames."""
        self._retry_at = None
        if self._retries >= MIN_SOLICIT_RETRIES and not self._answers_new:
            return
        self._answers_new = 0
        self._retries += 1
        self.solicit(now)
        if self._retries < MAX_SOLICIT_RETRIES:
            self._retry_gap *= 2
            self._retry_at = now + self._retry_gap

    def _reply(self, now: float) -> bytes:
        """The beacon that answers a SOLICIT: signed once, re-used for `reply_reuse` seconds.

        Every solicitor gets the same bytes, so a join storm costs one signature per window and
        not one per solicitor. A change of our own announcement invalidates it. It never promises
        less than our last multicast beacon did: the solicitor will hear our next multicast
        beacon anyway, and a shorter promise would only oblige us to send one early.
        """
        cached = self._reply_frame
        if cached is not None and now - cached[1] <= self.settings.reply_reuse:
            return cached[0]
        interval = max(self.announce_interval, self._mc_interval)
        self._gap_min = min(self._gap_min, interval)
        self._promised = min(self._promised, interval)
        frame = self._make_beacon(interval, reply=True)
        self._reply_frame = (frame, now)
        return frame

    def _force_after(self) -> float:
        """How long after our last multicast beacon the next one must come: a random point in
        the second half of the promised interval, but never below what Trickle's own firing
        points can resolve (1.5 Imax)."""
        promised = self._promised
        slack = promised - 1.5 * self.settings.imax
        if slack <= 0:
            return promised
        return promised - 0.5 * slack * self._force_jitter

    def _maybe_reset(self, now: float) -> None:
        """An inconsistency from a neighbour: reset Trickle, at most once per holdoff."""
        if now - self._last_reset >= self.settings.reset_holdoff and self._trickle.reset(now):
            self._last_reset = now
            self._timer_stale = True

    # ----------------------------------------------------------------- receiving

    def _membership(self, cell: bytes, cert: MembershipCert | None, wall_ms: int) -> int | None:
        """Cheap membership checks; returns the certificate's expiry when a certificate is what
        admits the peer (its signature must then be verified), else None."""
        s = self.settings
        if self._open_membership or (s.allowlist is not None and cell in s.allowlist):
            return None
        if not s.authority_keys:
            raise AdmissionError("not_allowed", "CellID is not on the allowlist")
        if cert is None:
            raise AdmissionError("no_cert", "no membership certificate")
        check_cert(
            cert,
            cell_id=cell,
            mesh_name=s.mesh_name,
            authority_keys=s.authority_keys,
            wall_ms=wall_ms,
        )
        return cert.not_after_ms

    def _verify_cert(self, cert: MembershipCert | None, cell: bytes, wall_ms: int) -> None:
        assert cert is not None
        s = self.settings
        verify_cert(
            cert,
            cell_id=cell,
            mesh_name=s.mesh_name,
            authority_keys=s.authority_keys,
            wall_ms=wall_ms,
            verify=self._verify,
        )

    def _precheck(self, data: bytes, view: FrameView, addr: Addr, now: float) -> bool:
        """The checks shared by BEACON and SOLICIT, up to the per-address budget."""
        src = view.src
        if src == self.cell_id:
            self.drops["reflected"] += 1
            return False
        check_mesh(data, view, self._mesh)
        if self._allow_only:
            allow = self.settings.allowlist
            assert allow is not None
            if src not in allow:
                raise AdmissionError("not_allowed", "CellID is not on the allowlist")
        if not self._addr_budget.take(addr, now):
            self.drops["rate_limited"] += 1
            return False
        return True

    def _on_beacon(self, data: bytes, addr: Addr, now: float) -> None:
        view = read_frame(data, _BEACON)
        if not self._precheck(data, view, addr, now):
            return
        wall_ms = self._wall_ms()
        table = self._table
        src = view.src
        if not table.check(src, view.seq, view.timestamp_ms, wall_ms):
            return
        flags = view.flags & ~FLAG_REPLY
        multicast = flags == view.flags
        static = data[STATIC_OFFSET : view.static_end]
        entry = table.entry(src)
        if entry is not None and entry.flags == flags and entry.static == static:
            # Fast path: the same announcement as last time, only seq/timestamp/interval moved.
            until = entry.membership_until_ms
            if until is not None and until < wall_ms:
                raise AdmissionError("cert_expired", "membership certificate has expired")
            check_signature(
                self._verify, entry.public_key, signed_message(data, view), data[view.sig_offset :]
            )
            table.refresh(src, view.seq, view.timestamp_ms, view.interval_ms, now, addr)
            self._beacons_accepted += 1
            if multicast:
                self._trickle.hear_consistent()
            return
        ub = parse_beacon(data, view)
        b = ub.beacon
        until = self._membership(b.cell_id, b.fields.cert, wall_ms)
        ub.verify(self._verify)
        if until is not None:
            self._verify_cert(b.fields.cert, b.cell_id, wall_ms)
        upd = table.apply(b, now, addr, static, flags)
        fresh = table.entry(src)
        assert fresh is not None
        fresh.membership_until_ms = until
        self._beacons_accepted += 1
        if upd.kind == "refresh":
            if multicast:
                self._trickle.hear_consistent()
            return
        assert upd.record is not None
        if upd.evicted is not None:
            self._events.append(PeerExpired(upd.evicted, "evicted"))
        if upd.kind == "new":
            self._events.append(PeerDiscovered(upd.record))
            if not multicast:
                self._answers_new += 1
            if (
                multicast
                and now >= self._intro_after
                and self._answer(src, addr, now, intro=True) is None
            ):
                # A node we have never heard is new to the link, or has not heard us either
                # (its SOLICIT, or our answer, was lost): introduce ourselves, as if asked.
                self._introductions += 1
        else:
            assert upd.previous is not None
            self._events.append(PeerUpdated(upd.record, upd.previous, upd.changed))
        if multicast:
            # An answer to our own SOLICIT tells us about the mesh, but nothing changed for
            # anyone else: no reason to make the whole link announce again.
            self._maybe_reset(now)

    def _on_solicit(self, data: bytes, addr: Addr, now: float) -> None:
        view = read_frame(data, _SOLICIT)
        if view.flags & FLAG_KNOWN and view.src in self._table and view.src != self.cell_id:
            # A repeated SOLICIT from a peer we know: if it lists us too there is nothing to do,
            # and nothing to verify (ignoring a frame is safe whoever sent it). Most repeats end
            # here, after two table lookups and a hash.
            known = peek_known(data, view)
            if known is not None and filter_contains(known, self.cell_id, view.seq):
                self._solicits_known += 1
                return
        if not self._precheck(data, view, addr, now):
            return
        src = view.src
        wall_ms = self._wall_ms()
        skew_ms = self._table.skew_ms
        if view.timestamp_ms < wall_ms - skew_ms:
            self.drops["stale"] += 1
            return
        if view.timestamp_ms > wall_ms + skew_ms:
            self.drops["future"] += 1
            return
        seen = self._solicit_seen.get(src)
        if seen is not None and view.seq <= seen:
            self.drops["solicit_replay"] += 1
            return
        us = parse_solicit(data, view)
        known = us.solicit.known
        listed = known is not None and filter_contains(known, self.cell_id, view.seq)
        stranger = src not in self._table
        if listed and not stranger:
            self._solicits_known += 1  # a repeated SOLICIT from a node that already has us
            return
        until = self._membership(src, us.solicit.cert, wall_ms)
        us.verify(self._verify)
        if until is not None:
            self._verify_cert(us.solicit.cert, src, wall_ms)
        self._solicit_seen[src] = view.seq
        self._solicit_seen.move_to_end(src)
        if len(self._solicit_seen) > self.settings.max_peers:
            self._solicit_seen.popitem(last=False)
        if stranger and not us.solicit.reply:
            self._ask(src, addr, now)  # we never heard its beacon: ask it for one
        if listed:
            self._solicits_known += 1
            return
        # A repeated SOLICIT that does not list us, or one asked back, says our answer (or our
        # beacon) was lost once already: answer twice this time.
        copies = 2 if known is not None or us.solicit.reply else 1
        last = self._answered.get(src)
        if (
            last is not None
            and (last[1] or copies > 1)
            and now - last[0] < self.settings.solicit_interval
        ):
            # Our answer is already on its way: we introduced ourselves when its beacon came
            # (before its SOLICIT), or it repeats or asks back while our answer is pending.
            # At most top the answer up to `copies`, once per interval.
            if last[1]:
                self._introductions -= 1  # asked for after all: an ordinary answer
            if copies > last[2]:
                pending = self._replies.get(addr)
                if pending is not None:
                    self._replies[addr] = (pending[0], pending[1] + copies - last[2])
                else:
                    jitter = self._rng.uniform(0.0, self.settings.solicit_reply_jitter)
                    self._replies[addr] = (now + jitter, copies - last[2])
                    self._timer_stale = True
            self._answered[src] = (last[0], False, max(copies, last[2]))
            self._solicits_accepted += 1
            return
        refused = self._answer(src, addr, now, copies)
        if refused is not None:
            self.drops[refused] += 1
            return
        self._solicits_accepted += 1
        self._maybe_reset(now)

    def _ask(self, cell: bytes, addr: Addr, now: float) -> None:
        """Send a SOLICIT (reply-flagged, so it is not asked back) unicast to a node whose
        SOLICIT reached us but whose beacon did not; at most one per CellID and one per address
        per interval, within the global budget."""
        asked = self._asked
        last = asked.get(cell)
        if last is not None and now - last < self.settings.solicit_interval:
            return
        if not (self._ask_by_addr.take(addr, now) and self._solicit_budget.take(now)):
            return
        asked[cell] = now
        asked.move_to_end(cell)
        if len(asked) > self.settings.max_peers:
            asked.popitem(last=False)
        cached = self._ask_frame
        if cached is None or now - cached[1] > self.settings.reply_reuse:
            self._seq += 1
            frame = push_solicit(
                self.identity,
                self._seq,
                self._wall_ms(),
                self._mesh,
                self.settings.membership_cert,
                reply=True,
            )
            cached = self._ask_frame = (frame, now)
        self._out.append((cached[0], addr))
        self._asks += 1

    def _answer(
        self, cell: bytes, addr: Addr, now: float, copies: int = 1, intro: bool = False
    ) -> str | None:
        """Schedule a unicast beacon (`copies` times, a jitter window apart) to `addr` for
        `cell`, within the limits: one per CellID and one per address per `solicit_interval`,
        and the global budget. `intro`: unasked (see `_on_beacon`). Returns why not, or None."""
        interval = self.settings.solicit_interval
        last = self._answered.get(cell)
        if last is not None and now - last[0] < interval:
            return "solicit_limited"
        if not self._solicit_by_addr.take(addr, now):
            return "solicit_limited"
        if not self._solicit_budget.take(now):
            return "solicit_budget"
        answered = self._answered
        answered[cell] = (now, intro, copies)
        answered.move_to_end(cell)
        if len(answered) > self.settings.max_peers:
            answered.popitem(last=False)
        if addr not in self._replies:
            due = now + self._rng.uniform(0.0, self.settings.solicit_reply_jitter)
            self._replies[addr] = (due, copies)
            self._timer_stale = True
        return None
