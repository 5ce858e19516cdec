"""Regression tests for hostile-peer and edge cases found in review."""

from __future__ import annotations

import random

import pytest

from cellmesh.config import NodeConfig
from cellmesh.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from cellmesh.identity.keys import Identity
from cellmesh.transport.connection import Connection, TransportParams
from cellmesh.transport.endpoint import MAX_REPEATED_ANSWERS, Endpoint
from cellmesh.transport.stream import CHUNK_BYTES_PER_PIECE, MAX_CHUNKS, RecvStream
from cellmesh.wire.header import HEADER_LEN, FrameType, pull_header
from cellmesh.wire.messages import (
    HandshakePattern,
    Ping,
    StreamFrame,
    pull_extensions,
    pull_messages,
    pull_timestamp_ext,
    push_extensions,
    push_message,
    push_timestamp_ext,
)

CONFIG = NodeConfig(listen=("127.0.0.1:0",))


def test_oversize_unreliable_record_is_dropped_not_blocking() -> None:
    c = Connection(TransportParams(), True, 0.0)
    c.queue_control(push_message(Ping(1, bytes(5000))))  # larger than the 1200-byte base MTU
    c.queue_control(push_message(Ping(2, b"ok")))
    pt = c.build_packet(0, 0.0)
    assert pt is not None
    assert [m for m in pull_messages(pt) if isinstance(m, Ping)] == [Ping(2, b"ok")]
    assert c.stats.control_dropped == 1
    assert not c.wants_to_send(0.0) or c.build_packet(1, 0.0) is not None


def test_unreliable_sends_larger_than_the_path_are_refused_clearly() -> None:
    a = Endpoint(Identity.generate(), CONFIG, 0.0, random.Random(1))
    b = Endpoint(Identity.generate(), CONFIG, 0.0, random.Random(2))
    a.connect(("b", 1), 0.0)
    for _ in range(5):
        for d, _ in a.datagrams_to_send():
            b.receive_datagram(d, ("a", 1), 0.0)
        for d, _ in b.datagrams_to_send():
            a.receive_datagram(d, ("b", 1), 0.0)
    with pytest.raises(LocalProtocolError, match="path MTU"):
        a.send_datagram(b.cell_id, bytes(2000), 0.0)
    with pytest.raises(LocalProtocolError, match="path MTU"):
        a.send_ping(b.cell_id, 0.0, bytes(2000))
    a.send_datagram(b.cell_id, bytes(1000), 0.0)  # what fits still goes


def test_a_stream_sliced_into_too_many_scattered_pieces_is_refused() -> None:
    r = RecvStream(1, 4 << 20)  # the default window: the floor of MAX_CHUNKS pieces applies
    for i in range(MAX_CHUNKS):
        r.on_frame(2 + 2 * i, b"x", False)  # one byte every other byte: nothing deliverable
    with pytest.raises(RemoteProtocolError, match="out-of-order pieces"):
        r.on_frame(2 + 2 * MAX_CHUNKS, b"x", False)


def test_a_grown_window_behind_one_lost_packet_holds_every_honest_frame() -> None:
    """A 16 MiB window (auto-tuned) with its first packet lost: the ~15,000 full frames that
    follow are all within the window and must be held, not refused as slicing."""
    window = 16 << 20
    r = RecvStream(1, window, window)
    frame = 1104  # a full frame at the 1200-byte path MTU
    n = (window - frame) // frame
    for i in range(1, n + 1):
        r.on_frame(i * frame, bytes(frame), False)
    assert r.buffered_out_of_order == n * frame
    data, _ = r.on_frame(0, bytes(frame), False)  # the retransmission fills the gap
    assert len(data) == (n + 1) * frame
    # Slicing is still bounded: one piece per CHUNK_BYTES_PER_PIECE bytes of the window.
    s = RecvStream(3, window, window)
    pieces = window // CHUNK_BYTES_PER_PIECE
    for i in range(pieces):
        s.on_frame(2 + 2 * i, b"x", False)
    with pytest.raises(RemoteProtocolError, match="out-of-order pieces"):
        s.on_frame(2 + 2 * pieces, b"x", False)


