"""cellmesh.identity."""
