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
import time
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    Progress,
    TaskID,
)

from cellmesh.cli.channel_cmds import EXIT_DENIED, _call, _chain_hex, _ctx
from cellmesh.cli.transfer_cmds import byte_progress, err, fail, run
from cellmesh.errors import AccessDeniedError, CellmeshError, ControlError
from cellmesh.identity.cellid import format_cell_id, parse_cell_id
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
      cellmesh --home B blob get <blob id> -o copy.pdf --from <CellID of A>
    `put`, and `get` of a blob stored here, work on the home directory and need no running
    node. `get` of a blob not stored here asks the running node to fetch it from its peers
    (docs/blobs_sync.md); the store is config `blob_dir` (default <home>/blobs).
    """


def _blob_store(obj: object) -> FileChunkStore:
    ctx = _ctx(obj)
    try:
        ctx.home.ensure()  # a new home is created 0700 like every other
        blob_dir = ctx.home.load_config(ctx.env).blob_dir
    except CellmeshError as exc:
        fail(str(exc))
    if not blob_dir:
        fail("no blob store: config blob_dir is empty")
    return FileChunkStore(Path(blob_dir))


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
@click.option(
    "--from",
    "peers",
    metavar="CELLID",
    multiple=True,
    help="Fetch from this peer (repeat for several; default: every connected peer).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=86400),
    default=None,
    help="Give up fetching after this many seconds (default: when no peer can serve it).",
)
@click.pass_obj
def blob_get(
    obj: object, blob_id: str, output: str, peers: tuple[str, ...], timeout: float | None
) -> None:
    """Write blob HASH (64 hex) to the file given with -o, verified chunk by chunk.

    \b
    A blob stored in this home is written at once. Otherwise the running node fetches it
    from the peers given with --from (or every connected peer), several at once, checking
    every block's BLAKE3 as it arrives; a peer that sends a corrupt block is dropped from the
    fetch and its blocks are fetched from the others. Fetched blocks stay in the store (a new
    attempt resumes; the node serves them to others). Progress goes to stderr.

    Exit code 1 when the blob cannot be had (the error names what each peer answered: not
    found, refused, timed out, corrupt) or fails verification; nothing is written under the
    output name then.
    """
    try:
        raw = bytes.fromhex(blob_id)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        fail(f"{blob_id!r} is not a blob id (64 hex digits)")
    try:
        cells = [format_cell_id(parse_cell_id(p)) for p in peers]
    except ValueError as exc:
        fail(f"bad --from: {exc}")
    out = Path(output).absolute()
    reason = "is not stored in this home"
    try:
        manifest = _blob_store(obj).export_blob(raw, out)
    except FileNotFoundError:
        pass
    except (ChunkMissingError, IntegrityError) as exc:
        reason = f"cannot be rebuilt from this home ({exc})"
    except OSError as exc:
        fail(f"cannot write {output}: {exc}")
    else:
        err.print(f"wrote {manifest.total_size} bytes to {output}")
        return
    socket_path = _ctx(obj).home.control_socket_path

    async def go() -> dict[str, Any]:
        try:
            async with ControlClient(socket_path) as c:
                with _FetchProgress(blob_id[:12]) as progress:
                    return await c.blob_fetch(
                        raw.hex(), str(out), cells or None, timeout, progress.update
                    )
        except ControlError as exc:
            # The node's own words (which peer answered what), or why there is no node.
            fail(f"blob {blob_id} {reason}, and fetching it from peers failed: {exc}")

    r = run(go)
    served = [p for p in r["peers"] if p["blocks"]]
    seconds = float(r["seconds"])
    rate = f", {r['bytes_fetched'] / seconds / 1e6:.2f} MB/s" if seconds > 0 else ""
    err.print(
        f"fetched {r['bytes_fetched']} bytes in {r['blocks_fetched']} block(s) from "
        f"{len(served)} peer(s) in {seconds:.2f} s{rate}; wrote {r['bytes']} bytes to {output}",
        soft_wrap=True,
    )
    for p in r["peers"]:
        if p["status"] == "banned":
            err.print(f"peer {p['cell_id']} dropped from the fetch: {p['detail']}", soft_wrap=True)


class _FetchProgress:
    """`blob get` progress: a rich bar on a terminal, a plain line a second otherwise."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last = 0.0

    def __enter__(self) -> _FetchProgress:
        if err.is_terminal:
            self._bar = byte_progress()
            self._bar.start()
            self._task = self._bar.add_task(f"fetching {self._name}", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, line: dict[str, Any]) -> None:
        done = int(line.get("progress") or 0)
        total = line.get("total")
        total_n = int(total) if isinstance(total, int) and total > 0 else None
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total_n)
            return
        now = time.monotonic()
        if now - self._last < 1.0:
            return
        self._last = now
        share = f" ({100 * done / total_n:.0f}%)" if total_n else ""
        err.print(f"fetching: {done} of {total_n or '?'} bytes{share}", soft_wrap=True)


