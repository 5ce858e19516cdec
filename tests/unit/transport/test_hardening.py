"""Regression tests for hostile-peer and edge cases found in review."""

from __future__ import annotations

import random

import pytest
from test_endpoint import connected_pair

from cellmesh.config import NodeConfig
from cellmesh.errors import LocalProtocolError, MalformedError, RemoteProtocolError
from cellmesh.identity.keys import Identity
from cellmesh.transport.connection import Connection, TransportParams
from cellmesh.transport.endpoint import MAX_REPEATED_ANSWERS, Endpoint
from cellmesh.transport.stream import CHUNK_BYTES_PER_PIECE, MAX_CHUNKS, RecvStream
from cellmesh.wire.header import HEADER_LEN, FrameType, pull_header
from cellmesh.wire.messages import (
    HandshakePattern,
    Message,
    Ping,
    ResetStream,
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


def _scatter(c: Connection, sid: int, pieces: int, pn: int) -> int:
    """Send `pieces` scattered 1-byte pieces of stream `sid` (one byte every other byte, so
    nothing is deliverable), 1,000 frames per packet; returns the next packet number."""
    for start in range(0, pieces, 1000):
        frames: list[Message] = [
            StreamFrame(sid, 2 + 2 * i, b"x") for i in range(start, min(pieces, start + 1000))
        ]
        c.on_packet(pn, frames, 0.0)
        pn += 1
    return pn


def test_many_streams_sliced_into_scattered_pieces_exhaust_the_connections_budget() -> None:
    """Each stream stays under its own piece limit, but together they may not hold more than
    one piece per KiB of the connection window (16 MiB: 16,384 pieces): without that, 1,024
    streams of 8,192 pieces would cost ~0.8 GB of bookkeeping."""
    c = Connection(TransportParams(), False, 0.0)  # the peer opens even stream ids
    limit = (16 << 20) // CHUNK_BYTES_PER_PIECE
    pn = _scatter(c, 0, 8000, 0)
    pn = _scatter(c, 2, 8000, pn)
    pn = _scatter(c, 4, limit - 16_000, pn)  # exactly at the budget: still accepted
    with pytest.raises(RemoteProtocolError, match="streams hold more than 16384 out-of-order"):
        c.on_packet(pn, [StreamFrame(6, 2, b"x")], 0.0)


def test_a_reset_stream_gives_its_pieces_back_to_the_budget() -> None:
    c = Connection(TransportParams(), False, 0.0)
    limit = (16 << 20) // CHUNK_BYTES_PER_PIECE
    pn = _scatter(c, 0, 8000, 0)
    pn = _scatter(c, 2, 8000, pn)
    c.on_packet(pn, [ResetStream(0, 7, 2 + 2 * 8000)], 0.0)  # the peer gives stream 0 up
    pn = _scatter(c, 4, 8000, pn + 1)  # its 8,000 pieces are free again
    pn = _scatter(c, 6, limit - 16_000, pn)
    assert c._pieces.held == limit
    c.stop_sending(2, 9)  # and we give stream 2 up: so are its
    pn = _scatter(c, 8, 8000, pn)
    assert c._pieces.held == limit
    with pytest.raises(RemoteProtocolError, match="out-of-order pieces"):
        c.on_packet(pn, [StreamFrame(10, 2, b"x")], 0.0)


def test_honest_reordering_on_several_streams_fits_the_budget() -> None:
    """Two streams with grown 16 MiB windows, each behind one lost packet: both windows' worth
    of full frames (large frames are kept apart, not copied into one) fit the budget of a
    grown 64 MiB connection window."""
    params = TransportParams(stream_window=16 << 20, connection_window=64 << 20)
    c = Connection(params, False, 0.0)
    frame = 1104  # a full frame at the 1200-byte path MTU
    n = ((16 << 20) - frame) // frame
    pn = 0
    for sid in (0, 2):
        for start in range(1, n + 1, 50):
            frames: list[Message] = [
                StreamFrame(sid, i * frame, bytes([i & 0xFF]) * frame)
                for i in range(start, min(n + 1, start + 50))
            ]
            c.on_packet(pn, frames, 0.0)
            pn += 1
    assert c._pieces.held == 2 * n <= c._pieces.limit
    for sid in (0, 2):
        c.on_packet(pn, [StreamFrame(sid, 0, bytes(frame))], 0.0)  # the retransmissions
        pn += 1
    assert c._pieces.held == 0
    delivered = [e[2] for e in c.events if e[0] == "data" and e[1] == 0]
    assert b"".join(delivered) == bytes(frame) + b"".join(
        bytes([i & 0xFF]) * frame for i in range(1, n + 1)
    )


def test_small_frames_behind_a_loss_on_three_streams_fit_the_budget() -> None:
    """Three streams each lose their first frame, then 5,500 contiguous 100-byte frames each
    arrive: 16,500 frames, but three gaps, so three pieces (counting frames, the budget of
    16,384 would have ended an honest session)."""
    c = Connection(TransportParams(), False, 0.0)
    pn = 0
    for sid in (0, 2, 4):
        for start in range(1, 5501, 500):
            frames: list[Message] = [
                StreamFrame(sid, 100 * i, bytes(100)) for i in range(start, min(5501, start + 500))
            ]
            c.on_packet(pn, frames, 0.0)
            pn += 1
    assert c._pieces.held == 3


def test_a_partly_overlapping_frame_does_not_keep_its_packet_alive() -> None:
    """A frame whose data is a view of a large packet and mostly overlaps what is buffered:
    the new part is copied, so one new byte does not pin the whole packet."""
    r = RecvStream(1, 4 << 20)
    r.on_frame(10, b"a" * 1000, False)  # buffered: 10..1010
    packet = bytes(65_000)
    r.on_frame(11, memoryview(packet)[:1000], False)  # new: 1010..1011 only
    pieces = list(r._chunks.values())
    assert len(pieces) == 1  # (merged into the piece it continues)
    assert not any(isinstance(p, memoryview) for p in pieces)
    s = RecvStream(3, 4 << 20)
    s.on_frame(100, memoryview(packet)[:5000], False)  # a whole frame may stay a view
    assert isinstance(s._chunks[100], memoryview)
    s.on_frame(50, memoryview(packet)[:60], False)  # 50..110: only 50..100 is new
    assert isinstance(s._chunks[50], (bytes, bytearray))


def test_stop_sending_returns_the_credit_of_out_of_order_bytes_and_of_the_reset() -> None:
    """Bytes received past a gap, and bytes the peer sent before its reset that were lost in
    flight, were counted against the connection window: stopping must give all of it back."""
    c = Connection(TransportParams(), False, 0.0)
    c.on_packet(0, [StreamFrame(0, 1000, bytes(50_000))], 0.0)  # a gap, then 50,000 bytes
    c.stop_sending(0, 9)
    assert c._consumed_total == 51_000 == c._recv_total
    c.on_packet(1, [ResetStream(0, 9, 60_000)], 0.0)  # 9,000 more were lost in flight
    c.on_packet(2, [StreamFrame(0, 0, bytes(1000))], 0.0)  # the gap's retransmission
    assert c._recv_total == 60_000 == c._consumed_total
    assert c._pieces.held == 0


def test_a_peer_slicing_many_streams_into_scattered_pieces_loses_its_session() -> None:
    """End to end: sealed, authenticated packets whose streams each stay under their own piece
    limit but together pass the connection's budget (16,384 pieces for a 16 MiB window) end
    the peer's session as a counted protocol violation; the receiver does not raise."""
    net, a, aa, b, _ba = connected_pair()
    s = a.session_for(b.cell_id)
    conn = a.connection(b.cell_id)
    assert s is not None
    assert conn is not None
    sids = [a.open_stream(b.cell_id) for _ in range(3)]
    plan = [(sids[0], 8000), (sids[1], 8000), (sids[2], 385)]
    frames = [push_message(StreamFrame(sid, 2 + 2 * i, b"x")) for sid, n in plan for i in range(n)]
    for k in range(0, len(frames), 80):  # ~80 one-byte records fill a 1200-byte packet
        pn = s.send_counter
        b.receive_datagram(s.seal(b"".join(frames[k : k + 80]), net.now), aa, net.now)
        conn.note_untracked(pn)
        if b.session_for(a.cell_id) is None:
            break
    assert b.statistics().drops["protocol_violation"] == 1
    assert b.session_for(a.cell_id) is None


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


def test_large_pieces_are_kept_apart_and_small_ones_merge() -> None:
    """Behind a loss, full 64 KB frames stay the views they arrived as (no copying); a small
    frame merges into the piece it continues; filling the gap delivers everything in order."""
    r = RecvStream(1, 4 << 20)
    packets = [bytes([i]) * 60_000 for i in range(3)]
    for i, p in enumerate(packets):
        r.on_frame(1000 + 60_000 * i, memoryview(p), False)
    assert r.pieces == 3
    assert all(isinstance(c, memoryview) for c in r._chunks.values())
    r.on_frame(1000 + 180_000, b"tail", False)  # small: merges into the last piece
    assert r.pieces == 3
    data, _ = r.on_frame(0, b"x" * 1000, False)
    assert bytes(data) == b"x" * 1000 + b"".join(packets) + b"tail"
    assert r.pieces == 0


def test_small_frames_in_descending_order_never_grow_one_piece() -> None:
    """Frames under 1 KiB sent last-first: each closes the gap before the piece after it. A
    small piece takes in a following small one, never a large one, so no piece grows past
    ~2 KiB (taking in the growing piece each time was quadratic: 8 MiB took ~10 s) and the
    count stays within one piece per KiB."""
    r = RecvStream(1, 4 << 20)
    frame, n = 1000, 3000
    data = bytes(i & 0xFF for i in range(frame * (n + 1)))
    for i in range(n, 0, -1):
        r.on_frame(frame * i, data[frame * i : frame * (i + 1)], False)
        assert all(len(c) <= 2 * CHUNK_BYTES_PER_PIECE for c in r._chunks.values())
    assert r.pieces <= n // 2 + 1
    got, _ = r.on_frame(0, data[:frame], False)
    assert bytes(got) == data
    assert r.pieces == 0
