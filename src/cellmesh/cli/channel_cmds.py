"""`cellmesh channels`, `cellmesh channel ...`, `cellmesh caps`: live channels on a running node.

Like cli/transfer_cmds.py this module does not import cli/main.py at run time (main imports it);
it reuses transfer_cmds' `run` and `fail`, which behave exactly like main's, plus exit code 3
when a peer refuses a channel request.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from cellmesh.cli.transfer_cmds import err, fail, out, run
from cellmesh.errors import AccessDeniedError
from cellmesh.node.control import ControlClient

if TYPE_CHECKING:
    from cellmesh.cli.main import Ctx

EXIT_DENIED = 3


def _ctx(obj: object) -> Ctx:
    from cellmesh.cli.main import Ctx

    assert isinstance(obj, Ctx)
    return obj


def _chain_hex(path: str | None) -> list[str]:
    """The token chain file's lines (hex tokens, root first), as `token issue` writes them."""
    if path is None:
        return []
    try:
        lines = Path(path).read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}")
    if not lines:
        fail(f"{path}: no token in the file")
    return lines


def _call(obj: object, op: str, **args: Any) -> Any:
    ctx = _ctx(obj)

    async def go() -> Any:
        async with ControlClient(ctx.home.control_socket_path) as c:
            return await c.call(op, **args)

    return run(go)


def _call_or_deny(obj: object, op: str, **args: Any) -> Any:
    """Like `_call`, but a refusal exits with code 3 and the peer's reason."""
    ctx = _ctx(obj)

    async def go() -> Any:
        async with ControlClient(ctx.home.control_socket_path) as c:
            try:
                return await c.call(op, **args)
            except AccessDeniedError as exc:
                fail(f"{exc} [reason: {exc.reason}]", EXIT_DENIED)

    return run(go)


@click.command("channels")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def channels_cmd(obj: object, as_json: bool) -> None:
    """Show channels: what this node hosts, who subscribes and publishes, policy state, drops."""
    st: dict[str, Any] = _call(obj, "channels")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    out.print("[bold]hosted[/]         " + (", ".join(st["declared"]) or "none"))
    pol = st["policy"]
    if pol["file"]:
        line = f"{pol['file']} ({pol['rules']} rules, {pol['reloads']} reloads"
        line += f", {pol['errors']} errors)" if pol["errors"] else ")"
        out.print(f"[bold]policy[/]         {line}")
        if pol["last_error"]:
            out.print(f"[bold red]policy error[/]   {pol['last_error']} (previous policy in force)")
    else:
        out.print("[bold]policy[/]         none (declarations and tokens decide)")
    t = Table(box=None, header_style="bold")
    for col in ("relation", "channel", "peer"):
        t.add_column(col, no_wrap=True)
    rows = [
        ("subscriber (to us)", "subscribers"),
        ("subscribed (at peer)", "subscriptions"),
        ("may publish (to us)", "publish_grants_given"),
        ("we may publish (at peer)", "publish_grants_held"),
    ]
    for label, key in rows:
        for r in st[key]:
            t.add_row(label, r["channel"], r["peer"])
    if t.row_count:
        out.print(t)
    refusals = ", ".join(f"{k}={v}" for k, v in st["refusals"].items()) or "none"
    drops = ", ".join(f"{k}={v}" for k, v in st["drops"].items()) or "none"
    out.print(f"[bold]refused[/]        {refusals}")
    out.print(f"[bold]dropped[/]        {drops}")
    out.print(f"[bold]delivered[/]      {st['delivered']} (forwarded {st['forwarded']})")


@click.group("channel")
def channel_group() -> None:
    """Host, subscribe to and publish on live channels of a running node.

    \b
    A channel is a name like telemetry/engine-3. A node hosts the channels its config declares
    (channels = ["telemetry/** token"]) or `channel declare` adds; peers ask it for the
    subscribe or publish right, showing a permission token (`cellmesh token issue`) when the
    declaration says `token`. The ring-1 policy (policy_file) has the last word.

    \b
    Example: A hosts, B subscribes with a token A issued:
      cellmesh --home A channel declare 'telemetry/**' --access token
      cellmesh --home A token issue <CellID of B> 'telemetry/**' --rights subscribe -o b.tok
      cellmesh --home B channel sub <CellID of A> telemetry/engine-3 --token b.tok --count 1
      cellmesh --home A channel pub telemetry/engine-3 'rpm=3000'
    """


@channel_group.command("declare")
@click.argument("pattern")
@click.option(
    "--access",
    type=click.Choice(["token", "open"]),
    default="token",
    show_default=True,
    help="token: peers need a permission token; open: only the policy decides.",
)
@click.option(
    "--visibility",
    type=click.Choice(["mesh", "local"]),
    default="mesh",
    show_default=True,
    help="local: invisible to peers (only this node's applications).",
)
@click.pass_obj
def channel_declare(obj: object, pattern: str, access: str, visibility: str) -> None:
    """Host channels matching PATTERN (segments, '*' = one, trailing '**' = any depth)."""
    r = _call(obj, "channel_declare", pattern=pattern, access=access, visibility=visibility)
    err.print(f"hosting {r['declared']}")


