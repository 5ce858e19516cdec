"""The `cellmesh` command.

Every command that talks to a running node goes through the local control API (node/control.py);
`node` runs the daemon in the foreground; `demo` builds a throwaway mesh on loopback.
Errors are one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics as stats_mod
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from cellmesh.cli.access_cmds import policy_group, token_group
from cellmesh.cli.anchor_cmd import anchor_cmd
from cellmesh.cli.channel_cmds import caps_cmd, channel_group, channels_cmd
from cellmesh.cli.chaos_cmd import chaos_relay
from cellmesh.cli.config_options import config_options, overrides_from
from cellmesh.cli.mesh_cmds import mesh_group
from cellmesh.cli.routing_cmds import routes_cmd, trace_cmd
from cellmesh.cli.state_cmds import (
    blob_group,
    fold_cmd,
    log_cmd,
    pub_cmd,
    query_cmd,
    sub_cmd,
)
from cellmesh.cli.sync_cmd import sync_cmd
from cellmesh.cli.transfer_cmds import cp_cmd, recv_cmd, send_cmd
from cellmesh.errors import CellmeshError, PeerUnreachableError
from cellmesh.identity.cellid import format_cell_id, parse_cell_id
from cellmesh.node.control import ControlClient, ControlServer
from cellmesh.node.home import NodeHome
from cellmesh.node.logs import configure_logging
from cellmesh.node.node import Node, discovery_settings_from, env_snapshot
from cellmesh.node.transfer import TransferService

T = TypeVar("T")
# When piped, rich would wrap at 80 columns and split CellIDs: give tables room instead.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)

EXIT_ERROR = 1
EXIT_UNREACHABLE = 2


class Ctx:
    """Options shared by every subcommand."""

    def __init__(self, home: str | None, passphrase_file: str | None) -> None:
        self.env = env_snapshot()
        self.home = NodeHome.resolve(home, self.env)
        self.passphrase_file = passphrase_file

    def passphrase(self) -> bytes | None:
        return NodeHome.read_passphrase(self.passphrase_file, self.env)


def fail(message: str, code: int = EXIT_ERROR) -> None:
    """Print one line to stderr and exit."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine, turning cellmesh errors into one-line failures."""
    try:
        return asyncio.run(coro_fn())
    except PeerUnreachableError as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    except CellmeshError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(str(exc))
    raise AssertionError("unreachable")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--home",
    metavar="DIR",
    envvar="CELLMESH_HOME",
    help="Node home directory: keystore, config.toml, control socket. "
    "[env CELLMESH_HOME; default ~/.cellmesh]",
)
@click.option(
    "--passphrase-file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Read the keystore passphrase from FILE. [env CELLMESH_PASSPHRASE holds it directly]",
)
@click.version_option(package_name="cellmesh")
@click.pass_context
def cli(ctx: click.Context, home: str | None, passphrase_file: str | None) -> None:
    """cellmesh: an identity-first encrypted mesh. A node is its key; peers are CellIDs.

    \b
    Quick start (two terminals):
      cellmesh --home /tmp/a id new
      cellmesh --home /tmp/a node --listen 127.0.0.1:7001
      cellmesh --home /tmp/b id new
      cellmesh --home /tmp/b node --listen 127.0.0.1:7002 --peer 127.0.0.1:7001
      cellmesh --home /tmp/b ping <CellID of a>

    Or see a whole mesh at once: cellmesh demo
    """
    ctx.obj = Ctx(home, passphrase_file)


# --------------------------------------------------------------------------- id


@cli.group("id")
def id_group() -> None:
    """Create and show this node's identity (Ed25519 key and CellID)."""


@id_group.command("new")
@click.option("--force", is_flag=True, help="Replace an existing identity (the old one is lost).")
@click.option(
    "--encrypt",
    is_flag=True,
    help="Encrypt the keystore with a passphrase (Argon2id). Asked for on the terminal unless "
    "--passphrase-file or CELLMESH_PASSPHRASE gives it.",
)
@click.pass_obj
def id_new(obj: Ctx, force: bool, encrypt: bool) -> None:
    """Create a new identity; prints the CellID on the last line."""
    try:
        passphrase = obj.passphrase()
        if encrypt and passphrase is None:
            text = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True)
            passphrase = text.encode()
        identity = obj.home.create_identity(passphrase, force)
        obj.home.write_default_config()
    except CellmeshError as exc:
        fail(str(exc))
        return
    err.print(f"identity written to {obj.home.keystore_path} (mode 0600)")
    err.print(f"public key: {identity.public_key.hex()}")
    click.echo(format_cell_id(identity.cell_id))


