"""cellmesh.routing."""
