"""The anchor core: Deterministic Anchor Truth for one node, sans-IO.

Theory of operation
-------------------
The driver (cellmesh.node later, cellmesh.sim.anchor today) tells the core who the members are
(`admit` / `forget`, from discovery), feeds it every anchor message it receives
(`receive_message(data, now)`), calls `handle_timer(now)` at `get_timer()`, sends what
`messages_to_send()` returns (each with a destination CellID, or None for a broadcast) and reads
`next_event()`. No sockets, no clocks: monotonic `now` is passed in, the wall clock (message
timestamps only) is the injected `wall()`, and every key and nonce comes from the injected
`random_bytes` (the OS CSPRNG by default).

Roles. A started node *listens* (`listen_time`, 15 s) for an anchor: it follows any eligible
member whose claim verifies, but may not promote itself. Then it *elects*: if it tops the
election order among the eligible members it does not suspect (`rule.py`) and no live claimant
outranks it in the claim order, it promotes itself; otherwise it follows the best live claimant,
or waits for the member that tops its ranking, passing over one that has not claimed within the
silence timeout (the next ones within `succession_wait`: live members time out together, so a
live successor claims at once). It does not promote itself while a claimant that outranks it
is still heard, serving the hold of a member we failed over from. A *follower* verifies its
anchor's pulses; an *anchor* pulses every `pulse_interval`, starts a new epoch every
`epoch_period` (and soon after a member is forgotten) and delivers each epoch key to each member
sealed to that member's X25519 key and signed.

Hysteresis (the exact rule is in docs/anchor.md). An incumbent (the anchor we follow, or we
ourselves as anchor) keeps the role unless a claimant that outranks it in the claim order has
been heard claiming, with no gap longer than the silence timeout, for its hold: `hold_time` (two
pulses), doubled for every failover away from that claimant beyond the first within
`strike_memory`. A follower whose ego is strictly higher than its anchor's becomes a claimant
after following it for `challenge_delay`. Claims from members that do not outrank the incumbent
are refused ("not_anchor"), unless the incumbent is overdue (no verified claim for 1.5 pulse
intervals), in which case they are verified and kept, so that a failover can follow the
successor at once instead of a pulse later.

Failover. A follower declares its anchor failed when no claim of it verified for the silence
timeout (3 pulses plus `pulse_slack`) or its key outlived `stale_epochs` periods (an anchor
that stopped rotating, which is then not taken back until it rotates), strikes it, and elects
again: the next member by the rule promotes itself and starts a new term.

Receiving, cheapest check first, every refusal counted by reason in `drops`: structure, our own
message reflected, membership (never any crypto for a non-member), the per-sender budget, the
timestamp window, the claim rule, replay (sequence and epoch numbers), the MAC (pulses), the
Ed25519 signature, the sealed box. Nothing raises out of `receive_message`.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable

from cellmesh.anchor.claimants import Claimant, Strikes
from cellmesh.anchor.early import EarlyMessages
from cellmesh.anchor.events import (
    AnchorChanged,
    AnchorEvent,
    AnchorFailed,
    AnchorStats,
    EpochKeyInstalled,
    Role,
)
from cellmesh.anchor.keys import (
    EPOCH_KEY_LEN,
    MAC_LEN,
    EpochKey,
    KeyOpener,
    compute_mac,
    mac_matches,
    seal_epoch_key,
    sealing_box,
)
from cellmesh.anchor.messages import (
    MAGIC,
    NONCE_LEN,
    PULSE_MAC_OFFSET,
    REQUEST_LEN,
    AnchorMsgType,
    EpochGrant,
    EpochRequest,
    Pulse,
    decode_message,
    make_grant,
    make_pulse,
    make_request,
    signed_bytes,
)
from cellmesh.anchor.rule import (
    Member,
    cap_ego,
    claim_outranks,
    election_order,
    election_top,
    seniority_level,
)
from cellmesh.anchor.settings import AnchorSettings
from cellmesh.errors import (
    AuthenticationError,
    DecodeError,
    LocalProtocolError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.filter.buckets import KeyedBuckets
from cellmesh.identity.cellid import CellId, cell_id_from_public_key
from cellmesh.identity.keys import (
    ED25519_PUBLIC_KEY_LEN,
    X25519_KEY_LEN,
    Identity,
    verify_signature,
)

__all__ = ["AnchorCore", "Outgoing"]

_cell_id_of = functools.lru_cache(maxsize=8192)(cell_id_from_public_key)
"""Memoised: a driver re-admits the same members again and again (pure, so safe to cache)."""

Outgoing = tuple[CellId | None, bytes]
"""A message for the driver: destination CellID (None: broadcast to the link) and its bytes."""

_ZERO_CELL = CellId(bytes(16))
_ZERO_NONCE = bytes(NONCE_LEN)
_OVERDUE_PULSES = 1.5
"""An anchor not heard for this many pulse intervals is overdue (see the module docstring)."""
_MAX_NONCES = 16
_MAX_ASKED = 64
_DECODE_REASONS: dict[type[DecodeError], str] = {
    TruncatedError: "truncated",
    OversizeError: "oversize",
    VersionError: "bad_version",
    MalformedError: "malformed",
}


def _short(cell: bytes) -> str:
    return bytes(cell).hex()[:8]


class AnchorCore:
    """Deterministic Anchor Truth for one node. See the module docstring and docs/anchor.md."""

    def __init__(
        self,
        identity: Identity,
        settings: AnchorSettings,
        now: float,
        wall: Callable[[], float],
        random_bytes: Callable[[int], bytes] = os.urandom,
        *,
        ego: int = 0,
        eligible: bool = True,
        verify: Callable[[bytes, bytes, bytes], None] = verify_signature,
    ) -> None:
        """`wall()` returns Unix time in seconds (message timestamps only); `random_bytes(n)`
        makes epoch keys and nonces and must be a CSPRNG outside simulations; `ego` is this
        node's configured score (capped at `settings.ego_cap`); `eligible=False` makes a member
        that takes keys but never claims the role; `verify` checks Ed25519 signatures (the
        default, or a shared cache such as `cellmesh.discovery.CachedVerifier`)."""
        self.identity = identity
        self.cell_id: CellId = identity.cell_id
        self.settings = settings
        self._wall = wall
        self._random_bytes = random_bytes
        self._verify = verify
        self._opener = KeyOpener(identity)
        self._self = Member(
            self.cell_id,
            identity.public_key,
            identity.noise_static_public,
            cap_ego(ego, settings.ego_cap),
            now,
            eligible,
        )
        self._members: dict[CellId, Member] = {self.cell_id: self._self}
        self._role = Role.IDLE
        self._anchor: CellId | None = None
        self._term = 0
        """The term of the anchor we follow, or ours while we are anchor."""
        self._installed: EpochKey | None = None
        self._retired: EpochKey | None = None
        """The key installed before the current one; usable for `key_grace` after `_retired_at`."""
        self._retired_at = -math.inf
        self._claimants: dict[CellId, Claimant] = {}
        self._strikes: dict[CellId, Strikes] = {}
        self._passed: dict[CellId, None] = {}
        self._expect: CellId | None = None
        self._expect_until = math.inf
        """When we pass over `_expect` if it has not claimed by then."""
        self._listen_until = math.inf
        self._followed_since = 0.0
        self._next_pulse = math.inf
        self._next_rotation = math.inf
        self._pending_rotation = math.inf
        self._last_rotation = -math.inf
        self._max_epoch = 0
        """Highest epoch number verified from anyone (or made by us): the next term is above."""
        # Pulse sequence numbers start from the wall clock (ms * 256), so a restarted anchor
        # continues above the numbers its previous life used and its pulses are not replays.
        self._seq = max(0, int(wall() * 1000)) << 8
        self._req_seen: OrderedDict[CellId, int] = OrderedDict()
        self._req_budget: KeyedBuckets[CellId] = KeyedBuckets(
            1.0 / settings.request_interval, 1.0, settings.max_members
        )
        self._sender_budget: KeyedBuckets[Hashable] = KeyedBuckets(
            settings.sender_rate, settings.sender_burst, settings.max_members
        )
        self._nonces: OrderedDict[bytes, None] = OrderedDict()
        self._asked: OrderedDict[CellId, float] = OrderedDict()
        """When we last sent each claimant a REQ_EPOCH."""
        self._early = EarlyMessages()
        self._out: list[Outgoing] = []
        self._events: deque[AnchorEvent] = deque()
        self.drops: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()
        self._bytes_sent: Counter[str] = Counter()
        self._received = 0
        self._promotions = 0
        self._step_downs = 0
        self._failovers = 0
        self._keys_installed = 0
        self._answered = 0
        self._requests_ignored = 0
        self._budget_key: Hashable = b""
        self._hold_due = math.inf
        """Earliest time a rival claimant on hold may displace the incumbent."""
        self._redecide_at = math.inf
        """No anchor: when an outranking claimant on probation is due for another look."""
        self._reason = "not started"

    # ------------------------------------------------------------------ read-only views

    @property
    def role(self) -> Role:
        """Where this node stands (see `Role`)."""
        return self._role

    @property
    def anchor(self) -> CellId | None:
        """The anchor we follow (our own CellID while we are anchor), or None."""
        return self._anchor

    @property
    def is_anchor(self) -> bool:
        """True while this node claims the anchor role."""
        return self._role is Role.ANCHOR

    @property
    def term(self) -> int | None:
        """The term of the current anchor, or None without one."""
        return self._term if self._anchor is not None else None

    @property
    def epoch(self) -> int | None:
        """The epoch number of the key currently installed, or None before the first one."""
        return self._installed.epoch if self._installed is not None else None

    @property
    def ego(self) -> int:
        """This node's ego score, as capped."""
        return self._self.ego

    @property
    def eligible(self) -> bool:
        """False when this node takes keys but never claims the role."""
        return self._self.eligible

    def __len__(self) -> int:
        """Number of admitted members, this node included."""
        return len(self._members)

    def __contains__(self, cell_id: object) -> bool:
        return cell_id in self._members

    # ------------------------------------------------------------------ membership

    def admit(
        self,
        cell_id: CellId,
        ed25519_public_key: bytes,
        x25519_public_key: bytes,
        ego: int,
        now: float,
        *,
        eligible: bool = True,
    ) -> bool:
        """Admit a member (or update one: ego, X25519 key, eligibility). Returns False when the
        membership is full (`max_members`) or `cell_id` is this node.

        The driver calls this for every peer its admission rules accept (discovery: mesh key,
        allowlist or certificate), with the ego that peer announces. `ego` is clamped to
        ``0..ego_cap``. An anchor sends the new member the current key at once. Raises
        `ValueError` if `cell_id` is not the CellID of `ed25519_public_key` or a key is
        malformed.
        """
        if len(ed25519_public_key) != ED25519_PUBLIC_KEY_LEN:
            raise ValueError("an Ed25519 public key is 32 bytes")
        if len(x25519_public_key) != X25519_KEY_LEN:
            raise ValueError("an X25519 public key is 32 bytes")
        if _cell_id_of(bytes(ed25519_public_key)) != cell_id:
            raise ValueError("cell_id is not the CellID of ed25519_public_key")
        if cell_id == self.cell_id:
            return False
        capped = cap_ego(ego, self.settings.ego_cap)
        member = self._members.get(cell_id)
        if member is not None:
            if member.x25519_public_key != x25519_public_key:
                member.x25519_public_key = bytes(x25519_public_key)
                member.box = None
            member.ego = capped
            member.eligible = eligible
            return True
        if len(self._members) > self.settings.max_members:
            return False
        member = Member(
            cell_id, bytes(ed25519_public_key), bytes(x25519_public_key), capped, now, eligible
        )
        self._members[cell_id] = member
        st = self._strikes.get(cell_id)
        if st is not None:
            st.suspect = False  # back after the driver forgot it: electable (count kept)
        if self._role is Role.ANCHOR and self._installed is not None:
            self._grant(member, self._installed, _ZERO_NONCE)
        self._replay_early(cell_id, now)
        if self._role is Role.ELECTING and self._expect is None:
            self._decide(now)  # we were waiting for nobody: the newcomer may change that
        return True

    def forget(self, cell_id: CellId, now: float) -> bool:
        """Forget a member (it left, or discovery expired it). Returns False if unknown.

        If it was our anchor, the anchor is declared failed. If we are anchor, a new epoch
        starts soon (`rotate_on_leave`), so the member that left does not keep the current key.
        Raises `LocalProtocolError` for this node's own CellID.
        """
        if cell_id == self.cell_id:
            raise LocalProtocolError("a node cannot forget itself")
        if cell_id not in self._members:
            return False
        if cell_id == self._anchor and self._role is Role.FOLLOWER:
            self._fail("forgotten", now)
        del self._members[cell_id]
        self._claimants.pop(cell_id, None)
        self._req_seen.pop(cell_id, None)
        self._passed.pop(cell_id, None)
        if self._role is Role.ANCHOR and self.settings.rotate_on_leave:
            due = max(now, self._last_rotation + self.settings.pulse_interval)
            self._pending_rotation = min(self._pending_rotation, due)
        if self._expect == cell_id:
            self._expect = None
            if self._role is Role.ELECTING:
                self._decide(now)
        return True

    def members(self) -> list[CellId]:
        """The admitted members' CellIDs, this node included, in admission order."""
        return list(self._members)

    # ------------------------------------------------------------------ sans-IO interface

    def start(self, now: float) -> None:
        """Begin listening for an anchor; broadcast a REQ_EPOCH unless disabled."""
        if self._role is not Role.IDLE:
            raise LocalProtocolError("anchor core already started")
        self._role = Role.LISTENING
        self._self.first_seen = now
        self._listen_until = now + self.settings.listen_time
        self._reason = "listening for an existing anchor before any election"
        if self.settings.request_on_start:
            self._send_request(_ZERO_CELL, None)

    def receive_message(self, data: bytes, now: float, src: Hashable | None = None) -> None:
        """Feed one received anchor message. Never raises for bad input: it is dropped and
        counted in `drops`. `src` (optional: the address or authenticated peer it came from)
        keys the per-sender budget; without it the claimed sender does."""
        self._received += 1
        if self._role is Role.IDLE:
            self.drops["not_started"] += 1
            return
        if (
            len(data) == REQUEST_LEN
            and data[0] == MAGIC
            and data[2] == AnchorMsgType.REQ_EPOCH
            and self._role is not Role.ANCHOR
            and data[28:44] != self.cell_id
        ):
            # A broadcast REQ_EPOCH is for whichever anchor hears it: not us. Skipping it
            # before decoding keeps a join (or cold-start) storm cheap for every follower.
            self._requests_ignored += 1
            return
        try:
            msg = decode_message(data)
        except DecodeError as exc:
            self.drops[_DECODE_REASONS.get(type(exc), "malformed")] += 1
            return
        sender = msg.sender
        if sender == self.cell_id:
            self.drops["reflected"] += 1
            return
        member = self._members.get(sender)
        if member is None:
            # Never any crypto for a non-member. Kept a few seconds in case the driver admits
            # the sender right after (its EPOCH can overtake its discovery beacon).
            self._early.keep(sender, bytes(data), now)
            self.drops["not_member"] += 1
            return
        self._budget_key = src if src is not None else sender
        wall_ms = self._wall_ms()
        skew_ms = int(self.settings.max_skew * 1000)
        if msg.timestamp_ms < wall_ms - skew_ms:
            self.drops["stale"] += 1
            return
        if msg.timestamp_ms > wall_ms + skew_ms:
            self.drops["future"] += 1
            return
        if isinstance(msg, Pulse):
            self._on_pulse(msg, bytes(data), member, now)
        elif isinstance(msg, EpochGrant):
            self._on_grant(msg, bytes(data), member, now, wall_ms)
        else:
            self._on_request(msg, bytes(data), member, now)

    def messages_to_send(self) -> list[Outgoing]:
        """Take every queued message: (destination CellID or None for broadcast, bytes)."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> AnchorEvent | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The absolute time at which `handle_timer` must next be called, or None."""
        role = self._role
        if role is Role.LISTENING:
            return self._listen_until
        if role is Role.ELECTING:
            if self._expect is None:
                return None if self._redecide_at == math.inf else self._redecide_at
            return min(self._redecide_at, self._expect_until)
        if role is Role.FOLLOWER:
            assert self._anchor is not None
            c = self._claimants[self._anchor]
            due = c.last_heard + self.settings.silence_timeout
            key = c.newest_key()
            if key is not None:
                due = min(due, key.installed_at + self.settings.stale_after - key.age_at_install)
            return min(due, self._challenge_at(), self._hold_due)
        if role is Role.ANCHOR:
            return min(
                self._next_pulse, self._next_rotation, self._pending_rotation, self._hold_due
            )
        return None

    def handle_timer(self, now: float) -> None:
        """Do whatever is due at `now`."""
        role = self._role
        s = self.settings
        if role is Role.LISTENING:
            if now >= self._listen_until:
                self._role = Role.ELECTING
                self._decide(now)
        elif role is Role.ELECTING:
            if now >= self._redecide_at:
                self._decide(now)
            elif self._expect is not None and now >= self._expect_until:
                # It tops our ranking but never claimed: pass over it (no strike, it never
                # held the role) and let the next member by the rule take over.
                self._passed[self._expect] = None
                self._expect = None
                self._decide(now)
        elif role is Role.FOLLOWER:
            if now >= self._hold_due:
                self._check_holds(now)
                if self._role is not Role.FOLLOWER:
                    return
            assert self._anchor is not None
            c = self._claimants[self._anchor]
            key = c.newest_key()
            if now >= c.last_heard + s.silence_timeout:
                self._fail("silent", now)
            elif key is not None and key.age(now) >= s.stale_after:
                self._fail("stale_key", now)
            elif now >= self._challenge_at():
                anchor = self._members[self._anchor]
                self._promote(
                    now,
                    f"this node's ego {self.ego} is higher than anchor {_short(anchor.cell_id)}'s "
                    f"ego {anchor.ego}; after following it for {s.challenge_delay:g} s it claimed "
                    "the role",
                )
        elif role is Role.ANCHOR:
            if now >= self._hold_due:
                self._check_holds(now)
                if self._role is not Role.ANCHOR:
                    return
            if now >= min(self._next_rotation, self._pending_rotation):
                self._new_epoch(now)
            if now >= self._next_pulse:
                self._pulse()
                self._next_pulse += s.pulse_interval
                if self._next_pulse <= now:
                    self._next_pulse = now + s.pulse_interval

    # ------------------------------------------------------------------ epoch-key MACs

    def epoch_mac(self, data: bytes) -> tuple[int, bytes] | None:
        """MAC `data` under the current epoch key's application subkey: (epoch, 16-byte tag),
        or None before the first key. For other layers; the key itself never leaves the core."""
        key = self._installed
        if key is None:
            return None
        return key.epoch, compute_mac(key.app_subkey, bytes(data))

    def check_epoch_mac(self, epoch: int, data: bytes, tag: bytes, now: float) -> bool:
        """True when `tag` is `data`'s MAC under the current key of `epoch`, or the previous
        one within `key_grace` (constant-time comparison)."""
        if len(tag) != MAC_LEN:
            return False
        keys = [self._installed]
        if now - self._retired_at <= self.settings.key_grace:
            keys.append(self._retired)
        for key in keys:
            if (
                key is not None
                and key.epoch == epoch
                and mac_matches(key.app_subkey, bytes(data), tag)
            ):
                return True
        return False

    def export_epoch_key(self) -> tuple[int, bytes] | None:
        """(epoch, key) of the current epoch key. FOR TESTS ONLY (e.g. searching captured
        traffic for the key bytes); nothing in cellmesh calls it and `status` never shows it."""
        key = self._installed
        return None if key is None else (key.epoch, key.key)

    # ------------------------------------------------------------------ status

    def rank(self, now: float) -> int | None:
        """This node's 1-based position in its own election order among the eligible members
        it does not suspect, with the tie-break of the current term (of the next one while
        there is no anchor), or None when it is not eligible."""
        if not self._self.eligible:
            return None
        order = election_order(
            self._candidates(now),
            now,
            self._term if self._anchor is not None else self._max_epoch + 1,
            self.settings.seniority_quantum,
            self.settings.seniority_levels,
        )
        for i, m in enumerate(order, 1):
            if m.cell_id == self.cell_id:
                return i
        return None

    def status(self, now: float) -> dict[str, object]:
        """What `cellmesh anchor` shows: the anchor, its term, the epoch number and key age
        (never the key), this node's rank and ego, and why the current choice was made."""
        key = self._installed
        s = self.settings
        level = seniority_level(
            now - self._self.first_seen, s.seniority_quantum, s.seniority_levels
        )
        return {
            "role": self._role.value,
            "cell_id": self.cell_id.hex(),
            "anchor": None if self._anchor is None else self._anchor.hex(),
            "term": self.term,
            "epoch": None if key is None else key.epoch,
            "key_age_s": None if key is None else round(key.age(now), 3),
            "key_from": None if key is None else key.anchor.hex(),
            "rank": self.rank(now),
            "ego": self.ego,
            "seniority_level": level,
            "members": len(self._members),
            "reason": self._explain(now),
            "drops": dict(self.drops),
        }

    def statistics(self) -> AnchorStats:
        """A snapshot of the counters."""
        return AnchorStats(
            role=self._role,
            members=len(self._members),
            messages_received=self._received,
            sent=dict(self._sent),
            bytes_sent=dict(self._bytes_sent),
            promotions=self._promotions,
            step_downs=self._step_downs,
            failovers=self._failovers,
            keys_installed=self._keys_installed,
            requests_answered=self._answered,
            requests_ignored=self._requests_ignored,
            drops=dict(self.drops),
        )

    # ------------------------------------------------------------------ receiving

    def _on_pulse(self, p: Pulse, data: bytes, member: Member, now: float) -> None:
        c = self._gate(member, p.term, now)
        if c is None:
            return
        if p.seq <= c.seq:
            self.drops["replay"] += 1
            return
        key = c.key_for(p.epoch, now, self.settings.key_grace)
        if key is None:
            if p.epoch > c.epoch:
                # A newer epoch than any we hold from it (its EPOCH was lost, or we just met
                # it): ask for the key. The answer is proof of life in itself.
                self.drops["unknown_epoch"] += 1
                self._ask(c, now)
            else:
                self.drops["stale_epoch"] += 1
            return
        if key.term != p.term:
            self.drops["bad_term"] += 1
            return
        if not mac_matches(key.pulse_subkey, data[:PULSE_MAC_OFFSET], p.mac):
            self.drops["bad_mac"] += 1
            return
        if not self._signature_ok(member, data, p.signature, now):
            return
        c.seq = p.seq
        self._heard(c, p.term, p.epoch, now)

    def _on_grant(
        self, g: EpochGrant, data: bytes, member: Member, now: float, wall_ms: int
    ) -> None:
        if g.recipient != self.cell_id:
            self.drops["not_for_us"] += 1
            return
        c = self._gate(member, g.term, now)
        if c is None:
            return
        answer = g.requested
        if answer and g.nonce not in self._nonces:
            self.drops["unrequested"] += 1  # a replayed answer, or one we never asked for
            return
        if g.epoch < c.epoch:
            self.drops["stale_epoch"] += 1
            return
        if g.epoch in c.keys and not answer:
            self.drops["duplicate_epoch"] += 1
            return
        if not self._signature_ok(member, data, g.signature, now):
            return
        if answer:
            del self._nonces[g.nonce]
        if g.epoch not in c.keys:
            try:
                secret = self._opener.open(g.sealed_key)
            except AuthenticationError:
                self.drops["bad_seal"] += 1
                return
            age = max(0.0, (wall_ms - g.issued_ms) / 1000.0)
            key = EpochKey(member.cell_id, g.term, g.epoch, g.issued_ms, now, age, secret)
            c.add_key(key, now)
            if c.cell_id == self._anchor and key is c.newest_key():
                self._install(key, now)
        self._heard(c, g.term, g.epoch, now)

    def _on_request(self, r: EpochRequest, data: bytes, member: Member, now: float) -> None:
        if self._role is not Role.ANCHOR or (not r.broadcast and r.target != self.cell_id):
            if r.target == self.cell_id:
                self.drops["not_anchor"] += 1  # addressed to us, but we do not hold the role
            else:
                self._requests_ignored += 1  # for whichever anchor hears it: not us
            return
        last = self._req_seen.get(member.cell_id)
        if last is not None and r.timestamp_ms <= last:
            self.drops["replay"] += 1
            return
        if not self._signature_ok(member, data, r.signature, now):
            return
        self._req_seen[member.cell_id] = r.timestamp_ms
        self._req_seen.move_to_end(member.cell_id)
        if len(self._req_seen) > self.settings.max_members:
            self._req_seen.popitem(last=False)
        # After the signature, so forged requests cannot spend a member's allowance.
        if not self._req_budget.take(member.cell_id, now):
            self.drops["request_limited"] += 1
            return
        assert self._installed is not None
        self._grant(member, self._installed, r.nonce)  # the current key: no rotation
        self._answered += 1

    def _gate(self, member: Member, term: int, now: float) -> Claimant | None:
        """The claim rule's cheap half, before any crypto: may `member` claim the role from
        where we stand? Returns its `Claimant` record, or None (counted) if not."""
        if not member.eligible:
            self.drops["not_eligible"] += 1
            return None
        cid = member.cell_id
        if cid != self._anchor and not self._admissible(member, term, now):
            self.drops["not_anchor"] += 1
            return None
        # A claimant we do not track yet gets a record only once a claim of it verifies
        # (`_heard`), so forged traffic cannot churn the table and evict a genuine rival.
        return self._claimants.get(cid) or Claimant(cid)

    def _track(self, c: Claimant) -> None:
        """Keep `c`'s record (its first claim just verified), evicting the rival heard least
        recently when the table is full (never the anchor we follow)."""
        if c.cell_id in self._claimants:
            return
        if len(self._claimants) >= self.settings.max_claimants:
            stalest = min(
                (x for x in self._claimants.values() if x.cell_id != self._anchor),
                key=lambda x: x.last_heard,
            )
            del self._claimants[stalest.cell_id]
        self._claimants[c.cell_id] = c

    def _admissible(self, member: Member, term: int, now: float) -> bool:
        role = self._role
        if role is Role.ANCHOR:
            return claim_outranks(
                member.ego, member.cell_id, term, self.ego, self.cell_id, self._term
            )
        if role is Role.FOLLOWER:
            assert self._anchor is not None
            anchor = self._members[self._anchor]
            if claim_outranks(
                member.ego, member.cell_id, term, anchor.ego, anchor.cell_id, self._term
            ):
                return True
            overdue = _OVERDUE_PULSES * self.settings.pulse_interval
            return now - self._claimants[self._anchor].last_heard > overdue
        return True  # no anchor: any eligible member's claim is worth verifying

    def _signature_ok(self, member: Member, data: bytes, signature: bytes, now: float) -> bool:
        """Verify, within the per-sender budget: a signature is the costly step, so the
        budget is spent only on messages that passed every cheap check (and the MAC)."""
        if not self._sender_budget.take(self._budget_key, now):
            self.drops["rate_limited"] += 1
            return False
        try:
            self._verify(member.public_key, signed_bytes(data), signature)
        except AuthenticationError:
            self.drops["bad_signature"] += 1
            return False
        return True

    # ------------------------------------------------------------------ the rule in motion

    def _heard(self, c: Claimant, term: int, epoch: int, now: float) -> None:
        """A claim of `c` verified: advance its hold clock, then apply the rule."""
        self._track(c)
        c.hear(now, term, epoch, self.settings.silence_timeout)
        self._max_epoch = max(self._max_epoch, epoch)
        if c.cell_id == self._anchor:
            self._term = term
            return
        self._consider(c, now)

    def _consider(self, c: Claimant, now: float) -> None:
        if self._role is Role.FOLLOWER or self._role is Role.ANCHOR:
            self._check_holds(now)
        else:
            self._decide(now)

    def _check_holds(self, now: float) -> None:
        """Displace the incumbent if a claimant that outranks it has been heard claiming,
        without a gap, for its whole hold, and is still claiming (heard within 1.5 pulse
        intervals); otherwise note when the next hold completes (`_hold_due`)."""
        assert self._anchor is not None
        self._hold_due = math.inf
        incumbent = self._members[self._anchor]
        still = _OVERDUE_PULSES * self.settings.pulse_interval
        winner: Claimant | None = None
        winner_member: Member | None = None
        for c in self._claimants.values():
            m = self._members.get(c.cell_id)
            if (
                m is None
                or c.cell_id == self._anchor
                or not m.eligible
                or now - c.last_heard > still
                or self._key_stale(c, now)
                or not claim_outranks(
                    m.ego, m.cell_id, c.term, incumbent.ego, incumbent.cell_id, self._term
                )
            ):
                continue
            due = c.heard_since + self._hold(c.cell_id, now)
            if due > now:
                self._hold_due = min(self._hold_due, due)
            elif (
                winner is None
                or winner_member is None
                or claim_outranks(
                    m.ego, m.cell_id, c.term, winner_member.ego, winner.cell_id, winner.term
                )
            ):
                winner, winner_member = c, m
        if winner is not None and winner_member is not None:
            hold = self._hold(winner.cell_id, now)
            self._follow(
                winner,
                now,
                f"{_short(winner.cell_id)} (ego {winner_member.ego}) outranks "
                f"{_short(incumbent.cell_id)} (ego {incumbent.ego}) in the claim order at term "
                f"{min(winner.term, self._term)} and was heard claiming without a gap for its "
                f"{hold:g} s hold",
            )

    def _decide(self, now: float) -> None:
        """No anchor: promote ourselves, follow the best live claimant, or wait for the member
        that tops our ranking (see the module docstring)."""
        s = self.settings
        self._redecide_at = math.inf
        next_term = self._max_epoch + 1
        best: Claimant | None = None
        best_member: Member | None = None
        blocked_until = math.inf  # when an outranking claimant on probation is due again
        for c in self._claimants.values():
            m = self._members.get(c.cell_id)
            if m is None or not c.fresh(now, s.silence_timeout):
                continue
            if self._key_stale(c, now):
                continue  # still on the key it was failed for
            st = self._active_strikes(c.cell_id, now)
            if st is not None and st.suspect and c.heard_for(now) < s.hold_for(st.count):
                # A member we failed over from must prove itself for its hold first. If it
                # outranks us, promoting ourselves meanwhile would only make a conflict we
                # lose (typically: we alone missed its pulses on a lossy link).
                if claim_outranks(m.ego, m.cell_id, c.term, self.ego, self.cell_id, next_term):
                    due = min(
                        c.heard_since + s.hold_for(st.count), c.last_heard + s.silence_timeout
                    )
                    blocked_until = min(blocked_until, due)
                continue
            if (
                best is None
                or best_member is None
                or claim_outranks(
                    m.ego, m.cell_id, c.term, best_member.ego, best.cell_id, best.term
                )
            ):
                best, best_member = c, m
        if self._role is Role.ELECTING:
            candidates = self._candidates(now)
            top = election_top(candidates, now, next_term, s.seniority_quantum, s.seniority_levels)
            if top is None and self._passed:
                self._passed.clear()  # everyone was passed over: give them another round
                candidates = self._candidates(now)
                top = election_top(
                    candidates, now, next_term, s.seniority_quantum, s.seniority_levels
                )
            if top is self._self and (
                best is None
                or best_member is None
                or claim_outranks(
                    self.ego, self.cell_id, next_term, best_member.ego, best.cell_id, best.term
                )
            ):
                if blocked_until < math.inf:
                    self._redecide_at = blocked_until
                    self._reason = (
                        "no anchor; a claimant that outranks this node is serving its hold"
                    )
                    return
                level = seniority_level(
                    now - self._self.first_seen, s.seniority_quantum, s.seniority_levels
                )
                self._promote(
                    now,
                    f"this node ranked first by the rule among {len(candidates)} eligible "
                    f"members (ego {self.ego}, seniority level {level}, tie-break at epoch "
                    f"{next_term}) and no live claimant outranks it",
                )
                return
            if best is None and top is None:
                self._reason = "no anchor, and no eligible member to elect"
                return
            if best is None and top is not None:
                if top.cell_id != self._expect:
                    # The first member we wait for gets the silence timeout. Once it is passed
                    # over, every live member has passed over it at the same moment (they all
                    # timed out the same anchor), so a live successor claims within a link
                    # delay: the next ones only get `succession_wait`.
                    wait = s.succession_wait if self._passed else s.silence_timeout
                    self._expect = top.cell_id
                    self._expect_until = now + wait
                self._reason = (
                    f"no anchor; waiting for {_short(top.cell_id)} (ego {top.ego}), ranked "
                    "first by the rule, to take over"
                )
                return
        if best is not None and best_member is not None:
            self._follow(
                best,
                now,
                f"{_short(best.cell_id)} (ego {best_member.ego}) is the best-ranked live claimant "
                "this node can verify",
            )

    def _key_stale(self, c: Claimant, now: float) -> bool:
        """True when `c`'s newest key has outlived `stale_epochs` periods: an anchor that
        stopped rotating is not taken (back) until it rotates."""
        key = c.newest_key()
        return key is not None and key.age(now) >= self.settings.stale_after

    def _candidates(self, now: float) -> list[Member]:
        """Who may be elected: eligible members we neither suspect nor passed over."""
        out = []
        for m in self._members.values():
            if not m.eligible or m.cell_id in self._passed:
                continue
            st = self._active_strikes(m.cell_id, now)
            if st is not None and st.suspect:
                continue
            out.append(m)
        return out

    def _active_strikes(self, cell_id: CellId, now: float) -> Strikes | None:
        """Its strikes record, the count reset once `strike_memory` has passed since the last
        one. A suspect stays one (out of elections) until it claims through a hold or the
        driver admits it afresh: forgiving a dead anchor would only make every later election
        wait for it again."""
        st = self._strikes.get(cell_id)
        if st is not None and st.count and now - st.last > self.settings.strike_memory:
            st.count = 0
        if st is not None and not st.count and not st.suspect:
            del self._strikes[cell_id]
            return None
        return st

    def _hold(self, cell_id: CellId, now: float) -> float:
        st = self._active_strikes(cell_id, now)
        return self.settings.hold_for(0 if st is None else st.count)

    def _challenge_at(self) -> float:
        if self._role is not Role.FOLLOWER or not self._self.eligible or self._anchor is None:
            return math.inf
        anchor = self._members.get(self._anchor)
        if anchor is None or self.ego <= anchor.ego:
            return math.inf
        return self._followed_since + self.settings.challenge_delay

    def _follow(self, c: Claimant, now: float, reason: str) -> None:
        previous = self._anchor
        if self._role is Role.ANCHOR:
            self._step_downs += 1
            self._next_pulse = self._next_rotation = self._pending_rotation = math.inf
        self._role = Role.FOLLOWER
        self._hold_due = math.inf
        self._anchor = c.cell_id
        self._term = c.term
        self._followed_since = now
        self._passed.clear()
        self._expect = None
        st = self._strikes.get(c.cell_id)
        if st is not None:
            st.suspect = False  # it claimed through its hold: electable again
        self._reason = f"following {_short(c.cell_id)}: {reason}"
        self._events.append(AnchorChanged(c.cell_id, previous, c.term, reason))
        key = c.newest_key()
        if key is not None:
            self._install(key, now)
        else:
            self._ask(c, now)

    def _fail(self, why: str, now: float) -> None:
        anchor = self._anchor
        assert anchor is not None
        st = self._active_strikes(anchor, now)
        if st is None:
            st = self._strikes[anchor] = Strikes(0, now)
        st.count += 1
        st.last = now
        st.suspect = True
        failed = self._claimants.get(anchor)
        if failed is not None:
            # Its record stays (replay protection: sequence and epoch numbers), but it is no
            # longer heard: any claim of it from now on starts a new hold clock.
            failed.last_heard = -math.inf
        self._failovers += 1
        s = self.settings
        text = {
            "silent": f"went silent for {s.silence_timeout:g} s",
            "stale_key": f"kept one epoch key for more than {s.stale_after:g} s",
            "forgotten": "was forgotten by the driver",
        }[why]
        reason = f"anchor {_short(anchor)} {text}"
        self._role = Role.ELECTING
        self._anchor = None
        self._term = 0
        self._reason = f"{reason}; electing a successor"
        self._events.append(AnchorFailed(anchor, why))
        self._events.append(AnchorChanged(None, anchor, None, reason))
        self._decide(now)

    def _promote(self, now: float, reason: str) -> None:
        previous = self._anchor
        self._role = Role.ANCHOR
        self._hold_due = math.inf
        self._anchor = self.cell_id
        self._term = self._max_epoch + 1
        self._promotions += 1
        self._passed.clear()
        self._expect = None
        self._reason = f"this node is the anchor: {reason}"
        self._events.append(AnchorChanged(self.cell_id, previous, self._term, reason))
        self._new_epoch(now)
        self._pulse()
        self._next_pulse = now + self.settings.pulse_interval

    # ------------------------------------------------------------------ anchor duties

    def _new_epoch(self, now: float) -> None:
        """Make a fresh key, install it and deliver it, sealed, to every member."""
        epoch = self._max_epoch + 1
        self._max_epoch = epoch
        secret = bytes(self._random_bytes(EPOCH_KEY_LEN))
        if len(secret) != EPOCH_KEY_LEN:
            raise LocalProtocolError("random_bytes returned the wrong number of bytes")
        key = EpochKey(self.cell_id, self._term, epoch, self._wall_ms(), now, 0.0, secret)
        self._install(key, now)
        self._last_rotation = now
        self._next_rotation = now + self.settings.epoch_period
        self._pending_rotation = math.inf
        for member in self._members.values():
            if member is not self._self:
                self._grant(member, key, _ZERO_NONCE)

    def _grant(self, member: Member, key: EpochKey, nonce: bytes) -> None:
        if member.box is None:
            member.box = sealing_box(member.x25519_public_key)
        sealed = seal_epoch_key(key.key, member.box)
        msg = make_grant(
            self.identity,
            self._wall_ms(),
            key.term,
            key.epoch,
            key.issued_ms,
            member.cell_id,
            nonce,
            sealed,
        )
        self._send(member.cell_id, msg, AnchorMsgType.EPOCH)

    def _pulse(self) -> None:
        key = self._installed
        assert key is not None
        assert key.anchor == self.cell_id
        self._seq += 1
        msg = make_pulse(
            self.identity, self._wall_ms(), self._term, key.epoch, self._seq, key.pulse_subkey
        )
        self._send(None, msg, AnchorMsgType.PULSE)

    def _install(self, key: EpochKey, now: float) -> None:
        current = self._installed
        if current is key:
            return
        if current is not None:
            # Only "retired" here: the key object may also be a claimant's, whose own
            # `superseded_at` only that claimant's next key may set.
            self._retired = current
            self._retired_at = now
        self._installed = key
        self._keys_installed += 1
        self._events.append(EpochKeyInstalled(key.anchor, key.term, key.epoch))

    # ------------------------------------------------------------------ requests

    def _ask(self, c: Claimant, now: float) -> None:
        """REQ_EPOCH to claimant `c`, at most once per `request_interval` (remembered for a
        bounded number of claimants: what asks is often an unverifiable pulse)."""
        last = self._asked.get(c.cell_id)
        if last is not None and now - last < self.settings.request_interval:
            return
        self._asked[c.cell_id] = now
        self._asked.move_to_end(c.cell_id)
        if len(self._asked) > _MAX_ASKED:
            self._asked.popitem(last=False)
        self._send_request(c.cell_id, c.cell_id)

    def _send_request(self, target: CellId, dst: CellId | None) -> None:
        nonce = bytes(self._random_bytes(NONCE_LEN))
        self._nonces[nonce] = None
        if len(self._nonces) > _MAX_NONCES:
            self._nonces.popitem(last=False)
        msg = make_request(self.identity, self._wall_ms(), target, nonce)
        self._send(dst, msg, AnchorMsgType.REQ_EPOCH)

    # ------------------------------------------------------------------ plumbing

    def _send(self, dst: CellId | None, msg: bytes, kind: AnchorMsgType) -> None:
        self._out.append((dst, msg))
        self._sent[kind.name] += 1
        self._bytes_sent[kind.name] += len(msg)

    def _wall_ms(self) -> int:
        return max(0, int(self._wall() * 1000))

    def _replay_early(self, cell_id: CellId, now: float) -> None:
        for data in self._early.release(cell_id, now):
            # Counted as "not_member" when it arrived; now it is processed after all.
            self.drops["not_member"] -= 1
            if not self.drops["not_member"]:
                del self.drops["not_member"]
            self._received -= 1
            self.receive_message(data, now)

    def _explain(self, now: float) -> str:
        """The reason for the current choice, with any rival on hold spelled out."""
        text = self._reason
        if self._anchor is None:
            return text
        incumbent = self._members.get(self._anchor)
        if incumbent is None:
            return text
        for c in self._claimants.values():
            m = self._members.get(c.cell_id)
            if (
                m is None
                or c.cell_id == self._anchor
                or not c.fresh(now, self.settings.silence_timeout)
            ):
                continue
            if claim_outranks(
                m.ego, m.cell_id, c.term, incumbent.ego, incumbent.cell_id, self._term
            ):
                hold = self._hold(c.cell_id, now)
                text += (
                    f"; {_short(c.cell_id)} outranks it and has been heard claiming for "
                    f"{c.heard_for(now):.1f} s of its {hold:g} s hold"
                )
        return text
