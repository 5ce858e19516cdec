"""Blob manifests: canonical encoding, strict decoding (and fuzzing), dedup, reassembly."""

from __future__ import annotations

import contextlib

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.state.blob_cache import ChunkMissingError, IntegrityError, LRUChunkStore
from cellmesh.state.blob_manifest import (
    MANIFEST_HEADER_LEN,
    MAX_MANIFEST_CHUNKS,
    ChunkRef,
    Manifest,
    ManifestBuilder,
    assemble_blob,
    iter_blob,
    load_manifest,
    pull_manifest,
    push_manifest,
    store_blob,
    store_chunks,
)
from cellmesh.state.chunking import ChunkerParams, chunk_id

SMALL = ChunkerParams(1024, 4096, 16384)


def rnd(seed: bytes, n: int) -> bytes:
    return blake3.blake3(seed).digest(length=n)


def big_store() -> LRUChunkStore:
    return LRUChunkStore(max_bytes=1 << 30)


def test_round_trip_and_blob_id() -> None:
    data = rnd(b"m", 100_000)
    store = big_store()
    m = store_blob(data, store, SMALL)
    enc = push_manifest(m)
    assert len(enc) == MANIFEST_HEADER_LEN + 36 * len(m.chunks)
    assert pull_manifest(enc) == m
    assert m.encode() == enc
    assert m.blob_id == blake3.blake3(enc).digest()
    assert m.total_size == len(data)
    assert m.file_hash == blake3.blake3(data).digest()
    assert sum(c.size for c in m.chunks) == len(data)
    assert store.get(m.blob_id) == enc  # the manifest is itself a block
    assert assemble_blob(m, store) == data
    assert load_manifest(m.blob_id, store) == m


def test_layout_bytes() -> None:
    m = Manifest(SMALL, 5, blake3.blake3(b"hello").digest(), (ChunkRef(chunk_id(b"hello"), 5),))
    enc = push_manifest(m)
    assert enc[:2] == b"\x01\x00"
    assert enc[2:14] == (1024).to_bytes(4, "big") + (4096).to_bytes(4, "big") + (16384).to_bytes(
        4, "big"
    )
    assert enc[14:22] == (5).to_bytes(8, "big")
    assert enc[22:54] == m.file_hash
    assert enc[54:58] == (1).to_bytes(4, "big")
    assert enc[58:90] == chunk_id(b"hello")
    assert enc[90:94] == (5).to_bytes(4, "big")
    assert len(enc) == 94


def test_empty_blob() -> None:
    store = big_store()
    m = store_blob(b"", store, SMALL)
    assert m.chunks == ()
    assert m.total_size == 0
    assert assemble_blob(m, store) == b""
    assert pull_manifest(push_manifest(m)) == m


def test_every_truncation_is_a_decode_error() -> None:
    store = big_store()
    enc = push_manifest(store_blob(rnd(b"t", 30_000), store, SMALL))
    for n in range(len(enc)):
        with pytest.raises(DecodeError):
            pull_manifest(enc[:n])
    with pytest.raises(MalformedError):
        pull_manifest(enc + b"\x00")


def _mutate(enc: bytes, at: int, value: bytes) -> bytes:
    return enc[:at] + value + enc[at + len(value) :]


def test_decode_rejects_bad_fields() -> None:
    store = big_store()
    enc = push_manifest(store_blob(rnd(b"f", 30_000), store, SMALL))
    with pytest.raises(VersionError):
        pull_manifest(_mutate(enc, 0, b"\x02"))
    with pytest.raises(MalformedError, match="flags"):
        pull_manifest(_mutate(enc, 1, b"\x01"))
    with pytest.raises(MalformedError, match="chunker"):
        pull_manifest(_mutate(enc, 2, (8192).to_bytes(4, "big")))  # min > avg
    with pytest.raises(MalformedError, match="add up"):
        pull_manifest(_mutate(enc, 14, (1).to_bytes(8, "big")))
    with pytest.raises(MalformedError, match="outside"):
        pull_manifest(_mutate(enc, 58 + 32, (0).to_bytes(4, "big")))
    with pytest.raises(MalformedError, match="outside"):
        pull_manifest(_mutate(enc, 58 + 32, (16385).to_bytes(4, "big")))
    with pytest.raises(TruncatedError):
        pull_manifest(_mutate(enc, 54, (10**6).to_bytes(4, "big")))
    with pytest.raises(OversizeError):
        pull_manifest(bytes(5 << 20))