def test_stop_sending_returns_unread_credit_to_the_connection() -> None:
    c = Connection(
        TransportParams(stream_window=128 * 1024, connection_window=128 * 1024), False, 0.0
    )
    c.on_packet(0, [StreamFrame(0, 0, bytes(70_000))], 0.0)  # peer (even ids) opens stream 0
    before = c._local_max_data
    c.stop_sending(0, 9)
    # 70,000 unread bytes were let go: the window reopened past its old limit.
    assert c._local_max_data > before
    c.on_packet(1, [StreamFrame(0, 70_000, bytes(4_000))], 0.0)  # still in flight: let go too
    assert c._consumed_total == 74_000


def test_a_replayed_init_is_answered_from_cache_only_a_few_times() -> None:
    a = Endpoint(Identity.generate(), CONFIG, 0.0, random.Random(1))
    b = Endpoint(Identity.generate(), CONFIG, 0.0, random.Random(2))
    a.connect(("b", 1), 0.0)
    ((init, _),) = a.datagrams_to_send()
    answers = 0
    for _ in range(20):
        b.receive_datagram(init, ("a", 1), 0.0)
        answers += sum(
            1 for d, _ in b.datagrams_to_send() if pull_header(d).type is FrameType.HANDSHAKE_RESP
        )
    assert answers == 1 + MAX_REPEATED_ANSWERS
    assert b.statistics().pending_responses == 1


def _exchange(a: Endpoint, b: Endpoint, rounds: int = 6) -> None:
    for _ in range(rounds):
        for d, _ in a.datagrams_to_send():
            b.receive_datagram(d, ("a", 1), 0.0)
        for d, _ in b.datagrams_to_send():
            a.receive_datagram(d, ("b", 1), 0.0)


def test_mesh_key_admits_members_and_silently_ignores_outsiders() -> None:
    keyed = NodeConfig(listen=("127.0.0.1:0",), mesh_key="11" * 32)
    other = NodeConfig(listen=("127.0.0.1:0",), mesh_key="22" * 32)
    a = Endpoint(Identity.generate(), keyed, 0.0, random.Random(1))
    b = Endpoint(Identity.generate(), keyed, 0.0, random.Random(2))
    a.connect(("b", 1), 0.0)
    _exchange(a, b)
    assert a.session_for(b.cell_id) is not None  # same mesh key: admitted

    for cfg in (other, CONFIG):  # a wrong key, and no key at all
        outsider = Endpoint(Identity.generate(), cfg, 0.0, random.Random(3))
        outsider.connect(("b", 1), 0.0)
        before = b.statistics().drops.get("admission", 0)
        for d, _ in outsider.datagrams_to_send():
            b.receive_datagram(d, ("x", 9), 0.0)
        assert b.datagrams_to_send() == []  # not a byte in answer
        assert b.statistics().drops["admission"] == before + 1
        assert b.statistics().pending_responses == 0
    # And a keyed node ignores an open-mesh node's initiation too.
    plain = Endpoint(Identity.generate(), CONFIG, 0.0, random.Random(4))
    a.connect(("p", 1), 0.0)
    for d, _ in a.datagrams_to_send():
        plain.receive_datagram(d, ("a", 1), 0.0)
    assert plain.datagrams_to_send() == []
    assert plain.statistics().drops["admission"] == 1


