"""A running node under fire: thousands of malformed, forged and replayed datagrams and a handshake
flood, then proof that legitimate peers are still served and memory stayed bounded."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.transfer import FileHeader
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import PingReply, StreamData
from cellmesh.wire.header import HEADER_LEN, FrameType, pack_header
from cellmesh.wire.messages import StreamFrame, push_message
from conftest import CliRunner, NodeProcess

Addr = tuple[str, int]


class SocketPeer:
    """A sans-IO Endpoint driven over a real UDP socket by the test itself."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.ep = Endpoint(
            Identity.generate(), NodeConfig(listen=("127.0.0.1:0",)), time.monotonic()
        )
        self.sent: list[bytes] = []

    def pump(self, seconds: float = 0.3) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for data, addr in self.ep.datagrams_to_send():
                self.sent.append(bytes(data))
                self.sock.sendto(data, addr)
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                self.ep.handle_timer(time.monotonic())
                continue
            self.ep.receive_datagram(data, (addr[0], addr[1]), time.monotonic())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def socket_peer() -> Iterator[SocketPeer]:
    p = SocketPeer()
    yield p
    p.close()


def _hostile(
    rng: random.Random, node_cell: bytes, peer_cell: bytes, sid: int, captured: list[bytes], n: int
) -> Iterator[bytes]:
    for i in range(n):
        k = i % 10
        if k == 0:
            yield rng.randbytes(rng.randrange(0, 300))  # junk
        elif k == 1:
            yield rng.randbytes(rng.randrange(1, HEADER_LEN))  # truncated header
        elif k == 2:
            yield bytes([rng.randrange(2, 256)]) + rng.randbytes(100)  # wrong version
        elif k == 3:  # replay of a frame the node already accepted
            yield captured[i % len(captured)]
        elif k == 4:  # forged tag on the live session
            body = rng.randbytes(64)
            yield pack_header(FrameType.DATA, peer_cell, node_cell, sid, 10**9 + i, 64) + body
        elif k == 5:  # unknown session id
            yield pack_header(FrameType.DATA, peer_cell, node_cell, i + 7, i, 32) + bytes(32)
        elif k == 6:  # reflection: claims to come from the node itself
            yield pack_header(FrameType.DATA, node_cell, node_cell, sid, i, 32) + bytes(32)
        elif k == 7:  # responses and finishes for handshakes that never happened
            t = FrameType.HANDSHAKE_RESP if i % 2 else FrameType.HANDSHAKE_FINISH
            yield pack_header(t, peer_cell, node_cell, rng.getrandbits(64), 0, 96) + rng.randbytes(
                96
            )
        elif k == 8:  # a handshake initiation with a garbage Noise message
            body = bytes([1]) + bytes(16) + rng.randbytes(80)
            yield (
                pack_header(FrameType.HANDSHAKE_INIT, rng.randbytes(16), bytes(16), 0, 0, len(body))
                + body
            )
        else:  # header length lies / trailing junk
            yield pack_header(FrameType.DATA, peer_cell, node_cell, sid, i, 10) + bytes(40)


def _blast(target: Addr, frames: Iterator[bytes]) -> int:
    n = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for f in frames:
            s.sendto(f, target)
            n += 1
            if n % 100 == 0:
                time.sleep(0.002)  # stay within the loopback socket buffer
    return n


