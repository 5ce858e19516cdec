"""Test tooling that ships with cellmesh: network namespaces for multi-host tests."""
