"""Ring 0 additions to the endpoint: packet buckets, the channel gate, channel traffic and bans.

Reuses the in-memory `Net` and `connected_pair` from test_endpoint.py (same directory).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_endpoint import CONFIG, Addr, Net, connected_pair

from cellmesh.errors import LocalProtocolError, PeerUnreachableError
from cellmesh.filter.channels import channel_hash
from cellmesh.transport import endpoint as endpoint_mod
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.events import (
    ChannelMessageReceived,
    DatagramReceived,
    MessageReceived,
    PeerConnected,
    PeerDisconnected,
)
from cellmesh.wire.header import FrameType, pull_header
from cellmesh.wire.messages import (
    CHANNEL_CONTROL,
    AppData,
    ChannelDatagram,
    Message,
    Msg,
    push_message,
    push_messages,
)

CHAT = channel_hash("chat")
NEWS = channel_hash("news")


def only_frame(ep: Endpoint) -> bytes:
    """The single datagram `ep` has to send right now."""
    out = ep.datagrams_to_send()
    assert len(out) == 1, out
    return bytes(out[0][0])


def data_frame(a: Endpoint, b: Endpoint, now: float) -> bytes:
    """A fresh, valid, untagged DATA frame from `a` to `b`."""
    a.send_datagram(b.cell_id, b"x", now)
    return only_frame(a)


def sealed(a: Endpoint, b: Endpoint, plaintext: bytes, now: float, channel: int) -> bytes:
    """A DATA frame from `a` to `b` with any plaintext and header channel, honestly sealed."""
    s = a.session_for(b.cell_id)
    conn = a.connection(b.cell_id)
    assert s is not None
    assert conn is not None
    pn = s.send_counter
    frame = s.seal(plaintext, now, channel)
    conn.note_untracked(pn)
    return frame


def settle(net: Net, idle: float = 10.0) -> None:
    """Let handshake leftovers (acks, paced packets) go out, then jump ahead with nothing due."""
    net.advance(1.0)
    net.now += idle


def channel_events(net: Net, addr: Addr) -> list[ChannelMessageReceived]:
    return [e for e in net.events[addr] if isinstance(e, ChannelMessageReceived)]


def messages(net: Net, addr: Addr) -> list[MessageReceived]:
    return [e for e in net.events[addr] if isinstance(e, MessageReceived)]


# --- per-peer and global packet buckets --------------------------------------------------------


def test_per_peer_bucket_drops_the_excess_before_decryption() -> None:
    config = replace(CONFIG, peer_packet_rate=10.0, peer_packet_burst=3.0)
    net, a, aa, b, _ba = connected_pair(config)
    settle(net)  # the bucket refills to its burst
    before = b.drops.copy()
    frames = [data_frame(a, b, net.now) for _ in range(8)]
    for frame in frames:
        b.receive_datagram(frame, aa, net.now)
    # Three tokens: three frames decrypt, the other five never reach the cipher at all.
    assert b.drops - before == {"peer_rate": 5}
    # Replayed copies are caught by the replay window first: they spend no tokens.
    net.now += 0.1
    for _ in range(5):
        b.receive_datagram(frames[0], aa, net.now)
    assert b.drops - before == {"peer_rate": 5, "replay": 5}
    assert b.statistics().drops["peer_rate"] == b.drops["peer_rate"]
    # The bucket refills at 10/s: 0.1 s later one more frame passes.
    net.now += 0.1
    fresh = data_frame(a, b, net.now)
    b.receive_datagram(fresh, aa, net.now)
    net.step()
    assert b.drops - before == {"peer_rate": 5, "replay": 5}
    assert net.of(net.addr_of(b), DatagramReceived)[-1] == DatagramReceived(a.cell_id, b"x")


def test_per_peer_buckets_are_independent() -> None:
    config = replace(CONFIG, peer_packet_rate=1.0, peer_packet_burst=2.0)
    net, a, aa, b, ba = connected_pair(config)
    c, ca = net.add(3, config)
    c.connect(ba, net.now)
    net.run()
    assert c.session_for(b.cell_id) is not None
    settle(net)
    before = b.drops.copy()
    for flood in [data_frame(a, b, net.now) for _ in range(20)]:
        b.receive_datagram(flood, aa, net.now)
    assert b.drops - before == {"peer_rate": 18}
    # C's bucket is its own: its frame passes while A is over its limit.
    b.receive_datagram(data_frame(c, b, net.now), ca, net.now)
    net.step()
    assert b.drops - before == {"peer_rate": 18}
    assert DatagramReceived(c.cell_id, b"x") in net.of(ba, DatagramReceived)


def test_peer_rate_zero_means_unlimited() -> None:
    net, a, aa, b, _ba = connected_pair(replace(CONFIG, peer_packet_rate=0.0))
    frame = data_frame(a, b, net.now)
    for _ in range(500):
        b.receive_datagram(frame, aa, net.now)
    assert b.drops["peer_rate"] == 0
    assert b.drops["replay"] == 499


def test_global_bucket_limits_all_peers_together() -> None:
    config = replace(CONFIG, peer_packet_rate=0.0, global_packet_rate=100.0)  # burst 10
    net, a, aa, b, ba = connected_pair(config)
    c, ca = net.add(3, config)
    c.connect(ba, net.now)
    net.run()
    assert c.session_for(b.cell_id) is not None
    settle(net)
    before = b.drops.copy()
    for frame in [data_frame(a, b, net.now) for _ in range(25)]:
        b.receive_datagram(frame, aa, net.now)
    assert b.drops - before == {"global_rate": 15}
    # The bucket is shared: C's frame is dropped too while it is empty.
    b.receive_datagram(data_frame(c, b, net.now), ca, net.now)
    assert b.drops - before == {"global_rate": 16}
    assert "peer_rate" not in b.drops
    # 0.02 s at 100/s refills the bucket by two tokens.
    net.now += 0.02
    b.receive_datagram(data_frame(c, b, net.now), ca, net.now)
    net.step()
    assert b.drops - before == {"global_rate": 16}
    assert DatagramReceived(c.cell_id, b"x") in net.of(ba, DatagramReceived)


def test_no_global_limit_by_default() -> None:
    net, a, aa, b, _ba = connected_pair()
    assert CONFIG.global_packet_rate == 0
    frame = data_frame(a, b, net.now)
    for _ in range(300):
        b.receive_datagram(frame, aa, net.now)
    assert "global_rate" not in b.drops
    assert "peer_rate" not in b.drops  # the default per-peer burst is far above 300


# --- the channel gate ----------------------------------------------------------------------------


def test_channel_datagram_header_carries_the_channel_hash() -> None:
    net, a, _aa, b, _ba = connected_pair()
    a.send_channel_datagram(b.cell_id, CHAT, b"hello", net.now)
    frame = only_frame(a)
    h = pull_header(frame)
    assert h.type is FrameType.DATA
    assert h.channel == CHAT
    assert frame[56:60] == CHAT.to_bytes(4, "big")


def test_tagged_frame_is_dropped_before_decryption_unless_admitted() -> None:
    net, a, aa, b, ba = connected_pair()
    a.send_channel_datagram(b.cell_id, CHAT, b"hello", net.now)
    frame = only_frame(a)
    b.receive_datagram(frame, aa, net.now)
    assert b.drops["channel_denied"] == 1
    net.step()
    assert channel_events(net, ba) == []
    # It never reached the cipher: the replay window did not record its packet number, so the
    # very same frame is accepted once the channel is admitted.
    b.allow_channel(a.cell_id, CHAT)
    b.receive_datagram(frame, aa, net.now)
    net.step()
    assert channel_events(net, ba) == [ChannelMessageReceived(a.cell_id, CHAT, b"hello", False)]
    assert b.drops["channel_denied"] == 1
    assert "replay" not in b.drops


def test_admission_is_per_peer_and_per_channel() -> None:
    net, a, _aa, b, ba = connected_pair()
    c, _ca = net.add(3)
    c.connect(ba, net.now)
    net.run()
    b.allow_channel(a.cell_id, CHAT)
    b.allow_channel(c.cell_id, NEWS)
    a.send_channel_datagram(b.cell_id, NEWS, b"a-news", net.now)
    a.send_channel_datagram(b.cell_id, CHAT, b"a-chat", net.now)
    c.send_channel_datagram(b.cell_id, CHAT, b"c-chat", net.now)
    c.send_channel_datagram(b.cell_id, NEWS, b"c-news", net.now)
    net.run()
    assert b.drops["channel_denied"] == 2
    assert {(e.cell_id, e.data) for e in channel_events(net, ba)} == {
        (a.cell_id, b"a-chat"),
        (c.cell_id, b"c-news"),
    }


def test_disallow_channel_closes_the_gate_again() -> None:
    net, a, _aa, b, ba = connected_pair()
    b.allow_channel(a.cell_id, CHAT)
    a.send_channel_datagram(b.cell_id, CHAT, b"1", net.now)
    net.run()
    b.disallow_channel(a.cell_id, CHAT)
    b.disallow_channel(a.cell_id, CHAT)  # idempotent
    a.send_channel_datagram(b.cell_id, CHAT, b"2", net.now)
    net.run()
    assert [e.data for e in channel_events(net, ba)] == [b"1"]
    assert b.drops["channel_denied"] == 1


def test_tagged_frames_still_pass_the_buckets_first() -> None:
    config = replace(CONFIG, peer_packet_rate=1.0, peer_packet_burst=1.0)
    net, a, aa, b, _ba = connected_pair(config)
    settle(net)
    before = b.drops.copy()
    a.send_channel_datagram(b.cell_id, CHAT, b"x", net.now)
    frame = only_frame(a)
    b.receive_datagram(frame, aa, net.now)
    b.receive_datagram(frame, aa, net.now)
    assert b.drops - before == {"channel_denied": 1, "peer_rate": 1}


def test_allow_channel_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoint_mod, "MAX_CHANNEL_GATE", 3)
    _net, a, _aa, b, _ba = connected_pair()
    for h in (1, 2, 3):
        b.allow_channel(a.cell_id, h)
    b.allow_channel(a.cell_id, 2)  # already admitted: no new entry, no error
    with pytest.raises(LocalProtocolError, match="at most 3"):
        b.allow_channel(a.cell_id, 4)
    b.disallow_channel(a.cell_id, 1)
    b.allow_channel(a.cell_id, 4)


def _mismatches(h: int) -> list[tuple[str, bytes]]:
    two: list[Message] = [ChannelDatagram(h, b"1"), ChannelDatagram(h, b"2")]
    return [
        ("other channel", push_message(ChannelDatagram(NEWS, b"x"))),
        ("two datagrams", push_messages(two)),
        ("app datagram", push_message(AppData(b"x"))),
        ("reliable message", push_message(Msg(1, b"x", h))),
        ("nothing", b""),
        ("undecodable", b"\x7f\x00\x00"),
        ("truncated", push_message(ChannelDatagram(h, b"xyz"))[:-1]),
    ]


@pytest.mark.parametrize(("what", "plaintext"), _mismatches(CHAT), ids=lambda v: str(v)[:20])
def test_tagged_frame_content_must_be_one_datagram_of_that_channel(
    what: str, plaintext: bytes
) -> None:
    net, a, aa, b, ba = connected_pair()
    b.allow_channel(a.cell_id, CHAT)
    b.allow_channel(a.cell_id, NEWS)
    b.receive_datagram(sealed(a, b, plaintext, net.now, CHAT), aa, net.now)
    net.step()
    assert b.drops["channel_mismatch"] == 1, what
    assert channel_events(net, ba) == []
    assert net.of(ba, MessageReceived) == []
    # Counted, not a protocol violation: the session carries on.
    assert b.session_for(a.cell_id) is not None
    a.send_datagram(b.cell_id, b"still here", net.now)
    net.run()
    assert net.of(ba, DatagramReceived) == [DatagramReceived(a.cell_id, b"still here")]


def test_untagged_frame_cannot_smuggle_a_channel_datagram_past_the_gate() -> None:
    net, a, aa, b, ba = connected_pair()
    plaintext = push_message(ChannelDatagram(CHAT, b"sneaky"))
    b.receive_datagram(sealed(a, b, plaintext, net.now, 0), aa, net.now)
    net.run()
    assert channel_events(net, ba) == []
    assert b.session_for(a.cell_id) is not None


def test_send_channel_datagram_refusals() -> None:
    net, a, _aa, b, _ba = connected_pair()
    for reserved in (0, CHANNEL_CONTROL, -1, 2**32):
        with pytest.raises(LocalProtocolError, match="reserved or out of range"):
            a.send_channel_datagram(b.cell_id, reserved, b"x", net.now)
    with pytest.raises(PeerUnreachableError):
        a.send_channel_datagram(bytes(16), CHAT, b"x", net.now)
    conn = a.connection(b.cell_id)
    assert conn is not None
    with pytest.raises(LocalProtocolError, match="path MTU"):
        a.send_channel_datagram(b.cell_id, CHAT, bytes(conn.max_control_record), net.now)
    # More than a record body can hold: the same refusal, not a codec error.
    with pytest.raises(LocalProtocolError, match="path MTU"):
        a.send_channel_datagram(b.cell_id, CHAT, bytes(70_000), net.now)
    assert a.datagrams_to_send() == []
    # The largest that fits is sent.
    a.send_channel_datagram(b.cell_id, CHAT, bytes(conn.max_control_record - 7), net.now)
    assert len(a.datagrams_to_send()) == 1


def test_channel_datagrams_do_not_disturb_the_reliable_stream_of_packets() -> None:
    net, a, _aa, b, ba = connected_pair()
    b.allow_channel(a.cell_id, CHAT)
    for i in range(5):
        a.send_channel_datagram(b.cell_id, CHAT, bytes([i]), net.now)
        a.send_message(b.cell_id, bytes([i]), net.now)
        net.run()
    net.advance(2.0)
    assert [e.data for e in channel_events(net, ba) if not e.reliable] == [
        bytes([i]) for i in range(5)
    ]
    assert [e.data for e in messages(net, ba)] == [bytes([i]) for i in range(5)]
    # The untracked packet numbers of channel datagrams are not mistaken for lost packets.
    stats = a.connection_stats(b.cell_id)
    assert stats is not None
    assert stats.packets_lost == 0
    assert b.statistics().drops == {}


# --- reliable channel messages -------------------------------------------------------------------


def test_send_message_on_a_channel_gives_channel_message_events() -> None:
    net, a, _aa, b, ba = connected_pair()
    a.send_message(b.cell_id, b"on chat", net.now, channel=CHAT)
    a.send_message(b.cell_id, b"plain", net.now)
    a.send_message(b.cell_id, b"control", net.now, channel=CHANNEL_CONTROL)
    net.advance(0.5)  # reliable messages leave through the pacer
    assert channel_events(net, ba) == [
        ChannelMessageReceived(a.cell_id, CHAT, b"on chat", True),
        ChannelMessageReceived(a.cell_id, CHANNEL_CONTROL, b"control", True),
    ]
    assert net.of(ba, MessageReceived) == [MessageReceived(a.cell_id, b"plain")]


@pytest.mark.parametrize("channel", [-1, 2**32])
def test_send_message_refuses_channel_hashes_out_of_range_at_the_call(channel: int) -> None:
    """Not later, inside a flush, where the encoder would raise out of the driver."""
    net, a, _aa, b, ba = connected_pair()
    with pytest.raises(LocalProtocolError, match="out of range"):
        a.send_message(b.cell_id, b"x", net.now, channel=channel)
    a.send_message(b.cell_id, b"fine", net.now, channel=CHAT)
    net.advance(0.5)
    assert channel_events(net, ba) == [ChannelMessageReceived(a.cell_id, CHAT, b"fine", True)]


def test_reliable_channel_messages_are_not_tagged_and_need_no_admission() -> None:
    net, a, _aa, b, ba = connected_pair()
    net.log.clear()
    a.send_message(b.cell_id, b"m", net.now, channel=CHAT)
    net.advance(0.5)
    data_frames = [d for d, _s, _t in net.log if pull_header(d).type is FrameType.DATA]
    assert data_frames
    assert all(pull_header(d).channel == 0 for d in data_frames)
    assert "channel_denied" not in b.drops
    assert len(channel_events(net, ba)) == 1


def test_reliable_channel_message_survives_loss() -> None:
    net, a, aa, b, ba = connected_pair()
    dropped: list[bytes] = []

    def drop_first_data(d: bytes, s: Addr, t: Addr) -> bool:
        if s == aa and pull_header(d).type is FrameType.DATA and not dropped:
            dropped.append(d)
            return True
        return False

    net.drop = drop_first_data
    a.send_message(b.cell_id, b"important", net.now, channel=CHAT)
    net.advance(3.0)
    assert len(dropped) == 1
    stats = a.connection_stats(b.cell_id)
    assert stats is not None
    assert stats.packets_lost == 1
    assert channel_events(net, ba) == [ChannelMessageReceived(a.cell_id, CHAT, b"important", True)]


def test_channel_message_size_limit_counts_the_channel_hash() -> None:
    net, a, _aa, b, ba = connected_pair()
    conn = a.connection(b.cell_id)
    assert conn is not None
    limit = conn.max_message
    a.send_message(b.cell_id, bytes(limit), net.now)  # plain: the full size
    a.send_message(b.cell_id, bytes(limit - 4), net.now, channel=CHAT)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        a.send_message(b.cell_id, bytes(limit - 3), net.now, channel=CHAT)
    net.advance(0.5)
    assert [len(e.data) for e in channel_events(net, ba)] == [limit - 4]
    assert [len(e.data) for e in messages(net, ba)] == [limit]


# --- bans --------------------------------------------------------------------------------------


def test_ban_drops_the_session_and_every_datagram_until_it_ends() -> None:
    net, a, _aa, b, ba = connected_pair()
    until = net.now + 30.0
    b.ban(a.cell_id, until)
    assert b.session_for(a.cell_id) is None
    net.step()
    assert net.of(ba, PeerDisconnected) == [PeerDisconnected(a.cell_id, "banned by inspection")]
    # A still thinks it is connected: its traffic is dropped on arrival.
    a.send_datagram(b.cell_id, b"x", net.now)
    net.run()
    assert b.drops["banned"] == 1
    assert net.of(ba, DatagramReceived) == []
    # A new handshake is refused too (the ban is checked before the frame type).
    a.close_peer(b.cell_id, net.now)
    net.run()
    a.connect(ba, net.now)
    net.run()
    assert b.drops["banned"] >= 2
    assert b.session_for(a.cell_id) is None
    # At `until` the ban still holds; just after, it is lifted and A may connect again.
    net.now = until
    a.connect(ba, net.now, b.cell_id)
    net.run()
    assert b.session_for(a.cell_id) is None
    banned = b.drops["banned"]
    net.now = until + 5.0  # past the ban, and past A's backoff for the earlier attempts
    for ep in (a, b):
        ep.handle_timer(net.now)
    a.connect(ba, net.now, b.cell_id)
    net.run()
    assert b.session_for(a.cell_id) is not None
    assert b.drops["banned"] == banned
    assert len(net.of(ba, PeerConnected)) == 2


def test_ban_of_an_unknown_cell_only_records_the_ban() -> None:
    net, a, _aa, b, ba = connected_pair()
    stranger = bytes(range(16))
    b.ban(stranger, net.now + 10)
    net.step()
    assert net.of(ba, PeerDisconnected) == []
    assert b.session_for(a.cell_id) is not None
    a.send_datagram(b.cell_id, b"ok", net.now)
    net.run()
    assert net.of(ba, DatagramReceived) == [DatagramReceived(a.cell_id, b"ok")]
    assert "banned" not in b.drops


def test_ban_is_checked_before_the_rate_buckets() -> None:
    config = replace(CONFIG, peer_packet_rate=1.0, peer_packet_burst=1.0)
    net, a, aa, b, _ba = connected_pair(config)
    frame = data_frame(a, b, net.now)
    b.ban(a.cell_id, net.now + 10)
    for _ in range(5):
        b.receive_datagram(frame, aa, net.now)
    assert b.drops["banned"] == 5
    assert "peer_rate" not in b.drops
