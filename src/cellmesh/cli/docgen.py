"""Render docs/cli.md from the click commands themselves, so the reference cannot drift.

Run: python -m cellmesh.cli.docgen > docs/cli.md (a test checks the file is current).
"""

from __future__ import annotations

import inspect

import click

from cellmesh.cli.main import cli
from cellmesh.config import config_fields

INTRO = """# `cellmesh` command reference

Generated from the command definitions by `python -m cellmesh.cli.docgen`; a test keeps it current.

Global options go before the command: `cellmesh --home DIR COMMAND ...`. The home directory
(default `~/.cellmesh`, or `$CELLMESH_HOME`) holds `keystore.json` (mode 0600), `config.toml` and,
while a node runs, `control.sock` (mode 0600). Commands other than `id`, `config` and `demo` talk to
the node running on that home through its control socket.

Exit status: 0 on success; 1 on an error (one line on stderr, never a traceback); 2 when a peer is
unknown or unreachable (`ping`).
"""


def _usage(cmd: click.Command, path: list[str]) -> str:
    ctx = click.Context(cmd, info_name=" ".join(path))
    pieces = cmd.collect_usage_pieces(ctx)
    return " ".join([*path, *pieces])


def _options(cmd: click.Command) -> list[str]:
    rows = []
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            names = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            rows.append(f"| {names} | {(p.help or '').replace('|', '/')} |")
    if not rows:
        return []
    return ["| option | meaning |", "|---|---|", *rows, ""]


def _walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            _walk(cmd.commands[name], [*path, name], out)
        return
    out.append(f"## `{' '.join(path[1:])}`")
    out.append("")
    out.append(f"```\n{_usage(cmd, path)}\n```")
    out.append("")
    help_text = inspect.cleandoc((cmd.help or "").replace("\b\n", ""))
    out.append(help_text.strip())
    out.append("")
    out.extend(_options(cmd))


def render() -> str:
    """The whole reference as Markdown."""
    out = [INTRO, "## Global options", "", *_options(cli)]
    _walk(cli, ["cellmesh"], out)
    out.append("## Settings (config.toml keys, environment variables, `node` flags)")
    out.append("")
    out.append("| key | env | default | meaning |")
    out.append("|---|---|---|---|")
    for f in config_fields():
        out.append(f"| `{f.name}` | `{f.env_var}` | `{f.default!r}` | {f.doc} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
