"""Blob manifests: the ordered list of chunks that makes a file, and its canonical encoding.

A blob is addressed by its *manifest*: the chunker parameters, the file's total size and
BLAKE3-256, and the ordered (chunk id, size) pairs. The blob id is BLAKE3-256 of the manifest's
canonical encoding, so the manifest is itself a block: peers fetch it with BLOCK_WANT like any
chunk and check it against the blob id, then fetch the chunks it lists and check each against
its id. A file that shares chunks with another (an edited version, a copy) shares their storage.

Canonical encoding (all integers big-endian; layout also in docs/blobs_sync.md)::

    offset size field
    0      1    version            = 1
    1      1    flags              = 0 (reserved, must be zero)
    2      4    min_size           chunker parameters the chunks were cut with
    6      4    avg_size
    10     4    max_size
    14     8    total_size         file length in bytes
    22     32   file_hash          BLAKE3-256 of the whole file
    54     4    chunk_count        n
    58     36*n entries            chunk id (32 bytes) + chunk size (u32), in file order

Decoding is strict: exact length, sizes in [1, max_size], sizes summing to `total_size`, at most
`MAX_MANIFEST_SIZE` bytes. One encoding per manifest, hence one blob id per file and parameters.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import blake3

from cellmesh.errors import DecodeError, MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.state.blob_cache import ChunkMissingError, ChunkStore, IntegrityError
from cellmesh.state.chunking import (
    CHUNK_ID_LEN,
    DEFAULT_PARAMS,
    MAX_CHUNK_LIMIT,
    Chunker,
    ChunkerParams,
    chunk_id,
    iter_chunks,
)

__all__ = [
    "MANIFEST_HEADER_LEN",
    "MANIFEST_VERSION",
    "MAX_MANIFEST_CHUNKS",
    "MAX_MANIFEST_SIZE",
    "ChunkRef",
    "Manifest",
    "ManifestBuilder",
    "assemble_blob",
    "iter_blob",
    "load_manifest",
    "pull_manifest",
    "push_manifest",
    "store_blob",
    "store_chunks",
]

MANIFEST_VERSION = 1
_HEAD = struct.Struct("!BBIIIQ32sI")
_ENTRY = struct.Struct("!32sI")
MANIFEST_HEADER_LEN = _HEAD.size
"""58 bytes before the first chunk entry."""
MAX_MANIFEST_SIZE = MAX_CHUNK_LIMIT
"""A manifest is a block, so it obeys the block size limit (4 MiB)."""
MAX_MANIFEST_CHUNKS = (MAX_MANIFEST_SIZE - MANIFEST_HEADER_LEN) // _ENTRY.size
"""116,508 chunks: about 7 GiB at the default 64 KiB average chunk size."""


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a blob: its id (BLAKE3-256) and its size in bytes."""

    id: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a blob is made of. `blob_id` is BLAKE3-256 of `push_manifest(self)`."""

    params: ChunkerParams
    total_size: int
    file_hash: bytes
    chunks: tuple[ChunkRef, ...]

    def encode(self) -> bytes:
        """The canonical encoding (see the module docstring)."""
        return push_manifest(self)

    @property
    def blob_id(self) -> bytes:
        """The blob's address: BLAKE3-256 of the canonical encoding."""
        return chunk_id(push_manifest(self))

    def unique_chunks(self) -> dict[bytes, int]:
        """Chunk id -> size, each id once, in first-appearance order (what a fetch must get)."""
        out: dict[bytes, int] = {}
        for c in self.chunks:
            out.setdefault(c.id, c.size)
        return out


def push_manifest(m: Manifest) -> bytes:
    """Encode a manifest canonically. Raises `OversizeError` / `MalformedError` on a manifest
    that could not be decoded back (too many chunks, inconsistent sizes)."""
    if len(m.chunks) > MAX_MANIFEST_CHUNKS:
        raise OversizeError(f"manifest of {len(m.chunks)} chunks exceeds {MAX_MANIFEST_CHUNKS}")
    if len(m.file_hash) != CHUNK_ID_LEN:
        raise MalformedError("file hash must be 32 bytes")
    total = 0
    parts = [
        _HEAD.pack(
            MANIFEST_VERSION,
            0,
            m.params.min_size,
            m.params.avg_size,
            m.params.max_size,
            m.total_size,
            m.file_hash,
            len(m.chunks),
        )
    ]
    for c in m.chunks:
        if len(c.id) != CHUNK_ID_LEN or not 1 <= c.size <= m.params.max_size:
            raise MalformedError("chunk entries need a 32-byte id and a size in [1, max_size]")
        total += c.size
        parts.append(_ENTRY.pack(c.id, c.size))
    if total != m.total_size:
        raise MalformedError("chunk sizes do not add up to the total size")
    return b"".join(parts)


