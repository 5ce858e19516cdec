"""The namespace tests' shared fixture: a fresh `Topology`, torn down after the test.

These tests need root, iproute2 and nftables (make test installs them); without them they fail
with the reason, never skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cellmesh.testing.netns import NetnsUnavailable, Topology, require_netns


@pytest.fixture
def topology() -> Iterator[Topology]:
    try:
        require_netns()
    except NetnsUnavailable as exc:
        pytest.fail(f"cannot run namespace tests: {exc}")
    with Topology() as topo:
        yield topo
