"""cellmesh.cli."""