@channel_group.command("sub")
@click.argument("peer", metavar="CELLID")
@click.argument("channel")
@click.option("--token", "token_file", type=click.Path(dir_okay=False), help="Token chain file.")
@click.option("--count", type=int, default=0, help="Exit after COUNT messages (0: never).")
@click.option(
    "--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the answer."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@click.pass_obj
def channel_sub(
    obj: object,
    peer: str,
    channel: str,
    token_file: str | None,
    count: int,
    timeout: float,
    as_json: bool,
) -> None:
    """Subscribe to CHANNEL at CELLID and print its messages as they arrive.

    Exit codes: 0 done, 1 error, 2 peer unreachable, 3 the peer refused (the reason is printed:
    token_required, untrusted_root, expired, revoked, wrong_subject, policy_drop, ...).
    """
    ctx = _ctx(obj)
    chain = _chain_hex(token_file)

    async def go() -> None:
        async with ControlClient(ctx.home.control_socket_path) as c:
            try:
                await c.call("subscribe", peer=peer, channel=channel, chain=chain, timeout=timeout)
            except AccessDeniedError as exc:
                fail(f"{exc} [reason: {exc.reason}]", EXIT_DENIED)
            err.print(f"subscribed to {channel} at {peer}")
            seen = 0
            while count == 0 or seen < count:
                msg = await c.call("channel_recv", channel=channel, timeout=3600)
                if msg is None:
                    continue
                seen += 1
                data = base64.b64decode(msg["data_b64"])
                if as_json:
                    click.echo(json.dumps(msg))
                else:
                    text = data.decode("utf-8", "backslashreplace")
                    click.echo(f"{msg['peer'][:12]}… {msg['channel']}: {text}")
                sys.stdout.flush()

    try:
        run(go)
    except KeyboardInterrupt:
        return


@channel_group.command("unsub")
@click.argument("peer", metavar="CELLID")
@click.argument("channel")
@click.pass_obj
def channel_unsub(obj: object, peer: str, channel: str) -> None:
    """Leave the subscription to CHANNEL at CELLID."""
    r = _call(obj, "unsubscribe", peer=peer, channel=channel)
    if not r["was_subscribed"]:
        fail(f"not subscribed to {channel} at {peer}")


@channel_group.command("pub")
@click.argument("channel")
@click.argument("data", default="-")
@click.option(
    "--to",
    "peer",
    metavar="CELLID",
    help="First ask CELLID for the right to publish into its CHANNEL (with --token).",
)
@click.option("--token", "token_file", type=click.Path(dir_okay=False), help="Token chain file.")
@click.option("--unreliable", is_flag=True, help="Send as datagrams (no retransmission).")
@click.pass_obj
def channel_pub(
    obj: object,
    channel: str,
    data: str,
    peer: str | None,
    token_file: str | None,
    unreliable: bool,
) -> None:
    """Publish DATA (or stdin with '-') on CHANNEL to every peer entitled to it."""
    payload = sys.stdin.buffer.read() if data == "-" else data.encode()
    if peer is not None:
        _call_or_deny(
            obj, "request_publish", peer=peer, channel=channel, chain=_chain_hex(token_file)
        )
    elif token_file is not None:
        fail("--token needs --to CELLID (the peer that hosts the channel)")
    r = _call(
        obj,
        "publish",
        channel=channel,
        data_b64=base64.b64encode(payload).decode(),
        unreliable=unreliable,
    )
    err.print(f"published {len(payload)} bytes on {channel} to {r['sent_to']} peer(s)")
    if r["sent_to"] == 0:
        err.print("nobody is subscribed to it here and no peer granted us publishing into it")


@click.command("caps")
@click.option("--find", "find", metavar="TAG[=VALUE]", help="List the nodes offering TAG.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def caps_cmd(obj: object, find: str | None, as_json: bool) -> None:
    """Show capabilities (this node's and its peers' signed adverts), or find nodes by one.

    This node's capabilities come from its config (capabilities = ["storage", "gpu=a100"]);
    peers exchange their adverts when a session starts.
    """
    r = _call(obj, "caps", find=find) if find else _call(obj, "caps")
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    if find:
        if not r["found"]:
            err.print(f"no known node offers {find}")
        for cell in r["found"]:
            click.echo(cell)
        return
    own = ", ".join(f"{k}={v}" if v else k for k, v in r["own"].items()) or "none"
    out.print(f"[bold]this node[/]  {own}")
    for tag, cells in r["known"].items():
        out.print(f"[bold]{tag}[/]  " + ", ".join(c[:12] + "…" for c in cells))


def reload_policy(obj: object) -> None:
    """`cellmesh policy reload`: ask the running node to reload its policy file now."""
    r = _call(obj, "policy_reload")
    err.print(f"policy reloaded from {r['reloaded']}")


def announce_revocation(obj: object, file: str) -> None:
    """`cellmesh token announce`: honour a revocation on the running node and pass it on."""
    try:
        lines = Path(file).read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {exc}")
    if len(lines) != 1:
        fail(f"{file}: expected one revocation line, found {len(lines)}")
    r = _call(obj, "revoke", revocation=lines[0])
    err.print("revocation recorded and sent to every peer" if r["new"] else "already known")
