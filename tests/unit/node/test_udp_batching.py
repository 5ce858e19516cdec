"""UDP batching: GSO sends and GRO receives split back into the exact datagrams, in order."""

from __future__ import annotations

import select

from cellmesh.node.udp import UdpSockets

Addr = tuple[str, int]


def _collect(rx: UdpSockets, want: int) -> list[tuple[bytes, Addr]]:
    got: list[tuple[bytes, Addr]] = []
    sock = rx.sockets[0]
    while len(got) < want:
        ready, _, _ = select.select([sock], [], [], 2.0)
        assert ready, f"only {len(got)} of {want} datagrams arrived"
        rx.drain(sock, lambda d, a: got.append((d, a)))
    return got


def _datagrams() -> list[bytes]:
    return [bytes([i]) * 1200 for i in range(10)] + [b"\xff" * 300]


def test_gso_batch_arrives_as_separate_datagrams_in_order() -> None:
    tx = UdpSockets(("127.0.0.1:0",), 1 << 20)
    rx = UdpSockets(("127.0.0.1:0",), 1 << 20)
    try:
        dst = rx.local_addresses()[0]
        sent = _datagrams()
        tx.send_many([(d, dst) for d in sent])
        got = _collect(rx, len(sent))
        assert [d for d, _ in got] == sent
        assert {a for _, a in got} == {tx.local_addresses()[0]}
        if tx.gso:
            assert tx.stats.gso_batches >= 1
    finally:
        tx.close()
        rx.close()


def test_without_gso_the_same_datagrams_arrive() -> None:
    tx = UdpSockets(("127.0.0.1:0",), 1 << 20)
    rx = UdpSockets(("127.0.0.1:0",), 1 << 20)
    try:
        tx.gso = False
        dst = rx.local_addresses()[0]
        sent = _datagrams()
        tx.send_many([(d, dst) for d in sent])
        assert [d for d, _ in _collect(rx, len(sent))] == sent
        assert tx.stats.gso_batches == 0
    finally:
        tx.close()
        rx.close()


def test_mixed_sizes_and_destinations_keep_their_order() -> None:
    tx = UdpSockets(("127.0.0.1:0",), 1 << 20)
    rx1 = UdpSockets(("127.0.0.1:0",), 1 << 20)
    rx2 = UdpSockets(("127.0.0.1:0",), 1 << 20)
    try:
        a, b = rx1.local_addresses()[0], rx2.local_addresses()[0]
        items = [(b"x" * 500, a), (b"y" * 500, a), (b"z" * 900, b), (b"w" * 500, a), (b"v" * 10, a)]
        tx.send_many(items)
        got_a = [d for d, _ in _collect(rx1, 4)]
        got_b = [d for d, _ in _collect(rx2, 1)]
        assert got_a == [b"x" * 500, b"y" * 500, b"w" * 500, b"v" * 10]
        assert got_b == [b"z" * 900]
    finally:
        for u in (tx, rx1, rx2):
            u.close()


def test_a_datagram_whose_handling_raises_costs_only_itself() -> None:
    tx = UdpSockets(("127.0.0.1:0",), 1 << 20)
    rx = UdpSockets(("127.0.0.1:0",), 1 << 20)
    try:
        dst = rx.local_addresses()[0]
        sent = _datagrams()
        tx.send_many([(d, dst) for d in sent])
        got: list[bytes] = []

        def deliver(data: bytes, addr: Addr) -> None:
            if data[0] == 3:
                raise RuntimeError("a bug in the receive path")
            got.append(data)

        sock = rx.sockets[0]
        while len(got) + rx.stats.deliver_errors < len(sent):
            ready, _, _ = select.select([sock], [], [], 2.0)
            assert ready
            rx.drain(sock, deliver)
        assert rx.stats.deliver_errors == 1
        assert got == [d for d in sent if d[0] != 3]
    finally:
        tx.close()
        rx.close()
