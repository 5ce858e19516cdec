"""A durable `ChunkStore` on a directory: one file per block, named by its BLAKE3 hash.

Layout: ``ROOT/ab/abcdef...`` (64 hex digits; the first two shard the directory so no directory
holds more than 1/256 of the blocks). A block is written to a temporary file in its shard
(``.tmp-<hex>-<random>``), fsynced, renamed over its final name (atomic on POSIX) and the shard
directory fsynced, so a crash leaves either the whole block or nothing under the final name.
Since the name is the content's hash, two writers of the same block write the same bytes and the
rename race is harmless.

Every `get` re-hashes what it read: a block damaged on disk (bit rot, a truncated copy, someone
editing files) is never served. It is moved to ``ROOT/corrupt/`` (kept as evidence, counted in
`statistics().corrupt`) and `get` answers None, so the fetcher fetches it again from a peer.

`put_file` chunks a file as it reads it (memory: one read buffer plus one chunk) and
`export_blob` writes a blob back to a file, verified chunk by chunk and as a whole before the
file appears under its name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from cellmesh.state.blob_cache import BLOCK_ID_LEN, IntegrityError, check_block
from cellmesh.state.blob_manifest import Manifest, iter_blob, load_manifest, store_chunks
from cellmesh.state.chunking import DEFAULT_PARAMS, ChunkerParams

__all__ = ["FileChunkStore", "FileStoreStats", "IntegrityError"]

_READ_SIZE = 1 << 20
_STALE_TMP_SECONDS = 600.0
"""Temporary files older than this are leftovers of a crash and are removed on open."""


@dataclass(frozen=True, slots=True)
class FileStoreStats:
    """A snapshot of a `FileChunkStore`'s counters (since it was opened)."""

    puts: int
    duplicates: int
    gets: int
    misses: int
    corrupt: int
    bytes_written: int
    bytes_read: int


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the data itself is already synced
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class FileChunkStore:
    """A `ChunkStore` in directory `root` (created if missing). See the module docstring.

    `fsync` False skips the fsyncs (tests, benchmarks, caches that may lose recent blocks).
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._puts = 0
        self._duplicates = 0
        self._gets = 0
        self._misses = 0
        self._corrupt = 0
        self._written = 0
        self._read = 0
        self._remove_stale_tmp()

    def _path(self, block_id: bytes) -> Path:
        if len(block_id) != BLOCK_ID_LEN:
            raise ValueError("a block id is 32 bytes")
        h = block_id.hex()  # hex only: an id can never name a path outside the store
        return self.root / h[:2] / h

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for tmp in self.root.glob("??/.tmp-*"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def has(self, block_id: bytes) -> bool:
        """True if a file for the block exists (`get` still verifies it)."""
        return self._path(block_id).is_file()

    def get(self, block_id: bytes) -> bytes | None:
        """The block's bytes, verified against its id; None if absent or found corrupt."""
        path = self._path(block_id)
        self._gets += 1
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._misses += 1
            return None
        self._read += len(data)
        if blake3.blake3(data).digest() != block_id:
            self._quarantine(path)
            return None
        return data

    def _quarantine(self, path: Path) -> None:
        self._corrupt += 1
        qdir = self.root / "corrupt"
        qdir.mkdir(exist_ok=True)
        target = qdir / f"{path.name}.{secrets.token_hex(4)}"
        try:
            os.replace(path, target)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()

    def put(self, block_id: bytes, data: bytes) -> bool:
        """Store a block atomically; False if it is already stored. Raises `IntegrityError` if
        `data` does not hash to `block_id`, `OSError` if the disk refuses."""
        check_block(block_id, data)
        path = self._path(block_id)
        if path.is_file():
            self._duplicates += 1
            return False
        shard = path.parent
        shard.mkdir(exist_ok=True)
        tmp = shard / f".tmp-{path.name[:16]}-{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if self.fsync:
            _fsync_dir(shard)
        self._puts += 1
        self._written += len(data)
        return True

    def delete(self, block_id: bytes) -> bool:
        """Remove a block; True if it was there."""
        try:
            self._path(block_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def ids(self) -> Iterator[bytes]:
        """Every block id stored (by file name; contents are verified only by `get`)."""
        for f in self.root.glob("??/*"):
            name = f.name
            if len(name) == 2 * BLOCK_ID_LEN and f.parent.name == name[:2]:
                with contextlib.suppress(ValueError):
                    yield bytes.fromhex(name)

    def put_file(
        self, path: Path, params: ChunkerParams = DEFAULT_PARAMS, read_size: int = _READ_SIZE
    ) -> Manifest:
        """Chunk the file at `path` into the store (plus its manifest block); return the
        manifest. Its `blob_id` is the address to share."""

        def pieces() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(read_size):
                    yield block

        return store_chunks(pieces(), self, params)

    def export_blob(self, blob_id: bytes, out: Path) -> Manifest:
        """Write blob `blob_id` to `out` (atomically: a temporary file beside it, renamed once
        every chunk and the whole-file hash have been verified). Raises `ChunkMissingError`,
        `IntegrityError`, or `FileNotFoundError` if the manifest is not stored."""
        manifest = load_manifest(blob_id, self)
        if manifest is None:
            raise FileNotFoundError(f"blob {blob_id.hex()} has no manifest in {self.root}")
        out = Path(out)
        tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                # iter_blob raises before its end if any chunk or the file hash is wrong, so a
                # bad blob never reaches the final name.
                for chunk in iter_blob(manifest, self):
                    _write_all(fd, chunk)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if self.fsync:
            _fsync_dir(out.parent)
        return manifest

    def statistics(self) -> FileStoreStats:
        """A frozen snapshot of the counters."""
        return FileStoreStats(
            puts=self._puts,
            duplicates=self._duplicates,
            gets=self._gets,
            misses=self._misses,
            corrupt=self._corrupt,
            bytes_written=self._written,
            bytes_read=self._read,
        )
