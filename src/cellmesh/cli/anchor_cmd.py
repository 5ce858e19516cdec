"""`cellmesh anchor`: who holds the anchor role on the running node's mesh, and why.

Like cli/channel_cmds.py this module does not import cli/main.py at run time (main imports it);
it reuses transfer_cmds' `run` and `fail`, which behave exactly like main's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from cellmesh.cli.transfer_cmds import fail, out, run
from cellmesh.node.control import ControlClient

if TYPE_CHECKING:
    from cellmesh.cli.main import Ctx


def _ctx(obj: object) -> Ctx:
    from cellmesh.cli.main import Ctx

    assert isinstance(obj, Ctx)
    return obj


def _status(obj: object) -> dict[str, Any]:
    ctx = _ctx(obj)

    async def go() -> Any:
        async with ControlClient(ctx.home.control_socket_path) as c:
            return await c.call("anchor")

    result: dict[str, Any] = run(go)
    return result


def _anchor_line(st: dict[str, Any]) -> str:
    anchor = st.get("anchor")
    if anchor is None:
        return "none yet"
    parts = [str(anchor)]
    if st.get("anchor_is_self"):
        parts.append("(this node)")
    if st.get("anchor_name"):
        parts.append(f"{st['anchor_name']!r}")
    if st.get("anchor_address"):
        parts.append(f"at {st['anchor_address']}")
    return " ".join(parts)


@click.command("anchor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (never the key).")
@click.pass_obj
def anchor_cmd(obj: object, as_json: bool) -> None:
    """Show the mesh's anchor: who holds the role, the epoch, and why.

    One member of the mesh, the anchor, is chosen by a deterministic rule instead of a vote:
    every member ranks the members it knows (the peers discovery admitted, and itself) by
    ego (config `ego`, 0-100), then seniority (how long it has known them, in 60 s steps),
    then a tie-break hash of the CellID mixed with the epoch number, and the top one takes the
    role. The anchor pulses every 5 s (signed, and MACed under the epoch key) and makes a fresh
    epoch key every 60 s, which it sends to each member sealed to that member's own key and
    signed: the key never crosses the link in the clear. A member that starts asks for the
    current key at once (REQ_EPOCH). When the anchor misses three pulses, the next member by
    the rule takes over and starts a new epoch; a returning anchor must be heard for a hold
    period before it gets the role back.

    Shows the anchor's CellID, this node's role (listening, electing, follower, anchor) and
    rank in its own election order (1: it would be anchor), the term (the epoch that opened
    the anchor's tenure), the epoch number and the key's age (never the key), the member
    count, and the reason for the current choice. The anchor runs beside discovery, with
    `anchor = true` (the default); `--anchor-pulse-interval` and `--anchor-epoch-seconds` of
    `cellmesh node` set its timing. Exit status 1 (or "running": false with --json) when this
    node takes no part in the election.
    """
    st = _status(obj)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    if not st.get("running"):
        fail(f"no anchor election on this node: {st.get('why', 'not running')}")
    settings = st.get("settings", {})
    out.print(f"[bold]anchor[/]    {_anchor_line(st)}")
    out.print(
        f"[bold]role[/]      {st['role']}" + ("" if st.get("eligible") else " (not eligible)")
    )
    out.print(f"[bold]term[/]      {'-' if st['term'] is None else st['term']}")
    if st["epoch"] is None:
        out.print("[bold]epoch[/]     no key yet")
    else:
        out.print(
            f"[bold]epoch[/]     {st['epoch']}, key {st['key_age_s']:.1f} s old "
            f"(a new one every {settings.get('epoch_seconds', 60):g} s)"
        )
    rank = "-" if st["rank"] is None else str(st["rank"])
    out.print(
        f"[bold]rank[/]      {rank} (ego {st['ego']}, seniority level {st['seniority_level']})"
    )
    out.print(f"[bold]members[/]   {st['members']} (this node included)")
    out.print(f"[bold]reason[/]    {st['reason']}", soft_wrap=True)
    stats = st.get("stats", {})
    sent = ", ".join(f"{k}={v}" for k, v in sorted(stats.get("sent", {}).items())) or "nothing"
    out.print(
        f"[bold]traffic[/]   sent {sent}; received {stats.get('messages_received', 0)}; "
        f"failovers {stats.get('failovers', 0)}"
    )
    drops = ", ".join(f"{k}={v}" for k, v in sorted(st.get("drops", {}).items())) or "nothing"
    out.print(f"[bold]dropped[/]   {drops}")
