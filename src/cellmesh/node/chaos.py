"""Network impairment in userspace: a seeded loss/delay/duplication/reordering model and relays.

Why this exists: the test machines have no `sch_netem`, so the lossy, slow, reordering paths that
cellmesh must survive cannot be made by the kernel. `UdpChaosRelay` sits between two real processes
(or two `Node`s in one process) as a tiny NAT and impairs every datagram it forwards.

Theory of operation
-------------------
`ChaosModel` is pure: no sockets, no clock, no global randomness. For each datagram it is given the
arrival time and size and draws from its own seeded `random.Random`; it answers with a `Decision`:
dropped (by random loss or by a full rate-limit queue), or one or two delivery times. The stages,
in order, for one direction of one link:

1. **Loss.** Independent (Bernoulli) with probability `loss`, and/or bursty with a two-state
   Gilbert-Elliott chain (`BurstLoss`): a "good" and a "bad" state, each with its own loss
   probability, switching state before every packet. A lost packet uses no link capacity.
2. **Rate limit** (optional). The link serialises `rate` bytes/s: a packet starts transmitting when
   the link is free and finishes `size / rate` seconds later. The bytes waiting ahead of it form the
   queue; if they plus the packet exceed `queue_bytes`, it is tail-dropped.
3. **Delay and jitter.** Propagation delay `delay`, plus a uniform draw in `[-jitter, +jitter]`
   (never below zero extra delay). With `keep_order` (the default) jitter does not reorder: a
   packet is never delivered before the previous in-order one, as on a real path with one queue.
4. **Reordering.** With probability `reorder` a packet is held back `reorder_gap` seconds extra and
   does not hold up the packets behind it, so those sent within the gap overtake it.
5. **Duplication.** With probability `duplicate` a second copy is delivered right after the first
   (plus up to `jitter` more). Copies are made after the bottleneck, so they cost no queue space.

Every random draw happens only when its probability or range is non-zero, so a given `Impairment`
and seed always yield the same decisions for the same sequence of (time, size) inputs. An all-zero
`Impairment` delivers every packet at its arrival time, in order, and draws nothing.

`UdpChaosRelay` is the asyncio driver. It listens on one UDP socket; each client address that sends
to it gets its own upstream socket towards the fixed target (a NAT mapping), so replies from the
target are routed back to the right client. The table is bounded (`max_clients`, least recently
active evicted) and mappings idle for `idle_timeout` expire. Each direction has its own
`ChaosModel` and RNG stream ("up" is client -> target, "down" is target -> client); one model per
direction is shared by all clients, like one shared bottleneck link. Sockets are non-blocking and
registered with `loop.add_reader`; each readiness event drains a batch (`UdpSockets.drain`).
Packets due later go into one heap ordered by delivery time; a single `loop.call_at` timer is armed
for the earliest and sends everything due when it fires. The heap is bounded in packets and bytes
(overflow counts as `dropped_queue`), so memory stays bounded whatever the offered load.

Counters per direction (`DirectionStats`) obey, at any instant:
`received + duplicated == forwarded + dropped_loss + dropped_queue + dropped_send + in_flight`.

TCP and loss
------------
A userspace proxy only ever sees a TCP *byte stream*: the kernel has already retransmitted whatever
the network lost. Dropping bytes in a proxy corrupts the stream; it does not make the kernel's TCP
see loss. So honest TCP-under-loss baselines cannot be built at this layer. `TcpShaper` therefore
only adds one-way delay per direction (so the RTT grows by twice `delay`, as for the UDP relay) and
an optional rate limit, which is enough for "TCP over the same RTT and bottleneck" comparisons
without loss. For TCP through loss, use the kernel: `netem` where available, or two network
namespaces joined by TUN devices whose IP packets a userspace process forwards through a
`ChaosModel` (it is pure and reusable for that), or `iptables -m statistic --mode random` drops
plus a `tbf` qdisc. Needs root; check `/dev/net/tun` and `ip tuntap add ... mode tun`. (The TUN
route works: kernel TCP between two namespaces whose TUN devices a small select() loop bridges
through `ChaosModel.decide` sees real losses, fast-retransmits and SACK recoveries.)
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import socket
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

from cellmesh.config import parse_host_port
from cellmesh.errors import ConfigError, LocalProtocolError
from cellmesh.node.udp import Addr, UdpSockets, format_addr

log = logging.getLogger("cellmesh.chaos")

KIB: Final = 1024
MIB: Final = 1024 * 1024
MAX_DELAY: Final = 60.0
"""Upper bound on every delay-like setting (seconds): keeps the relay's memory and timers bounded."""

