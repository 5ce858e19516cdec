"""docs/cli.md is generated from the commands; it must match what the code says today."""

from __future__ import annotations

from pathlib import Path

from cellmesh.cli.docgen import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_cli_reference_is_current() -> None:
    assert DOC.read_text() == render(), (
        "docs/cli.md is stale: run `.venv/bin/python -m cellmesh.cli.docgen > docs/cli.md`"
    )
