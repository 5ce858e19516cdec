"""`cellmesh sync CHANNEL`: reconcile a channel's log with its hosts now (node/state_sync.py).

Like the other state commands it talks to the running node over the control socket; the node
runs the sessions and answers with one report per peer.
"""

from __future__ import annotations

import json
from typing import Any

import click

from cellmesh.cli.channel_cmds import _call
from cellmesh.cli.transfer_cmds import err, fail, out


@click.command("sync")
@click.argument("channel")
@click.option(
    "--with",
    "peer",
    metavar="CELLID",
    help="Sync with this peer only (default: every host this node subscribes to CHANNEL at).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=3600),
    default=60.0,
    show_default=True,
    help="Seconds to wait for each session to finish.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per peer.")
@click.pass_obj
def sync_cmd(obj: object, channel: str, peer: str | None, timeout: float, as_json: bool) -> None:
    """Reconcile CHANNEL's log with its host(s) now, and say what moved.

    \b
    The node already syncs on its own: when a subscription is granted (a late subscriber
    catches up), when a live event arrives whose predecessors it lacks, and every
    `sync_interval` seconds (config, default 30). This command runs a session at once, e.g.
    after a partition healed. Sessions compare range fingerprints, so the bytes exchanged
    grow with the difference between the two logs, not with their size; every event
    received is verified (signature, hash chain, clock) before it is stored.

    \b
    The peer must let us read CHANNEL (we subscribed to it there: `cellmesh sub CHANNEL
    --at CELLID` or `channel sub`); it takes our events only if it granted us publishing.

    \b
    Exit codes: 0 every session completed, 1 a session failed or a peer refused.

    \b
    Example:
      cellmesh --home B sync chat/room
      synced chat/room with 3f2a…: +5 events in, 0 out, 1.2 kB in / 0.3 kB out, 4 ms
    """
    args: dict[str, Any] = {"channel": channel, "timeout": timeout}
    if peer:
        args["peer"] = peer
    r = _call(obj, "sync", **args)
    failed = 0
    for res in r["results"]:
        if as_json:
            click.echo(json.dumps(res))
        if "error" in res:
            failed += 1
            if not as_json:
                err.print(f"[red]sync with {res['peer'][:12]}… failed:[/] {res['error']}")
            continue
        if not as_json:
            out.print(
                f"synced {channel} with {res['peer'][:12]}…: +{res['events_new']} events in, "
                f"{res['events_sent']} out, {res['bytes_received'] / 1000:.1f} kB in / "
                f"{res['bytes_sent'] / 1000:.1f} kB out, {res['seconds'] * 1000:.0f} ms"
                + ("" if res["complete"] else " (incomplete: run again)")
            )
    if failed:
        fail(f"{failed} of {len(r['results'])} sync session(s) failed")