_FOLD_FORMATS = """\b
Built-in folds (every channel has them; event payloads are UTF-8 JSON, anything else is
counted as ignored, never an error):
  counter  payload empty (counts 1) or an integer (5, -2)      value: the sum
  lww      {"set": {KEY: VALUE, ...}, "del": [KEY, ...]}       value: the live map
  set      {"add": [ELEMENT, ...], "remove": [ELEMENT, ...]}   value: the elements
  latest   a JSON object with a string member "key"            value: latest object per key
Conflicts are settled by causal order (then Lamport clock and event id), so every replica
holding the same events computes the same value. Folds registered in Python on the node
(node.state.folds.register) are addressed by their name too.

\b
--key K selects one key: lww gives its value (null when absent or deleted), latest its
record, set whether element K is present (K is JSON text such as 5 or '"5"'; text that is
not JSON is the string itself). A counter has no keys."""


_FOLD_HELP = """Print the value of fold NAME over this node's log of CHANNEL.

\b
The running node brings the fold up to date with every event delivered to its log so far
(its own and its peers', see `cellmesh pub`/`sub`) and prints the value as JSON on stdout;
stderr says how many events it reflects and the log position of the last one. Only this
node's log is read: `cellmesh query` asks the peers holding CHANNEL too.

\b
Example:
  cellmesh --home A pub app/doc '{"set": {"title": "draft"}}'
  cellmesh --home A fold app/doc lww                  # {"title": "draft"}
  cellmesh --home A fold app/doc lww --key title      # "draft"
Exit codes: 0 printed, 1 error (unknown fold, a key on a counter, no node).
"""

_QUERY_HELP = """Print fold NAME of CHANNEL merged over this node and the peers that hold CHANNEL.

\b
The node evaluates the fold on its own log and asks, all at once, every peer holding
CHANNEL from its point of view: peers subscribed to CHANNEL here, hosts it subscribed to,
hosts that let it publish into CHANNEL. A peer answers only if CHANNEL is shared with
this node (subscribed either way, or this node publishes into it there). lww, set and
latest merge entry by entry (the causally latest write of each key wins, deletions
included), which is exactly the value of one replica holding all their events together;
a counter (and a Python fold) takes the answer of the replica that applied the most events.

\b
stdout: the merged value as JSON. stderr: how many replicas were merged, and the peers
that timed out or refused (with the reason: not_entitled, unknown_fold, fold_mismatch,
unreachable, bad_answer, ...). Answers are capped at 256 KiB; a cut one is named.
Exit codes: 0 printed (even if some peers did not answer), 1 error.
"""


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@click.command("fold", help=_FOLD_HELP + "\n" + _FOLD_FORMATS)
@click.argument("channel")
@click.argument("name")
@click.option("--key", metavar="K", help="Only this key (lww, latest, set; see above).")
@click.option("--json", "as_json", is_flag=True, help="The node's whole answer as one JSON object.")
@click.pass_obj
def fold_cmd(obj: object, channel: str, name: str, key: str | None, as_json: bool) -> None:
    """Print the value of fold NAME over this node's log of CHANNEL (`_FOLD_HELP`)."""
    r = _call(obj, "fold", channel=channel, fold=name, key=key)
    if as_json:
        click.echo(_compact(r))
        return
    click.echo(_compact(r["value"]))
    err.print(f"{name} on {channel}: {r['events']} event(s), log position {r['position']}")


@click.command("query", help=_QUERY_HELP + "\n" + _FOLD_FORMATS)
@click.argument("channel")
@click.argument("name")
@click.option("--key", metavar="K", help="Only this key (lww, latest, set; see above).")
@click.option(
    "--timeout",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds to wait for the peers' answers (one deadline for all, at most 60).",
)
@click.option("--json", "as_json", is_flag=True, help="The node's whole answer as one JSON object.")
@click.pass_obj
def query_cmd(
    obj: object, channel: str, name: str, key: str | None, timeout: float, as_json: bool
) -> None:
    """Print fold NAME of CHANNEL merged over the replicas (`_QUERY_HELP`)."""
    r = _call(obj, "query", channel=channel, fold=name, key=key, timeout=timeout)
    if as_json:
        click.echo(_compact(r))
        return
    click.echo(_compact(r["value"]))
    how = "merged by stamp" if r["strategy"] == "stamp" else f"taken from {r['chosen']}"
    err.print(
        f"{name} on {channel}: {r['replicas']} replica(s) ({how}); "
        f"{len(r['answered'])} peer(s) answered"
    )
    for peer in r["timed_out"]:
        err.print(f"  {peer}: no answer within {timeout:g} s")
    for peer, reason in r["refused"].items():
        err.print(f"  {peer}: refused ({reason})")
    for peer in r["truncated"]:
        err.print(f"  {peer}: answer truncated; its entries beyond the cut are missing")