def pull_manifest(data: bytes | bytearray | memoryview) -> Manifest:
    """Decode a canonical manifest; any fault raises a `DecodeError` subclass."""
    n = len(data)
    if n > MAX_MANIFEST_SIZE:
        raise OversizeError(f"manifest of {n} bytes exceeds {MAX_MANIFEST_SIZE}")
    if n < 1:
        raise TruncatedError("empty manifest")
    if data[0] != MANIFEST_VERSION:
        raise VersionError(f"manifest version {data[0]} (this build speaks {MANIFEST_VERSION})")
    if n < _HEAD.size:
        raise TruncatedError("manifest header cut short")
    _v, flags, mn, avg, mx, total, file_hash, count = _HEAD.unpack_from(data, 0)
    if flags:
        raise MalformedError("manifest flags are reserved and must be zero")
    try:
        params = ChunkerParams(mn, avg, mx)
    except ValueError as exc:
        raise MalformedError(f"bad chunker parameters: {exc}") from exc
    expected = _HEAD.size + count * _ENTRY.size
    if n < expected:
        raise TruncatedError(f"manifest lists {count} chunks but holds {n} bytes")
    if n > expected:
        raise MalformedError("junk after the last manifest entry")
    chunks = []
    seen = 0
    for off in range(_HEAD.size, expected, _ENTRY.size):
        cid, size = _ENTRY.unpack_from(data, off)
        if not 1 <= size <= mx:
            raise MalformedError(f"chunk size {size} outside [1, {mx}]")
        seen += size
        chunks.append(ChunkRef(cid, size))
    if seen != total:
        raise MalformedError("chunk sizes do not add up to the total size")
    return Manifest(params, total, file_hash, tuple(chunks))


class ManifestBuilder:
    """Builds a manifest from chunks given in file order (streaming: one chunk in memory)."""

    def __init__(self, params: ChunkerParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._hasher = blake3.blake3()
        self._chunks: list[ChunkRef] = []
        self._total = 0

    def add(self, chunk: bytes) -> ChunkRef:
        """Account for the next chunk; returns its reference (id computed here)."""
        if not 1 <= len(chunk) <= self.params.max_size:
            raise ValueError(f"chunk of {len(chunk)} bytes outside [1, {self.params.max_size}]")
        if len(self._chunks) >= MAX_MANIFEST_CHUNKS:
            raise OversizeError(f"a blob has at most {MAX_MANIFEST_CHUNKS} chunks")
        self._hasher.update(chunk)
        ref = ChunkRef(chunk_id(chunk), len(chunk))
        self._chunks.append(ref)
        self._total += len(chunk)
        return ref

    def finish(self) -> Manifest:
        """The manifest of everything added so far."""
        return Manifest(self.params, self._total, self._hasher.digest(), tuple(self._chunks))


def store_blob(
    data: bytes | bytearray | memoryview,
    store: ChunkStore,
    params: ChunkerParams = DEFAULT_PARAMS,
) -> Manifest:
    """Chunk `data`, put every chunk and the manifest block into `store`; return the manifest.

    A chunk already in the store is not stored again (`put` returns False): deduplication.
    """
    builder = ManifestBuilder(params)
    for chunk in iter_chunks(data, params):
        ref = builder.add(chunk)
        store.put(ref.id, chunk)
    manifest = builder.finish()
    encoded = push_manifest(manifest)
    store.put(chunk_id(encoded), encoded)
    return manifest


def store_chunks(
    pieces: Iterable[bytes], store: ChunkStore, params: ChunkerParams = DEFAULT_PARAMS
) -> Manifest:
    """Like `store_blob`, for data arriving in pieces of any size (a file read in blocks)."""
    chunker = Chunker(params)
    builder = ManifestBuilder(params)
    for piece in pieces:
        for chunk in chunker.feed(piece):
            store.put(builder.add(chunk).id, chunk)
    for chunk in chunker.finish():
        store.put(builder.add(chunk).id, chunk)
    manifest = builder.finish()
    encoded = push_manifest(manifest)
    store.put(chunk_id(encoded), encoded)
    return manifest


def iter_blob(manifest: Manifest, store: ChunkStore) -> Iterator[bytes]:
    """Yield the blob's chunks in order, each checked against its id; after the last one, check
    the whole-file hash. Raises `ChunkMissingError` or `IntegrityError`.

    A consumer writing to a file must not treat it as complete until the iterator is exhausted:
    only then has the file hash been checked (a manifest author could list chunks that do not
    make the file it claims).
    """
    hasher = blake3.blake3()
    for ref in manifest.chunks:
        data = store.get(ref.id)
        if data is None:
            raise ChunkMissingError(f"chunk {ref.id.hex()} is not in the store")
        if len(data) != ref.size or chunk_id(data) != ref.id:
            raise IntegrityError(f"chunk {ref.id.hex()} does not match its id and size")
        hasher.update(data)
        yield data
    if hasher.digest() != manifest.file_hash:
        raise IntegrityError("the reassembled blob does not match the manifest's file hash")


def assemble_blob(manifest: Manifest, store: ChunkStore) -> bytes:
    """The whole blob, verified chunk by chunk and as a whole (see `iter_blob`)."""
    return b"".join(iter_blob(manifest, store))


def load_manifest(blob_id: bytes, store: ChunkStore) -> Manifest | None:
    """The manifest of `blob_id` if the store has its block, decoded; None if absent.

    Raises `IntegrityError` if the block is there but is not a valid manifest (an id that names
    some other block).
    """
    data = store.get(blob_id)
    if data is None:
        return None
    if chunk_id(data) != blob_id:
        raise IntegrityError("manifest block does not hash to the blob id")
    try:
        return pull_manifest(data)
    except DecodeError as exc:
        raise IntegrityError(f"block {blob_id.hex()} is not a blob manifest: {exc}") from exc
