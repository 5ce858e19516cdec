"""The gateway cache: bounded, least-recently-used eviction, age limit."""

from __future__ import annotations

import pytest

from cellmesh.errors import LocalProtocolError
from cellmesh.routing import GatewayCache

Addr = tuple[str, int]


def cell(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_learn_and_lookup() -> None:
    g: GatewayCache[Addr] = GatewayCache(capacity=4)
    assert g.learn_gateway(cell(1), ("198.18.0.1", 19541), 10.0) is None
    assert g.lookup(cell(1), 11.0) == ("198.18.0.1", 19541)
    assert g.lookup(cell(2), 11.0) is None
    e = g.get(cell(1), 12.0)
    assert e is not None
    assert (e.learned_at, e.last_used, e.hits) == (10.0, 11.0, 1)
    st = g.statistics()
    assert (st.entries, st.learned, st.hits, st.misses) == (1, 1, 1, 1)


def test_a_new_handshake_replaces_the_old_path() -> None:
    g: GatewayCache[Addr] = GatewayCache(capacity=2)
    g.learn_gateway(cell(1), ("198.18.0.1", 1), 0.0)
    g.learn_gateway(cell(1), ("198.18.0.2", 2), 5.0)  # roamed
    assert len(g) == 1
    assert g.lookup(cell(1), 6.0) == ("198.18.0.2", 2)


def test_eviction_is_least_recently_used() -> None:
    g: GatewayCache[str] = GatewayCache(capacity=3)
    for i in range(1, 4):
        g.learn_gateway(cell(i), f"via{i}", float(i))
    g.lookup(cell(1), 5.0)  # 1 is used: 2 is now the oldest
    evicted = g.learn_gateway(cell(4), "via4", 6.0)
    assert evicted is not None
    assert evicted.cell == cell(2)
    assert cell(2) not in g
    assert [e.cell for e in g.entries()] == [cell(3), cell(1), cell(4)]
    g.get(cell(3), 7.0)  # get does not count as use
    assert g.learn_gateway(cell(5), "via5", 8.0).cell == cell(3)  # type: ignore[union-attr]
    assert g.statistics().evicted == 2
    assert len(g) == 3


def test_entries_age_out() -> None:
    g: GatewayCache[str] = GatewayCache(capacity=8, max_age=100.0)
    g.learn_gateway(cell(1), "a", 0.0)
    g.learn_gateway(cell(2), "b", 50.0)
    assert g.lookup(cell(1), 99.0) == "a"
    assert g.lookup(cell(1), 100.0) is None  # learned 100 s ago: stale even though used
    assert g.expire(149.0) == 0
    assert g.expire(150.0) == 1
    assert len(g) == 0
    assert g.statistics().expired == 2


def test_forget_and_validation() -> None:
    g: GatewayCache[str] = GatewayCache(capacity=1, max_age=None)
    g.learn_gateway(cell(1), "a", 0.0)
    assert g.expire(1e9) == 0
    assert g.forget(cell(1))
    assert not g.forget(cell(1))
    with pytest.raises(LocalProtocolError):
        g.learn_gateway(b"short", "a", 0.0)
    with pytest.raises(ValueError, match="capacity"):
        GatewayCache(capacity=0)
    with pytest.raises(ValueError, match="max_age"):
        GatewayCache(max_age=0.0)
