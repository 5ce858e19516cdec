"""cellmesh.wire."""
