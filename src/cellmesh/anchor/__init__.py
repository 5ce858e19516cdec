"""cellmesh.anchor."""
