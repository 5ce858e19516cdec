"""Blob fetching between nodes: MB/s fetching a blob from 1 and from 3 peers, against a stream
transfer (`cellmesh cp`'s engine) of the same file between the same nodes in the same run.

Layout: each serving peer is a `Node` in a child process of its own, on loopback, its blob store
a copy of one store holding the blob (chunked once, default 16/64/256 KiB chunk parameters).
The fetcher is a `Node` in this process. Every fetch starts from an empty store (a fresh
directory; blocks written without fsync, as a node does) and ends when the blob is in the store
and written to a file, every block and the whole-file hash verified.

* ours, 1 peer / 3 peers: `node.blobs.fetch(blob, peers, output=FILE)`.
* baseline: `TransferService.send_file` from peer 1 to this node (one stream, the receiver
  hashes while it writes and confirms the BLAKE3), timed by the sender after its hashing pass.

Bytes are file bytes (20 MB; `--quick` 4 MB). All peers share the machine's CPUs with the
fetcher, so on a small machine 3 peers add more CPU work than bandwidth.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import blake3

from _common import (
    Connection,
    Metric,
    Result,
    bench_main,
    child_process,
    expect,
    print_header,
    report,
    run_child,
)
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.node.blob_store import FileChunkStore
from cellmesh.node.node import Node
from cellmesh.node.transfer import TransferService
from cellmesh.state.blobs import ServeSettings

BENCH = "bench_blob_fetch"
LOCAL = ("127.0.0.1:0",)
ROUNDS = 2


def _peer_main(conn: Connection) -> None:
    """A serving peer: a node on `blob_dir`; answers ("cp", cell, path) with a file transfer."""

    def body() -> None:
        blob_dir, inbox, rate = conn.recv()

        async def main() -> None:
            node = Node(Identity.generate(), NodeConfig(listen=LOCAL, blob_dir=blob_dir))
            async with node:
                if rate:
                    node.blobs.serve_settings = ServeSettings(rate=rate)
                transfers = TransferService(node, Path(inbox))
                await transfers.start()
                host, port = node.local_addresses()[0]
                conn.send((node.cell_id, f"{host}:{port}"))
                loop = asyncio.get_running_loop()
                while True:
                    msg = await loop.run_in_executor(None, conn.recv)
                    if msg[0] == "stop":
                        break
                    _, cell, path = msg
                    r = await transfers.send_file(cell, Path(path))
                    conn.send(float(r["seconds"]))
                await transfers.stop()

        asyncio.run(main())

    run_child(conn, body)


async def _fetch_rate(
    node: Node, work: Path, blob_id: bytes, peers: list[bytes], size: int, tag: str
) -> float:
    """Best MB/s of `ROUNDS` fetches into empty stores."""
    best = 0.0
    for i in range(ROUNDS):
        node.blobs.store = FileChunkStore(work / f"fetch-{tag}-{i}", fsync=False)  # as a node
        out = work / f"out-{tag}-{i}.bin"
        r = await node.blobs.fetch(blob_id, peers, output=out, timeout=120)
        assert r.banned == [], r.peers
        best = max(best, size / r.seconds)
        out.unlink()
    return best


async def _run(args: argparse.Namespace, work: Path, peers: list[Connection]) -> None:
    size = (4 if args.quick else 20) * 1_000_000
    src = work / "data.bin"
    src.write_bytes(blake3.blake3(b"bench blob fetch").digest(length=size))
    origin = FileChunkStore(work / "origin", fsync=False)
    blob_id = origin.put_file(src).blob_id
    cells: list[bytes] = []
    for i, conn in enumerate(peers):
        store = work / f"peer{i}"
        shutil.copytree(origin.root, store)
        conn.send((str(store), str(work / f"inbox{i}"), args.serve_rate * 1e6))
    addrs = []
    for conn in peers:
        msg = await asyncio.to_thread(expect, conn, 30, "its address")
        assert isinstance(msg, tuple)
        cells.append(msg[0])
        addrs.append(msg[1])
    me = Node(Identity.generate(), NodeConfig(listen=LOCAL, blob_dir=str(work / "me")))
    async with me:
        transfers = TransferService(me, work / "inbox-me")
        await transfers.start()
        for a in addrs:
            await me.connect(a)
        one = await _fetch_rate(me, work, blob_id, cells[:1], size, "1")
        three = await _fetch_rate(me, work, blob_id, cells, size, "3")
        best_cp = 0.0
        for _ in range(ROUNDS):
            peers[0].send(("cp", me.cell_id, str(src)))
            seconds = await asyncio.to_thread(expect, peers[0], 120, "a transfer")
            assert isinstance(seconds, float)
            best_cp = max(best_cp, size / seconds)
            for f in (work / "inbox-me").iterdir():
                f.unlink()
        await transfers.stop()
    for conn in peers:
        conn.send(("stop",))
    chunks = sum(1 for _ in origin.ids())
    for name, rate in (("1 peer", one), ("3 peers", three)):
        report(
            Result(
                BENCH,
                f"fetch a {size / 1e6:.0f} MB blob from {name}",
                f"node.blobs.fetch, {chunks} blocks, BLOCK_WANT/PUT on blob streams",
                "TransferService.send_file of the same file, one stream, from peer 1",
                [Metric("throughput (best of 2)", rate, best_cp, "MB/s", "higher")],
            ),
            args.json,
            args.quick,
        )


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--serve-rate",
        type=float,
        default=0.0,
        metavar="MB/S",
        help="each peer's per-stream serving rate (default: the node's own)",
    )


def _run_all(args: argparse.Namespace) -> int:
    rate = f"serving at {args.serve_rate:g} MB/s per stream" if args.serve_rate else "node defaults"
    print_header(BENCH, f"blob fetch from 1 and 3 peers vs a stream transfer, loopback, {rate}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-blob-") as tmp,
        child_process(_peer_main, "peer1") as p1,
        child_process(_peer_main, "peer2") as p2,
        child_process(_peer_main, "peer3") as p3,
    ):
        asyncio.run(_run(args, Path(tmp), [p1.conn, p2.conn, p3.conn]))
    return 0


if __name__ == "__main__":
    sys.exit(bench_main(BENCH, __doc__, _options, _run_all))
