"""The chaos relay between real sockets: nodes through loss, NAT mapping, limits, TCP shaping, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TypeVar, cast

import pytest
from click.testing import CliRunner

from cellmesh.cli.chaos_cmd import chaos_relay, parse_size
from cellmesh.config import NodeConfig
from cellmesh.errors import ConfigError, PeerUnreachableError
from cellmesh.identity.keys import Identity
from cellmesh.node.chaos import DirectionStats, Impairment, TcpShaper, UdpChaosRelay
from cellmesh.node.node import Node
from cellmesh.node.udp import Addr, format_addr

T = TypeVar("T")
LOOPBACK = NodeConfig(listen=("127.0.0.1:0",))
BUFFER = 4 * 1024 * 1024


class _LoopBlocked(SystemExit):
    """Raised by the watchdog; a SystemExit so that asyncio does not swallow it in a callback."""


def run(coro: Coroutine[object, object, T], limit: float = 12.0) -> T:
    """Run a test coroutine with a hard deadline, so nothing can hang.

    `asyncio.timeout` bounds the awaits. A SIGALRM watchdog a little later catches code that spins
    without ever yielding to the event loop, which no asyncio timeout can interrupt (nor can
    pytest-timeout: asyncio logs and drops its exception when it is raised inside a callback).
    The watchdog then cancels the test, interrupting further spins, so sockets still get closed.
    """

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await coro

    def bark(signum: int, frame: object) -> None:
        raise _LoopBlocked()

    grace = limit + 3.0
    outer_delay, _ = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's alarm, if armed
    old_handler = signal.signal(signal.SIGALRM, bark)
    t0 = time.monotonic()
    loop = asyncio.new_event_loop()
    task = loop.create_task(bounded())
    try:
        signal.setitimer(signal.ITIMER_REAL, grace)
        try:
            return loop.run_until_complete(task)
        except _LoopBlocked:
            pass
        task.cancel()
        for _ in range(10):
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with contextlib.suppress(_LoopBlocked, asyncio.CancelledError):
                loop.run_until_complete(task)
            if task.done():
                break
        raise AssertionError(
            f"the event loop was blocked for {grace:g} s: something spins without yielding"
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        loop.close()
        if outer_delay > 0:
            remaining = outer_delay - (time.monotonic() - t0)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001))


def _balanced(d: DirectionStats) -> bool:
    fates = d.forwarded + d.dropped_loss + d.dropped_queue + d.dropped_send + d.in_flight
    return d.received + d.duplicated == fates


class _Echo(asyncio.DatagramProtocol):
    """A UDP echo server that remembers who sent."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sources: list[Addr] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        assert self.transport is not None
        self.sources.append((str(addr[0]), int(addr[1])))
        self.transport.sendto(data, addr)


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[str, _Echo]]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)  # bursts of hundreds
    sock.bind(("127.0.0.1", 0))
    transport, proto = await loop.create_datagram_endpoint(_Echo, sock=sock)
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        yield f"{host}:{port}", proto
    finally:
        transport.close()


def _client() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def _recv_all(s: socket.socket, want: int, within: float) -> list[bytes]:
    """Receive up to `want` datagrams on `s`, giving up after `within` seconds."""
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    deadline = loop.time() + within
    while len(got) < want and loop.time() < deadline:
        try:
            got.append(s.recv(65535))
        except BlockingIOError:
            await asyncio.sleep(0.002)
    return got


# --------------------------------------------------------------------------- nodes through chaos


