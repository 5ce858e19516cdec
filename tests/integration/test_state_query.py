"""Folds through the node and federated queries between real nodes on loopback: answers from
the replicas holding a channel merge into the fold over the union of their events; a peer not
entitled refuses, a silent one times out; garbage requests and answers cost nothing but a
refusal or a counted drop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cellmesh.config import NodeConfig
from cellmesh.errors import CellmeshError, LocalProtocolError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.identity.keys import Identity
from cellmesh.node import state_folds
from cellmesh.node.node import Node
from cellmesh.node.streams import Stream
from cellmesh.state.folds import (
    JSON,
    Counter,
    Fold,
    FoldEngine,
    FoldError,
    FunctionFold,
    InMemoryFoldStates,
    LatestPerKey,
    LwwMap,
)
from cellmesh.state.log import InMemoryLogStore, StoredEvent
from cellmesh.state.query import MAX_ANSWER, Refusal, decode_answer

LOCAL = ("127.0.0.1:0",)
CH = "app/doc"


def _addr(node: Node) -> str:
    host, port = node.local_addresses()[0]
    return f"{host}:{port}"


def _node(tmp: Path, name: str, host: bool = False) -> Node:
    cfg = NodeConfig(
        listen=LOCAL,
        channels=("app/** open",) if host else (),
        database=str(tmp / f"{name}.db"),
    )
    return Node(Identity.generate(), cfg)


async def _until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(300):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _js(value: object) -> bytes:
    return json.dumps(value).encode()


def _union_value(nodes: list[Node], fold: Fold, view: Callable[[Any], Any]) -> Any:
    """The fold over the union of the nodes' logs, computed by one replica holding them all."""
    union = InMemoryLogStore()
    union.append_many(s.encoded for n in nodes for s in n.state.log(CH))
    engine = FoldEngine(union, InMemoryFoldStates())
    engine.register(CH, fold)
    return view(engine.update(CH, fold.name).state)


def _add_payload_size(state: JSON, stored: StoredEvent) -> JSON:
    assert isinstance(state, int)
    return state + len(stored.event.payload)


def _payload_bytes() -> FunctionFold:
    """A user fold with no structure a merge could use: total payload bytes."""
    return FunctionFold("bytes", lambda: 0, _add_payload_size)


