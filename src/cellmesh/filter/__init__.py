"""cellmesh.filter."""