@id_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print {cell_id, public_key} as JSON.")
@click.pass_obj
def id_show(obj: Ctx, as_json: bool) -> None:
    """Show this node's CellID and public key."""
    try:
        identity = obj.home.load_identity(obj.passphrase())
    except CellmeshError as exc:
        fail(str(exc))
        return
    cell = format_cell_id(identity.cell_id)
    if as_json:
        click.echo(json.dumps({"cell_id": cell, "public_key": identity.public_key.hex()}))
    else:
        click.echo(f"cell_id:    {cell}")
        click.echo(f"public_key: {identity.public_key.hex()}")


# --------------------------------------------------------------------------- node


@cli.command("node")
@config_options
@click.pass_obj
def node_cmd(obj: Ctx, /, **flags: Any) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM.

    Settings come from (weakest first) built-in defaults, DIR/config.toml, CELLMESH_* environment
    variables and these flags. Repeat --listen and --peer for several addresses.
    """
    try:
        config = obj.home.load_config(obj.env, overrides_from(flags))
        identity = obj.home.load_identity(obj.passphrase())
        # Built here rather than in node.start() so that a bad membership certificate is a
        # one-line error before anything binds, not a failure half-way through start-up.
        discovery = discovery_settings_from(config, identity.cell_id) if config.discovery else None
    except CellmeshError as exc:
        fail(str(exc))
        return
    configure_logging(config.log_level, config.log_format)

    async def main() -> None:
        node = Node(identity, config, discovery)
        transfers = TransferService(node, obj.home.inbox_path)
        server = ControlServer(node, obj.home.control_socket_path, transfers)
        await server.start()  # first: it refuses if another node already runs on this home
        try:
            # Before the node takes packets: its start cleans partial files of a killed run.
            await transfers.start()
            await node.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, node.request_stop)
            await node.serve_forever()
        finally:
            await transfers.stop()
            await server.stop()
            await node.stop()

    run(main)


# --------------------------------------------------------------------------- control-API commands


def _call(obj: Ctx, op: str, **args: Any) -> Any:
    async def go() -> Any:
        async with ControlClient(obj.home.control_socket_path) as c:
            return await c.call(op, **args)

    return run(go)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


@cli.command("peers")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def peers_cmd(obj: Ctx, as_json: bool) -> None:
    """List peers: connected ones (address, state, RTT, path MTU, traffic, losses) and those
    discovered on the link (name, type, zone, capabilities, first seen: see --json)."""
    rows: list[dict[str, Any]] = _call(obj, "peers")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        err.print("no peers connected")
        return
    t = Table(box=None, header_style="bold")
    cols = (
        "CellID",
        "name",
        "address",
        "path",
        "state",
        "RTT",
        "MTU",
        "session age",
        "in",
        "out",
        "lost",
    )
    for col in cols:
        t.add_column(col, no_wrap=True)
    for r in rows:
        found = r.get("discovered") or {}
        connected = "session_age_s" in r
        t.add_row(
            r["cell_id"],
            str(found.get("name", "")),
            r["address"],
            r.get("path_note") or r.get("path", "-"),
            r["state"] if r["state"] == "alive" else f"[yellow]{r['state']}[/]",
            _ms(r.get("rtt_ms")),
            str(r.get("mtu", "-")),
            f"{r['session_age_s']:.0f} s" if connected else "-",
            f"{r['packets_in']} pkt / {r['bytes_in']} B" if connected else "-",
            f"{r['packets_out']} pkt / {r['bytes_out']} B" if connected else "-",
            str(r.get("packets_lost", "-")),
        )
    out.print(t)


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status_cmd(obj: Ctx, as_json: bool) -> None:
    """Show the running node: CellID, addresses, counters and drops by reason."""
    st: dict[str, Any] = _call(obj, "status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    s = st["stats"]
    out.print(f"[bold]cell_id[/]   {st['cell_id']}")
    out.print(f"[bold]listen[/]    {', '.join(st['listen'])}")
    out.print(f"[bold]uptime[/]    {st['uptime']:.0f} s")
    out.print(
        f"[bold]traffic[/]   in {s['datagrams_in']} datagrams / {s['bytes_in']} B, "
        f"out {s['datagrams_out']} / {s['bytes_out']} B"
    )
    out.print(f"[bold]sessions[/]  {s['sessions']} ({s['handshakes_completed']} handshakes)")
    drops = s["drops"]
    if drops:
        out.print("[bold]dropped[/]   " + ", ".join(f"{k}={v}" for k, v in drops.items()))
    else:
        out.print("[bold]dropped[/]   nothing")
    d = st.get("discovery")
    if d is None:
        out.print("[bold]discovery[/] off")
        return
    out.print(
        f"[bold]discovery[/] mesh {d['mesh_name']!r}, {d['peers']} peers; received "
        f"{d['received']} frames, admitted {d['admitted']}"
    )
    if d["drops"]:
        out.print("[bold]refused[/]   " + ", ".join(f"{k}={v}" for k, v in d["drops"].items()))


@cli.command("ping")
@click.argument("cell_id", metavar="CELLID")
@click.option("-c", "--count", default=4, show_default=True, help="Echo requests to send.")
@click.option("-i", "--interval", default=1.0, show_default=True, help="Seconds between requests.")
@click.option("-W", "--timeout", default=2.0, show_default=True, help="Seconds to wait per reply.")
@click.option("-s", "--size", default=0, show_default=True, help="Payload bytes per request.")
@click.pass_obj
def ping_cmd(
    obj: Ctx, cell_id: str, count: int, interval: float, timeout: float, size: int
) -> None:
    """Send encrypted echo requests to CELLID through the running node.

    Exit status: 0 when at least one reply came back, 2 when the peer is unknown or unreachable.
    """
    try:
        cell = format_cell_id(parse_cell_id(cell_id))
    except ValueError as exc:
        fail(str(exc))
        return
    if count < 1 or interval < 0 or timeout <= 0:
        fail("--count must be >= 1, --interval >= 0 and --timeout > 0")

    async def go() -> list[float]:
        rtts: list[float] = []
        last_error = ""
        async with ControlClient(obj.home.control_socket_path) as c:
            out.print(f"PING {cell}: encrypted echo, {size} bytes of payload")
            for seq in range(1, count + 1):
                try:
                    r = await c.call("ping", cell_id=cell, timeout=timeout, size=size)
                except PeerUnreachableError as exc:
                    last_error = str(exc)
                    out.print(f"seq={seq}: {exc}")
                else:
                    rtt = float(r["rtt"]) * 1000
                    rtts.append(rtt)
                    out.print(f"reply from {cell}: seq={seq} time={rtt:.3f} ms")
                if seq < count:
                    await asyncio.sleep(interval)
        loss = 100.0 * (count - len(rtts)) / count
        out.print(f"--- {cell} ping statistics ---")
        summary = f"{count} sent, {len(rtts)} received, {loss:.0f}% loss"
        if rtts:
            summary += (
                f"; rtt min/median/max = {min(rtts):.3f}/{stats_mod.median(rtts):.3f}/"
                f"{max(rtts):.3f} ms"
            )
        out.print(summary)
        if not rtts:
            raise PeerUnreachableError(last_error or f"no reply from {cell}")
        return rtts

    run(go)


@cli.command("config")
@click.option("--defaults", is_flag=True, help="Print the commented default config.toml.")
@click.pass_obj
def config_cmd(obj: Ctx, defaults: bool) -> None:
    """Show the effective settings (defaults < config.toml < CELLMESH_* variables)."""
    from cellmesh.config import config_fields, render_default_config

    if defaults:
        click.echo(render_default_config(), nl=False)
        return
    try:
        cfg = obj.home.load_config(obj.env)
    except CellmeshError as exc:
        fail(str(exc))
        return
    for f in config_fields():
        value = getattr(cfg, f.name)
        if f.name == "mesh_key" and value:
            value = "(set; not shown)"  # a secret: never printed
        click.echo(f"{f.name} = {value!r}")


@cli.command("demo")
@click.option("--nodes", default=3, show_default=True, help="How many local nodes (2-16).")
@click.option("--pings", default=5, show_default=True, help="Pings per pair.")
def demo_cmd(nodes: int, pings: int) -> None:
    """Start a local mesh on loopback, connect it, ping across, attack it, and summarise."""
    from cellmesh.cli.demo import run_demo

    if not 2 <= nodes <= 16:
        fail("--nodes must be between 2 and 16")
    if not 1 <= pings <= 1000:
        fail("--pings must be between 1 and 1000")
    ok = run(lambda: run_demo(out, nodes, pings))
    sys.exit(0 if ok else EXIT_ERROR)


cli.add_command(chaos_relay)
cli.add_command(anchor_cmd)
cli.add_command(token_group)
cli.add_command(channels_cmd)
cli.add_command(channel_group)
cli.add_command(caps_cmd)
cli.add_command(routes_cmd)
cli.add_command(trace_cmd)
cli.add_command(policy_group)
cli.add_command(cp_cmd)
cli.add_command(send_cmd)
cli.add_command(recv_cmd)
cli.add_command(pub_cmd)
cli.add_command(sub_cmd)
cli.add_command(log_cmd)
cli.add_command(fold_cmd)
cli.add_command(query_cmd)
cli.add_command(sync_cmd)
cli.add_command(blob_group)
cli.add_command(mesh_group)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="cellmesh")
