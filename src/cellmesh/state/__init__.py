"""cellmesh.state."""
