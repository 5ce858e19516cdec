"""cellmesh.sim."""
