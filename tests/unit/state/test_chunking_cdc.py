"""Content-defined chunking: determinism, size bounds, streaming, and the boundary-shift property."""

from __future__ import annotations

import itertools
import random

import blake3
import pytest

from cellmesh.state.chunking import (
    DEFAULT_PARAMS,
    GEAR,
    MAX_CHUNK_LIMIT,
    Chunker,
    ChunkerParams,
    chunk_id,
    chunk_spans,
    find_cut,
    iter_chunks,
)

SMALL = ChunkerParams(2048, 8192, 32768)


def rnd(seed: bytes, n: int) -> bytes:
    """Deterministic pseudo-random bytes (BLAKE3 in XOF mode)."""
    return blake3.blake3(seed).digest(length=n)


def test_gear_table_is_fixed() -> None:
    # Every node must cut at the same places: the table is part of the format.
    assert len(GEAR) == 256
    assert len(set(GEAR)) == 256
    assert (GEAR[0], GEAR[1], GEAR[255]) == (
        0x70B4CE526506CC46,
        0xF8810FB5BD7C4301,
        0xC3DEF438D5F87BD7,
    )


def test_cut_points_vector() -> None:
    """A regression vector: 1 MiB of BLAKE3-XOF bytes, default parameters."""
    data = rnd(b"cellmesh chunking vector", 1 << 20)
    assert chunk_spans(data) == [
        (0, 69588),
        (69588, 135919),
        (135919, 204944),
        (204944, 282469),
        (282469, 357401),
        (357401, 386439),
        (386439, 453981),
        (453981, 553394),
        (553394, 620857),
        (620857, 713432),
        (713432, 798637),
        (798637, 871688),
        (871688, 973875),
        (973875, 1045124),
        (1045124, 1048576),
    ]


@pytest.mark.parametrize(
    ("mn", "avg", "mx"),
    [
        (16, 8192, 32768),  # min below the window
        (4096, 4096, 32768),  # min == avg
        (2048, 8192, 8192),  # avg == max
        (2048, 6000, 32768),  # avg not a power of two
        (2048, 8192, MAX_CHUNK_LIMIT + 1),  # max too large
    ],
)
def test_params_validated(mn: int, avg: int, mx: int) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by field
        ChunkerParams(mn, avg, mx)


def test_defaults() -> None:
    assert (DEFAULT_PARAMS.min_size, DEFAULT_PARAMS.avg_size, DEFAULT_PARAMS.max_size) == (
        16 * 1024,
        64 * 1024,
        256 * 1024,
    )


def test_spans_cover_data_within_bounds() -> None:
    data = rnd(b"bounds", 3 << 20)
    spans = chunk_spans(data, SMALL)
    assert spans[0][0] == 0
    assert spans[-1][1] == len(data)
    for (a, b), (c, _) in itertools.pairwise(spans):
        assert b == c
        assert SMALL.min_size <= b - a <= SMALL.max_size
    assert 1 <= spans[-1][1] - spans[-1][0] <= SMALL.max_size
    # Normalised chunking keeps the mean near avg_size (wide tolerance: it is a distribution).
    mean = len(data) / len(spans)
    assert SMALL.avg_size * 0.6 < mean < SMALL.avg_size * 1.6


def test_empty_and_tiny() -> None:
    assert chunk_spans(b"") == []
    assert list(iter_chunks(b"x")) == [b"x"]
    assert chunk_spans(bytes(100), SMALL) == [(0, 100)]


def test_low_entropy_is_cut_at_max() -> None:
    spans = chunk_spans(bytes(100_000), SMALL)
    assert all(b - a == SMALL.max_size for a, b in spans[:-1])


def test_deterministic() -> None:
    data = rnd(b"det", 1 << 20)
    assert chunk_spans(data, SMALL) == chunk_spans(bytes(data), SMALL)
    assert chunk_spans(data, SMALL) == chunk_spans(bytearray(data), SMALL)


def test_find_cut_depends_only_on_the_chunk() -> None:
    data = rnd(b"cut", 200_000)
    cut = find_cut(data, 0, len(data), SMALL)
    # The same prefix followed by anything else cuts at the same place.
    assert find_cut(data[:cut] + rnd(b"other", 100_000), 0, cut + 100_000, SMALL) == cut


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streaming_matches_one_shot(seed: int) -> None:
    rng = random.Random(seed)
    data = rnd(seed.to_bytes(2, "big"), 700_000)
    chunker = Chunker(SMALL)
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 100, 5000, 40_000, 100_000])
        out += chunker.feed(data[pos : pos + n])
        pos += n
    out += chunker.finish()
    assert out == list(iter_chunks(data, SMALL))
    assert chunker.finish() == []
    with pytest.raises(ValueError, match="after finish"):
        chunker.feed(b"x")


def _changed(a: bytes, b: bytes, params: ChunkerParams) -> int:
    old = {chunk_id(c) for c in iter_chunks(a, params)}
    return sum(1 for c in iter_chunks(b, params) if chunk_id(c) not in old)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_insert_in_the_middle_changes_few_chunks(where: float) -> None:
    data = rnd(b"shift", 2 << 20)  # ~250 chunks at 8 KiB average
    at = int(len(data) * where)
    edited = data[:at] + b"inserted bytes!" * 7 + data[at:]
    total = len(chunk_spans(edited, SMALL))
    changed = _changed(data, edited, SMALL)
    assert total > 150
    assert 1 <= changed <= 3, f"{changed} of {total} chunk ids changed"


def test_delete_and_default_params_change_few_chunks() -> None:
    data = rnd(b"big", 4 << 20)
    at = len(data) // 3
    edited = data[:at] + data[at + 1000 :]
    assert _changed(data, edited, DEFAULT_PARAMS) <= 3
    appended = data + b"tail"
    assert _changed(data, appended, DEFAULT_PARAMS) <= 2


def test_chunk_id_is_blake3() -> None:
    assert chunk_id(b"abc") == blake3.blake3(b"abc").digest()
    assert len(chunk_id(b"")) == 32
