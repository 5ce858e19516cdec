"""`ChannelDriver`: channels, access control, capabilities and inspection inside a running `Node`.

Theory of operation: the protocol work is sans-IO (`cellmesh.channels.service`,
`cellmesh.filter.access`, `cellmesh.identity.capabilities`, `cellmesh.filter.inspection`); this
module only gives it clocks, files and asyncio: it turns service events into awaited futures and
queues, watches the policy file (a changed file is reloaded atomically, and a broken one keeps
the policy in force and is logged with its line and column), runs ring-2 inspectors off the
receive path with a time budget, and passes their bans to ring 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cellmesh.channels.protocol import Caps, Op
from cellmesh.channels.service import (
    ChannelDelivery,
    ChannelReply,
    ChannelService,
    GrantEnded,
)
from cellmesh.errors import (
    AccessDeniedError,
    ConfigError,
    DecodeError,
    LocalProtocolError,
    PeerUnreachableError,
)
from cellmesh.filter.access import AccessController
from cellmesh.filter.channels import ChannelSpec, ChannelTable, parse_channel_spec
from cellmesh.filter.inspection import (
    InspectionItem,
    InspectionQueue,
    Inspector,
    ThreatList,
    Verdict,
)
from cellmesh.filter.policy import Context, Decision, PolicyHolder, parse_policy
from cellmesh.identity.capabilities import (
    CapabilityIndex,
    decode_advert,
    encode_advert,
    issue_advert,
    parse_tag,
)
from cellmesh.identity.cellid import format_cell_id
from cellmesh.identity.tokens import Revocation, Token
from cellmesh.transport.events import ChannelMessageReceived

if TYPE_CHECKING:
    from cellmesh.node.node import Node

log = logging.getLogger("cellmesh.channels")
MAX_CHANNEL_QUEUE: Final = 4096
MAX_QUEUES: Final = 1024
MAX_POLICY_BYTES: Final = 4 << 20
WATCH_INTERVAL: Final = 1.0
ADVERT_LIFETIME: Final = 24 * 3600
INSPECTION_BUDGET_ITEMS: Final = 256
INSPECTION_BUDGET_SECONDS: Final = 0.005
INSPECTION_PER_SOURCE: Final = 256
ANY: Final = ""
MAX_INTENTS: Final = 4096
"""Most grants remembered for renewal after a reconnection."""
RENEW_ATTEMPTS: Final = 5
RENEW_BACKOFF: Final = 1.0
"""Seconds before the second attempt to renew a grant; doubled for each later one."""
RELAY_CHANNEL: Final = "relay"
"""The channel name policy rules use to speak about relaying for a neighbour."""


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    """A message on a channel, as the application sees it."""

    peer: bytes
    channel: str
    data: bytes
    reliable: bool
    tag: str | None = None


def read_policy_file(path: str) -> str:
    """The text of a policy file; `ConfigError` if it cannot be read or is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (bad byte at offset {exc.start})") from None


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ChannelDriver:
    """Everything channel-related a `Node` runs. Reach it as `node.channels`."""

    def __init__(self, node: Node, inspectors: list[Inspector] | None = None) -> None:
        cfg = node.config
        self._node = node
        self.table = ChannelTable(tuple(parse_channel_spec(s) for s in cfg.channels))
        self.policy_path = cfg.policy_file
        self.policy: PolicyHolder | None = None
        self._policy_stamp: tuple[int, int, int] | None = None
        self.policy_reloads = 0
        self.policy_errors = 0
        self.last_policy_error: str | None = None
        if self.policy_path:
            # A node must not start with a policy nobody can read: fail loudly, with line:col.
            self._policy_stamp = _file_stamp(self.policy_path)
            text = read_policy_file(self.policy_path)
            self.policy = PolicyHolder(parse_policy(text, self.policy_path))
        self.capabilities = CapabilityIndex()
        self._own_tags = tuple(parse_tag(t) for t in cfg.capabilities)
        self._advert: bytes | None = None
        self._advert_issued = 0.0
        self.access = AccessController(
            self.table,
            node.identity.public_key,
            frozenset(bytes.fromhex(k) for k in cfg.trusted_roots),
            self.policy,
            capabilities_of=lambda cell: self.capabilities.capabilities_of(cell, time.time()),
        )
        self._rng = random.Random()
        self.service = ChannelService(
            node.endpoint,
            self.access,
            lambda: self._rng.getrandbits(32),
            on_caps=self._on_caps,
            inspect_all=bool(inspectors) or bool(cfg.threat_list),
        )
        inspectors = list(inspectors or [])
        if cfg.threat_list:
            text = read_policy_file(cfg.threat_list)
            try:
                inspectors.append(ThreatList.from_lines(text, source=cfg.threat_list))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self.inspection: InspectionQueue | None = (
            InspectionQueue(inspectors, per_source=INSPECTION_PER_SOURCE) if inspectors else None
        )
        self._inspect_scheduled = False
        self._awaiting: dict[int, tuple[InspectionItem, ChannelDelivery]] = {}
        self._replies: dict[int, asyncio.Future[ChannelReply]] = {}
        self._queues: dict[str, asyncio.Queue[ChannelMessage]] = {
            ANY: asyncio.Queue(MAX_CHANNEL_QUEUE)
        }
        self._mirrors: dict[str, asyncio.Queue[ChannelMessage]] = {}
        self.taps: list[Callable[[ChannelMessage], bool]] = []
        """Called with each granted message before it is queued; one returning True consumed
        it (the state layer takes the messages that carry events this way)."""
        self.grant_listeners: list[Callable[[bytes, str], None]] = []
        """Called with (host, channel) each time a host grants us a subscription or a publish
        right (first time or renewed): the state layer starts a sync then."""
        self._intents: dict[tuple[bytes, str, Op], tuple[Token, ...]] = {}
        """Grants we asked for and were given, renewed when the host reconnects: a session
        that dies in a partition ends every grant, and the application still wants them."""
        self._renewing: set[asyncio.Task[None]] = set()
        self._renewals: set[tuple[bytes, str, Op]] = set()
        self.dropped: Counter[str] = Counter()
        self._watch: asyncio.TimerHandle | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._schedule_watch()

    def stop(self) -> None:
        self._stopped = True
        if self._watch is not None:
            self._watch.cancel()
        for task in list(self._renewing):
            task.cancel()
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(PeerUnreachableError("node stopped"))
        self._replies.clear()

    def _schedule_watch(self) -> None:
        if not self._stopped:
            loop = asyncio.get_running_loop()
            self._watch = loop.call_later(WATCH_INTERVAL, self._tick)

    def _tick(self) -> None:
        """Once a second: reload a changed policy file, end lapsed grants, time out requests."""
        try:
            if self.policy_path:
                stamp = _file_stamp(self.policy_path)
                if stamp != self._policy_stamp:
                    self._policy_stamp = stamp
                    self.reload_policy()
            self.service.expire(time.time(), self._node._now())
            self._drain()
        finally:
            self._schedule_watch()

    # ------------------------------------------------------------------ policy

    def reload_policy(self) -> str | None:
        """Read the policy file again; returns None, or the error (the old policy stays)."""
        if not self.policy_path:
            return "no policy_file is configured"
        try:
            text = read_policy_file(self.policy_path)
        except ConfigError as exc:
            return self._policy_failed(str(exc))
        if self.policy is None:
            self.policy = PolicyHolder(parse_policy("default -> pass", "builtin"))
            self.access.policy = self.policy
        error = self.policy.reload(text, self.policy_path)
        if error is not None:
            return self._policy_failed(str(error))
        self.policy_reloads += 1
        self.last_policy_error = None
        log.info(
            "policy reloaded from %s (%d rules)", self.policy_path, len(self.policy.policy.rules)
        )
        self._revalidate()
        return None

    def _policy_failed(self, message: str) -> str:
        self.policy_errors += 1
        self.last_policy_error = message
        log.error("policy not reloaded, the previous one stays in force: %s", message)
        return message

    def relay_admission(self) -> Callable[[bytes, float], bool] | None:
        """The ring-1 policy's say on relaying: rules on `channel relay` decide, per neighbour,
        whether (drop), how fast (throttle) or freely (pass) this node relays for it.
        Decided once per neighbour and policy version; None without a policy file."""
        if self.policy is None:
            return None
        decisions: dict[bytes, Decision] = {}
        version = [self.policy_reloads]

        def admit(neighbour: bytes, now: float) -> bool:
            holder = self.policy
            if holder is None:
                return True
            if version[0] != self.policy_reloads:
                decisions.clear()
                version[0] = self.policy_reloads
            d = decisions.get(neighbour)
            if d is None:
                caps = self.capabilities.capabilities_of(neighbour, time.time())
                d = holder.decide(Context(neighbour, RELAY_CHANNEL, caps), reasons=False)
                if len(decisions) >= MAX_QUEUES:
                    decisions.clear()
                decisions[neighbour] = d
            return self.access.throttles.allow(d, neighbour, now)

        return admit

    def _revalidate(self) -> None:
        ended = self.service.revalidate(time.time(), self._node._now())
        for ev in ended:
            log.info(
                "grant ended: %s may no longer %s %s (%s)",
                format_cell_id(ev.peer),
                "subscribe to" if ev.op == Op.SUBSCRIBE else "publish on",
                ev.name,
                ev.reason,
            )
        self._drain()

    # ------------------------------------------------------------------ declarations

    def declare(self, pattern: str, access: str = "token", visibility: str = "mesh") -> ChannelSpec:
        """Host channels matching `pattern` (see `ChannelSpec`); re-decides existing grants."""
        spec = parse_channel_spec(f"{pattern} {access} {visibility}")
        self.table.declare(spec)
        self._revalidate()
        return spec

    def undeclare(self, pattern: str) -> bool:
        """Stop hosting `pattern`; grants under it end."""
        removed = self.table.remove(pattern)
        if removed:
            self._revalidate()
        return removed

    # ------------------------------------------------------------------ requests

    async def subscribe(
        self,
        peer: bytes,
        channel: str,
        chain: tuple[Token, ...] = (),
        timeout: float = 5.0,
    ) -> None:
        """Subscribe to `channel` at `peer`, presenting `chain`; raises `AccessDeniedError`."""
        await self._ask(peer, Op.SUBSCRIBE, channel, chain, timeout)
        self._queue(channel)

    async def request_publish(
        self,
        peer: bytes,
        channel: str,
        chain: tuple[Token, ...] = (),
        timeout: float = 5.0,
    ) -> None:
        """Obtain the right to publish into `peer`'s `channel`; raises `AccessDeniedError`."""
        await self._ask(peer, Op.PUBLISH, channel, chain, timeout)

    async def _ask(
        self,
        peer: bytes,
        op: Op,
        channel: str,
        chain: tuple[Token, ...],
        timeout: float,
        renewal: bool = False,
    ) -> None:
        node = self._node
        await node.ensure_connected(peer, timeout)
        now = node._now()
        if op == Op.SUBSCRIBE:
            rid = self.service.subscribe(peer, channel, chain, now)
        else:
            rid = self.service.request_publish(peer, channel, chain, now)
        fut: asyncio.Future[ChannelReply] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        node._pump()
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise PeerUnreachableError(
                f"{format_cell_id(peer)} did not answer within {timeout:g} s"
            ) from None
        finally:
            self._replies.pop(rid, None)
        if not reply.allowed:
            self._intents.pop((peer, channel, op), None)
            what = "subscribe to" if op == Op.SUBSCRIBE else "publish on"
            detail = f": {reply.detail}" if reply.detail else ""
            raise AccessDeniedError(
                f"{format_cell_id(peer)} refused to let us {what} {channel} "
                f"({reply.reason}){detail}",
                reply.reason,
            )
        key = (peer, channel, op)
        if renewal:
            if key not in self._intents:
                # The application let go while the renewal was on its way: undo it.
                if op == Op.SUBSCRIBE:
                    self.service.unsubscribe(peer, channel, node._now())
                    node._pump()
                return
        elif key in self._intents or len(self._intents) < MAX_INTENTS:
            self._intents[key] = chain
        for listener in list(self.grant_listeners):
            listener(peer, channel)

    def _renew(self, peer: bytes) -> None:
        """Ask `peer` again for the grants it gave us before its session ended."""
        for key, chain in list(self._intents.items()):
            if key[0] != peer or key in self._renewals:
                continue  # another peer's, or a renewal of it already runs
            self._renewals.add(key)
            task = asyncio.ensure_future(self._renew_one(key, chain))
            self._renewing.add(task)
            task.add_done_callback(self._renewing.discard)

    async def _renew_one(self, key: tuple[bytes, str, Op], chain: tuple[Token, ...]) -> None:
        peer, channel, op = key
        what = "subscription" if op == Op.SUBSCRIBE else "publish grant"
        try:
            for attempt in range(RENEW_ATTEMPTS):
                if key not in self._intents or self._stopped:
                    return
                try:
                    await self._ask(peer, op, channel, chain, 5.0, renewal=True)
                except AccessDeniedError as exc:
                    self._intents.pop(key, None)
                    log.warning("%s no longer granted after reconnecting: %s", channel, exc)
                    return
                except (PeerUnreachableError, LocalProtocolError) as exc:
                    # Right after a reconnection the host may be slow to answer: try again
                    # while the session lasts (a new session renews anyway).
                    if self._node.endpoint.session_for(peer) is None:
                        log.info("could not renew %s on %s: %s", what, channel, exc)
                        return
                    await asyncio.sleep(RENEW_BACKOFF * 2**attempt)
                    continue
                log.info("renewed %s on %s at %s", what, channel, format_cell_id(peer))
                return
            log.warning("gave up renewing %s on %s at %s", what, channel, format_cell_id(peer))
        finally:
            self._renewals.discard(key)

    def unsubscribe(self, peer: bytes, channel: str) -> bool:
        """Leave a subscription."""
        self._intents.pop((peer, channel, Op.SUBSCRIBE), None)
        ok = self.service.unsubscribe(peer, channel, self._node._now())
        self._node._pump()
        return ok

    def publish(self, channel: str, data: bytes, reliable: bool = True) -> int:
        """Send `data` on `channel` to every entitled peer; returns how many it went to."""
        n = self.service.publish(channel, data, self._node._now(), reliable)
        self._node._pump()
        return n

    async def recv(self, channel: str | None = None) -> ChannelMessage:
        """The next message on `channel` (or on any channel nobody listens to by name)."""
        return await self._queue(channel or ANY).get()

    def _queue(self, channel: str) -> asyncio.Queue[ChannelMessage]:
        q = self._queues.get(channel)
        if q is None:
            if len(self._queues) >= MAX_QUEUES:
                raise ValueError(f"at most {MAX_QUEUES} channel queues")
            q = asyncio.Queue(MAX_CHANNEL_QUEUE)
            self._queues[channel] = q
        return q

    def mirror(self, name: str) -> asyncio.Queue[ChannelMessage]:
        """The queue that `mirror(NAME)` policy rules copy messages into."""
        q = self._mirrors.get(name)
        if q is None:
            q = asyncio.Queue(MAX_CHANNEL_QUEUE)
            self._mirrors[name] = q
        return q

    # ------------------------------------------------------------------ revocations, capabilities

    def revoke(self, rev: Revocation) -> bool:
        """Honour a revocation here and pass it to every peer (and they to theirs)."""
        new = self.service.add_revocation(rev, time.time(), self._node._now())
        self._drain()
        self._node._pump()
        return new

    def advert(self) -> bytes:
        """This node's signed capability advert (re-signed when older than an hour)."""
        wall = time.time()
        if self._advert is None or wall - self._advert_issued > 3600:
            seq = int(wall * 1000)
            adv = issue_advert(
                self._node.identity, seq, self._own_tags, int(wall), int(wall) + ADVERT_LIFETIME
            )
            self._advert = encode_advert(adv)
            self._advert_issued = wall
            self.capabilities.accept(adv, wall)
        return self._advert

    def find(self, tag: str, value: str | None = None) -> list[bytes]:
        """CellIDs of nodes whose advert offers `tag` (with `value`, if given)."""
        self.advert()
        return [bytes(c) for c in self.capabilities.find(tag, value, now=time.time())]

    def known_capabilities(self) -> dict[str, list[str]]:
        """Every capability tag known (ours and peers'), with the CellIDs offering it."""
        wall = time.time()
        return {
            tag: [format_cell_id(c) for c in self.capabilities.find(tag, now=wall)]
            for tag in sorted(self.capabilities.tag_names())
        }

    def _on_caps(self, peer: bytes, blob: bytes, wall: float) -> None:
        """A peer's advert: kept only if it is the peer's own (a peer cannot fill our index
        with adverts of others) and it verifies; the index counts what it rejects."""
        try:
            advert = decode_advert(blob)
        except DecodeError:
            self.dropped["advert_malformed"] += 1
            return
        if advert.cell_id != peer:
            self.dropped["advert_not_own"] += 1
            return
        self.capabilities.accept(advert, wall)

    # ------------------------------------------------------------------ events from the node

    def on_connected(self, peer: bytes) -> None:
        self.service.announce(peer, Caps(self.advert()), self._node._now())
        if not self._stopped and any(k[0] == peer for k in self._intents):
            self._renew(peer)

    def on_gone(self, peer: bytes) -> None:
        self.service.on_peer_gone(peer)
        self._drain()

    def on_message(self, ev: ChannelMessageReceived) -> None:
        node = self._node
        now = node._now()
        s = node.endpoint.session_for(ev.cell_id)
        age = now - s.created if s is not None else 0.0
        # The policy's `rate` condition: packets per second from this peer over the session so
        # far (a request is decided once, so a long-run average is the fair measure).
        rate = s.counters.packets_in / max(age, 1.0) if s is not None else 0.0
        self.service.on_message(ev, now, time.time(), age, rate)
        self._drain()

    def _drain(self) -> None:
        events = self.service.events
        while events:
            ev = events.popleft()
            if isinstance(ev, ChannelReply):
                fut = self._replies.get(ev.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(ev)
            elif isinstance(ev, ChannelDelivery):
                self._on_delivery(ev)
            elif isinstance(ev, GrantEnded) and ev.by_peer:
                log.info(
                    "%s ended our %s on %s: %s",
                    format_cell_id(ev.peer),
                    "subscription" if ev.op == Op.SUBSCRIBE else "publish grant",
                    ev.name,
                    ev.reason,
                )

    def _on_delivery(self, ev: ChannelDelivery) -> None:
        msg = ChannelMessage(ev.peer, ev.name, ev.data, ev.reliable, ev.tag)
        if ev.mirror is not None:
            self._put(self.mirror(ev.mirror), msg, "mirror_full")
        if self.inspection is not None and ev.inspect:
            item = InspectionItem(ev.peer, ev.name, ev.data, time.time())
            if not self.inspection.submit(item, self._node._now()):
                return  # counted by the queue (overload, per-source quota, banned source)
            self._awaiting[id(item)] = (item, ev)
            self._schedule_inspection()
            return
        if ev.inspect:
            # The policy asked for inspection and no inspector runs: refuse rather than skip it.
            self.dropped["no_inspector"] += 1
            return
        self._deliver(msg)

    def _schedule_inspection(self) -> None:
        if not self._inspect_scheduled:
            self._inspect_scheduled = True
            asyncio.get_running_loop().call_soon(self._run_inspection)

    def _run_inspection(self) -> None:
        """Ring 2, off the receive path: a bounded slice of work per turn of the event loop."""
        self._inspect_scheduled = False
        queue = self.inspection
        if queue is None or self._stopped:
            return
        node = self._node
        now = node._now()
        for item, verdict in queue.run(
            now, INSPECTION_BUDGET_ITEMS, INSPECTION_BUDGET_SECONDS, time.monotonic
        ):
            entry = self._awaiting.pop(id(item), None)
            if entry is None:
                continue
            ev = entry[1]
            if verdict.kind is not Verdict.PASS:
                self.dropped[f"inspection_{verdict.kind.value}"] += 1
                continue
            self._deliver(ChannelMessage(ev.peer, ev.name, ev.data, ev.reliable, ev.tag))
            if ev.forward:
                self.service.forward(ev.name, ev.peer, ev.data, now, ev.reliable)
        for cell, until in queue.take_bans():
            # Ring 2 feeds ring 0: every datagram from this CellID now drops before any crypto.
            log.warning("ring 2 banned %s for %.0f s", format_cell_id(cell), until - now)
            node.endpoint.ban(bytes(cell), node._now() + (until - now))
            self.service.on_peer_gone(bytes(cell))
        self._drain()
        node._pump()
        if len(queue):
            self._schedule_inspection()

    def _deliver(self, msg: ChannelMessage) -> None:
        for tap in self.taps:
            if tap(msg):
                return
        q = self._queues.get(msg.channel) or self._queues[ANY]
        self._put(q, msg, "queue_full")

    def _put(self, q: asyncio.Queue[ChannelMessage], msg: ChannelMessage, reason: str) -> None:
        try:
            q.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped[reason] += 1

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """What `cellmesh channels` shows."""
        svc = self.service
        return {
            "declared": [s.text() for s in self.table.specs()],
            "subscribers": [
                {"channel": name, "peer": format_cell_id(peer)} for name, peer in svc.subscribers()
            ],
            "subscriptions": [
                {"channel": name, "peer": format_cell_id(peer)}
                for peer, name in svc.subscriptions()
            ],
            "publish_grants_given": [
                {"channel": g.channel, "peer": format_cell_id(g.peer), "rule": g.decision.rule}
                for g in self.access.grants()
                if g.right == "publish"
            ],
            "publish_grants_held": [
                {"channel": name, "peer": format_cell_id(peer)}
                for peer, name in svc.publish_grants_held()
            ],
            "policy": {
                "file": self.policy_path or None,
                "rules": len(self.policy.policy.rules) if self.policy is not None else 0,
                "reloads": self.policy_reloads,
                "errors": self.policy_errors,
                "last_error": self.last_policy_error,
            },
            "refusals": dict(sorted(self.access.refusals.items())),
            "drops": dict(sorted((svc.drops + self.dropped).items())),
            "delivered": svc.delivered,
            "forwarded": svc.forwarded,
            "revocations": len(self.access.revocations),
            "capabilities": {name: value for name, value in self._own_tags},
        }