def test_nodes_handshake_and_ping_through_loss_delay_dup_reorder() -> None:
    delay = 0.005
    imp = Impairment(loss=0.10, delay=delay, duplicate=0.05, reorder=0.10, reorder_gap=0.003)

    async def go() -> None:
        async with (
            Node(Identity.generate(), LOOPBACK) as a,
            Node(Identity.generate(), LOOPBACK) as b,
            UdpChaosRelay("127.0.0.1:0", format_addr(b.local_addresses()[0]), imp, seed=1) as relay,
        ):
            assert await a.connect(relay.address, timeout=8.0) == b.cell_id
            rtts: list[float] = []
            for _ in range(4):  # bursts of concurrent pings, so that reordering has company
                results = await asyncio.gather(
                    *(a.ping(b.cell_id, timeout=0.3) for _ in range(25)), return_exceptions=True
                )
                for r in results:
                    if not isinstance(r, PeerUnreachableError):  # ~19% lose a packet
                        assert isinstance(r, float)
                        rtts.append(r)
            # B reaches A back through the relay's mapping, by CellID
            back = await asyncio.gather(
                *(b.ping(a.cell_id, timeout=0.3) for _ in range(10)), return_exceptions=True
            )
            assert any(isinstance(r, float) for r in back)

            assert len(rtts) >= 50, f"only {len(rtts)} of 100 pings answered"
            assert min(rtts) >= 2 * delay  # each way is delayed

            await asyncio.wait_for(relay.wait_idle(), 2.0)
            s = relay.stats()
            sa, sb = a.statistics(), b.statistics()
        assert s.clients == 1
        for d in (s.up, s.down):
            assert _balanced(d)
            assert d.in_flight == 0
            assert d.dropped_queue == 0
            assert d.dropped_send == 0
            assert 0.03 < d.dropped_loss / d.received < 0.2
            assert d.duplicated > 0
            assert d.reordered > 0
        # what the nodes counted is exactly what the relay took and gave
        assert s.up.received == sa.datagrams_out
        assert s.up.forwarded == sb.datagrams_in
        assert s.down.received == sb.datagrams_out
        assert s.down.forwarded == sa.datagrams_in
        assert sb.drops.get("replay", 0) + sa.drops.get("replay", 0) > 0  # duplicates were caught

    run(go())


def test_total_loss_makes_ping_fail() -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), LOOPBACK) as a,
            Node(Identity.generate(), LOOPBACK) as b,
            UdpChaosRelay("127.0.0.1:0", format_addr(b.local_addresses()[0])) as relay,
        ):
            assert await a.connect(relay.address) == b.cell_id
            assert await a.ping(b.cell_id) > 0
            relay.set_impairment(up=Impairment(loss=1.0), down=Impairment(loss=1.0))
            with pytest.raises(PeerUnreachableError):
                await a.ping(b.cell_id, timeout=0.3)
            s = relay.stats()
            assert s.up.dropped_loss >= 1
            assert s.up.forwarded + s.up.dropped_loss == s.up.received
            relay.set_impairment(up=Impairment(), down=Impairment())
            assert await a.ping(b.cell_id) > 0  # the path heals, the session survived

    run(go(), limit=4.0)


def test_handshake_through_total_loss_fails() -> None:
    async def go() -> None:
        async with (
            Node(Identity.generate(), LOOPBACK) as a,
            Node(Identity.generate(), LOOPBACK) as b,
            UdpChaosRelay(
                "127.0.0.1:0", format_addr(b.local_addresses()[0]), Impairment(loss=1.0)
            ) as relay,
        ):
            with pytest.raises(PeerUnreachableError):
                await a.connect(relay.address, timeout=0.7)
            assert relay.stats().up.forwarded == 0
            assert b.statistics().datagrams_in == 0

    run(go())


# --------------------------------------------------------------------------- relay mechanics


def test_transparent_relay_keeps_order_and_routes_each_client_back() -> None:
    async def go() -> None:
        async with (
            echo_server() as (target, echo),
            UdpChaosRelay("127.0.0.1:0", target) as relay,
        ):
            c1, c2 = _client(), _client()
            try:
                for i in range(200):
                    c1.sendto(b"1:%d" % i, relay.address)
                    c2.sendto(b"2:%d" % i, relay.address)
                got1 = await _recv_all(c1, 200, 3.0)
                got2 = await _recv_all(c2, 200, 3.0)
            finally:
                c1.close()
                c2.close()
            assert got1 == [b"1:%d" % i for i in range(200)]
            assert got2 == [b"2:%d" % i for i in range(200)]
            s = relay.stats()
            assert s.clients == 2
            assert len(set(echo.sources)) == 2  # one upstream socket per client
            assert s.up.received == s.up.forwarded == 400
            assert s.down.received == s.down.forwarded == 400
            assert s.up.bytes_forwarded == s.up.bytes_received

    run(go())


