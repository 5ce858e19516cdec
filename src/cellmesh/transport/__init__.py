"""cellmesh.transport."""
