"""cellmesh.discovery."""