DropReason = Literal["loss", "queue"]
Direction = Literal["up", "down"]
_UP: Final = 0
_DOWN: Final = 1
_EARLY: Final = 1e-6  # the event loop may fire a timer this much before its deadline
_BYTE_SLACK: Final = 1e-3  # float rounding in the queue arithmetic must not cost a whole packet


def _check_probability(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{name} must be a probability between 0 and 1, got {value!r}")


def _check_seconds(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= MAX_DELAY):
        raise ConfigError(f"{name} must be between 0 and {MAX_DELAY:g} seconds, got {value!r}")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class BurstLoss:
    """Gilbert-Elliott bursty loss: a two-state Markov chain evaluated before every packet.

    In the good state packets are lost with probability `loss_good`, in the bad state with
    `loss_bad`. The chain moves good -> bad with probability `p_good_to_bad` and bad -> good with
    `p_bad_to_good` per packet, so bad spells last `1 / p_bad_to_good` packets on average.
    """

    p_good_to_bad: float
    p_bad_to_good: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        _check_probability("burst p_good_to_bad", self.p_good_to_bad)
        _check_probability("burst p_bad_to_good", self.p_bad_to_good)
        _check_probability("burst loss_good", self.loss_good)
        _check_probability("burst loss_bad", self.loss_bad)

    @classmethod
    def from_average(cls, loss: float, mean_burst: float) -> BurstLoss:
        """Bursts of `mean_burst` consecutive losses on average, `loss` of all packets in the long run.

        (The simple Gilbert model: nothing lost in the good state, everything in the bad one.)
        """
        _check_probability("loss", loss)
        if not (math.isfinite(mean_burst) and mean_burst >= 1.0):
            raise ConfigError(f"mean burst length must be at least 1 packet, got {mean_burst!r}")
        if loss >= 1.0:
            return cls(1.0, 0.0)
        p_bg = 1.0 / mean_burst
        p_gb = min(1.0, loss * p_bg / (1.0 - loss))
        return cls(p_gb, p_bg)

    @property
    def average_loss(self) -> float:
        """The long-run fraction of packets lost (stationary distribution of the chain)."""
        total = self.p_good_to_bad + self.p_bad_to_good
        bad = 0.0 if total == 0 else self.p_good_to_bad / total
        return bad * self.loss_bad + (1.0 - bad) * self.loss_good


@dataclass(frozen=True, slots=True)
class Impairment:
    """What one direction of the emulated path does to packets. All-zero means a perfect wire.

    Probabilities are in [0, 1]; times are in seconds (at most `MAX_DELAY`); `rate` is in
    bytes per second (None: unlimited) and `queue_bytes` bounds the bottleneck queue behind it.
    Invalid values raise `ConfigError` naming the field.
    """

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_gap: float = 0.005
    rate: float | None = None
    queue_bytes: int = 256 * KIB
    burst_loss: BurstLoss | None = None
    keep_order: bool = True

    def __post_init__(self) -> None:
        _check_probability("loss", self.loss)
        _check_probability("duplicate", self.duplicate)
        _check_probability("reorder", self.reorder)
        _check_seconds("delay", self.delay)
        _check_seconds("jitter", self.jitter)
        _check_seconds("reorder_gap", self.reorder_gap)
        if self.rate is not None and not (
            isinstance(self.rate, int | float) and math.isfinite(self.rate) and self.rate > 0
        ):
            raise ConfigError(f"rate must be a positive number of bytes/s, got {self.rate!r}")
        if not (isinstance(self.queue_bytes, int) and 1 <= self.queue_bytes <= 1 << 30):
            raise ConfigError(f"queue_bytes must be between 1 and 1 GiB, got {self.queue_bytes!r}")
        if self.burst_loss is not None and not isinstance(self.burst_loss, BurstLoss):
            raise ConfigError("burst_loss must be a BurstLoss or None")

    @property
    def is_transparent(self) -> bool:
        """True when packets pass unchanged, immediately and in order."""
        return (
            self.loss == 0
            and self.delay == 0
            and self.jitter == 0
            and self.duplicate == 0
            and self.reorder == 0
            and self.rate is None
            and self.burst_loss is None
        )

    def describe(self) -> str:
        """A short human summary, e.g. 'loss 5% delay 10 ms rate 1.25 MB/s'."""
        parts: list[str] = []
        if self.loss:
            parts.append(f"loss {self.loss * 100:g}%")
        if self.burst_loss is not None:
            b = self.burst_loss
            burst = 1 / b.p_bad_to_good if b.p_bad_to_good else math.inf
            parts.append(f"burst loss {b.average_loss * 100:.3g}% (mean run {burst:.3g})")
        if self.delay:
            parts.append(f"delay {self.delay * 1000:g} ms")
        if self.jitter:
            parts.append(f"jitter ±{self.jitter * 1000:g} ms")
        if self.duplicate:
            parts.append(f"dup {self.duplicate * 100:g}%")
        if self.reorder:
            parts.append(f"reorder {self.reorder * 100:g}% (+{self.reorder_gap * 1000:g} ms)")
        if self.rate is not None:
            parts.append(f"rate {self.rate / 1e6:.4g} MB/s queue {self.queue_bytes} B")
        return " ".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class Decision:
    """The fate of one datagram: `times` to deliver it at (empty when `dropped` says why)."""

    times: tuple[float, ...]
    dropped: DropReason | None = None
    duplicated: bool = False
    reordered: bool = False


DROP_LOSS: Final = Decision((), "loss")
DROP_QUEUE: Final = Decision((), "queue")


class ChaosModel:
    """One direction of an impaired link: pure, deterministic given its `random.Random`.

    `decide(now, size)` must be called with non-decreasing `now` (seconds on any clock).
    """

    __slots__ = ("_bad", "_floor", "_imp", "_link_free", "rng")

    def __init__(self, impairment: Impairment, rng: random.Random) -> None:
        self._imp = impairment
        self.rng = rng
        self._link_free = -math.inf  # when the rate-limited link finishes its current backlog
        self._floor = -math.inf  # delivery time of the last in-order packet
        self._bad = False  # Gilbert-Elliott state

    @classmethod
    def seeded(cls, impairment: Impairment, seed: int | str) -> ChaosModel:
        """A model with its own RNG seeded from `seed`."""
        return cls(impairment, random.Random(seed))

    @property
    def impairment(self) -> Impairment:
        """The current settings."""
        return self._imp

    @impairment.setter
    def impairment(self, value: Impairment) -> None:
        """Change the settings; the RNG stream, queue and ordering state carry on."""
        self._imp = value

    def queued_bytes(self, now: float) -> float:
        """Bytes waiting in the rate-limit queue at `now` (0 without a rate limit)."""
        rate = self._imp.rate
        if rate is None or self._link_free <= now:
            return 0.0
        return (self._link_free - now) * rate

    def decide(self, now: float, size: int) -> Decision:
        """Drop the datagram of `size` bytes arriving at `now`, or say when to deliver it."""
        imp = self._imp
        if imp.is_transparent:
            return Decision((now,))
        rng = self.rng
        # 1. loss
        if imp.loss > 0 and rng.random() < imp.loss:
            return DROP_LOSS
        ge = imp.burst_loss
        if ge is not None:
            if self._bad:
                if ge.p_bad_to_good > 0 and rng.random() < ge.p_bad_to_good:
                    self._bad = False
            elif ge.p_good_to_bad > 0 and rng.random() < ge.p_good_to_bad:
                self._bad = True
            p = ge.loss_bad if self._bad else ge.loss_good
            if p > 0 and rng.random() < p:
                return DROP_LOSS
        # 2. rate limit with a tail-drop queue
        depart = now
        if imp.rate is not None:
            start = max(now, self._link_free)
            if (start - now) * imp.rate + size > imp.queue_bytes + _BYTE_SLACK:
                return DROP_QUEUE
            self._link_free = depart = start + size / imp.rate
        # 3. delay and jitter
        at = depart + imp.delay
        if imp.jitter > 0:
            at = max(depart, at + rng.uniform(-imp.jitter, imp.jitter))
        # 4. reordering
        reordered = imp.reorder > 0 and rng.random() < imp.reorder
        if reordered:
            at += imp.reorder_gap
        elif imp.keep_order:
            at = max(at, self._floor)
            self._floor = at
        # 5. duplication
        if imp.duplicate > 0 and rng.random() < imp.duplicate:
            second = at + rng.uniform(0.0, imp.jitter) if imp.jitter > 0 else at
            if not reordered and imp.keep_order:
                self._floor = max(self._floor, second)
            return Decision((at, second), None, True, reordered)
        return Decision((at,), None, False, reordered)


# --------------------------------------------------------------------------- counters


@dataclass(frozen=True, slots=True)
class DirectionStats:
    """Counters of one direction. `received + duplicated` equals the sum of the other fates."""

    received: int = 0
    forwarded: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    dropped_send: int = 0
    duplicated: int = 0
    reordered: int = 0
    in_flight: int = 0
    bytes_received: int = 0
    bytes_forwarded: int = 0

    def summary(self) -> str:
        """One line: 'recv 10 fwd 9 lost 1 qdrop 0 sendfail 0 dup 0 reord 0 inflight 0'."""
        return (
            f"recv {self.received} fwd {self.forwarded} lost {self.dropped_loss} "
            f"qdrop {self.dropped_queue} sendfail {self.dropped_send} dup {self.duplicated} "
            f"reord {self.reordered} inflight {self.in_flight}"
        )


@dataclass(frozen=True, slots=True)
class RelayStats:
    """A snapshot of a `UdpChaosRelay`'s counters."""

    up: DirectionStats
    down: DirectionStats
    clients: int
    clients_expired: int
    clients_evicted: int
    stray: int
    """Datagrams that reached an upstream socket from somewhere other than the target (ignored)."""


class _Counters:
    __slots__ = (
        "bytes_forwarded",
        "bytes_received",
        "dropped_loss",
        "dropped_queue",
        "dropped_send",
        "duplicated",
        "forwarded",
        "in_flight",
        "received",
        "reordered",
    )

    def __init__(self) -> None:
        self.received = self.forwarded = self.dropped_loss = self.dropped_queue = 0
        self.dropped_send = self.duplicated = self.reordered = self.in_flight = 0
        self.bytes_received = self.bytes_forwarded = 0

    def snapshot(self) -> DirectionStats:
        return DirectionStats(
            received=self.received,
            forwarded=self.forwarded,
            dropped_loss=self.dropped_loss,
            dropped_queue=self.dropped_queue,
            dropped_send=self.dropped_send,
            duplicated=self.duplicated,
            reordered=self.reordered,
            in_flight=self.in_flight,
            bytes_received=self.bytes_received,
            bytes_forwarded=self.bytes_forwarded,
        )


# --------------------------------------------------------------------------- the UDP relay


def _resolve(spec: str, what: str) -> tuple[Addr, int]:
    """HOST:PORT to a numeric address and its family, resolving a name once."""
    host, port = parse_host_port(spec)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve {what} {spec}: {exc.strerror}") from exc
    family, _, _, _, sa = infos[0]
    return (str(sa[0]), int(sa[1])), int(family)


def _source_ip(target: Addr, family: int) -> str:
    """The local address the kernel would send from towards `target` (wildcard if unknown)."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(target)
            return str(probe.getsockname()[0])
        except OSError:
            return "::" if family == socket.AF_INET6 else "0.0.0.0"


class _Client:
    """One NAT mapping: a client address and the upstream socket that speaks for it."""

    __slots__ = ("addr", "closed", "fd", "last_seen", "udp")

    def __init__(self, addr: Addr, udp: UdpSockets, now: float) -> None:
        self.addr = addr
        self.udp = udp
        self.fd = udp.sockets[0].fileno()
        self.last_seen = now
        self.closed = False


_Item = tuple[float, int, int, _Client, bytes]  # (when, seq, direction, client, data)


class UdpChaosRelay:
    """An impairing UDP relay (a small NAT) from `listen` to a fixed `target`.

    ```
    async with UdpChaosRelay("127.0.0.1:0", "127.0.0.1:7001", Impairment(loss=0.05)) as relay:
        await node.connect(relay.address)   # node <-> relay <-> the node at 127.0.0.1:7001
    ```

    `up` impairs client -> target traffic, `down` target -> client (default: the same settings as
    `up`, drawn from an independent RNG stream). `seed` makes both streams reproducible.
    Limits: `max_clients` mappings (least recently active evicted), `idle_timeout` seconds of
    silence before a mapping expires, and at most `max_pending` datagrams / `max_pending_bytes`
    bytes held for later delivery across both directions.
    """

    def __init__(
        self,
        listen: str,
        target: str,
        up: Impairment | None = None,
        down: Impairment | None = None,
        *,
        seed: int | str | None = None,
        max_clients: int = 64,
        idle_timeout: float = 60.0,
        max_pending: int = 65536,
        max_pending_bytes: int = 64 * MIB,
        socket_buffer: int = 4 * MIB,
    ) -> None:
        if not 1 <= max_clients <= 65536:
            raise ConfigError(f"max_clients must be between 1 and 65536, got {max_clients}")
        if not (math.isfinite(idle_timeout) and 0 < idle_timeout <= 86400):
            raise ConfigError(f"idle_timeout must be in (0, 86400] seconds, got {idle_timeout}")
        if max_pending < 1 or max_pending_bytes < 1:
            raise ConfigError("max_pending and max_pending_bytes must be positive")
        parse_host_port(listen)  # fail early on syntax; binding happens in start()
        parse_host_port(target)
        up = up if up is not None else Impairment()
        down = down if down is not None else up
        self.listen_spec = listen
        self.target_spec = target
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.socket_buffer = socket_buffer
        rng_up = random.Random(f"cellmesh-chaos:{seed}:up") if seed is not None else random.Random()
        rng_down = (
            random.Random(f"cellmesh-chaos:{seed}:down") if seed is not None else random.Random()
        )
        self._models = (ChaosModel(up, rng_up), ChaosModel(down, rng_down))
        self._counters = (_Counters(), _Counters())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen: UdpSockets | None = None
        self._listen_fd = -1
        self._target: Addr = ("", 0)
        self._target_family: int = socket.AF_INET
        self._bind_ip = ""
        self._clients: OrderedDict[Addr, _Client] = OrderedDict()
        self._heap: list[_Item] = []
        self._seq = 0
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf
        self._sweeper: asyncio.TimerHandle | None = None
        self._writers: dict[int, UdpSockets] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._expired = 0
        self._evicted = 0
        self._stray = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> UdpChaosRelay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Resolve the target, bind the listening socket and start relaying."""
        if self._loop is not None:
            raise LocalProtocolError("relay already started")
        loop = asyncio.get_running_loop()
        self._target, self._target_family = _resolve(self.target_spec, "target")
        self._bind_ip = _source_ip(self._target, self._target_family)
        self._listen = UdpSockets((self.listen_spec,), self.socket_buffer)
        self._loop = loop
        self._listen_fd = self._listen.sockets[0].fileno()
        loop.add_reader(self._listen_fd, self._on_client_readable)
        self._sweeper = loop.call_later(self._sweep_interval, self._sweep)
        log.info(
            "chaos relay %s -> %s; up: %s; down: %s",
            format_addr(self.address),
            format_addr(self._target),
            self._models[_UP].impairment.describe(),
            self._models[_DOWN].impairment.describe(),
        )

    async def stop(self) -> None:
        """Stop relaying, close every socket and discard datagrams still in flight."""
        loop = self._loop
        if loop is None or self._listen is None:
            return
        for handle in (self._timer, self._sweeper):
            if handle is not None:
                handle.cancel()
        self._timer = self._sweeper = None
        for fd in self._writers:
            loop.remove_writer(fd)
        self._writers.clear()
        loop.remove_reader(self._listen_fd)
        for client in list(self._clients.values()):
            self._close_client(client)
        self._clients.clear()
        for _, _, direction, _, _ in self._heap:
            c = self._counters[direction]
            c.in_flight -= 1
            c.dropped_send += 1
        self._heap.clear()
        self._pending_bytes = 0
        self._idle.set()
        self._listen.close()
        self._listen = None
        self._loop = None

    @property
    def address(self) -> Addr:
        """Where the relay listens, with the real port (clients send here)."""
        if self._listen is None:
            raise LocalProtocolError("relay is not running")
        return self._listen.local_addresses()[0]

    @property
    def target(self) -> Addr:
        """The resolved target address (after `start`)."""
        return self._target

    def set_impairment(self, up: Impairment | None = None, down: Impairment | None = None) -> None:
        """Change the impairment of either direction while running (RNG streams carry on)."""
        if up is not None:
            self._models[_UP].impairment = up
        if down is not None:
            self._models[_DOWN].impairment = down

    def impairments(self) -> tuple[Impairment, Impairment]:
        """The current (up, down) settings."""
        return self._models[_UP].impairment, self._models[_DOWN].impairment

    def stats(self) -> RelayStats:
        """A frozen snapshot of the counters."""
        return RelayStats(
            up=self._counters[_UP].snapshot(),
            down=self._counters[_DOWN].snapshot(),
            clients=len(self._clients),
            clients_expired=self._expired,
            clients_evicted=self._evicted,
            stray=self._stray,
        )

    async def wait_idle(self) -> None:
        """Return once no datagram is waiting for its delivery time (wrap in a timeout)."""
        await self._idle.wait()

    # ------------------------------------------------------------------ receiving

    @property
    def _sweep_interval(self) -> float:
        return min(max(self.idle_timeout / 4, 0.05), 5.0)

    def _on_client_readable(self) -> None:
        loop, listen = self._loop, self._listen
        if loop is None or listen is None:
            return
        now = loop.time()
        model = self._models[_UP]
        counters = self._counters[_UP]

        def deliver(data: bytes, addr: Addr) -> None:
            counters.received += 1
            counters.bytes_received += len(data)
            client = self._clients.get(addr)
            if client is None:
                client = self._new_client(addr, now)
                if client is None:
                    counters.dropped_send += 1
                    return
            else:
                client.last_seen = now
                self._clients.move_to_end(addr)
            self._apply(_UP, model.decide(now, len(data)), now, client, data)

        listen.drain(listen.sockets[0], deliver)
        self._after_batch(now)

    def _on_target_readable(self, client: _Client) -> None:
        loop = self._loop
        if loop is None or client.closed:
            return
        now = loop.time()
        client.last_seen = now
        model = self._models[_DOWN]
        counters = self._counters[_DOWN]
        target = self._target

        def deliver(data: bytes, addr: Addr) -> None:
            if addr != target:
                self._stray += 1
                return
            counters.received += 1
            counters.bytes_received += len(data)
            self._apply(_DOWN, model.decide(now, len(data)), now, client, data)

        client.udp.drain(client.udp.sockets[0], deliver)
        self._after_batch(now)

    def _new_client(self, addr: Addr, now: float) -> _Client | None:
        assert self._loop is not None
        while len(self._clients) >= self.max_clients:
            _, oldest = self._clients.popitem(last=False)
            self._close_client(oldest)
            self._evicted += 1
        bind = format_addr((self._bind_ip, 0))
        try:
            udp = UdpSockets((bind,), self.socket_buffer)
        except OSError as exc:
            log.warning("cannot open an upstream socket for %s: %s", format_addr(addr), exc)
            return None
        client = _Client(addr, udp, now)
        self._clients[addr] = client
        self._loop.add_reader(client.fd, self._on_target_readable, client)
        log.debug("new mapping %s -> %s", format_addr(addr), format_addr(udp.local_addresses()[0]))
        return client

    def _close_client(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        if self._loop is not None:
            self._loop.remove_reader(client.fd)
            if self._writers.pop(client.fd, None) is not None:
                self._loop.remove_writer(client.fd)
        client.udp.close()

    def _sweep(self) -> None:
        loop = self._loop
        if loop is None:
            return
        deadline = loop.time() - self.idle_timeout
        # Client traffic keeps the table in LRU order, but target traffic also counts as activity
        # without reordering it, so scan it all (it is bounded by max_clients).
        for addr, client in list(self._clients.items()):
            if client.last_seen <= deadline:
                del self._clients[addr]
                self._close_client(client)
                self._expired += 1
        self._sweeper = loop.call_later(self._sweep_interval, self._sweep)

    # ------------------------------------------------------------------ scheduling and sending

    def _apply(self, direction: int, d: Decision, now: float, client: _Client, data: bytes) -> None:
        counters = self._counters[direction]
        if d.dropped == "loss":
            counters.dropped_loss += 1
            return
        if d.dropped == "queue":
            counters.dropped_queue += 1
            return
        if d.duplicated:
            counters.duplicated += 1
        if d.reordered:
            counters.reordered += 1
        for when in d.times:
            if when <= now and not self._heap:
                self._send(direction, client, data)
            else:
                self._push(when, direction, client, data)

    def _push(self, when: float, direction: int, client: _Client, data: bytes) -> None:
        counters = self._counters[direction]
        if (
            len(self._heap) >= self.max_pending
            or self._pending_bytes + len(data) > self.max_pending_bytes
        ):
            counters.dropped_queue += 1
            return
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, direction, client, data))
        self._pending_bytes += len(data)
        counters.in_flight += 1
        self._idle.clear()

    def _after_batch(self, now: float) -> None:
        if self._heap and self._heap[0][0] <= now + _EARLY:
            self._send_due(now)
        self._arm()

    def _arm(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if not self._heap:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
                self._timer_when = math.inf
            self._idle.set()
            return
        when = self._heap[0][0]
        if self._timer is not None:
            if self._timer_when <= when:
                return  # the armed timer fires first and re-arms
            self._timer.cancel()
        self._timer_when = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = math.inf
        if self._loop is None:
            return
        self._send_due(self._loop.time())
        self._arm()

    def _send_due(self, now: float) -> None:
        heap = self._heap
        limit = now + _EARLY
        while heap and heap[0][0] <= limit:
            _, _, direction, client, data = heapq.heappop(heap)
            self._pending_bytes -= len(data)
            self._counters[direction].in_flight -= 1
            self._send(direction, client, data)

    def _send(self, direction: int, client: _Client, data: bytes) -> None:
        counters = self._counters[direction]
        if client.closed or self._listen is None:
            counters.dropped_send += 1
            return
        udp = client.udp if direction == _UP else self._listen
        ok = udp.send(data, self._target if direction == _UP else client.addr)
        if not ok:
            counters.dropped_send += 1
            return
        counters.forwarded += 1
        counters.bytes_forwarded += len(data)
        if udp.has_backlog:
            self._want_write(udp)

    def _want_write(self, udp: UdpSockets) -> None:
        fd = udp.sockets[0].fileno()
        if fd in self._writers or self._loop is None:
            return
        self._writers[fd] = udp
        self._loop.add_writer(fd, self._on_writable, fd)

    def _on_writable(self, fd: int) -> None:
        udp = self._writers.get(fd)
        if udp is None or self._loop is None:
            return
        udp.flush_backlog()
        if not udp.has_backlog:
            del self._writers[fd]
            self._loop.remove_writer(fd)


# --------------------------------------------------------------------------- TCP shaping


@dataclass(frozen=True, slots=True)
class TcpShaperStats:
    """Counters of a `TcpShaper`."""

    connections: int
    active: int
    failed: int
    bytes_up: int
    bytes_down: int


_EOF: Final = b""


class TcpShaper:
    """A TCP proxy adding `delay` seconds each way and an optional rate limit. No loss: see below.

    Each chunk read from one side is delivered to the other `delay` seconds after it has passed
    a link of `rate` bytes/s (None: unlimited), per direction, so the RTT through the shaper grows
    by `2 * delay`, exactly as through a `UdpChaosRelay` with `Impairment(delay=delay)` both ways.
    At most `buffer_bytes` (in chunks of up to 64 KiB) wait per direction; beyond that the shaper
    stops reading and TCP flow control pushes back on the sender, which caps throughput at about
    `buffer_bytes / delay`.

    Loss, duplication and reordering cannot be applied: the proxy sees the byte stream after the
    kernel's TCP has already repaired the network's losses, so dropping bytes here would corrupt
    the stream rather than exercise TCP. Emulating loss for kernel TCP needs a layer below it
    (netem, or TUN devices in network namespaces forwarding IP packets through a `ChaosModel`).
    """

    CHUNK: Final = 64 * KIB

    def __init__(
        self,
        listen: str,
        target: str,
        *,
        delay: float = 0.0,
        rate: float | None = None,
        buffer_bytes: int = 4 * MIB,
        max_connections: int = 64,
    ) -> None:
        _check_seconds("delay", delay)
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"rate must be a positive number of bytes/s, got {rate!r}")
        if buffer_bytes < self.CHUNK:
            raise ConfigError(f"buffer_bytes must be at least {self.CHUNK}")
        if not 1 <= max_connections <= 4096:
            raise ConfigError("max_connections must be between 1 and 4096")
        parse_host_port(listen)
        parse_host_port(target)
        self.listen_spec = listen
        self.target_spec = target
        self.delay = delay
        self.rate = rate
        self.buffer_bytes = buffer_bytes
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connections = 0
        self._failed = 0
        self._bytes = [0, 0]

    async def __aenter__(self) -> TcpShaper:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind the listening socket and start accepting."""
        if self._server is not None:
            raise LocalProtocolError("shaper already started")
        host, port = parse_host_port(self.listen_spec)
        self._server = await asyncio.start_server(self._accept, host, port)

    async def stop(self) -> None:
        """Stop accepting and tear down every proxied connection."""
        if self._server is None:
            return
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    @property
    def address(self) -> Addr:
        """Where the shaper listens, with the real port."""
        if self._server is None:
            raise LocalProtocolError("shaper is not running")
        sockets = self._server.sockets
        host, port = sockets[0].getsockname()[:2]
        return str(host), int(port)

    def stats(self) -> TcpShaperStats:
        """Counters so far."""
        return TcpShaperStats(
            connections=self._connections,
            active=len(self._tasks),
            failed=self._failed,
            bytes_up=self._bytes[_UP],
            bytes_down=self._bytes[_DOWN],
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= self.max_connections:
            writer.close()
            self._failed += 1
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._connections += 1
        try:
            host, port = parse_host_port(self.target_spec)
            try:
                t_reader, t_writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                log.warning("tcp shaper: cannot reach %s: %s", self.target_spec, exc)
                self._failed += 1
                return
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pipe(reader, t_writer, _UP))
                    tg.create_task(self._pipe(t_reader, writer, _DOWN))
            except* OSError:
                self._failed += 1
            finally:
                t_writer.close()
        except asyncio.CancelledError:
            # `stop` cancels connection handlers; asyncio's stream server logs a handler that
            # ends cancelled as an error, so a handler stopped on purpose ends normally.
            return
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: int
    ) -> None:
        """Read chunks, stamp their delivery time, and deliver them in order when due."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(
            max(1, self.buffer_bytes // self.CHUNK)
        )

        async def produce() -> None:
            link_free = -math.inf
            while True:
                chunk = await reader.read(self.CHUNK)
                now = loop.time()
                depart = now
                if chunk and self.rate is not None:
                    link_free = depart = max(now, link_free) + len(chunk) / self.rate
                await queue.put((depart + self.delay, chunk))
                if not chunk:
                    return

        async def consume() -> None:
            while True:
                when, chunk = await queue.get()
                wait = when - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if chunk == _EOF:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                writer.write(chunk)
                self._bytes[direction] += len(chunk)
                await writer.drain()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            tg.create_task(consume())
