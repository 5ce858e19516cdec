"""Roaming with path validation: a session follows its peer to a new address only after the
peer answers a challenge there, so spoofed or replayed packets cannot redirect traffic."""

from __future__ import annotations

from test_endpoint import Net, connected_pair

from cellmesh.transport.events import DatagramReceived, PeerMoved
from cellmesh.wire.messages import PathChallenge, PathResponse, pull_messages, push_message


def _peer_addr(net: Net, ep_addr: tuple[str, int], cell: bytes) -> tuple[str, int]:
    ep = net.nodes[ep_addr]
    return next(p.addr for p in ep.peers(net.now) if p.cell_id == cell)


def test_a_peer_that_moves_is_followed_after_answering_the_challenge() -> None:
    net, a, aa, b, ba = connected_pair()
    # A's NAT rebinds: it now sends from another port.
    new = ("10.0.0.9", 4444)
    net.nodes[new] = net.nodes.pop(aa)
    net.events[new] = net.events.pop(aa)
    a.send_datagram(b.cell_id, b"from the new address", net.now)
    net.run()
    assert DatagramReceived(a.cell_id, b"from the new address") in net.of(ba, DatagramReceived)
    assert PeerMoved(a.cell_id, new) in net.of(ba, PeerMoved)
    assert _peer_addr(net, ba, a.cell_id) == new
    # Traffic now flows to the new address.
    b.send_datagram(a.cell_id, b"back", net.now)
    net.run()
    assert DatagramReceived(b.cell_id, b"back") in net.of(new, DatagramReceived)


def test_a_frame_from_a_spoofed_address_does_not_redirect_the_session() -> None:
    net, a, aa, b, ba = connected_pair()
    a.send_datagram(b.cell_id, b"genuine", net.now)
    (frame, _), *_ = a.datagrams_to_send()
    attacker = ("10.6.6.6", 6666)
    # The attacker races the genuine frame to B from its own address.
    b.receive_datagram(frame, attacker, net.now)
    challenges = [d for d, to in b.datagrams_to_send() if to == attacker]
    assert len(challenges) == 1  # one challenge went to the attacker's address, nothing else
    # It cannot answer (it holds no key), so B keeps sending to A where A really is.
    assert _peer_addr(net, ba, a.cell_id) == aa
    b.send_datagram(a.cell_id, b"still to A", net.now)
    net.run()
    assert DatagramReceived(b.cell_id, b"still to A") in net.of(aa, DatagramReceived)
    assert not net.of(ba, PeerMoved)


def test_a_forged_path_response_is_counted_and_ignored() -> None:
    net, a, aa, b, ba = connected_pair()
    s = a.session_for(b.cell_id)
    assert s is not None
    b.receive_datagram(s.seal(push_message(PathResponse(b"12345678")), net.now), aa, net.now)
    assert b.drops["path_response_unexpected"] == 1
    assert _peer_addr(net, ba, a.cell_id) == aa


def test_path_records_round_trip() -> None:
    for rec in (PathChallenge(b"abcdefgh"), PathResponse(b"hgfedcba")):
        assert pull_messages(push_message(rec)) == [rec]