def test_query_merges_the_replicas_and_reports_refusals_and_timeouts(tmp_path: Path) -> None:
    async def main() -> None:
        a, d = _node(tmp_path, "a", host=True), _node(tmp_path, "d", host=True)
        b, c, e = (_node(tmp_path, n) for n in "bce")
        async with a, b, c, d, e:
            for peer in (b, c, e):
                await peer.connect(_addr(a))
                await peer.channels.subscribe(a.cell_id, CH)
            # A may publish into D's channel, but D never shares its log with A: D refuses.
            await a.connect(_addr(d))
            await a.channels.request_publish(d.cell_id, CH)

            # E holds the channel but never answers a query.
            async def silent(stream: Stream, header: dict[str, Any]) -> None:
                await asyncio.sleep(3600)

            e.services.register(state_folds.QUERY_KIND, silent)

            from_a: list[object] = [{"set": {"x": 1, "y": 2}}, {"key": "temp", "v": 20}]
            for payload in [*from_a, {"set": {"z": 3}}]:
                a.state.publish(CH, _js(payload))
            await _until(lambda: all(len(n.state.log(CH)) == 3 for n in (b, c, e)), "A's events")
            # B and C then write locally only (they publish into nobody's channel): their
            # logs diverge, each holding events the others lack.
            from_b: list[object] = [{"del": ["x"], "set": {"b": 1}}, {"key": "temp", "v": 21}, 5]
            for payload in from_b:
                assert b.state.publish_event(CH, _js(payload)).sent_to == 0
            from_c: list[object] = [{"set": {"y": "from c", "c": True}}, {"key": "hum", "v": 40}]
            for payload in from_c:
                c.state.publish(CH, _js(payload))

            # The local fold: A's own log only.
            mine = a.state.folds.read(CH, "lww")
            assert mine.value == {"x": 1, "y": 2, "z": 3}
            assert mine.events == 3
            assert mine.position == a.state.last_position(CH)

            r = await a.state.folds.query(CH, "lww", timeout=2.0)
            b_id, c_id = format_cell_id(b.cell_id), format_cell_id(c.cell_id)
            assert r.answered == sorted([b_id, c_id])
            assert r.timed_out == [format_cell_id(e.cell_id)]
            assert r.refused == {format_cell_id(d.cell_id): "not_entitled"}
            assert r.replicas == 3
            assert r.strategy == "stamp"
            assert r.value == _union_value([a, b, c], LwwMap(name="lww"), LwwMap.view)
            assert r.value["b"] == 1
            assert "x" not in r.value  # B's deletion wins over A's older write
            assert r.sources[b_id]["events"] == 6
            assert d.state.folds.counters["refused_not_entitled"] == 1

            # One key; latest-per-key; the counter takes the most complete replica (B).
            both = [b.cell_id, c.cell_id]
            r = await a.state.folds.query(CH, "lww", key="y", timeout=5.0, peers=both)
            assert r.value == "from c"
            r = await a.state.folds.query(CH, "latest", timeout=5.0, peers=both)
            assert r.value == _union_value([a, b, c], LatestPerKey(), LatestPerKey.view)
            assert r.value["temp"]["v"] == 21
            assert r.value["hum"]["v"] == 40
            r = await a.state.folds.query(CH, "counter", timeout=5.0, peers=both)
            assert r.strategy == "most_events"
            assert r.chosen == b_id
            assert r.value == b.state.folds.read(CH, "counter").value == 5
            assert r.value == _union_value([b], Counter(), Counter.view)

            # A user fold: merged by the most complete replica; C never registered it.
            for n in (a, b):
                n.state.folds.register(CH, _payload_bytes())
            r = await a.state.folds.query(CH, "bytes", timeout=5.0, peers=both)
            assert r.answered == [b_id]
            assert r.refused == {c_id: "unknown_fold"}
            assert r.value == sum(len(s.event.payload) for s in b.state.log(CH))
            # Same name, another kind of fold: not merged.
            c.state.folds.register(CH, LwwMap(name="bytes"))
            r = await a.state.folds.query(CH, "bytes", timeout=5.0, peers=[c.cell_id])
            assert r.refused == {c_id: "fold_mismatch"}

            # Misuse is refused before anything is sent.
            with pytest.raises(FoldError):
                a.state.folds.read(CH, "nope")
            with pytest.raises(FoldError):
                await a.state.folds.query(CH, "counter", key="k")
            with pytest.raises(FoldError):
                a.state.folds.register(CH, Counter())
            with pytest.raises(ValueError, match="timeout"):
                await a.state.folds.query(CH, "lww", timeout=0)

    asyncio.run(main())


async def _raw(
    node: Node, peer: Node, head: bytes, *, body: bytes = b"", finish: bool = True
) -> bytes:
    st = await node.open_stream(peer.cell_id)
    await st.write(head + body)
    if finish:
        await st.close()
    async with asyncio.timeout(5):
        return await st.read_all(MAX_ANSWER + 64)


def _head(**fields: Any) -> bytes:
    return json.dumps({"v": 1, "kind": "query", **fields}).encode() + b"\n"