def test_encoder_refuses_what_decoder_would() -> None:
    h = bytes(32)
    with pytest.raises(MalformedError):
        push_manifest(Manifest(SMALL, 10, h, (ChunkRef(h, 5),)))  # sizes do not add up
    with pytest.raises(MalformedError):
        push_manifest(Manifest(SMALL, 0, b"short", ()))
    with pytest.raises(MalformedError):
        push_manifest(Manifest(SMALL, 20000, h, (ChunkRef(h, 20000),)))  # over max_size
    refs = tuple(ChunkRef(h, 1) for _ in range(MAX_MANIFEST_CHUNKS + 1))
    with pytest.raises(OversizeError):
        push_manifest(Manifest(SMALL, len(refs), h, refs))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        m = pull_manifest(data)
    except DecodeError:
        return
    assert push_manifest(m) == data  # canonical: one encoding per manifest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(1, 16384)), max_size=20))
def test_fuzz_round_trip(entries: list[tuple[bytes, int]]) -> None:
    refs = tuple(ChunkRef(i, s) for i, s in entries)
    m = Manifest(SMALL, sum(s for _, s in entries), bytes(range(32)), refs)
    assert pull_manifest(push_manifest(m)) == m


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 93), st.integers(0, 255))
def test_fuzz_single_byte_flips(pos: int, value: int) -> None:
    m = Manifest(SMALL, 5, blake3.blake3(b"hello").digest(), (ChunkRef(chunk_id(b"hello"), 5),))
    enc = bytearray(push_manifest(m))
    enc[pos] = value
    with contextlib.suppress(DecodeError):
        pull_manifest(bytes(enc))


def test_dedup_same_chunk_stored_once() -> None:
    store = big_store()
    a = rnd(b"dedup", 200_000)
    m1 = store_blob(a, store, SMALL)
    blocks_after_first = len(store)
    m2 = store_blob(a, store, SMALL)
    assert m1 == m2
    assert len(store) == blocks_after_first
    # An edited copy shares almost every chunk.
    edited = a[:100_000] + b"!" + a[100_000:]
    m3 = store_blob(edited, store, SMALL)
    new_blocks = len(store) - blocks_after_first
    assert new_blocks <= 4  # a couple of chunks and the new manifest
    assert len(m3.chunks) > 20
    # A blob repeating one chunk lists it twice but stores it once.
    unit = rnd(b"unit", 20_000)
    rep = unit[:4096] * 8
    m4 = store_blob(rep, store, ChunkerParams(1024, 2048, 4096))
    assert len(m4.unique_chunks()) < len(m4.chunks)
    assert assemble_blob(m4, store) == rep


def test_store_chunks_matches_store_blob() -> None:
    data = rnd(b"stream", 150_000)
    s1, s2 = big_store(), big_store()
    pieces = [data[i : i + 3333] for i in range(0, len(data), 3333)]
    assert store_chunks(pieces, s1, SMALL) == store_blob(data, s2, SMALL)


def test_assemble_failures() -> None:
    store = big_store()
    data = rnd(b"asm", 50_000)
    m = store_blob(data, store, SMALL)
    missing = LRUChunkStore(1 << 30)
    for ref in m.chunks[1:]:
        missing.put(ref.id, store.get(ref.id) or b"")
    with pytest.raises(ChunkMissingError):
        assemble_blob(m, missing)
    # A manifest whose file hash lies: every chunk checks out, the whole does not.
    liar = Manifest(m.params, m.total_size, bytes(32), m.chunks)
    with pytest.raises(IntegrityError, match="file hash"):
        assemble_blob(liar, store)
    # A consumer sees chunks before the verdict, but never a clean end.
    it = iter_blob(liar, store)
    next(it)
    with pytest.raises(IntegrityError):
        list(it)


def test_load_manifest_of_a_non_manifest_block() -> None:
    store = big_store()
    store.put(chunk_id(b"not a manifest"), b"not a manifest")
    with pytest.raises(IntegrityError, match="not a blob manifest"):
        load_manifest(chunk_id(b"not a manifest"), store)
    assert load_manifest(bytes(32), store) is None


def test_builder_limits() -> None:
    b = ManifestBuilder(SMALL)
    with pytest.raises(ValueError, match="outside"):
        b.add(b"")
    with pytest.raises(ValueError, match="outside"):
        b.add(bytes(SMALL.max_size + 1))
