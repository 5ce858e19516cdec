"""The file-backed chunk store (cellmesh.node.blob_store): atomic puts, verified reads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import blake3
import pytest

from cellmesh.node.blob_store import FileChunkStore
from cellmesh.state.blob_cache import ChunkMissingError, ChunkStore, IntegrityError, LRUChunkStore
from cellmesh.state.blob_manifest import store_blob
from cellmesh.state.chunking import ChunkerParams, chunk_id

SMALL = ChunkerParams(2048, 8192, 32768)


def rnd(seed: bytes, n: int) -> bytes:
    return blake3.blake3(seed).digest(length=n)


def test_put_get_layout(tmp_path: Path) -> None:
    s = FileChunkStore(tmp_path / "blocks", fsync=True)
    assert isinstance(s, ChunkStore)
    data = b"hello block"
    bid = chunk_id(data)
    assert not s.has(bid)
    assert s.get(bid) is None
    assert s.put(bid, data)
    assert not s.put(bid, data)  # stored once
    h = bid.hex()
    assert (tmp_path / "blocks" / h[:2] / h).read_bytes() == data
    assert s.get(bid) == data
    assert list(s.ids()) == [bid]
    assert not [p for p in (tmp_path / "blocks").rglob(".tmp-*")]  # no leftovers
    st = s.statistics()
    assert (st.puts, st.duplicates, st.gets, st.misses, st.corrupt) == (1, 1, 2, 1, 0)
    assert s.delete(bid)
    assert not s.delete(bid)


def test_wrong_id_refused(tmp_path: Path) -> None:
    s = FileChunkStore(tmp_path, fsync=False)
    with pytest.raises(IntegrityError):
        s.put(chunk_id(b"a"), b"b")
    with pytest.raises(ValueError, match="32 bytes"):
        s.get(b"../../etc/passwd")


def test_corrupt_file_is_quarantined_not_served(tmp_path: Path) -> None:
    s = FileChunkStore(tmp_path, fsync=False)
    data = rnd(b"rot", 5000)
    bid = chunk_id(data)
    s.put(bid, data)
    path = tmp_path / bid.hex()[:2] / bid.hex()
    path.write_bytes(data[:-1] + b"\x00")  # bit rot
    assert s.get(bid) is None
    assert not s.has(bid)
    assert s.statistics().corrupt == 1
    assert len(list((tmp_path / "corrupt").iterdir())) == 1
    assert s.put(bid, data)  # a good copy can come back
    assert s.get(bid) == data


def test_put_file_and_export_round_trip(tmp_path: Path) -> None:
    s = FileChunkStore(tmp_path / "store", fsync=False)
    src = tmp_path / "in.bin"
    data = rnd(b"file", 300_000)
    src.write_bytes(data)
    m = s.put_file(src, SMALL, read_size=7777)
    # Same manifest as chunking the bytes in memory.
    assert m == store_blob(data, LRUChunkStore(1 << 30), SMALL)
    out = tmp_path / "out.bin"
    assert s.export_blob(m.blob_id, out) == m
    assert out.read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_export_refuses_a_damaged_blob(tmp_path: Path) -> None:
    s = FileChunkStore(tmp_path / "store", fsync=False)
    data = rnd(b"damaged", 100_000)
    m = store_blob(data, s, SMALL)
    victim = m.chunks[3].id
    (tmp_path / "store" / victim.hex()[:2] / victim.hex()).write_bytes(b"garbage")
    out = tmp_path / "out.bin"
    with pytest.raises(ChunkMissingError):  # the corrupt chunk is quarantined, so: missing
        s.export_blob(m.blob_id, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    with pytest.raises(FileNotFoundError):
        s.export_blob(bytes(32), out)


def test_stale_temporary_files_are_cleaned(tmp_path: Path) -> None:
    shard = tmp_path / "ab"
    shard.mkdir()
    old = shard / ".tmp-abcdef-123"
    old.write_bytes(b"half a block")
    past = time.time() - 3600
    os.utime(old, (past, past))
    fresh = shard / ".tmp-abcdef-456"
    fresh.write_bytes(b"being written")
    FileChunkStore(tmp_path, fsync=False)
    assert not old.exists()
    assert fresh.exists()
