"""CLI flags generated from `NodeConfig`, so the flags, the TOML keys and the env vars never drift.

Each field becomes `--field-name` (tuple fields named in the plural become a repeatable singular flag:
`peers` -> `--peer`, `capabilities` -> `--capability`), with its docstring as help text and its environment variable named in the help.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from cellmesh.config import config_fields

F = TypeVar("F", bound=Callable[..., Any])


def _singular(name: str) -> str:
    """The singular of a plural field name, for a repeatable flag that takes one item.

    Only the last word changes: `capabilities` -> `capability`, `mesh_authorities` ->
    `mesh_authority`, `peers` -> `peer`; names that are not plurals (`listen`, `allowlist`, or
    one ending in "ss") are kept, so no flag gets a truncated name like `--capabilitie`.
    """
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith("s") and not name.endswith("ss"):
        return name[:-1]
    return name


def _flag_name(name: str, is_tuple: bool) -> str:
    base = _singular(name) if is_tuple else name
    return "--" + base.replace("_", "-")


def config_options(fn: F) -> F:
    """Decorate a click command with one option per NodeConfig field."""
    for f in reversed(config_fields()):
        is_tuple = f.type_name.startswith("tuple")
        flag = _flag_name(f.name, is_tuple)
        meta = "HOST:PORT" if f.name in ("listen", "peers") else None
        help_text = f"{f.doc} [env {f.env_var}; default {f.default!r}]"
        if is_tuple:
            opt = click.option(flag, f.name, multiple=True, metavar=meta, help=help_text)
        elif f.type_name == "bool":
            base = f.name.replace("_", "-")
            opt = click.option(f"--{base}/--no-{base}", f.name, default=None, help=help_text)
        else:
            opt = click.option(flag, f.name, default=None, metavar=meta, help=help_text)
        fn = opt(fn)
    return fn


def overrides_from(flags: dict[str, Any]) -> dict[str, object]:
    """The flags the user actually gave (unset ones are None or empty and are left out)."""
    out: dict[str, object] = {}
    for f in config_fields():
        v = flags.get(f.name)
        if v is None or (isinstance(v, tuple) and not v):
            continue
        out[f.name] = v
    return out
