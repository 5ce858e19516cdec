"""cellmesh.web."""
