"""cellmesh.node."""