def test_garbage_requests_and_answers_are_refused_or_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_folds, "REQUEST_TIMEOUT", 0.3)

    async def main() -> None:
        h, m = _node(tmp_path, "h", host=True), _node(tmp_path, "m")
        async with h, m:
            await m.connect(_addr(h))
            await m.channels.subscribe(h.cell_id, CH)
            h.state.publish(CH, b"3")

            async def reason(head: bytes, **kw: Any) -> str:
                got = decode_answer(await _raw(m, h, head, **kw))
                assert isinstance(got, Refusal)
                return got.reason

            assert await reason(_head(channel=123, fold="lww")) == "malformed"
            assert await reason(_head(channel="bad//name", fold="lww")) == "malformed"
            assert await reason(_head(channel=CH, fold=["lww"])) == "malformed"
            assert await reason(_head(channel=CH, fold="lww", key="k" * 2000)) == "malformed"
            assert await reason(_head(channel=CH, fold="lww", key=7)) == "malformed"
            assert await reason(_head(channel=CH, fold="lww"), body=b"\x00junk") == "malformed"
            assert await reason(_head(channel=CH, fold="nope")) == "unknown_fold"
            assert await reason(_head(channel=CH, fold="counter", key="k")) == "bad_key"
            assert await reason(_head(channel="app/other", fold="lww")) == "not_entitled"
            folds = h.state.folds
            assert folds.counters["refused_malformed"] == 6

            # A request that never ends is dropped (the stream reset), and counted.
            with pytest.raises(CellmeshError):
                await _raw(m, h, _head(channel=CH, fold="lww"), finish=False)
            assert folds.counters["dropped_incomplete"] == 1

            # Streams that are not query requests at all (binary junk, a header line longer
            # than any header may be) never reach the query service.
            served = h.services.counters.get("served_query", 0)
            for junk in (b"\x00\x01\x02garbage", b"{" + b"a" * 6000):
                st = await m.open_stream(h.cell_id)
                await st.write(junk)
                await st.close()
            async with asyncio.timeout(5):
                handed = [await h.accept_stream() for _ in range(2)]
            assert all(isinstance(st, Stream) for st in handed)
            assert h.services.counters.get("served_query", 0) == served

            # The node still answers a well-formed query.
            r = await m.state.folds.query(CH, "counter", timeout=5.0)
            assert r.answered == [format_cell_id(h.cell_id)]
            assert r.value == 3
            assert folds.counters["served"] == 1

            # A peer answering garbage or too much is refused on the asking side, nothing more.
            def answering(data: bytes) -> Callable[[Stream, dict[str, Any]], Awaitable[None]]:
                async def serve(stream: Stream, header: dict[str, Any]) -> None:
                    await stream.read_all(0)
                    await stream.write(data)
                    await stream.close()

                return serve

            for data, why in (
                (b"not json at all\n", "bad_answer"),
                (b'{"ok": true, "kind": "counter"}\n', "bad_answer"),
                (b"x" * (MAX_ANSWER + 1000), "oversized_answer"),
            ):
                h.services.register(state_folds.QUERY_KIND, answering(data))
                r = await m.state.folds.query(CH, "counter", timeout=5.0)
                assert r.refused == {format_cell_id(h.cell_id): why}
                assert r.answered == []
                assert r.replicas == 1  # our own state alone
            with pytest.raises(LocalProtocolError):
                await m.state.folds.query(CH, "counter", key="x")

    asyncio.run(main())


def _hostile(data: bytes) -> Callable[[Stream, dict[str, Any]], Awaitable[None]]:
    """A query handler answering `data` whatever it is asked."""

    async def serve(stream: Stream, header: dict[str, Any]) -> None:
        await stream.read_all(0)
        await stream.write(data)
        await stream.close()

    return serve


def _line(**fields: Any) -> bytes:
    return json.dumps({"ok": True, "version": "1", "truncated": False, **fields}).encode() + b"\n"


