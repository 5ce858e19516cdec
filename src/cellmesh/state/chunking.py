"""Content-defined chunking (FastCDC with a gear rolling hash) and BLAKE3 chunk addresses.

Theory of operation
-------------------
A file is cut into chunks at positions chosen by its *content*, not by fixed offsets, so that
inserting or deleting bytes in the middle of a file changes only the chunk(s) around the edit:
the cut points after it are found again at the same content, and every other chunk keeps its
address. That is what makes deduplication across versions of a file work (Dataforts).

The cut-point search is FastCDC (Xia et al., "FastCDC: a Fast and Efficient Content-Defined
Chunking Approach for Data Deduplication", USENIX ATC 2016), simplified:

* A *gear* hash rolls over the bytes: ``h = ((h << 1) + GEAR[byte]) mod 2**64``. Each step shifts
  the oldest byte's contribution one bit further up, so bit k of `h` depends on the last k + 1
  bytes only: the hash is a rolling hash over a 64-byte window without any "remove" step.
* A position is a cut point when the top bits of `h` selected by a mask are all zero. With n
  mask bits a cut happens on average every 2**n bytes of random data.
* The first `min_size` bytes of a chunk are never a cut point, so hashing starts there (cut-point
  skipping: FastCDC's main speed-up, and no chunk is smaller than `min_size`).
* Normalised chunking (FastCDC section 3.4, "NC level 2"): before `avg_size` the mask has two
  *more* bits (cuts are 4x rarer), after it two *fewer* (4x likelier). Chunk sizes cluster around
  `avg_size` instead of following a long-tailed geometric distribution.
* A chunk never exceeds `max_size`: if no cut point is found, the chunk is cut there.

The gear table is 256 pseudo-random 64-bit words derived from BLAKE3 with a fixed context
string, so every node (any version, any platform) finds the same cut points and thus the same
chunk ids. The table is not secret and needs no randomness at run time.

Chunk ids are BLAKE3-256 of the chunk's bytes (plain, unkeyed): a content address any peer can
verify. BLAKE3 is collision-resistant, so a peer cannot make two different chunks share an id.

This module is pure: bytes in, byte spans out, no I/O. It runs about 7-10 MB/s in CPython (one
Python-level step per byte past `min_size`); docs/blobs_sync.md lists that as a known limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import blake3

__all__ = [
    "CHUNK_ID_LEN",
    "DEFAULT_PARAMS",
    "GEAR",
    "MAX_CHUNK_LIMIT",
    "MIN_CHUNK_LIMIT",
    "Chunker",
    "ChunkerParams",
    "chunk_id",
    "chunk_spans",
    "find_cut",
    "iter_chunks",
]

CHUNK_ID_LEN = 32
"""Bytes in a chunk id (BLAKE3-256)."""
MIN_CHUNK_LIMIT = 64
"""The smallest `min_size` allowed: below it the 64-byte hash window has nothing to roll over."""
MAX_CHUNK_LIMIT = 4 * 1024 * 1024
"""The largest `max_size` allowed (4 MiB). Also the largest block a peer ever has to buffer."""

_GEAR_CONTEXT = "cellmesh 2026-01 fastcdc gear table v1"
_M64 = (1 << 64) - 1


def _gear_table() -> tuple[int, ...]:
    # One 64-bit word per byte value, from BLAKE3 in key-derivation mode: fixed, portable, and
    # free of the structure a hand-written table or a weak PRNG could have.
    return tuple(
        int.from_bytes(
            blake3.blake3(bytes([i]), derive_key_context=_GEAR_CONTEXT).digest(length=8),
            "little",
        )
        for i in range(256)
    )


GEAR: tuple[int, ...] = _gear_table()
"""The gear table: GEAR[b] is the 64-bit word byte value b adds to the rolling hash."""


def _top_mask(bits: int) -> int:
    """A mask of the top `bits` bits of a 64-bit word (the bits with the widest window)."""
    return ((1 << bits) - 1) << (64 - bits)


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """Chunk size bounds, in bytes. Every node must use the same values to share chunk ids.

    Defaults: 16 KiB / 64 KiB / 256 KiB, a common choice for file deduplication (small enough
    that an edit re-sends little, large enough that a manifest stays small: 36 bytes per chunk).
    """

    min_size: int = 16 * 1024
    """No chunk is smaller (except the last chunk of a file)."""
    avg_size: int = 64 * 1024
    """The target size; must be a power of two (it sets the number of mask bits)."""
    max_size: int = 256 * 1024
    """No chunk is larger: with no cut point found, the chunk is cut here."""

    def __post_init__(self) -> None:
        if not MIN_CHUNK_LIMIT <= self.min_size < self.avg_size < self.max_size:
            raise ValueError(
                f"need {MIN_CHUNK_LIMIT} <= min_size < avg_size < max_size, got "
                f"{self.min_size}/{self.avg_size}/{self.max_size}"
            )
        if self.max_size > MAX_CHUNK_LIMIT:
            raise ValueError(f"max_size must be at most {MAX_CHUNK_LIMIT}")
        if self.avg_size & (self.avg_size - 1):
            raise ValueError(f"avg_size must be a power of two, got {self.avg_size}")
        if self.avg_size.bit_length() - 1 < 4:
            raise ValueError("avg_size must be at least 16")

    @property
    def mask_small(self) -> int:
        """The stricter mask used before `avg_size` (two more bits than log2(avg_size))."""
        return _top_mask(self.avg_size.bit_length() - 1 + 2)

    @property
    def mask_large(self) -> int:
        """The looser mask used from `avg_size` on (two fewer bits than log2(avg_size))."""
        return _top_mask(self.avg_size.bit_length() - 1 - 2)


DEFAULT_PARAMS = ChunkerParams()


def chunk_id(data: bytes | bytearray | memoryview) -> bytes:
    """The address of a chunk (or any block): BLAKE3-256 of its bytes."""
    return blake3.blake3(data).digest()


def find_cut(
    data: bytes | bytearray | memoryview, start: int, end: int, params: ChunkerParams
) -> int:
    """The end of the chunk that starts at `start`, looking no further than `end`.

    Returns an offset in (start, end]. `end` - `start` should be at least `max_size` unless the
    data really ends at `end`: the result then depends only on data[start:cut], which is what
    lets a streaming chunker and a one-shot chunker agree.
    """
    size = end - start
    if size <= params.min_size:
        return end
    limit = start + min(size, params.max_size)
    normal = start + min(limit - start, params.avg_size)
    gear = GEAR
    m64 = _M64
    h = 0
    i = start + params.min_size
    # Two loops instead of one with a branch: the mask changes at `avg_size` (normalised chunking).
    mask = params.mask_small
    for b in data[i:normal]:
        h = ((h << 1) + gear[b]) & m64
        i += 1
        if not h & mask:
            return i
    mask = params.mask_large
    for b in data[normal:limit]:
        h = ((h << 1) + gear[b]) & m64
        i += 1
        if not h & mask:
            return i
    return limit


def chunk_spans(
    data: bytes | bytearray | memoryview, params: ChunkerParams = DEFAULT_PARAMS
) -> list[tuple[int, int]]:
    """The chunks of `data` as (start, end) offsets, in order. Empty data has no chunks."""
    view = memoryview(data)
    spans: list[tuple[int, int]] = []
    pos, n = 0, len(view)
    while pos < n:
        cut = find_cut(view, pos, n, params)
        spans.append((pos, cut))
        pos = cut
    return spans


def iter_chunks(
    data: bytes | bytearray | memoryview, params: ChunkerParams = DEFAULT_PARAMS
) -> Iterator[bytes]:
    """Yield the chunks of `data` as bytes, in order."""
    view = memoryview(data)
    for a, b in chunk_spans(view, params):
        yield bytes(view[a:b])


class Chunker:
    """A streaming chunker: `feed` bytes in any pieces, get whole chunks out as they are found.

    The chunks are exactly those `iter_chunks` gives for the concatenated input: a cut is only
    searched once `max_size` bytes are buffered (or at `finish`), so the search never depends on
    how the input was split. Memory: at most `max_size` + the size of one `feed` call.
    """

    def __init__(self, params: ChunkerParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._buf = bytearray()
        self._finished = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add `data`; return the chunks now complete (possibly none)."""
        if self._finished:
            raise ValueError("feed() after finish()")
        self._buf += data
        return self._drain(final=False)

    def finish(self) -> list[bytes]:
        """Flush: return the remaining chunks (the last one may be shorter than `min_size`)."""
        if self._finished:
            return []
        self._finished = True
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        n = len(buf)
        max_size = self.params.max_size
        while pos < n and (final or n - pos >= max_size):
            cut = find_cut(buf, pos, n, self.params)
            out.append(bytes(buf[pos:cut]))
            pos = cut
        # One compaction per call, not per chunk: del on a bytearray's head is a memmove.
        del buf[:pos]
        return out
