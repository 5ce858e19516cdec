"""Where the microseconds go: per-stage costs of the DATA receive and send paths and of a ping.

Not a benchmark with a claim (so `make bench` does not run it): a profiling aid that explains the
figures of bench_datagram_rate.py and bench_ping.py. Every stage is timed in this process with
`timeit` (best of several repeats, no profiler overhead) on one 1200-byte DATA datagram of a real
session between two in-memory Endpoints, next to the same stage of the raw ChaCha20-Poly1305
baseline. With --cprofile it also prints cProfile's ranking of the receive path.

    .venv/bin/python bench/profile_hot_paths.py [--quick] [--cprofile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import socket
import struct
import sys
import time
import timeit
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from _common import LOOPBACK, parse_args, print_header
from bench_handshake import A_ADDR, B_ADDR, endpoint_handshake, endpoint_pair
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.udp import normalize_addr
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import DatagramReceived
from cellmesh.wire.header import HEADER_LEN, associated_data, pull_header
from cellmesh.wire.messages import AppData, pull_messages, push_messages

WIRE = 1200
OURS_PAYLOAD = WIRE - HEADER_LEN - 3 - 16
RAW_PAYLOAD = WIRE - HEADER_LEN - 16
_NONCE = struct.Struct("<4xQ")
_PN = struct.Struct("!Q")
_RAW_HEADER = struct.Struct("!BBBBHH16s16sQQII")


def best_us(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Best-of-`repeat` microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def row(label: str, us: float, note: str = "") -> None:
    print(f"  {label:<52} {us:7.2f} us  {note}")


def session_pair() -> tuple[Endpoint, Endpoint]:
    a, b = Identity.generate(), Identity.generate()
    # No per-peer packet budget: the stages below run at a fixed `now`, where the default
    # budget (100,000 packets/s, burst 10,000) would soon drop every datagram unopened.
    ea, eb = endpoint_pair(a, b, NodeConfig(listen=(f"{LOOPBACK}:0",), peer_packet_rate=0))
    endpoint_handshake(ea, eb)
    while ea.next_event() is not None or eb.next_event() is not None:
        pass
    return ea, eb


def data_datagrams(ea: Endpoint, eb: Endpoint, count: int) -> list[bytes]:
    """`count` sealed 1200-byte DATA datagrams from `ea` to `eb`, collected in small batches
    (the connection's unreliable queue is bounded and sheds the oldest beyond it)."""
    payload = bytes(OURS_PAYLOAD)
    dgs: list[bytes] = []
    for i in range(count):
        ea.send_datagram(eb.cell_id, payload, 0.0)
        if i % 32 == 31 or i == count - 1:
            dgs.extend(bytes(d) for d, _ in ea.datagrams_to_send() if len(d) == WIRE)
    return dgs


def receive_path(number: int) -> None:
    ea, eb = session_pair()
    # A fresh datagram per call: the replay window refuses repeats.
    count = number * 6 + 10
    dgs = data_datagrams(ea, eb, count)
    if len(dgs) < count:
        raise RuntimeError(f"expected {count} DATA datagrams of {WIRE} bytes, got {len(dgs)}")
    it = iter(dgs)
    receive = eb.receive_datagram
    got: list[tuple[bytes, bytes]] = []
    append = got.append
    eb.datagram_sink = lambda cell, data: append((cell, data))  # as the Node's inbox takes them

    def full() -> None:
        receive(next(it), A_ADDR, 0.0)
        if len(got) > 1000:
            got.clear()

    def check_nothing_dropped() -> None:
        if eb.drops:
            raise RuntimeError(f"datagrams were dropped, the figure would be wrong: {eb.drops}")

    d = dgs[0]
    s = eb.session_for(ea.cell_id)
    assert s is not None
    h = pull_header(d)
    ad, ct = associated_data(d), d[HEADER_LEN:]
    pn = h.packet_number
    plain = s.recv.open(pn, ad, ct)
    rsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rsock.bind((LOOPBACK, 0))
    wsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = rsock.getsockname()

    def sock_cost(recv: Callable[[], object], n: int = 1000) -> float:
        total = 0.0
        for _ in range(5):
            for _ in range(n):
                wsock.sendto(d, target)
            t0 = time.perf_counter()
            for _ in range(n):
                recv()
            total = min(total or 1e9, (time.perf_counter() - t0) / n * 1e6)
        return total

    aead = ChaCha20Poly1305(bytes(32))
    raw_hdr = _RAW_HEADER.pack(1, 5, 0, 0, RAW_PAYLOAD + 16, 0, bytes(16), bytes(16), 7, 1, 0, 0)
    raw_ct = aead.encrypt(_NONCE.pack(1), bytes(RAW_PAYLOAD), raw_hdr)
    raw_dg = raw_hdr + raw_ct

    print("\nreceive path, one 1200-byte DATA datagram (ours: Node -> Endpoint; baseline: raw)")
    row("socket.recvfrom(65535) (Node, queued datagram)", sock_cost(lambda: rsock.recvfrom(65535)))
    row("socket.recv(2048) (baseline)", sock_cost(lambda: rsock.recv(2048)))
    row("normalize_addr", best_us(lambda: normalize_addr(("127.0.0.1", 5000)), number))
    row(
        "Endpoint.receive_datagram into a datagram sink (all of it)",
        best_us(full, number),
        "<- the sans-IO core",
    )
    check_nothing_dropped()
    row("  pull_header (FrameHeader + FrameType + checks)", best_us(lambda: pull_header(d), number))
    row("  associated_data (copy, TTL zeroed)", best_us(lambda: associated_data(d), number))
    row(
        "  TransportCipher.open (nonce checks + decrypt)",
        best_us(lambda: s.recv.open(pn, ad, ct), number),
    )
    row(
        "  ChaCha20Poly1305.decrypt alone",
        best_us(lambda: aead.decrypt(_NONCE.pack(1), raw_ct, raw_dg[:HEADER_LEN]), number),
    )
    row("  pull_messages (one APP record)", best_us(lambda: pull_messages(plain), number))
    row("  DatagramReceived(...) event object", best_us(lambda: DatagramReceived(d, plain), number))
    row("  ReplayWindow check + accept (4096-bit int)", replay_cost(number))
    asyncio.run(queue_cost(number))
    row(
        "baseline: unpack pn + nonce + decrypt",
        best_us(
            lambda: aead.decrypt(
                _NONCE.pack(_PN.unpack_from(raw_dg, 48)[0]),
                raw_dg[HEADER_LEN:],
                raw_dg[:HEADER_LEN],
            ),
            number,
        ),
    )
    rsock.close()
    wsock.close()


def replay_cost(number: int) -> float:
    from cellmesh.crypto.replay import ReplayWindow

    w = ReplayWindow(4096)
    pn = [0]

    def step() -> None:
        p = pn[0] = pn[0] + 1
        if w.check(p):
            w.accept(p)

    return best_us(step, number)


async def queue_cost(number: int) -> None:
    q: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(4096)
    item = (b"", b"")
    batch = 512
    rounds = max(1, number // batch)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds):
            for _ in range(batch):
                q.put_nowait(item)
            for _ in range(batch):
                await q.get()
        best = min(best, (time.perf_counter() - t0) / (rounds * batch) * 1e6)
    row("Node inbox: asyncio.Queue put_nowait + await get", best)


def send_path(number: int) -> None:
    ea, eb = session_pair()
    payload = bytes(OURS_PAYLOAD)
    s = ea.session_for(eb.cell_id)
    assert s is not None
    cell = eb.cell_id
    send = ea.send_datagram

    def ep_send() -> None:
        send(cell, payload, 0.0)
        ea.datagrams_to_send()

    aead = ChaCha20Poly1305(bytes(32))
    raw_payload = bytes(RAW_PAYLOAD)
    src, dst = bytes(16), bytes(16)
    pn = [0]

    def raw_seal() -> bytes:
        p = pn[0] = pn[0] + 1
        h = _RAW_HEADER.pack(1, 5, 0, 0, RAW_PAYLOAD + 16, 0, src, dst, 7, p, 0, 0)
        return h + aead.encrypt(_NONCE.pack(p), raw_payload, h)

    plain = push_messages([AppData(payload)])
    print("\nsend path, one 1200-byte DATA datagram (socket sendto not included)")
    row("Endpoint.send_datagram + datagrams_to_send", best_us(ep_send, number))
    row("  push_messages([AppData])", best_us(lambda: push_messages([AppData(payload)]), number))
    row(
        "  Session.seal (header, encrypt, bytearray copy)",
        best_us(lambda: s.seal(plain, 0.0), number),
    )
    row("baseline: header pack + encrypt + concat", best_us(raw_seal, number))
    asyncio.run(node_send_cost(number))


async def node_send_cost(number: int) -> None:
    from cellmesh.node.node import Node

    # max_datagram 1200: one datagram per packet, as in bench_datagram_rate (no coalescing).
    cfg = NodeConfig(listen=(f"{LOOPBACK}:0",), max_datagram=WIRE, peer_packet_rate=0)
    async with Node(Identity.generate(), cfg) as a, Node(Identity.generate(), cfg) as b:
        cell = await a.connect(b.local_addresses()[0])
        payload = bytes(OURS_PAYLOAD)
        best = 1e9
        n = min(number, 400)  # stay under the receiver's socket buffer
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                a.send_datagram(cell, payload)
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
            await asyncio.sleep(0.05)
        row("Node.send_datagram (incl. _pump and sendto)", best)


def ping_path(number: int) -> None:
    ea, eb = session_pair()
    cell = eb.cell_id

    def round_trip() -> None:
        ea.send_ping(cell, 0.0)
        for d, _ in ea.datagrams_to_send():
            eb.receive_datagram(d, A_ADDR, 0.0)
        for d, _ in eb.datagrams_to_send():
            ea.receive_datagram(d, B_ADDR, 0.0)
        ea.next_event()

    print("\nping, sans-IO part of one round trip (both sides, no sockets, no event loop)")
    row("send_ping + PING receive + PONG seal + PONG receive", best_us(round_trip, number))
    asyncio.run(wait_for_cost(number))


async def wait_for_cost(number: int) -> None:
    loop = asyncio.get_running_loop()

    async def with_wait_for() -> None:
        fut: asyncio.Future[float] = loop.create_future()
        loop.call_soon(fut.set_result, 0.0)
        await asyncio.wait_for(fut, 2.0)

    async def bare() -> None:
        fut: asyncio.Future[float] = loop.create_future()
        loop.call_soon(fut.set_result, 0.0)
        await fut

    for label, fn in (
        ("await asyncio.wait_for(future, 2.0)", with_wait_for),
        ("await future", bare),
    ):
        best = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(number // 10):
                await fn()
            best = min(best, (time.perf_counter() - t0) / (number // 10) * 1e6)
        row(f"event loop: {label}, resolved next iteration", best)


def cprofile_receive(number: int) -> None:
    ea, eb = session_pair()
    dgs = data_datagrams(ea, eb, number)
    prof = cProfile.Profile()
    prof.enable()
    for d in dgs:
        eb.receive_datagram(d, A_ADDR, 0.0)
        eb.next_event()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(18)
    print("\ncProfile of Endpoint.receive_datagram over", number, "DATA datagrams (ranking only)")
    print(out.getvalue())


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cprofile", action="store_true", help="also print cProfile's ranking")


def main() -> int:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "profile", options)
    number = 2000 if args.quick else 20000
    print_header("profile_hot_paths", f"best of 5 x {number} calls per stage")
    receive_path(number)
    send_path(number)
    ping_path(number)
    if args.cprofile:
        cprofile_receive(number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
