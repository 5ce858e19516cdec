"""Unit tests for the two halves of a stream: `SendStream` and `RecvStream` (pure, no time)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.errors import LocalProtocolError, RemoteProtocolError
from cellmesh.transport.stream import (
    FINAL_SIZE_ERROR,
    FLOW_CONTROL_ERROR,
    RecvStream,
    SendBuffer,
    SendStream,
    grown_window,
)

BIG = 1 << 40
DATA = bytes(range(256)) * 8  # 2048 distinguishable-ish bytes

Frame = tuple[int, bytes, bool, bool]


def drain(s: SendStream, max_len: int = 1000, credit: int = BIG) -> list[Frame]:
    """Every frame the stream gives right now."""
    out: list[Frame] = []
    for _ in range(10_000):
        f = s.next_frame(max_len, credit)
        if f is None:
            return out
        out.append((f[0], bytes(f[1]), f[2], f[3]))
    raise AssertionError("next_frame never returned None")


# ---------------------------------------------------------------------------------- SendStream


def test_new_stream_has_nothing_to_send() -> None:
    s = SendStream(0, 1000)
    assert not s.has_data()
    assert s.next_frame(100, BIG) is None
    assert s.write_offset == 0
    assert s.buffered == 0
    assert not s.done


def test_frames_respect_max_len_and_are_contiguous() -> None:
    s = SendStream(4, BIG)
    s.write(DATA[:1000], fin=False)
    frames = drain(s, max_len=300)
    assert [(o, len(d)) for o, d, _, _ in frames] == [(0, 300), (300, 300), (600, 300), (900, 100)]
    assert b"".join(d for _, d, _, _ in frames) == DATA[:1000]
    assert all(new and not fin for _, _, fin, new in frames)
    assert s.next_offset == 1000
    assert not s.has_data()


@pytest.mark.parametrize("max_len", [0, -5])
def test_no_room_no_frame(max_len: int) -> None:
    s = SendStream(0, BIG)
    s.write(b"abc", fin=True)
    assert s.next_frame(max_len, BIG) is None
    assert s.has_data()


def test_stream_credit_limits_new_data() -> None:
    s = SendStream(0, 500)
    s.write(DATA[:1000], fin=True)
    frames = drain(s, max_len=400)
    assert [(o, len(d), fin) for o, d, fin, _ in frames] == [(0, 400, False), (400, 100, False)]
    assert not s.has_data()  # blocked by flow control, not finished
    assert s.next_frame(400, BIG) is None
    s.max_data = 2000  # MAX_STREAM_DATA arrived
    assert s.has_data()
    frames = drain(s, max_len=400)
    assert [(o, len(d), fin) for o, d, fin, _ in frames] == [
        (500, 400, False),
        (900, 100, True),  # the FIN rides on the last frame
    ]
    assert s.fin_sent


def test_connection_credit_limits_new_data() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:1000], fin=False)
    assert s.next_frame(1000, 0) is None
    f = s.next_frame(1000, 120)
    assert f is not None
    assert (f[0], len(f[1])) == (0, 120)
    f = s.next_frame(50, 120)  # max_len is the tighter bound now
    assert f is not None
    assert (f[0], len(f[1])) == (120, 50)


def test_fin_on_the_last_frame_exactly() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:600], fin=True)
    frames = drain(s, max_len=300)
    assert [(o, len(d), fin) for o, d, fin, _ in frames] == [(0, 300, False), (300, 300, True)]
    assert s.fin_sent
    assert not s.has_data()


def test_fin_written_later_goes_out_as_an_empty_frame() -> None:
    s = SendStream(0, BIG)
    s.write(b"hello", fin=False)
    assert drain(s) == [(0, b"hello", False, True)]
    s.write(b"", fin=True)
    assert s.has_data()
    assert drain(s) == [(5, b"", True, True)]
    assert not s.has_data()


def test_empty_stream_with_fin() -> None:
    s = SendStream(0, BIG)
    s.write(b"", fin=True)
    assert drain(s) == [(0, b"", True, True)]


def test_fin_is_sent_even_without_connection_credit_when_all_data_is_out() -> None:
    s = SendStream(0, BIG)
    s.write(b"abc", fin=False)
    drain(s)
    s.write(b"", fin=True)
    assert s.next_frame(100, 0) == (3, b"", True, True)


def test_writing_after_fin_is_a_local_error() -> None:
    s = SendStream(0, BIG)
    s.write(b"abc", fin=True)
    with pytest.raises(LocalProtocolError):
        s.write(b"more", fin=False)
    with pytest.raises(LocalProtocolError):
        s.write(b"", fin=True)


def test_writing_after_reset_is_a_local_error() -> None:
    s = SendStream(0, BIG)
    s.reset_code = 9
    with pytest.raises(LocalProtocolError):
        s.write(b"abc", fin=False)


def test_lost_range_is_retransmitted_first_and_costs_no_credit() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:900], fin=False)
    first = drain(s, max_len=300)
    assert len(first) == 3
    s.write(DATA[900:1200], fin=False)
    s.on_lost(300, 300, False)
    assert s.has_data()
    # No connection credit left: only the retransmission may go, and it is not "new".
    assert s.next_frame(1000, 0) == (300, DATA[300:600], False, False)
    assert s.next_frame(1000, 0) is None
    assert drain(s) == [(900, DATA[900:1200], False, True)]


def test_retransmission_is_split_to_max_len() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:1000], fin=False)
    drain(s)
    s.on_lost(0, 1000, False)
    frames = drain(s, max_len=400)
    assert [(o, len(d), new) for o, d, _, new in frames] == [
        (0, 400, False),
        (400, 400, False),
        (800, 200, False),
    ]
    assert b"".join(d for _, d, _, _ in frames) == DATA[:1000]


def test_retransmission_skips_an_acknowledged_prefix() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:1000], fin=False)
    drain(s, max_len=250)
    s.on_lost(0, 500, False)
    s.on_acked(0, 250, False)  # a late ACK for a copy of the start
    assert s.base == 250
    assert drain(s) == [(250, DATA[250:500], False, False)]


def test_retransmission_of_a_fully_acknowledged_range_is_skipped() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:1000], fin=False)
    drain(s, max_len=250)
    s.on_lost(250, 250, False)
    s.on_acked(250, 250, False)  # the "lost" packet was only late
    assert drain(s) == []


def test_retransmission_skips_acknowledged_bytes_inside_the_range() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:1000], fin=False)
    drain(s, max_len=250)
    s.on_lost(0, 500, False)
    s.on_lost(500, 250, False)  # merged with the previous one: [0, 750) queued
    s.on_acked(0, 250, False)
    s.on_acked(500, 250, False)
    assert drain(s) == [(250, DATA[250:500], False, False)]


def test_lost_after_acknowledged_is_not_resent() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:100], fin=True)
    drain(s)
    s.on_acked(0, 100, True)
    s.on_lost(0, 100, True)
    assert not s.has_data()
    assert drain(s) == []
    assert s.done


def test_lost_fin_frame_resends_data_then_an_empty_fin() -> None:
    s = SendStream(0, BIG)
    s.write(b"ab", fin=True)
    assert drain(s) == [(0, b"ab", True, True)]
    s.on_lost(0, 2, True)
    assert s.has_data()
    assert drain(s) == [(0, b"ab", False, False), (2, b"", True, False)]
    assert not s.has_data()


def test_lost_empty_fin_is_resent() -> None:
    s = SendStream(0, BIG)
    s.write(b"xyz", fin=False)
    drain(s)
    s.write(b"", fin=True)
    assert drain(s) == [(3, b"", True, True)]
    s.on_acked(0, 3, False)
    s.on_lost(3, 0, True)
    assert s.has_data()
    assert drain(s) == [(3, b"", True, False)]
    s.on_acked(3, 0, True)
    assert s.done


def test_on_acked_advances_base_and_frees_the_buffer() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:1000], fin=False)
    drain(s, max_len=300)
    assert s.buffered == 1000
    s.on_acked(300, 300, False)  # out of order: nothing can be freed yet
    assert (s.base, s.buffered) == (0, 1000)
    s.on_acked(0, 300, False)
    assert (s.base, s.buffered) == (600, 400)
    assert s.write_offset == 1000
    s.on_acked(600, 300, False)
    s.on_acked(900, 100, False)
    assert (s.base, s.buffered) == (1000, 0)
    # Bytes written later are still sent from the right place.
    s.write(b"tail", fin=True)
    assert drain(s) == [(1000, b"tail", True, True)]


def test_duplicate_and_stale_acks_are_harmless() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:600], fin=False)
    drain(s, max_len=300)
    s.on_acked(0, 300, False)
    s.on_acked(0, 300, False)
    s.on_acked(100, 50, False)
    assert (s.base, s.buffered) == (300, 300)


def test_done_needs_every_byte_and_the_fin_acknowledged() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:200], fin=True)
    drain(s, max_len=100)
    assert not s.done
    s.on_acked(100, 100, True)  # the FIN frame arrived, but not the first frame
    assert s.fin_acked
    assert not s.done
    s.on_acked(0, 100, False)
    assert s.done


def test_all_data_acknowledged_without_fin_is_not_done() -> None:
    s = SendStream(0, BIG)
    s.write(b"abc", fin=False)
    drain(s)
    s.on_acked(0, 3, False)
    assert not s.done


def test_reset_stream_stops_everything() -> None:
    s = SendStream(0, BIG)
    s.write(DATA[:500], fin=False)
    drain(s, max_len=100)
    s.reset_code = 3
    assert s.done
    assert not s.has_data()
    s.on_lost(0, 100, False)
    assert s.next_frame(1000, BIG) is None


# ---------------------------------------------------------------------------------- RecvStream


def test_in_order_delivery() -> None:
    r = RecvStream(1, 1000)
    assert r.on_frame(0, b"abc", False) == (b"abc", False)
    assert r.on_frame(3, b"de", True) == (b"de", True)
    assert r.delivered == 5
    assert r.final_size == 5
    assert r.fin_delivered


def test_out_of_order_reassembly() -> None:
    r = RecvStream(1, 1000)
    assert r.on_frame(6, b"ghi", True) == (b"", False)
    assert r.on_frame(3, b"def", False) == (b"", False)
    assert r.buffered_out_of_order == 6
    assert r.on_frame(0, b"abc", False) == (b"abcdefghi", True)
    assert r.buffered_out_of_order == 0


def test_duplicates_deliver_nothing_new() -> None:
    r = RecvStream(1, 1000)
    assert r.on_frame(0, b"abc", False) == (b"abc", False)
    assert r.on_frame(0, b"abc", False) == (b"", False)
    assert r.on_frame(5, b"fg", False) == (b"", False)
    assert r.on_frame(5, b"fg", False) == (b"", False)
    assert r.on_frame(3, b"de", False) == (b"defg", False)
    assert r.on_frame(0, b"abcdefg", False) == (b"", False)


def test_fin_reported_once() -> None:
    r = RecvStream(1, 1000)
    assert r.on_frame(0, b"abc", True) == (b"abc", True)
    assert r.on_frame(0, b"abc", True) == (b"", False)
    assert r.on_frame(3, b"", True) == (b"", False)


def test_empty_fin_after_data() -> None:
    r = RecvStream(1, 1000)
    assert r.on_frame(0, b"abc", False) == (b"abc", False)
    assert r.on_frame(3, b"", True) == (b"", True)


def test_empty_fin_before_the_data() -> None:
    r = RecvStream(1, 1000)
    assert r.on_frame(3, b"", True) == (b"", False)
    assert r.on_frame(0, b"abc", False) == (b"abc", True)


def test_overlapping_retransmissions_with_different_boundaries_are_byte_exact() -> None:
    data = DATA[:100]
    r = RecvStream(1, 1000)
    out = bytearray()
    fin_seen = 0
    for a, b, fin in [
        (10, 30, False),
        (20, 50, False),
        (45, 100, True),
        (5, 12, False),
        (40, 60, False),
        (0, 15, False),  # fills the head: everything up to 100 becomes deliverable
        (0, 100, True),  # a full retransmission after the fact
        (99, 100, True),
    ]:
        got, fin_now = r.on_frame(a, data[a:b], fin)
        out += got
        fin_seen += fin_now
    assert bytes(out) == data
    assert fin_seen == 1


def test_frame_straddling_the_delivered_point_is_trimmed() -> None:
    r = RecvStream(1, 1000)
    r.on_frame(0, b"abcdef", False)
    assert r.on_frame(4, b"efghij", False) == (b"ghij", False)


def test_flow_control_limit_is_inclusive_and_then_enforced() -> None:
    r = RecvStream(1, 100)
    assert r.on_frame(90, bytes(10), False) == (b"", False)  # ends exactly at the limit
    with pytest.raises(RemoteProtocolError) as ei:
        r.on_frame(95, bytes(6), False)
    assert ei.value.code == FLOW_CONTROL_ERROR


def test_flow_control_violation_even_for_an_empty_fin_past_the_limit() -> None:
    r = RecvStream(1, 100)
    with pytest.raises(RemoteProtocolError) as ei:
        r.on_frame(101, b"", True)
    assert ei.value.code == FLOW_CONTROL_ERROR


def test_final_size_change_is_a_protocol_error() -> None:
    r = RecvStream(1, 1000)
    r.on_frame(0, b"abc", True)
    r.on_frame(0, b"abc", True)  # the same final size again is fine
    with pytest.raises(RemoteProtocolError) as ei:
        r.on_frame(3, b"d", True)
    assert ei.value.code == FINAL_SIZE_ERROR


def test_fin_below_data_already_received() -> None:
    r = RecvStream(1, 1000)
    r.on_frame(10, b"late", False)
    with pytest.raises(RemoteProtocolError) as ei:
        r.on_frame(0, b"abc", True)
    assert ei.value.code == FINAL_SIZE_ERROR


def test_data_beyond_the_final_size() -> None:
    r = RecvStream(1, 1000)
    r.on_frame(5, b"", True)
    r.on_frame(3, b"de", False)  # up to the final size: fine
    with pytest.raises(RemoteProtocolError) as ei:
        r.on_frame(4, b"ef", False)
    assert ei.value.code == FINAL_SIZE_ERROR


def test_on_consumed_widens_the_window_only_after_half_of_it() -> None:
    r = RecvStream(1, 1000)
    r.on_frame(0, bytes(900), False)
    assert r.on_consumed(400) is None  # 1400 - 1000 < 500
    assert r.max_data == 1000
    assert r.on_consumed(99) is None
    assert r.on_consumed(1) == 1500  # exactly half a window: advertise
    assert r.max_data == 1500
    assert r.on_consumed(0) is None
    assert r.on_consumed(400) is None  # 1900 - 1500 < 500
    r.on_frame(900, bytes(100), False)
    assert r.on_consumed(100) == 2000
    # The new limit is enforced.
    r.on_frame(1000, bytes(1000), False)
    with pytest.raises(RemoteProtocolError):
        r.on_frame(2000, b"x", False)


def test_window_doubles_while_updates_come_under_two_rtts_apart() -> None:
    r = RecvStream(1, 1000, max_window=3000)
    r.on_frame(0, bytes(1000), False)
    assert r.on_consumed(500, now=0.0, rtt=0.010) == 1500  # the first update: nothing to compare
    assert r.window == 1000
    r.on_frame(1000, bytes(500), False)
    # 15 ms after the last update, RTT 10 ms: the window, not the path, held the sender back.
    assert r.on_consumed(500, now=0.015, rtt=0.010) == 1000 + 2000
    assert r.window == 2000
    r.on_frame(1500, bytes(1500), False)
    assert r.on_consumed(1000, now=0.020, rtt=0.010) == 2000 + 3000  # capped at max_window
    assert r.window == 3000
    r.on_frame(3000, bytes(2000), False)
    assert r.on_consumed(1500, now=0.021, rtt=0.010) == 3500 + 3000  # stays at the cap
    assert r.window == r.max_window == 3000
    # The grown limit is the one enforced.
    r.on_frame(5000, bytes(1500), False)
    with pytest.raises(RemoteProtocolError):
        r.on_frame(6500, b"x", False)


def test_window_stays_when_updates_are_more_than_two_rtts_apart() -> None:
    r = RecvStream(1, 1000, max_window=1 << 20)
    now = 0.0
    for i in range(20):
        r.on_frame(i * 500, bytes(500), False)
        assert r.on_consumed(500, now=now, rtt=0.010) is not None
        now += 0.025  # over two round trips apart: the window keeps up with the path
    assert r.window == 1000


def test_window_never_grows_without_a_clock_or_a_maximum() -> None:
    r = RecvStream(1, 1000, max_window=1 << 20)
    s = RecvStream(3, 1000)  # max_window defaults to the window: no tuning
    for i in range(20):
        for x in (r, s):
            x.on_frame(i * 500, bytes(500), False)
        r.on_consumed(500)  # no `now`: the fixed-window behaviour
        s.on_consumed(500, now=i * 1e-6, rtt=0.010)
    assert r.window == s.window == 1000
    assert grown_window(1000, 1000, 0.0, 0.001, 0.010) == 1000
    assert grown_window(1000, 4000, None, 0.001, 0.010) == 1000  # no earlier update
    assert grown_window(1000, 4000, 0.0, 0.001, 0.0) == 1000  # no RTT measured yet
    assert grown_window(1000, 4000, 0.0, 0.001, 0.010) == 2000


def test_on_consumed_never_counts_more_than_delivered() -> None:
    r = RecvStream(1, 1000)
    r.on_frame(0, bytes(100), False)
    assert r.on_consumed(10_000) is None
    assert r.consumed == 100


def test_no_window_update_once_the_final_size_is_known() -> None:
    r = RecvStream(1, 1000)
    r.on_frame(0, bytes(900), True)
    assert r.on_consumed(900) is None
    assert r.done


def test_recv_done_semantics() -> None:
    r = RecvStream(1, 1000)
    r.on_frame(0, b"abc", True)
    assert not r.done  # delivered but not read yet
    r.on_consumed(2)
    assert not r.done
    r.on_consumed(1)
    assert r.done
    r2 = RecvStream(3, 1000)
    r2.reset_code = 1
    assert r2.done
    assert r2.on_frame(0, b"abc", False) == (b"", False)


def test_overlapping_frames_are_trimmed_against_what_is_buffered() -> None:
    r = RecvStream(1, 10_000)
    for off in range(1, 201):
        r.on_frame(off, bytes(5_000), False)
    # Only bytes [1, 5200) are distinct.
    assert r.buffered_out_of_order <= 5_200


# --------------------------------------------------------------------- reassembly property test


@st.composite
def scrambled_frames(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes, bool]]]:
    data = draw(st.binary(min_size=0, max_size=400))
    n = len(data)
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=12))) | {0, n})
    frames: list[tuple[int, bytes, bool]] = []
    for a, b in itertools.pairwise(cuts):
        frames.append((a, data[a:b], b == n and draw(st.booleans())))
    # Overlapping re-chunked retransmissions with other boundaries.
    for _ in range(draw(st.integers(0, 10))):
        a = draw(st.integers(0, n))
        b = draw(st.integers(a, n))
        frames.append((a, data[a:b], b == n and draw(st.booleans())))
    frames.append((n, b"", True))  # the FIN, possibly alone (as a retransmitted FIN is)
    dups = draw(st.lists(st.sampled_from(frames), max_size=6))
    frames += dups
    order = draw(st.permutations(frames))
    return data, list(order)


@given(scrambled_frames())
@settings(max_examples=300, deadline=None)
def test_any_permutation_duplication_and_rechunking_reassembles_exactly(
    case: tuple[bytes, list[tuple[int, bytes, bool]]],
) -> None:
    data, frames = case
    r = RecvStream(1, max(len(data), 1))
    out = bytearray()
    fins = 0
    for off, chunk, fin in frames:
        got, fin_now = r.on_frame(off, chunk, fin)
        out += got
        fins += fin_now
        assert r.delivered == len(out)
    assert bytes(out) == data
    assert fins == 1
    assert r.fin_delivered
    assert r.buffered_out_of_order == 0


@given(st.binary(max_size=3000), st.integers(1, 500), st.data())
@settings(max_examples=100, deadline=None)
def test_send_stream_to_recv_stream_with_random_losses(
    data: bytes, max_len: int, draw: st.DataObject
) -> None:
    """SendStream frames, some lost and resent (in any order), always rebuild the bytes exactly."""
    s = SendStream(0, BIG)
    r = RecvStream(0, max(len(data), 1))
    s.write(data, fin=True)
    out = bytearray()
    fins = 0
    for _ in range(1000):
        frames = drain(s, max_len=max_len)
        if not frames:
            break
        order = draw.draw(st.permutations(frames))
        for off, chunk, fin, _new in order:
            if draw.draw(st.booleans()) and draw.draw(st.booleans()):
                s.on_lost(off, len(chunk), fin)
                continue
            got, fin_now = r.on_frame(off, chunk, fin)
            out += got
            fins += fin_now
            s.on_acked(off, len(chunk), fin)
    assert bytes(out) == data
    assert fins == 1
    assert s.done
    assert s.buffered == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(0, 9000), st.sampled_from(["b", "ba", "mv"])),
            st.tuples(st.just("take"), st.integers(0, 10**6), st.integers(1, 70_000)),
            st.tuples(st.just("release"), st.integers(0, 20_000), st.just("")),
        ),
        max_size=60,
    )
)
def test_send_buffer_is_a_byte_string_with_a_moving_start(ops: list[tuple[str, int, Any]]) -> None:
    """Whatever mix of small and large writes (bytes, bytearray, memoryview), reads of any
    range and releases: the buffer holds exactly the bytes a plain bytearray model holds."""
    buf, model, base, written = SendBuffer(), bytearray(), 0, 0
    for kind, n, arg in ops:
        if kind == "write":
            data = bytes((written + i) % 251 for i in range(n))
            src: Any = {"b": data, "ba": bytearray(data), "mv": memoryview(data)}[arg]
            buf.append(src)
            if arg == "ba":
                src[:] = bytes(len(src))  # the writer reuses its buffer: what was sent stays
            model += data
            written += n
        elif kind == "take" and len(model):
            start = base + n % len(model)
            stop = min(base + len(model), start + arg)
            assert bytes(buf.take(start, stop)) == model[start - base : stop - base]
        elif kind == "release":
            new_base = base + min(n, len(model))
            buf.release(new_base)
            del model[: new_base - base]
            base = new_base
        assert len(buf) == len(model)
        assert buf.base == base
        assert buf.end == written


def test_a_frame_within_one_written_chunk_is_a_view_not_a_copy() -> None:
    s = SendStream(1, BIG)
    chunk = bytes(range(256)) * 256  # 64 KiB, one chunk
    s.write(chunk, fin=False)
    got = s.next_frame(1000, BIG)
    assert got is not None
    assert isinstance(got[1], memoryview)
    assert got[1].obj is chunk
    assert got[1] == chunk[:1000]


def test_a_peer_delaying_its_acks_cannot_grow_a_slow_readers_window() -> None:
    # The RTT the growth test uses is ours to measure but the peer's to inflate (it times its
    # ACKs): past 250 ms it counts as 250 ms, so updates 1 s apart never grow the window.
    assert grown_window(1000, 4000, 0.0, 1.0, rtt=3.0) == 1000
    assert grown_window(1000, 4000, 0.0, 0.4, rtt=3.0) == 2000  # under 2 x 250 ms: a fast reader


def test_small_writes_sent_one_by_one_are_gathered_not_kept_a_chunk_each() -> None:
    s = SendStream(1, BIG)
    for _ in range(2000):
        s.write(b"12345678", fin=False)  # an interactive writer: each piece goes out at once
        assert s.next_frame(1000, BIG) is not None
    assert s.buffered == 16_000  # nothing acknowledged yet
    assert len(s._buf._chunks) == 0  # still one gathering buffer, not 2,000 chunks
    s.on_acked(0, 16_000, False)
    assert s.buffered == 0
