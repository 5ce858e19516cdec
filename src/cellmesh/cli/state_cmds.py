"""`cellmesh pub`, `sub`, `log`: signed, durable channel logs of a running node; `blob put|get`.

Like cli/channel_cmds.py this module does not import cli/main.py at run time (main imports it);
it talks to the node over the control socket (ops in node/state_control.py), so only the node
process opens the database.
"""

from __future__ import annotations

import base64
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import click

from cellmesh.cli.channel_cmds import EXIT_DENIED, _call, _chain_hex, _ctx
from cellmesh.cli.transfer_cmds import err, fail, run
from cellmesh.errors import AccessDeniedError, KeystoreError
from cellmesh.node.blob_store import FileChunkStore
from cellmesh.node.control import ControlClient
from cellmesh.state.blob_cache import ChunkMissingError, IntegrityError


def _show(ev: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(ev))
    else:
        text = base64.b64decode(ev["data_b64"]).decode("utf-8", "backslashreplace")
        when = datetime.datetime.fromtimestamp(ev["timestamp_ms"] / 1000, datetime.UTC)
        click.echo(
            f"{ev['position']:>6} {when:%H:%M:%S} {ev['author'][:12]}… #{ev['seq']} "
            f"{ev['channel']}: {text}"
        )
    sys.stdout.flush()


@click.command("pub")
@click.argument("channel")
@click.argument("data", default="-")
@click.option(
    "--to",
    "peer",
    metavar="CELLID",
    help="First ask CELLID for the right to publish into its CHANNEL (with --token if needed).",
)
@click.option("--token", "token_file", type=click.Path(dir_okay=False), help="Token chain file.")
@click.pass_obj
def pub_cmd(obj: object, channel: str, data: str, peer: str | None, token_file: str | None) -> None:
    """Append a signed event with DATA (or stdin with '-') to CHANNEL's log and send it live.

    \b
    The running node signs the event with its identity, links it to its previous event on
    CHANNEL (hash chain) and to what it has seen from others (horizon), stores it durably in
    its database (config `database`, default <home>/cellmesh.db) and only then sends it to the
    peers subscribed to CHANNEL here, and to the hosts that let it publish into CHANNEL. They
    verify it and append it to their own logs. Prints the event id (64 hex) on stdout.

    \b
    Example: A hosts an open channel, B follows it, A publishes:
      cellmesh --home A channel declare 'chat/**' --access open
      cellmesh --home B sub chat/room --at <CellID of A>
      cellmesh --home A pub chat/room 'hello'
    Payloads are at most 64 KiB. Exit codes: 0 stored, 1 error, 3 the host refused --to.
    """
    payload = sys.stdin.buffer.read() if data == "-" else data.encode()
    ctx = _ctx(obj)

    async def go() -> Any:
        async with ControlClient(ctx.home.control_socket_path) as c:
            if peer is not None:
                try:
                    await c.call(
                        "request_publish",
                        peer=peer,
                        channel=channel,
                        chain=_chain_hex(token_file),
                    )
                except AccessDeniedError as exc:
                    fail(f"{exc} [reason: {exc.reason}]", EXIT_DENIED)
            elif token_file is not None:
                fail("--token needs --to CELLID (the peer that hosts the channel)")
            return await c.call("pub", channel=channel, data_b64=base64.b64encode(payload).decode())

    r = run(go)
    click.echo(r["id"])
    err.print(
        f"event #{r['seq']} on {channel} stored at position {r['position']}, "
        f"sent to {r['sent_to']} peer(s)"
    )


@click.command("sub")
@click.argument("channel")
@click.option("--from-start", is_flag=True, help="First print the events already in the log.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--count", type=int, default=0, help="Exit after COUNT events (0: never).")
@click.option(
    "--at",
    "peer",
    metavar="CELLID",
    help="First subscribe to CHANNEL at CELLID (its host), with --token if needed.",
)
@click.option("--token", "token_file", type=click.Path(dir_okay=False), help="Token chain file.")
@click.pass_obj
def sub_cmd(
    obj: object,
    channel: str,
    from_start: bool,
    as_json: bool,
    count: int,
    peer: str | None,
    token_file: str | None,
) -> None:
    """Print the events of CHANNEL as they enter this node's log (its own and its peers').

    \b
    Events arrive in the log when this node publishes (`cellmesh pub`) or when a peer's event
    comes in on a channel this node subscribed to (--at, or `channel sub`): each one is
    verified (signature, hash chain, clock) and stored before it is printed. Output: log
    position, time, author, the author's sequence number, channel and data; --json prints
    every field (ids in hex, data in base64).

    \b
    Only live events travel between nodes: events published before the subscription are not
    fetched, and a peer's events wait in the log (not printed) until its earlier ones arrive.
    Exit codes: 0 done (--count reached), 1 error, 2 host unreachable, 3 the host refused --at.
    """
    ctx = _ctx(obj)
    if token_file is not None and peer is None:
        fail("--token needs --at CELLID (the peer that hosts the channel)")

    async def go() -> None:
        async with ControlClient(ctx.home.control_socket_path) as c:
            if peer is not None:
                try:
                    await c.call(
                        "subscribe", peer=peer, channel=channel, chain=_chain_hex(token_file)
                    )
                except AccessDeniedError as exc:
                    fail(f"{exc} [reason: {exc.reason}]", EXIT_DENIED)
                err.print(f"subscribed to {channel} at {peer}")
            after: int | None = 0 if from_start else None
            seen = 0
            while count == 0 or seen < count:
                args: dict[str, Any] = {"channel": channel, "timeout": 3600}
                if after is not None:
                    args["after"] = after
                r = await c.call("sub_recv", **args)
                ev = r["event"]
                if ev is None:
                    after = r["after"]
                    continue
                after = ev["position"]
                seen += 1
                _show(ev, as_json)

    try:
        run(go)
    except KeyboardInterrupt:
        return