def test_a_hostile_answer_costs_that_answer_never_the_query(tmp_path: Path) -> None:
    async def main() -> None:
        h, m = _node(tmp_path, "h", host=True), _node(tmp_path, "m")
        async with h, m:
            await m.connect(_addr(h))
            await m.channels.subscribe(h.cell_id, CH)
            m.state.publish(CH, _js({"add": ["mine"]}))
            h_id = format_cell_id(h.cell_id)

            # A set element key that is no JSON text: LwwSet.view would fail parsing it back.
            h.services.register(
                state_folds.QUERY_KIND,
                _hostile(
                    _line(
                        fold="set",
                        kind="lww_set",
                        position=1,
                        events=1,
                        state={"elements": {"{not json": [9, "ff", 1]}},
                    )
                ),
            )
            r = await m.state.folds.query(CH, "set", timeout=5.0)
            assert r.refused == {h_id: "bad_answer"}
            assert (r.answered, r.replicas, r.value) == ([], 1, ["mine"])

            # A user fold's answer is opaque (no structure to validate) and the most complete,
            # so it would be chosen: a state that is no object cannot give a key's value.
            tally = FunctionFold("tally", dict, lambda state, _stored: state)
            m.state.folds.register(CH, tally)
            h.services.register(
                state_folds.QUERY_KIND,
                _hostile(_line(fold="tally", kind="opaque", position=9, events=99, state=[1, 2])),
            )
            r = await m.state.folds.query(CH, "tally", key="k", timeout=5.0)
            assert r.refused == {h_id: "bad_answer"}
            assert (r.answered, r.replicas, r.value, r.chosen) == ([], 1, None, "local")

    asyncio.run(main())


def test_unentitled_and_malformed_requests_are_refused_before_the_request_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short, so that before the fix such a request was dropped (a reset, not a refusal) fast.
    monkeypatch.setattr(state_folds, "REQUEST_TIMEOUT", 0.3)

    async def main() -> None:
        h, m = _node(tmp_path, "h", host=True), _node(tmp_path, "m")
        async with h, m:
            await m.connect(_addr(h))
            await m.channels.subscribe(h.cell_id, CH)
            folds = h.state.folds
            for head, why in (
                (_head(channel="app/other", fold="lww"), "not_entitled"),
                (_head(channel=CH, fold=7), "malformed"),
            ):
                # The asker never finishes its half: the answer comes from the header alone.
                got = decode_answer(await _raw(m, h, head, finish=False))
                assert isinstance(got, Refusal)
                assert got.reason == why
            assert folds.counters["refused_not_entitled"] == 1
            assert folds.counters["refused_malformed"] == 1
            assert folds.counters["dropped_incomplete"] == 0
            # An entitled request still waits for its end (and is dropped if it never comes).
            with pytest.raises(CellmeshError):
                await _raw(m, h, _head(channel=CH, fold="lww"), finish=False)
            assert folds.counters["dropped_incomplete"] == 1

    asyncio.run(main())


def test_closing_the_state_layer_stops_serving_queries(tmp_path: Path) -> None:
    async def main() -> None:
        h, m = _node(tmp_path, "h", host=True), _node(tmp_path, "m")
        async with h, m:
            await m.connect(_addr(h))
            await m.channels.subscribe(h.cell_id, CH)
            h.state.publish(CH, b"3")
            folds = h.state.folds

            # A request in flight: its handler waits for the end of the request...
            pending = await m.open_stream(h.cell_id)
            await pending.write(_head(channel=CH, fold="counter"))
            await _until(lambda: h.services.counters.get("served_query", 0) == 1, "the handler")
            # ...while the state layer closes (as in Node.stop, before the sessions end).
            h.state.close()
            await pending.close()
            async with asyncio.timeout(5):
                got = decode_answer(await pending.read_all(MAX_ANSWER + 64))
            assert isinstance(got, Refusal)
            assert got.reason == "unavailable"
            assert folds.counters["served"] == 0

            # A new query stream no longer reaches the query service: the node hands it to the
            # application like any stream of a kind nobody serves.
            st = await m.open_stream(h.cell_id)
            await st.write(_head(channel=CH, fold="counter"))
            await st.close()
            async with asyncio.timeout(5):
                handed = await h.accept_stream()
            assert isinstance(handed, Stream)
            assert h.services.counters.get("served_query", 0) == 1
            assert folds.counters["refused_unavailable"] == 1

    asyncio.run(main())
