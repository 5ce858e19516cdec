"""`python -m cellmesh` runs the CLI."""

from cellmesh.cli.main import main

main()