@click.command("log")
@click.argument("channel")
@click.option(
    "--verify", is_flag=True, help="Re-check every stored event instead of printing them."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event (or problem).")
@click.pass_obj
def log_cmd(obj: object, channel: str, verify: bool, as_json: bool) -> None:
    """Print the events of CHANNEL held in this node's log, in log (causal) order.

    \b
    --verify re-reads the channel from the database and checks every event: it decodes, its
    id matches, its signature and author key hold, each author's hash chain and Lamport clock
    are intact, and fork evidence is consistent. Exit code 1 when anything is wrong (each
    problem is printed: kind, detail, event id), 0 when the log is sound.
    """
    if verify:
        r = _call(obj, "log_verify", channel=channel)
        for p in r["problems"]:
            if as_json:
                click.echo(json.dumps(p))
            else:
                click.echo(f"{p['kind']}: {p['detail']} {p['event_id'] or ''}".rstrip())
        if r["problems"]:
            fail(f"{channel}: {len(r['problems'])} problem(s) in {r['events']} event(s)")
        err.print(f"{channel}: {r['events']} event(s), hash chains and signatures verified")
        return
    after, shown = 0, 0
    while True:
        r = _call(obj, "log", channel=channel, after=after)
        for ev in r["events"]:
            _show(ev, as_json)
            after = ev["position"]
            shown += 1
        if not r["events"] or after >= r["last_position"]:
            break
    if not shown:
        err.print(f"no events on {channel} in this node's log")


@click.group("blob")
def blob_group() -> None:
    """Store files as content-addressed blobs in this home, and write them back out.

    \b
    A file is cut into chunks at content-defined boundaries (so an edit changes only the
    chunks around it), each chunk is stored once under its BLAKE3 hash in <home>/blobs, and a
    manifest lists them; the blob id (64 hex) is the BLAKE3 hash of that manifest. Getting a
    blob re-checks every chunk and the whole file before the output file appears.

    \b
    Example:
      cellmesh --home A blob put report.pdf          # prints the blob id
      cellmesh --home A blob get <blob id> -o copy.pdf
    These commands work on the home directory and need no running node. Fetching a blob from
    peers is not wired yet: `get` only finds blobs stored in this home.
    """


def _blob_store(obj: object) -> FileChunkStore:
    home = _ctx(obj).home
    try:
        home.ensure()  # a new home is created 0700 like every other
    except KeystoreError as exc:
        fail(str(exc))
    return FileChunkStore(home.blobs_path)


@blob_group.command("put")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=False))
@click.pass_obj
def blob_put(obj: object, file: str) -> None:
    """Store FILE (chunked and deduplicated) and print its blob id."""
    try:
        store = _blob_store(obj)
        manifest = store.put_file(Path(file))
    except OSError as exc:
        fail(f"cannot store {file}: {exc}")
    st = store.statistics()
    click.echo(manifest.blob_id.hex())
    err.print(
        f"{manifest.total_size} bytes in {len(manifest.chunks)} chunk(s); "
        f"{st.puts} new block(s), {st.duplicates} already stored"
    )


@blob_group.command("get")
@click.argument("blob_id", metavar="HASH")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), required=True, help="File to write."
)
@click.pass_obj
def blob_get(obj: object, blob_id: str, output: str) -> None:
    """Write blob HASH (64 hex) to the file given with -o, verified chunk by chunk.

    Exit code 1 when the blob is not stored here or a chunk fails verification (nothing is
    written under the output name then).
    """
    try:
        raw = bytes.fromhex(blob_id)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        fail(f"{blob_id!r} is not a blob id (64 hex digits)")
    try:
        manifest = _blob_store(obj).export_blob(raw, Path(output))
    except FileNotFoundError:
        fail(f"blob {blob_id} is not stored in this home")
    except (ChunkMissingError, IntegrityError) as exc:
        fail(f"blob {blob_id} cannot be rebuilt: {exc}")
    except OSError as exc:
        fail(f"cannot write {output}: {exc}")
    err.print(f"wrote {manifest.total_size} bytes to {output}")