def _status(cli: type[CliRunner], home: Path) -> dict[str, object]:
    r = cli.run("--home", str(home), "status", "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_node_survives_malformed_replayed_and_flooded_traffic(
    tmp_path: Path,
    cli: type[CliRunner],
    node_factory: type[NodeProcess],
    socket_peer: SocketPeer,
) -> None:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    cli.identity(a_home)
    b_cell = cli.identity(b_home)
    port = cli.free_port()
    target = ("127.0.0.1", port)
    a = node_factory(a_home, "--listen", f"127.0.0.1:{port}", "--max-pending-handshakes", "64")
    node_factory(b_home, "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{port}")

    # A hostile-but-authenticated peer: it completes a real handshake, so its session id is live.
    peer = socket_peer
    peer.ep.connect(target, time.monotonic())
    peer.pump(1.0)
    node_cell = peer.ep.peers(time.monotonic())[0].cell_id
    session = peer.ep.session_for(node_cell)
    assert session is not None
    for i in range(20):
        peer.ep.send_datagram(node_cell, bytes([i]) * 100, time.monotonic())
    peer.pump(0.2)
    captured = [f for f in peer.sent if f[1] == FrameType.DATA]
    assert len(captured) >= 5  # the 20 datagrams share packets: coalescing is expected
    sid = session.remote_index
    rng = random.Random(7)

    # Warm up, then measure memory across a much larger second wave.
    sent = _blast(target, _hostile(rng, node_cell, peer.ep.cell_id, sid, captured, 5000))
    time.sleep(0.3)
    rss_before = a.rss_kib()
    sent += _blast(target, _hostile(rng, node_cell, peer.ep.cell_id, sid, captured, 20000))

    # A handshake flood from 500 distinct (never completing) identities.
    cfg = NodeConfig(listen=("127.0.0.1:0",))
    inits = []
    for _ in range(500):
        e = Endpoint(Identity.generate(), cfg, 0.0)
        e.connect(target, 0.0)
        inits.append(bytes(e.datagrams_to_send()[0][0]))
    sent += _blast(target, iter(inits))
    time.sleep(0.5)
    rss_after = a.rss_kib()

    status = _status(cli, a_home)
    stats = status["stats"]
    assert isinstance(stats, dict)
    drops: dict[str, int] = stats["drops"]
    for reason in (
        "truncated",
        "bad_version",
        "replay",
        "auth_failed",
        "unknown_session",
        "reflected",
        "unexpected_handshake",
        "handshake_auth",
    ):
        assert drops.get(reason, 0) > 0, (reason, drops)
    accounted = sum(drops.values())
    assert accounted >= 0.9 * (sent - 500), (accounted, sent, drops)
    assert stats["pending_responses"] <= 64
    assert stats["sessions"] <= 4  # B, the socket peer, and at most their rekeys
    # Bounded memory: 25,000 hostile datagrams and 500 half-open handshakes later.
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)

    # Legitimate traffic still flows: a real node pings through the CLI...
    r = cli.run("--home", str(b_home), "ping", node_cell.hex(), "-c", "2", "-i", "0.05")
    assert r.returncode == 0, r.stdout + r.stderr
    # ...and the authenticated socket peer still gets encrypted echo replies.
    pid = peer.ep.send_ping(node_cell, time.monotonic())
    peer.pump(0.5)
    replies = []
    while (ev := peer.ep.next_event()) is not None:
        if isinstance(ev, PingReply):
            replies.append(ev.ping_id)
    assert pid in replies
    assert b_cell
    assert a.proc.poll() is None
    assert "Traceback" not in a.log_path.read_text()
    assert os.path.exists(a_home / "control.sock")


def test_a_file_sent_as_one_byte_frames_arrives_whole(
    tmp_path: Path,
    cli: type[CliRunner],
    node_factory: type[NodeProcess],
    socket_peer: SocketPeer,
) -> None:
    """A peer that sends a file's bytes as one-byte STREAM frames, a thousand to a packet:
    the receiving node gathers them (its `Stream` and `cp`'s batches hold a few large pieces,
    not a Python object per byte), writes the file byte-exact and answers `ok`."""
    home = tmp_path / "a"
    cli.identity(home)
    port = cli.free_port()
    target = ("127.0.0.1", port)
    node_factory(home, "--listen", f"127.0.0.1:{port}")
    peer = socket_peer
    peer.ep.connect(target, time.monotonic())
    peer.pump(1.0)
    node_cell = peer.ep.peers(time.monotonic())[0].cell_id
    session = peer.ep.session_for(node_cell)
    conn = peer.ep.connection(node_cell)
    assert session is not None
    assert conn is not None

    payload = random.Random(5).randbytes(150_000)
    header = FileHeader("tiny-frames.bin", len(payload), blake3.blake3(payload).hexdigest())
    sid = peer.ep.open_stream(node_cell)
    line = header.encode()
    peer.ep.stream_write(node_cell, sid, line, time.monotonic())
    peer.pump(0.3)  # the header goes the ordinary way (tracked, retransmitted if lost)
    base = len(line)
    for start in range(0, len(payload), 1000):  # then 150 packets of 1,000 one-byte frames
        records = [
            push_message(StreamFrame(sid, base + i, payload[i : i + 1], i == len(payload) - 1))
            for i in range(start, min(len(payload), start + 1000))
        ]
        pn = session.send_counter
        peer.sock.sendto(session.seal(b"".join(records), time.monotonic()), target)
        conn.note_untracked(pn)
        if start % 10_000 == 0:
            peer.pump(0.05)  # (keep the session's acknowledgements flowing)
    answer = b""
    deadline = time.monotonic() + 15
    while b"\n" not in answer and time.monotonic() < deadline:
        peer.pump(0.2)
        while (ev := peer.ep.next_event()) is not None:
            if isinstance(ev, StreamData) and ev.stream_id == sid:
                answer += ev.data
    assert json.loads(answer.split(b"\n")[0])["ok"] is True, answer
    assert (home / "inbox" / "tiny-frames.bin").read_bytes() == payload