def test_rate_limit_tail_drops_and_paces() -> None:
    imp = Impairment(rate=100_000.0, queue_bytes=10_000)  # 10 ms per 1000-byte datagram

    async def go() -> None:
        async with (
            echo_server() as (target, _),
            UdpChaosRelay("127.0.0.1:0", target, imp, Impairment()) as relay,
        ):
            c = _client()
            try:
                t0 = time.monotonic()
                for _ in range(40):
                    c.sendto(b"x" * 1000, relay.address)
                got = await _recv_all(c, 10, 3.0)
                elapsed = time.monotonic() - t0
            finally:
                c.close()
            s = relay.stats()
            assert len(got) == 10
            assert s.up.forwarded == 10
            assert s.up.dropped_queue == 30
            assert elapsed >= 0.095  # ten datagrams serialised at 10 ms each
            assert _balanced(s.up)

    run(go())


def test_client_table_is_bounded_and_expires_idle_mappings() -> None:
    async def go() -> None:
        async with (
            echo_server() as (target, echo),
            UdpChaosRelay("127.0.0.1:0", target, max_clients=2, idle_timeout=0.2) as relay,
        ):
            clients = [_client() for _ in range(3)]
            try:
                for c in clients:
                    c.sendto(b"hi", relay.address)
                    assert await _recv_all(c, 1, 2.0) == [b"hi"]
                s = relay.stats()
                assert s.clients == 2
                assert s.clients_evicted == 1
                # someone other than the target writes to an upstream socket: ignored, counted
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
                    stray.sendto(b"spoof", echo.sources[-1])
                await asyncio.sleep(0.6)  # > idle_timeout plus a sweep interval
                s = relay.stats()
                assert s.stray == 1
                assert s.clients == 0
                assert s.clients_expired == 2
                # a returning client gets a fresh mapping
                clients[0].sendto(b"again", relay.address)
                assert await _recv_all(clients[0], 1, 2.0) == [b"again"]
            finally:
                for c in clients:
                    c.close()

    run(go())


def test_pending_datagrams_are_bounded_and_discarded_at_stop() -> None:
    async def go() -> None:
        async with echo_server() as (target, _):
            relay = UdpChaosRelay("127.0.0.1:0", target, Impairment(delay=5.0), max_pending=5)
            await relay.start()
            c = _client()
            try:
                for _ in range(8):
                    c.sendto(b"slow", relay.address)
                await asyncio.sleep(0.1)
                s = relay.stats()
                assert s.up.in_flight == 5
                assert s.up.dropped_queue == 3
            finally:
                c.close()
                await relay.stop()
            s = relay.stats()
            assert s.up.in_flight == 0
            assert s.up.dropped_send == 5
            assert _balanced(s.up)
            await relay.stop()  # idempotent

    run(go())


def test_relay_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError):
        UdpChaosRelay("127.0.0.1:0", "nonsense:port")
    with pytest.raises(ConfigError):
        UdpChaosRelay("127.0.0.1:0", "127.0.0.1:9", max_clients=0)

    async def go() -> None:
        relay = UdpChaosRelay("127.0.0.1:0", "no-such-host.invalid:9")
        with pytest.raises(ConfigError, match="cannot resolve target"):
            await relay.start()

    run(go())


# --------------------------------------------------------------------------- TCP shaper


def test_tcp_shaper_delays_each_way_and_keeps_the_stream_intact() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def go() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with TcpShaper("127.0.0.1:0", f"127.0.0.1:{port}", delay=0.01) as shaper:
                host, sport = shaper.address
                reader, writer = await asyncio.open_connection(host, sport)
                t0 = time.monotonic()
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                assert time.monotonic() - t0 >= 0.02
                blob = bytes(range(256)) * 2048  # 512 KiB
                writer.write(blob)
                await writer.drain()
                writer.write_eof()
                echoed = await reader.read()  # until the echo server's EOF comes through
                assert echoed == blob
                writer.close()
                await writer.wait_closed()
                await asyncio.sleep(0.05)
                st = shaper.stats()
                assert st.connections == 1
                assert st.bytes_up == st.bytes_down == len(blob) + 4
        finally:
            server.close()
            await server.wait_closed()

    run(go())