def test_allowlist_admits_listed_cellids_only_and_denylist_drops_early() -> None:
    a_id, b_id, c_id = Identity.generate(), Identity.generate(), Identity.generate()
    allow_a = NodeConfig(listen=("127.0.0.1:0",), allowlist=(a_id.cell_id.hex(),))
    b = Endpoint(b_id, allow_a, 0.0, random.Random(2))
    a = Endpoint(a_id, CONFIG, 0.0, random.Random(1))
    a.connect(("b", 1), 0.0)
    _exchange(a, b)
    assert b.session_for(a.cell_id) is not None  # on the list: admitted
    c = Endpoint(c_id, CONFIG, 0.0, random.Random(3))
    c.connect(("b", 1), 0.0)
    for d, _ in c.datagrams_to_send():
        b.receive_datagram(d, ("c", 1), 0.0)
    assert b.datagrams_to_send() == []  # not listed: ignored before any DH
    assert b.statistics().drops["not_allowed"] == 1
    # A denied CellID is dropped on arrival, whatever the frame.
    deny_a = NodeConfig(listen=("127.0.0.1:0",), denylist=(a_id.cell_id.hex(),))
    d_ep = Endpoint(Identity.generate(), deny_a, 0.0, random.Random(4))
    a.connect(("d", 1), 0.0)
    for d, _ in a.datagrams_to_send():
        d_ep.receive_datagram(d, ("a", 1), 0.0)
    assert d_ep.statistics().drops == {"denied": 1}
    assert d_ep.datagrams_to_send() == []


def test_initiator_refuses_a_responder_that_is_not_on_its_allowlist() -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    only_c = NodeConfig(listen=("127.0.0.1:0",), allowlist=("cc" * 16,))
    a = Endpoint(a_id, only_c, 0.0, random.Random(1))
    b = Endpoint(b_id, CONFIG, 0.0, random.Random(2))
    a.connect(("b", 1), 0.0)  # dial by address: B answers, but B is not allowed
    _exchange(a, b)
    assert a.session_for(b.cell_id) is None
    assert a.statistics().drops["not_allowed"] >= 1


def test_a_replayed_ik_init_is_refused_once_the_answer_cache_forgot_it() -> None:
    # IK message 1 authenticates the initiator at once, so without a timestamp a recorded one
    # would make the responder do the handshake again whenever it was replayed.
    a = Endpoint(Identity.generate(), CONFIG, 0.0, random.Random(1))
    b = Endpoint(Identity.generate(), CONFIG, 0.0, random.Random(2))

    def exchange(t: float) -> None:
        for _ in range(6):
            for d, _ in a.datagrams_to_send():
                b.receive_datagram(d, ("a", 1), t)
            for d, _ in b.datagrams_to_send():
                a.receive_datagram(d, ("b", 1), t)

    a.connect(("b", 1), 0.0)  # XX: A learns B's static key
    exchange(0.0)
    a.close_peer(b.cell_id, 1.0)
    exchange(1.0)
    a.connect(("b", 1), 2.0, b.cell_id)  # IK now
    ((init, _),) = a.datagrams_to_send()
    assert init[HEADER_LEN] & 0x7F == HandshakePattern.IK
    b.receive_datagram(init, ("a", 1), 2.0)
    ((resp, _),) = b.datagrams_to_send()
    assert pull_header(resp).type is FrameType.HANDSHAKE_RESP
    a.receive_datagram(resp, ("b", 1), 2.0)
    exchange(2.0)
    assert a.session_for(b.cell_id) is not None
    done = b.statistics().handshakes_completed
    b.handle_timer(30.0)  # long after the answer cache let the INIT go
    b.datagrams_to_send()
    b.receive_datagram(init, ("10.9.9.9", 9), 30.0)  # replayed, from anywhere
    assert b.datagrams_to_send() == []
    assert b.statistics().drops["init_replay"] == 1
    assert b.statistics().handshakes_completed == done
    # A's next IK initiation carries a newer timestamp and is accepted.
    a.close_peer(b.cell_id, 31.0)
    exchange(31.0)
    a.connect(("b", 1), 32.0, b.cell_id)
    exchange(32.0)
    assert a.session_for(b.cell_id) is not None
    assert b.statistics().handshakes_completed == done + 1
    assert b.statistics().drops["init_replay"] == 1


def test_handshake_extensions_round_trip_and_reject_damage() -> None:
    ext = push_timestamp_ext(123456789)
    assert pull_timestamp_ext(ext) == 123456789
    assert pull_timestamp_ext(b"") is None
    assert pull_extensions(push_extensions([(7, b"xy"), (1, bytes(8))])) == {7: b"xy", 1: bytes(8)}
    for bad in (ext[:5], ext + ext, b"\x01\x04abcd", b"\x09"):
        with pytest.raises(MalformedError):
            pull_timestamp_ext(bad)
