"""Reliable ordered byte streams: the send and receive halves, with flow control. Pure.

Theory of operation. A send stream keeps every byte the application wrote until the peer acknowledges
it; bytes go out once as new data, and again only if the packet that carried them is declared lost
(then the range is queued for retransmission in a fresh packet with a fresh packet number). The peer's
MAX_STREAM_DATA bounds how far ahead of its reader we may send. A receive stream reassembles frames by
offset (duplicates and overlaps are trimmed), hands contiguous bytes to the application in order, and
widens the window it advertises as the application consumes, so a slow reader throttles the sender
instead of growing memory.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

from cellmesh.errors import LocalProtocolError, RemoteProtocolError
from cellmesh.transport.ranges import RangeSet

FLOW_CONTROL_ERROR = 3
FINAL_SIZE_ERROR = 4
# Out-of-order pieces one stream may hold. A small arrival (under 1 KiB) merges with the piece it
# continues, so every piece but those right after a gap holds at least 1 KiB: an honest sender
# needs at most one piece per KiB plus one per gap; a peer that slices data into tiny, scattered
# pieces to burn our CPU and memory is refused.
MAX_CHUNKS = 8192
# A grown window allows one piece per this many bytes of it: even with every other 1,100-byte
# packet lost, a 16 MiB window's gaps fit.
CHUNK_BYTES_PER_PIECE = 1024
# Receive-window auto-tuning (as Chromium's QUIC flow controller does): when the application reads
# so fast that window updates go out less than WINDOW_GROWTH_RTTS round trips apart, the window,
# not the path, is what limits the sender, so the window doubles, up to its configured maximum.
# A reader that keeps up with a fast sender earns a large window; an idle or slow reader keeps the
# small one, so memory is spent only where it buys throughput.
WINDOW_GROWTH_RTTS = 2.0
# The RTT that test uses is capped: the peer sets our RTT estimate (it times its ACKs), and a peer
# that delayed them for seconds would otherwise make a slow reader's window grow.
WINDOW_GROWTH_MAX_RTT = 0.25


# Writes smaller than this are gathered into one chunk (up to TAIL_CHUNK bytes), so an
# application writing a byte at a time does not leave a chunk per byte to slice frames from.
SMALL_WRITE = 4096
TAIL_CHUNK = 64 * 1024


class SendBuffer:
    """The bytes of a send stream from `base` (everything below is acknowledged) to `end`,
    kept as the immutable chunks the application wrote.

    A frame's data is a view of one chunk, not a copy, and acknowledged chunks are dropped
    whole. (A single bytearray cost a copy per frame and, once acknowledgements had trimmed its
    front, a move of everything buffered whenever a write made it grow: a quarter of the
    sender's time in a bulk transfer at 64 KB datagrams.)"""

    __slots__ = ("_chunks", "_first", "_starts", "_tail", "_tail_start", "base", "end")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._starts: list[int] = []  # offset of each chunk, ascending
        self._first = 0  # chunks before this index are acknowledged and released
        self._tail = bytearray()  # small writes being gathered (offset `_tail_start`)
        self._tail_start = 0
        self.base = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.base

    def append(self, data: bytes) -> None:
        n = len(data)
        if not n:
            return
        if n < SMALL_WRITE:
            if not self._tail:
                self._tail_start = self.end
            self._tail += data
            if len(self._tail) >= TAIL_CHUNK:
                self._seal_tail()
        else:
            self._seal_tail()
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._starts.append(self.end)
        self.end += n

    def _seal_tail(self) -> None:
        if self._tail:
            self._chunks.append(bytes(self._tail))
            self._starts.append(self._tail_start)
            self._tail = bytearray()

    def take(self, start: int, stop: int) -> bytes | memoryview:
        """The bytes [start, stop) (within [base, end)): a view of one chunk when they lie in
        one, else joined (bytes still being gathered are copied out: the gathering buffer stays
        open, so small writes sent one by one do not become a chunk each)."""
        tail_start = self._tail_start
        if self._tail and stop > tail_start:
            if start >= tail_start:
                return bytes(self._tail[start - tail_start : stop - tail_start])
            head = self.take(start, tail_start)
            return b"".join((head, self._tail[: stop - tail_start]))
        chunks, starts = self._chunks, self._starts
        i = bisect_right(starts, start, self._first) - 1
        c, cs = chunks[i], starts[i]
        if stop - cs <= len(c):
            if start == cs and stop - cs == len(c):
                return c
            return memoryview(c)[start - cs : stop - cs]
        parts: list[memoryview] = []
        pos = start
        while pos < stop:
            c, cs = chunks[i], starts[i]
            e = min(stop, cs + len(c))
            parts.append(memoryview(c)[pos - cs : e - cs])
            pos = e
            i += 1
        return b"".join(parts)

    def release(self, new_base: int) -> None:
        """Forget the bytes below `new_base` (acknowledged)."""
        self.base = new_base
        chunks, starts = self._chunks, self._starts
        first, n = self._first, len(chunks)
        while first < n and starts[first] + len(chunks[first]) <= new_base:
            chunks[first] = b""  # the memory goes now, the slot when the list is compacted
            first += 1
        if first > 64 and 2 * first > n:
            del chunks[:first]
            del starts[:first]
            first = 0
        self._first = first


class SendStream:
    """The sending half of one stream."""

    __slots__ = (
        "_buf",
        "_fin_lost",
        "_retransmit",
        "acked",
        "base",
        "fin_acked",
        "fin_sent",
        "fin_written",
        "max_data",
        "next_offset",
        "reset_code",
        "stream_id",
    )

    def __init__(self, stream_id: int, max_data: int) -> None:
        self.stream_id = stream_id
        self._buf = SendBuffer()  # bytes from `base` on, not yet acknowledged
        self.base = 0  # everything below is acknowledged and forgotten
        self.next_offset = 0  # first byte never sent
        self.max_data = max_data  # peer's MAX_STREAM_DATA
        # Bounded by the window divided by the smallest packet; trimming would stall the base.
        self.acked = RangeSet(limit=1 << 16)
        self._retransmit = RangeSet(limit=1 << 20)
        self.fin_written = False
        self.fin_sent = False
        self.fin_acked = False
        self._fin_lost = False
        self.reset_code: int | None = None

    @property
    def write_offset(self) -> int:
        """Total bytes written by the application."""
        return self.base + len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes held (written but not acknowledged)."""
        return len(self._buf)

    def write(self, data: bytes, fin: bool) -> None:
        """Append application data (and optionally end the stream)."""
        if self.fin_written or self.reset_code is not None:
            raise LocalProtocolError(f"stream {self.stream_id} is closed for writing")
        self._buf.append(data)
        if fin:
            self.fin_written = True

    def has_data(self) -> bool:
        """Something to (re)send, flow control permitting."""
        if self.reset_code is not None:
            return False
        if self._retransmit or self._fin_lost:
            return True
        if self.next_offset < self.write_offset and self.next_offset < self.max_data:
            return True
        return self.fin_written and not self.fin_sent and self.next_offset == self.write_offset

    def next_frame(
        self, max_len: int, conn_credit: int
    ) -> tuple[int, bytes | memoryview, bool, bool] | None:
        """(offset, data, fin, is_new) of the next frame of at most `max_len` bytes, or None.

        Retransmissions come first and cost no flow-control credit (it was spent when first sent);
        new data is limited by the stream's and the connection's credit (`conn_credit`).
        """
        if max_len <= 0 or self.reset_code is not None:
            return None
        while self._retransmit:
            start, end = self._retransmit.ranges()[0]
            self._retransmit.remove_below(end)
            start = max(start, self.base)
            if start >= end:
                continue
            # Skip parts the peer acknowledged after we queued them.
            start = self.acked.first_gap_from(start)
            if start >= end:
                continue
            stop = min(end, start + max_len)
            acked_next = self.acked.next_start_after(start)
            if acked_next is not None and acked_next < stop:
                stop = acked_next  # do not resend bytes the peer already has
            if stop < end:
                self._retransmit.add(stop, end)
            return start, self._buf.take(start, stop), False, False
        limit = min(self.write_offset, self.max_data, self.next_offset + conn_credit)
        n = min(max_len, limit - self.next_offset)
        end_of_stream = self.fin_written and self.next_offset + max(n, 0) == self.write_offset
        if n <= 0 and not (end_of_stream and not self.fin_sent) and not self._fin_lost:
            return None
        if n <= 0 and self._fin_lost:
            self._fin_lost = False
            return self.write_offset, b"", True, False
        n = max(n, 0)
        start = self.next_offset
        data = self._buf.take(start, start + n) if n else b""
        self.next_offset += n
        fin = end_of_stream
        if fin:
            self.fin_sent = True
        return start, data, fin, True

    def on_acked(self, offset: int, length: int, fin: bool) -> None:
        """The frame [offset, offset+length) (and fin) reached the peer."""
        if length:
            self.acked.add(offset, offset + length)
        if fin:
            self.fin_acked = True
        new_base = self.acked.first_gap_from(self.base)
        if new_base > self.base:
            self._buf.release(new_base)
            self.base = new_base
            self.acked.remove_below(new_base)

    def on_lost(self, offset: int, length: int, fin: bool) -> None:
        """The frame was lost: queue whatever of it is still unacknowledged."""
        if self.reset_code is not None:
            return
        end = offset + length
        if end > self.base:
            self._retransmit.add(max(offset, self.base), end)
        if fin and not self.fin_acked:
            self._fin_lost = True  # resent as an empty FIN frame at the final offset

    @property
    def done(self) -> bool:
        """Everything including the FIN was acknowledged (or the stream was reset)."""
        return self.reset_code is not None or (self.fin_acked and self.base == self.write_offset)


class PieceBudget:
    """The out-of-order pieces all receiving streams of one connection hold, and how many they
    may hold. Each stream bounds its own pieces, but a peer with many streams could otherwise
    slice each into scattered 1-byte pieces: 1,024 streams x 8,192 pieces fit in a 16 MiB
    connection window, ~0.8 GB of bookkeeping."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.held = 0
        self.limit = limit


class RecvStream:
    """The receiving half of one stream."""

    __slots__ = (
        "_budget",
        "_buffered",
        "_chunks",
        "_last_update",
        "_offsets",
        "consumed",
        "delivered",
        "fin_delivered",
        "final_size",
        "highest",
        "max_data",
        "max_window",
        "reset_code",
        "stream_id",
        "window",
    )

    def __init__(
        self,
        stream_id: int,
        window: int,
        max_window: int = 0,
        budget: PieceBudget | None = None,
    ) -> None:
        self.stream_id = stream_id
        # (shared by the connection's streams; a stream on its own has only its own limit)
        self._budget = budget if budget is not None else PieceBudget(1 << 62)
        self.window = window
        self.max_window = max(window, max_window)  # auto-tuning stops here
        self._last_update: float | None = None  # when the last window update was made
        self.max_data = window  # what we have allowed the peer to send up to
        self.delivered = 0  # bytes handed to the application, in order
        self.consumed = 0  # bytes the application has actually read
        self.highest = 0  # highest offset + 1 received
        self.final_size: int | None = None
        self.fin_delivered = False
        self.reset_code: int | None = None
        # Out-of-order pieces by start offset. Small contiguous arrivals merge (into a
        # bytearray), so pieces hold at least 1 KiB each, whatever the sender's frame sizes.
        self._chunks: dict[int, bytes | memoryview | bytearray] = {}
        self._offsets: list[int] = []
        self._buffered = RangeSet(limit=1 << 20)  # what the chunks cover: they never overlap

    def on_frame(
        self, offset: int, data: bytes | memoryview, fin: bool
    ) -> tuple[bytes | memoryview, bool]:
        """Take a STREAM frame; return (bytes now deliverable in order, fin reached).

        Raises `RemoteProtocolError` when the peer exceeds our flow-control window or changes the
        final size.
        """
        end = offset + len(data)
        if end > self.max_data:
            raise RemoteProtocolError(
                f"stream {self.stream_id}: peer sent past the flow-control limit",
                FLOW_CONTROL_ERROR,
            )
        if fin:
            if self.final_size is not None and self.final_size != end:
                raise RemoteProtocolError("stream final size changed", FINAL_SIZE_ERROR)
            if end < self.highest:
                raise RemoteProtocolError(
                    "stream FIN below data already received", FINAL_SIZE_ERROR
                )
            self.final_size = end
        elif self.final_size is not None and end > self.final_size:
            raise RemoteProtocolError("stream data beyond its final size", FINAL_SIZE_ERROR)
        self.highest = max(self.highest, end)
        if self.reset_code is not None:
            return b"", False
        if offset == self.delivered and not self._offsets:
            # In order with nothing buffered (nearly every frame on a clean path): the data is
            # deliverable as it is, without buffering and copying.
            self.delivered = end
            return data, self._fin_now()
        if end > self.delivered and data:
            # Keep only the parts no buffered chunk covers yet, so overlapping retransmissions
            # cannot make buffering exceed the window.
            pos = max(offset, self.delivered)
            while pos < end:
                pos = self._buffered.first_gap_from(pos)
                if pos >= end:
                    break
                nxt = self._buffered.next_start_after(pos)
                stop = end if nxt is None else min(end, nxt)
                piece = data[pos - offset : stop - offset]
                if stop - pos < len(data) and type(piece) is memoryview:
                    # Part of a frame (the rest overlapped what is buffered): a view would keep
                    # its whole packet alive, up to 64 KB for one byte.
                    piece = bytes(piece)
                # Merge with a piece it continues, unless both are large: the budget allows
                # one piece per KiB, so only small ones need merging, and large ones (64 KB
                # packets behind a loss) are not copied.
                start = self._piece_ending_at(pos)
                if start is None or (
                    len(piece) >= CHUNK_BYTES_PER_PIECE
                    and len(self._chunks[start]) >= CHUNK_BYTES_PER_PIECE
                ):
                    self._new_piece(pos, piece)
                    start = pos
                else:
                    self._extend_piece(start, piece)
                self._buffered.add(pos, stop)
                after = self._chunks.get(stop)
                if after is not None and len(after) < CHUNK_BYTES_PER_PIECE:
                    # The gap before a small piece is filled: take it in. (Never a large one:
                    # small frames sent in descending order would copy the whole growing piece
                    # each time, quadratic in the window.)
                    self._extend_piece(start, self._chunks.pop(stop))
                    del self._offsets[bisect_left(self._offsets, stop)]
                    self._budget.held -= 1
                pos = stop
        parts: list[bytes | memoryview | bytearray] = []
        offsets = self._offsets
        k = 0
        while k < len(offsets):
            first = offsets[k]
            if first > self.delivered:
                break
            k += 1
            chunk = self._chunks.pop(first)
            chunk_end = first + len(chunk)
            if chunk_end > self.delivered:
                parts.append(chunk[self.delivered - first :] if first < self.delivered else chunk)
                self.delivered = chunk_end
        if k:
            del offsets[:k]  # (at once: one at a time is quadratic in the pieces delivered)
            self._budget.held -= k
        self._buffered.remove_below(self.delivered)
        one = parts[0] if len(parts) == 1 else None
        if isinstance(one, (bytes, memoryview)):
            return one, self._fin_now()  # (one piece: handed on as it is, no copy)
        return b"".join(parts), self._fin_now()

    def _piece_ending_at(self, pos: int) -> int | None:
        """The start of the buffered piece that ends exactly at `pos`, if there is one."""
        i = bisect_left(self._offsets, pos)
        if i:
            start = self._offsets[i - 1]
            if start + len(self._chunks[start]) == pos:
                return start
        return None

    def _new_piece(self, pos: int, piece: bytes | memoryview) -> None:
        limit = max(MAX_CHUNKS, self.window // CHUNK_BYTES_PER_PIECE)
        if len(self._chunks) >= limit:
            raise RemoteProtocolError(
                f"stream {self.stream_id}: more than {limit} out-of-order pieces",
                FLOW_CONTROL_ERROR,
            )
        budget = self._budget
        if budget.held >= budget.limit:
            raise RemoteProtocolError(
                f"the peer's streams hold more than {budget.limit} out-of-order pieces",
                FLOW_CONTROL_ERROR,
            )
        budget.held += 1
        self._chunks[pos] = piece
        insort(self._offsets, pos)

    def _extend_piece(self, start: int, more: bytes | memoryview | bytearray) -> None:
        """Append `more` to the piece at `start` (copied once into a growing bytearray:
        amortised linear, and memory stays proportional to the bytes)."""
        piece = self._chunks[start]
        if type(piece) is not bytearray:
            piece = self._chunks[start] = bytearray(piece)
        piece += more

    def _fin_now(self) -> bool:
        """Whether everything up to the final size has just been delivered (true once)."""
        if self.fin_delivered or self.final_size is None or self.delivered != self.final_size:
            return False
        self.fin_delivered = True
        return True

    @property
    def pieces(self) -> int:
        """Out-of-order pieces held."""
        return len(self._chunks)

    def drop_pieces(self) -> None:
        """Let go of every out-of-order piece: the stream was reset or is being forgotten, so
        they will never be delivered (and no longer count against the connection's budget)."""
        self._budget.held -= len(self._chunks)
        self._chunks.clear()
        self._offsets.clear()
        self._buffered = RangeSet(limit=1 << 20)

    @property
    def buffered_out_of_order(self) -> int:
        """Bytes held waiting for a gap to fill."""
        return sum(len(c) for c in self._chunks.values())

    def on_consumed(self, n: int, now: float | None = None, rtt: float = 0.0) -> int | None:
        """The application read `n` bytes. Returns a new MAX_STREAM_DATA to advertise, if due.

        With `now` and the smoothed `rtt`, the window auto-tunes (see WINDOW_GROWTH_RTTS)."""
        self.consumed = min(self.delivered, self.consumed + n)
        target = self.consumed + self.window
        if self.final_size is None and target - self.max_data >= self.window // 2:
            if now is not None:
                self.window = grown_window(
                    self.window, self.max_window, self._last_update, now, rtt
                )
                self._last_update = now
                target = self.consumed + self.window
            self.max_data = target
            return target
        return None

    def has_gap_at(self, offset: int) -> bool:
        """Whether a chunk starting at or before `offset` is buffered (for tests)."""
        i = bisect_right(self._offsets, offset)
        return i > 0

    @property
    def done(self) -> bool:
        """FIN delivered (or reset) and everything read."""
        return self.reset_code is not None or (
            self.fin_delivered and self.consumed >= self.delivered
        )


def grown_window(
    window: int, max_window: int, last_update: float | None, now: float, rtt: float
) -> int:
    """The receive window to advertise now: doubled (up to `max_window`) when the previous window
    update was less than WINDOW_GROWTH_RTTS round trips ago, else unchanged."""
    if (
        last_update is not None
        and window < max_window
        and rtt > 0
        and now - last_update < WINDOW_GROWTH_RTTS * min(rtt, WINDOW_GROWTH_MAX_RTT)
    ):
        return min(2 * window, max_window)
    return window