def test_tcp_shaper_rate_limit() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.write(b"done")
        writer.close()

    async def go() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with TcpShaper("127.0.0.1:0", f"127.0.0.1:{port}", rate=1_000_000) as shaper:
                reader, writer = await asyncio.open_connection(*shaper.address)
                t0 = time.monotonic()
                writer.write(b"x" * 200_000)
                writer.write_eof()
                assert await reader.read() == b"done"
                assert time.monotonic() - t0 >= 0.19  # 200 kB at 1 MB/s
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    run(go())


def test_tcp_shaper_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="delay"):
        TcpShaper("127.0.0.1:0", "127.0.0.1:9", delay=-1)
    with pytest.raises(ConfigError, match="rate"):
        TcpShaper("127.0.0.1:0", "127.0.0.1:9", rate=0)


# --------------------------------------------------------------------------- the click command


def test_parse_size() -> None:
    assert parse_size("10M") == 10_000_000
    assert parse_size("1.5k") == 1500
    assert parse_size("64Ki") == 65536
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1200") == 1200
    for bad in ("", "M", "-1", "0", "10X", "1e3"):
        with pytest.raises(ValueError, match=r"size|zero"):
            parse_size(bad)


def test_cli_help_teaches() -> None:
    r = CliRunner().invoke(chaos_relay, ["--help"])
    assert r.exit_code == 0
    for text in ("--target", "--loss", "--rate", "--down-loss", "Example", "--peer 127.0.0.1:7100"):
        assert text in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "1.5"], "--loss must be a probability between 0 and 1"),
        (["--down-loss", "-0.1"], "--down-loss must be a probability"),
        (["--dup", "2"], "--dup must be a probability"),
        (["--reorder", "7"], "--reorder must be a probability"),
        (["--delay", "-1"], "--delay must be between 0 and 60000 ms"),
        (["--jitter", "nan"], "--jitter must be between"),
        (["--rate", "fast"], "--rate: 'fast' is not a size"),
        (["--queue", "0"], "--queue: '0' must be greater than zero"),
        (["--burst", "0.5"], "--burst must be at least 1"),
        (["--duration", "0"], "--duration must be a positive number"),
        (["--stats-interval", "0.001"], "--stats-interval must be at least 0.05"),
        (["--max-clients", "0"], "--max-clients must be between 1 and 65536"),
        (["--listen", "1.2.3.4:99999"], "--listen:"),
        (["--target", "127.0.0.1:0"], "--target needs a port"),
    ],
)
def test_cli_validation_errors_are_one_line(args: list[str], message: str) -> None:
    r = CliRunner().invoke(chaos_relay, ["--target", "127.0.0.1:9", *args])
    assert r.exit_code == 1, r.output
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_cli_requires_target() -> None:
    r = CliRunner().invoke(chaos_relay, [])
    assert r.exit_code == 2
    assert "--target" in r.stderr


def test_cli_bind_failure_is_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        r = CliRunner().invoke(
            chaos_relay, ["--listen", f"127.0.0.1:{port}", "--target", "127.0.0.1:9"]
        )
    assert r.exit_code == 1
    assert "cannot listen on" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_runs_for_duration_and_prints_address_and_counters() -> None:
    r = CliRunner().invoke(
        chaos_relay,
        [
            "--target", "127.0.0.1:9", "--loss", "0.05", "--delay", "10", "--rate", "1.25M",
            "--burst", "3", "--seed", "7", "--duration", "0.35", "--stats-interval", "0.1",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    host, _, port = r.stdout.strip().rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert "burst loss 5% (mean run 3) delay 10 ms rate 1.25 MB/s" in r.stderr
    assert r.stderr.count("t=") >= 2
    assert "final clients 0: up recv 0 fwd 0" in r.stderr
