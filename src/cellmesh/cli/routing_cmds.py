"""`cellmesh routes` and `cellmesh trace`: the mesh routing table and hop-by-hop paths.

Like cli/channel_cmds.py this module does not import cli/main.py at run time.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from cellmesh.cli.channel_cmds import _call
from cellmesh.cli.transfer_cmds import err, fail, out


@click.command("routes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--nat", is_flag=True, help="Also show neighbours, relay counters and NAT type.")
@click.pass_obj
def routes_cmd(obj: object, as_json: bool, nat: bool) -> None:
    """Show the routing table: for every CellID the mesh can reach, the next hop (a direct
    neighbour), the additive metric (link costs from RTT and loss), hop count and freshness.

    Routes come from a distance-vector protocol with loop-free feasibility checks between
    direct neighbours (docs/routing.md); peers without a direct path are reached through the
    next hop, which relays without ever decrypting.
    """
    rows: list[dict[str, Any]] = _call(obj, "routes")
    extra: dict[str, Any] | None = _call(obj, "routing") if nat or as_json else None
    if as_json:
        click.echo(json.dumps({"routes": rows, "routing": extra}, indent=2))
        return
    if not rows:
        err.print("no routes: this node has no neighbours yet (or routing is off)")
    else:
        t = Table(box=None, header_style="bold")
        for col in ("destination", "next hop", "hops", "metric", "seqno", "age", "expires"):
            t.add_column(col, no_wrap=True)
        for r in rows:
            direct = r["hops"] == 1
            t.add_row(
                r["destination"],
                "direct" if direct else r["next_hop"],
                str(r["hops"]),
                str(r["metric"]),
                str(r["seqno"]),
                f"{r['age_s']:.0f} s",
                f"{r['expires_in_s']:.0f} s",
            )
        out.print(t)
    if extra is not None:
        n = extra["nat"]
        out.print(f"[bold]NAT[/]        {n['type']}: {n['reason']}")
        if n["reflexive"]:
            out.print(f"[bold]seen as[/]    {', '.join(n['reflexive'])}")
        out.print(f"[bold]relayed[/]    {extra['relayed']['total']} frames for others")


@click.command("trace")
@click.argument("cell_id", metavar="CELLID")
@click.option("--max-hops", default=16, show_default=True, help="Give up after this many hops.")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for each hop.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def trace_cmd(obj: object, cell_id: str, max_hops: int, timeout: float, as_json: bool) -> None:
    """Show the path to CELLID hop by hop, with the round-trip time to each hop (a traceroute
    for the mesh). Each probe travels through the same relays as traffic does and is answered
    by the node where its hop limit runs out; `*` marks a hop that did not answer in time."""
    hops: list[dict[str, Any]] = _call(
        obj, "trace", cell_id=cell_id, max_hops=max_hops, timeout=timeout
    )
    if as_json:
        click.echo(json.dumps(hops, indent=2))
    else:
        for h in hops:
            if h["cell_id"] is None:
                click.echo(f"{h['ttl']:>3}  *")
            else:
                click.echo(f"{h['ttl']:>3}  {h['cell_id']}  {h['rtt_ms']:.3f} ms")
    if not hops or hops[-1]["cell_id"] != cell_id.lower():
        fail(f"{cell_id} not reached within {max_hops} hops", 2)
