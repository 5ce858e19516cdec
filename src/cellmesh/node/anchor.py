"""The anchor driver: runs the sans-IO `AnchorCore` inside a `Node`, on the node's UDP port.

Theory of operation
-------------------
*Membership* comes from discovery. The driver registers a listener on the discovery driver and
mirrors its table into the core: `PeerDiscovered` and `PeerUpdated` admit the peer (or update its
ego, X25519 Noise static key, anchor-eligible bit and address) with what its signed beacon
carries; `PeerExpired` (expired or evicted) forgets it. At start it reconciles once with the
whole table, because discovery starts first and may already know peers. Events rather than
polling: a joiner is admitted the moment its beacon verifies, so the anchor's key push (and the
joiner's REQ_EPOCH) are not delayed by a polling period, and nothing runs while nothing changes.
`Membership` holds that bookkeeping (pure: no sockets, no loop), with the address of each member.

*Receiving.* Anchor messages share the node's UDP port with cellmesh frames. Byte 0 tells them
apart: 0xCA for anchor messages, the wire version (1) for frames. The node's socket loop hands
every datagram whose byte 0 is 0xCA to `feed` while this driver runs (otherwise the endpoint
drops it as ``bad_version``); the source address goes to the core, where it keys the
per-sender budget of signature checks.

*Sending.* The core says "to this CellID" or "to everyone" (None). A unicast goes to the
member's address from discovery (the beacon's source host and the data port it announces, the
same address the node dials). A broadcast (PULSE, the start REQ_EPOCH) is sent by unicast to
every admitted member: the node's data socket is not always the discovery multicast socket
(a node listening on another port, or with its own discovery socket), and unicast reaches the
socket whose reader routes 0xCA here in every case. Each member receives exactly what a
multicast would have given it; only the anchor sends N-1 copies of a 132-byte pulse every 5 s.

*Timer.* One `loop.call_at` at `core.get_timer()`, re-armed after every feed, event and timer.
Events are logged (anchor changes and failures at info/warning; key installations at info,
with the epoch number only). `status()` is what `cellmesh anchor` prints; it never contains the
key. `export_epoch_key()` is for tests only and refuses unless the node process was started
with ``CELLMESH_TEST_EXPORT_EPOCH_KEY=1``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from cellmesh.anchor.core import AnchorCore
from cellmesh.anchor.events import AnchorChanged, AnchorFailed, EpochKeyInstalled
from cellmesh.anchor.messages import MAGIC
from cellmesh.anchor.settings import AnchorSettings
from cellmesh.config import NodeConfig
from cellmesh.discovery.events import DiscoveryEvent, PeerDiscovered, PeerExpired, PeerUpdated
from cellmesh.discovery.table import PeerRecord
from cellmesh.errors import LocalProtocolError
from cellmesh.identity.cellid import CellId, format_cell_id
from cellmesh.node.discovery import dial_address
from cellmesh.node.udp import Addr, format_addr

if TYPE_CHECKING:
    from cellmesh.node.node import Node

__all__ = [
    "ANCHOR_MAGIC",
    "TEST_EXPORT_ENV",
    "AnchorDriver",
    "Membership",
    "anchor_settings_from",
]

log = logging.getLogger("cellmesh.anchor")

ANCHOR_MAGIC: Final = MAGIC
"""Byte 0 of every anchor message (0xCA); cellmesh frames start with the wire version, 1."""
TEST_EXPORT_ENV: Final = "CELLMESH_TEST_EXPORT_EPOCH_KEY"
"""FOR TESTS ONLY: with this variable set to 1 in the node's environment, the control API's
`anchor_epoch_key` operation returns the current epoch key (the netns test searches a capture
of the link for it). Without it the operation is refused. Never set it on a real node."""


def anchor_settings_from(config: NodeConfig) -> AnchorSettings:
    """The `AnchorSettings` a `NodeConfig` describes.

    `anchor_pulse_interval` and `anchor_epoch_seconds` set the pulse interval and the epoch
    period. Two settings are defined in pulses and follow the interval: the listening period of
    a starting node is the silence timeout's 3 pulses (15 s at the default 5 s) and the hold an
    outranking claimant serves is 2 pulses (10 s). Everything else keeps its default.
    """
    pulse = config.anchor_pulse_interval
    base = AnchorSettings()
    return AnchorSettings(
        pulse_interval=pulse,
        epoch_period=config.anchor_epoch_seconds,
        listen_time=base.silence_pulses * pulse,
        hold_time=2 * pulse,
    )


class Membership:
    """Discovery's peer table mirrored into an `AnchorCore`, with each member's address.

    Pure bookkeeping (no sockets, no clock): `apply` takes one discovery event, `sync` the whole
    table. `refused` counts peers the core would not admit, by reason (``full``: `max_members`
    reached; ``bad_key``: the record's keys did not match its CellID).
    """

    def __init__(self, core: AnchorCore) -> None:
        self.core = core
        self._addrs: dict[CellId, Addr] = {}
        self.refused: Counter[str] = Counter()

    def apply(self, ev: DiscoveryEvent, now: float) -> None:
        """Mirror one discovery event into the core."""
        if isinstance(ev, PeerDiscovered | PeerUpdated):
            self._admit(ev.peer, now)
        elif isinstance(ev, PeerExpired):
            self._forget(ev.peer.cell_id, now)

    def sync(self, peers: Iterable[PeerRecord], now: float) -> None:
        """Make the membership exactly `peers` (plus this node): admit or update each, forget
        every member that is not among them."""
        seen: set[CellId] = set()
        for rec in peers:
            seen.add(rec.cell_id)
            self._admit(rec, now)
        for cell in self.core.members():
            if cell != self.core.cell_id and cell not in seen:
                self._forget(cell, now)

    def address(self, cell_id: CellId) -> Addr | None:
        """Where to send to an admitted member, or None."""
        return self._addrs.get(cell_id)

    def addresses(self) -> list[Addr]:
        """The addresses of every admitted member (this node excluded)."""
        return list(self._addrs.values())

    def __len__(self) -> int:
        """Admitted members with an address (this node excluded)."""
        return len(self._addrs)

    def _admit(self, rec: PeerRecord, now: float) -> None:
        cell = rec.cell_id
        if cell == self.core.cell_id:
            return
        try:
            ok = self.core.admit(
                cell,
                rec.public_key,
                rec.noise_static,
                rec.ego,
                now,
                eligible=rec.caps.anchor_eligible,
            )
        except ValueError:
            self.refused["bad_key"] += 1
            self._forget(cell, now)
            return
        if ok:
            self._addrs[cell] = dial_address(rec)
        else:
            self.refused["full"] += 1

    def _forget(self, cell: CellId, now: float) -> None:
        self._addrs.pop(cell, None)
        if cell != self.core.cell_id:
            self.core.forget(cell, now)


class AnchorDriver:
    """Runs an `AnchorCore` for a `Node` whose discovery runs. See the module docstring."""

    def __init__(self, node: Node, settings: AnchorSettings | None = None) -> None:
        self.node = node
        self.settings = settings if settings is not None else anchor_settings_from(node.config)
        self.core: AnchorCore | None = None
        self.membership: Membership | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf
        self._allow_export = os.environ.get(TEST_EXPORT_ENV) == "1"
        self.unroutable = 0
        """Unicast messages for a CellID with no known address (dropped)."""
        self.send_failures = 0
        """Datagrams the socket layer refused or dropped."""

    @property
    def running(self) -> bool:
        """True between `start` and `stop`."""
        return self.core is not None

    def start(self) -> None:
        """Create the core from the node's identity, admit what discovery knows, start it.

        The core's ego and anchor eligibility are the ones this node announces in its beacons,
        so every member ranks it with the same inputs it uses itself. Raises
        `LocalProtocolError` when the node's discovery is not running.
        """
        disc = self.node.discovery
        if disc is None or disc.core is None:
            raise LocalProtocolError("the anchor needs discovery: its members are discovery's")
        loop = asyncio.get_running_loop()
        self._loop = loop
        now = loop.time()
        core = AnchorCore(
            self.node.identity,
            self.settings,
            now,
            wall=time.time,
            ego=disc.settings.ego,
            eligible=disc.settings.caps.anchor_eligible,
        )
        self.core = core
        self.membership = Membership(core)
        self.membership.sync(disc.peers(), now)
        disc.listeners.append(self._on_discovery)
        core.start(now)
        self._pump()
        log.info(
            "anchor election on: %d member(s), pulse every %g s, new key every %g s%s",
            len(core),
            self.settings.pulse_interval,
            self.settings.epoch_period,
            "" if core.eligible else " (this node is not anchor-eligible)",
        )

    def stop(self) -> None:
        """Stop the timer and detach from discovery. Nothing is sent: followers fail over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = math.inf
        disc = self.node.discovery
        if disc is not None and self._on_discovery in disc.listeners:
            disc.listeners.remove(self._on_discovery)
        self.core = None
        self.membership = None

    # ------------------------------------------------------------------ driving the core

    def feed(self, data: bytes, addr: Addr, now: float) -> None:
        """An anchor message (byte 0 == 0xCA) from the node's socket; call `flush` after."""
        if self.core is not None:
            self.core.receive_message(data, now, addr)

    def flush(self) -> None:
        """Send what the core queued, log its events and re-arm its timer."""
        self._pump()

    def _on_discovery(self, ev: DiscoveryEvent) -> None:
        if self.membership is None or self._loop is None:
            return
        self.membership.apply(ev, self._loop.time())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = math.inf
        if self.core is not None and self._loop is not None:
            self.core.handle_timer(self._loop.time())
            self._pump()

    def _pump(self) -> None:
        core = self.core
        members = self.membership
        loop = self._loop
        if core is None or members is None or loop is None:
            return
        out = core.messages_to_send()
        if out:
            self._send_all(out, members)
        while (ev := core.next_event()) is not None:
            if isinstance(ev, AnchorChanged):
                if ev.anchor is None:
                    log.info("anchor: none (%s)", ev.reason)
                else:
                    who = "this node" if ev.anchor == core.cell_id else format_cell_id(ev.anchor)
                    log.info("anchor is %s, term %s: %s", who, ev.term, ev.reason)
            elif isinstance(ev, AnchorFailed):
                log.warning("anchor %s failed: %s", format_cell_id(ev.anchor), ev.reason)
            elif isinstance(ev, EpochKeyInstalled):
                log.info(
                    "epoch %d key installed (anchor %s, term %d)",
                    ev.epoch,
                    format_cell_id(ev.anchor),
                    ev.term,
                )
        when = core.get_timer()
        if when is None or not math.isfinite(when):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_when = math.inf
            return
        if self._timer is not None:
            if abs(self._timer_when - when) < 1e-4:
                return
            self._timer.cancel()
        self._timer_when = when
        self._timer = loop.call_at(when, self._on_timer)

    def _send_all(self, out: list[tuple[CellId | None, bytes]], members: Membership) -> None:
        udp = self.node._udp
        if udp is None:
            return
        for dst, data in out:
            if dst is None:
                targets = members.addresses()
            else:
                addr = members.address(dst)
                if addr is None:
                    self.unroutable += 1
                    continue
                targets = [addr]
            for addr in targets:
                if not udp.send(data, addr):
                    self.send_failures += 1
        if udp.has_backlog:
            self.node._set_writing(True)

    # ------------------------------------------------------------------ reading

    def status(self) -> dict[str, Any]:
        """What `cellmesh anchor` shows: the core's status (anchor, role, term, epoch, key age,
        rank, members, reason; never the key) plus the settings, counters and where the anchor
        is. CellIDs as 32 hex characters."""
        core = self.core
        if core is None or self._loop is None or self.membership is None:
            return {"running": False, "why": "the anchor driver is stopped"}
        now = self._loop.time()
        st: dict[str, Any] = {"running": True, **core.status(now)}
        stats = core.statistics()
        anchor = core.anchor
        st["anchor_is_self"] = anchor is not None and anchor == core.cell_id
        st["anchor_address"] = None
        st["anchor_name"] = None
        if anchor is not None:
            if anchor == core.cell_id:
                st["anchor_name"] = self.node.config.name
            else:
                addr = self.membership.address(anchor)
                st["anchor_address"] = None if addr is None else format_addr(addr)
                disc = self.node.discovery
                rec = disc.core.peer(anchor) if disc is not None and disc.core else None
                st["anchor_name"] = None if rec is None else rec.name
        st["eligible"] = core.eligible
        st["settings"] = {
            "pulse_interval_s": self.settings.pulse_interval,
            "epoch_seconds": self.settings.epoch_period,
            "silence_timeout_s": self.settings.silence_timeout,
            "listen_time_s": self.settings.listen_time,
            "hold_time_s": self.settings.hold_time,
        }
        st["stats"] = {
            "messages_received": stats.messages_received,
            "sent": stats.sent,
            "bytes_sent": stats.bytes_sent,
            "promotions": stats.promotions,
            "step_downs": stats.step_downs,
            "failovers": stats.failovers,
            "keys_installed": stats.keys_installed,
            "requests_answered": stats.requests_answered,
            "unroutable": self.unroutable,
            "send_failures": self.send_failures,
            "admissions_refused": dict(self.membership.refused),
        }
        return st

    def export_epoch_key(self) -> dict[str, Any] | None:
        """FOR TESTS ONLY: {"epoch": n, "key": hex} of the current epoch key, or None before
        the first key. Raises `LocalProtocolError` unless the node process was started with
        ``CELLMESH_TEST_EXPORT_EPOCH_KEY=1`` (see `TEST_EXPORT_ENV`)."""
        if not self._allow_export:
            raise LocalProtocolError(
                "anchor_epoch_key is a test-only operation and is refused: the node was not "
                f"started with {TEST_EXPORT_ENV}=1"
            )
        if self.core is None:
            return None
        got = self.core.export_epoch_key()
        return None if got is None else {"epoch": got[0], "key": got[1].hex()}
