"""cellmesh.gossip."""
