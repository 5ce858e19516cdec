"""Tests for cellmesh.filter.inspection: verdicts, built-in inspectors, the queue, the ban list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.filter.inspection import (
    PASS,
    BanList,
    InspectionItem,
    InspectionQueue,
    InspectionVerdict,
    Inspector,
    SizeShapeValidator,
    ThreatList,
    Verdict,
)

A = bytes.fromhex("9dfe6bc24576a9e4fefe7b303f792766")
B = bytes.fromhex("b1a9d515abddbb717a18408ff792f255")
C = bytes.fromhex("00112233445566778899aabbccddeeff")
DOCS = Path(__file__).resolve().parents[3] / "docs" / "inspection.md"


def item(payload: bytes = b"{}", source: bytes = A, channel: str = "chat") -> InspectionItem:
    return InspectionItem(source, channel, payload, 0.0)


class FakeClock:
    """A clock that moves only when told to (no real time in these tests)."""

    def __init__(self) -> None:
        self.t = 100.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.t


class Scripted:
    """An inspector that returns a fixed verdict, costs `cost` fake seconds, and logs calls."""

    def __init__(
        self,
        name: str,
        verdict: InspectionVerdict = PASS,
        clock: FakeClock | None = None,
        cost: float = 0.0,
    ) -> None:
        self.name = name
        self.verdict = verdict
        self.clock = clock
        self.cost = cost
        self.seen: list[InspectionItem] = []

    def inspect(self, it: InspectionItem) -> InspectionVerdict:
        self.seen.append(it)
        if self.clock is not None:
            self.clock.t += self.cost
        return self.verdict


class Exploding:
    name = "exploding"

    def inspect(self, it: InspectionItem) -> InspectionVerdict:
        raise RuntimeError("plugin bug")


class WrongType:
    name = "wrong_type"

    def inspect(self, it: InspectionItem) -> InspectionVerdict:
        return "drop"  # type: ignore[return-value]


def run_all(q: InspectionQueue, now: float = 0.0) -> list[tuple[InspectionItem, InspectionVerdict]]:
    return q.run(now, budget_items=10_000, budget_seconds=1e9, clock=FakeClock())


# --- items and verdicts -----------------------------------------------------------------------


def test_verdict_constructors() -> None:
    assert PASS.kind is Verdict.PASS
    assert InspectionVerdict.drop("x") == InspectionVerdict(Verdict.DROP, "x")
    ban = InspectionVerdict.ban("x", 5)
    assert (ban.kind, ban.reason, ban.ban_seconds) == (Verdict.BAN, "x", 5.0)


@pytest.mark.parametrize(
    ("kind", "reason", "seconds"),
    [
        (Verdict.PASS, "why", 0.0),
        (Verdict.PASS, "", 1.0),
        (Verdict.DROP, "", 0.0),
        (Verdict.DROP, "x", 3.0),
        (Verdict.BAN, "x", 0.0),
        (Verdict.BAN, "x", -1.0),
        (Verdict.BAN, "x", float("inf")),
        (Verdict.BAN, "x", float("nan")),
        (Verdict.BAN, "", 1.0),
    ],
)
def test_invalid_verdicts(kind: Verdict, reason: str, seconds: float) -> None:
    with pytest.raises(ValueError, match="verdict"):
        InspectionVerdict(kind, reason, seconds)


def test_item_needs_a_cell_id() -> None:
    with pytest.raises(ValueError, match="16-byte CellID"):
        InspectionItem(b"short", "chat", b"", 0.0)


# --- SizeShapeValidator -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"a": 1}', None),
        (b"{}", None),
        (b'{"a": [1, 2, {"b": null}]}', None),
        (b"x" * 65, "too_large"),
        (b"\xff\xfe", "not_utf8"),
        (b'{"a": 1', "not_json"),
        (b'{"a": 1} {}', "not_json"),
        (b'{"a": NaN}', "not_json"),
        (b'{"a": -Infinity}', "not_json"),
        (b"", "not_json"),
        (b"[1, 2]", "not_json_object"),
        (b'"text"', "not_json_object"),
        (b"42", "not_json_object"),
        (b"null", "not_json_object"),
    ],
)
def test_size_shape_json(payload: bytes, expected: str | None) -> None:
    v = SizeShapeValidator(64, json_object=True).inspect(item(payload))
    assert v == (PASS if expected is None else InspectionVerdict.drop(expected))


def test_size_shape_deep_nesting_is_not_json() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    v = SizeShapeValidator(1 << 20, json_object=True).inspect(item(deep))
    assert v == InspectionVerdict.drop("not_json")


def test_size_shape_prefix_and_size() -> None:
    v = SizeShapeValidator(8, prefix=b"CM\x01")
    assert v.name == "size_shape"
    assert v.inspect(item(b"CM\x01abcde")) is PASS
    assert v.inspect(item(b"CM\x01abcdef")) == InspectionVerdict.drop("too_large")
    assert v.inspect(item(b"CM\x02abc")) == InspectionVerdict.drop("bad_prefix")
    assert v.inspect(item(b"")) == InspectionVerdict.drop("bad_prefix")
    j = SizeShapeValidator(100, prefix=b"J", json_object=True, name="json")
    assert j.name == "json"
    assert j.inspect(item(b'J{"k": "v"}')) is PASS
    assert j.inspect(item(b'{"k": "v"}')) == InspectionVerdict.drop("bad_prefix")
    with pytest.raises(ValueError, match="max_size"):
        SizeShapeValidator(-1)


# --- ThreatList -------------------------------------------------------------------------------


def test_threat_list_parses_and_bans() -> None:
    text = f"""# threat intel, 2026-11
{A.hex()}
  {B.hex().upper()}   # known flooder

# end
"""
    tl = ThreatList.from_lines(text, ban_seconds=600)
    assert len(tl) == 2
    assert A in tl
    assert B in tl
    assert tl.name == "threat_list"
    assert tl.inspect(item(source=A)) == InspectionVerdict.ban("threat_list", 600)
    assert tl.inspect(item(source=C)) is PASS
    assert len(ThreatList.from_lines(text.splitlines())) == 2
    assert len(ThreatList.from_lines("")) == 0


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (f"{A.hex()}\nnot-a-cell-id\n", 2, "32 hex characters"),
        (f"# c\n\n{A.hex()[:-1]}g\n", 3, "hex digits"),
        (f"{A.hex()} {B.hex()}\n", 1, "one CellID per line"),
        ("\n\n\n\n" + A.hex() + "00\n", 5, "32 hex characters"),
    ],
)
def test_threat_list_errors_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^threats\.txt:{line}: .*{message}"):
        ThreatList.from_lines(text, source="threats.txt")


def test_threat_list_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ThreatList([b"short"])
    with pytest.raises(ValueError, match="ban_seconds"):
        ThreatList([A], ban_seconds=0)


# --- the queue: verdict paths -----------------------------------------------------------------


def test_every_verdict_path() -> None:
    tl = ThreatList([B], ban_seconds=60)
    shape = SizeShapeValidator(16, json_object=True)
    q = InspectionQueue([tl, shape])
    good, big, threat = item(b"{}"), item(b"{}" + b" " * 20), item(b"{}", source=B)
    for it in (good, big, threat):
        assert q.submit(it, now=0.0)
    results = run_all(q, now=1000.0)
    assert results == [
        (good, PASS),
        (big, InspectionVerdict(Verdict.DROP, "too_large", inspector="size_shape")),
        (threat, InspectionVerdict(Verdict.BAN, "threat_list", 60.0, inspector="threat_list")),
    ]
    assert q.take_bans() == [(B, 1060.0)]
    assert q.take_bans() == []
    stats = q.statistics()
    assert stats.counters == {
        "submitted": 3,
        "inspected": 3,
        "pass": 1,
        "drop": 1,
        "ban": 1,
    }
    assert stats.reasons == {"size_shape:too_large": 1, "threat_list:threat_list": 1}
    assert stats.inspector_calls == {"threat_list": 3, "size_shape": 2}
    assert stats.queued == 0
    assert len(q) == 0


def test_first_non_pass_verdict_decides() -> None:
    first = Scripted("first", InspectionVerdict.drop("nope"))
    second = Scripted("second", InspectionVerdict.ban("worse", 10))
    q = InspectionQueue([first, second])
    q.submit(item(), 0.0)
    [(_, v)] = run_all(q)
    assert (v.kind, v.reason, v.inspector) == (Verdict.DROP, "nope", "first")
    assert second.seen == []


def test_plugin_exceptions_are_contained() -> None:
    after = Scripted("after")
    q = InspectionQueue([Exploding(), after])
    for _ in range(3):
        q.submit(item(), 0.0)
    results = run_all(q)
    assert len(results) == 3
    for _, v in results:
        assert (v.kind, v.reason, v.inspector) == (Verdict.DROP, "inspector_error", "exploding")
    assert q.counters["inspector_error:exploding"] == 3
    assert q.counters["drop"] == 3
    assert q.reasons["exploding:inspector_error"] == 3
    assert after.seen == []
    # The queue keeps working after the failures.
    q2 = InspectionQueue([WrongType(), after])
    q2.submit(item(), 0.0)
    [(_, v)] = run_all(q2)
    assert v.reason == "inspector_error"
    assert q2.counters["inspector_error:wrong_type"] == 1


def test_base_exceptions_are_not_swallowed() -> None:
    class Interrupting:
        name = "interrupting"

        def inspect(self, it: InspectionItem) -> InspectionVerdict:
            raise KeyboardInterrupt

    q = InspectionQueue([Interrupting()])
    q.submit(item(), 0.0)
    with pytest.raises(KeyboardInterrupt):
        run_all(q)


def test_duplicate_inspector_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        InspectionQueue([Scripted("x"), Scripted("x")])


@pytest.mark.parametrize(
    "kwargs",
    [{"capacity": 0}, {"per_source": 0}, {"max_ban_seconds": 0}, {"max_ban_seconds": float("inf")}],
)
def test_queue_rejects_bad_configuration(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        InspectionQueue([], **kwargs)  # type: ignore[arg-type]


# --- the queue: bounds and budgets ------------------------------------------------------------


def test_overflow_is_counted_not_stored() -> None:
    q = InspectionQueue([Scripted("p")], capacity=3)
    accepted = [q.submit(item(), 0.0) for _ in range(10)]
    assert accepted == [True] * 3 + [False] * 7
    assert len(q) == 3
    assert q.counters["inspection_overload"] == 7
    assert q.counters["submitted"] == 3
    run_all(q)
    assert q.submit(item(), 0.0)  # room again


def test_per_source_quota() -> None:
    q = InspectionQueue([Scripted("p")], capacity=10, per_source=2)
    assert [q.submit(item(source=A), 0.0) for _ in range(3)] == [True, True, False]
    assert q.submit(item(source=B), 0.0)
    assert q.counters["source_quota"] == 1
    q.run(0.0, budget_items=1, budget_seconds=1.0, clock=FakeClock())
    assert q.submit(item(source=A), 0.0)  # one of A's items left the queue
    run_all(q)
    assert q._per_source == {}


def test_item_budget() -> None:
    p = Scripted("p")
    q = InspectionQueue([p])
    items = [item(bytes([i])) for i in range(7)]
    for it in items:
        q.submit(it, 0.0)
    clock = FakeClock()
    first = q.run(0.0, budget_items=3, budget_seconds=10.0, clock=clock)
    assert [it for it, _ in first] == items[:3]
    assert len(q) == 4
    assert q.run(0.0, budget_items=0, budget_seconds=10.0, clock=clock) == []
    rest = q.run(0.0, budget_items=100, budget_seconds=10.0, clock=clock)
    assert [it for it, _ in rest] == items[3:]
    assert p.seen == items


def test_time_budget_with_a_fake_clock() -> None:
    clock = FakeClock()
    slow = Scripted("slow", clock=clock, cost=1.0)
    cheap = Scripted("cheap", clock=clock, cost=0.25)
    q = InspectionQueue([cheap, slow])
    for i in range(10):
        q.submit(item(bytes([i])), 0.0)
    # Each item costs 1.25 s: started at 0, 1.25, 2.5 (all < 3); at 3.75 the budget is spent.
    done = q.run(0.0, budget_items=100, budget_seconds=3.0, clock=clock)
    assert len(done) == 3
    assert len(q) == 7
    stats = q.statistics()
    assert stats.inspector_seconds == {"cheap": 0.75, "slow": 3.0}
    assert stats.inspector_calls == {"cheap": 3, "slow": 3}
    assert q.run(0.0, budget_items=100, budget_seconds=0.0, clock=clock) == []
    assert len(q.run(0.0, budget_items=100, budget_seconds=1.0, clock=clock)) == 1
    with pytest.raises(ValueError, match="budgets"):
        q.run(0.0, budget_items=-1, budget_seconds=1.0, clock=clock)
    with pytest.raises(ValueError, match="budgets"):
        q.run(0.0, budget_items=1, budget_seconds=float("nan"), clock=clock)


# --- the queue: bans --------------------------------------------------------------------------


def test_bans_stop_later_items_from_that_source() -> None:
    banner = Scripted("banner", InspectionVerdict.ban("bad", 30))
    q = InspectionQueue([banner])
    q.submit(item(source=A), 0.0)
    q.submit(item(source=A), 0.0)
    first, second = run_all(q, now=100.0)
    assert first[1].kind is Verdict.BAN
    assert second[1] == InspectionVerdict.drop("banned_source")
    assert len(banner.seen) == 1  # the second item was not inspected again
    assert not q.submit(item(source=A), now=130.0)  # still banned (until is inclusive)
    assert q.submit(item(source=B), now=130.0)
    assert q.submit(item(source=A), now=130.5)  # ban over
    assert q.counters["banned_source"] == 2
    assert q.reasons["queue:banned_source"] == 1
    assert q.take_bans() == [(A, 130.0)]


def test_bans_are_capped_and_merged() -> None:
    q = InspectionQueue([Scripted("b", InspectionVerdict.ban("bad", 1e9))], max_ban_seconds=50)
    q.submit(item(source=A), 0.0)
    run_all(q, now=10.0)
    assert q.take_bans() == [(A, 60.0)]


def test_pending_bans_are_bounded() -> None:
    banner = Scripted("b", InspectionVerdict.ban("bad", 5))
    q = InspectionQueue([banner], ban_capacity=2)
    for src in (A, B, C):
        q.submit(item(source=src), 0.0)
    results = run_all(q)
    assert [v.kind for _, v in results] == [Verdict.BAN] * 3  # the verdicts still say so
    assert q.counters["ban_overflow"] == 1
    assert q.statistics().pending_bans == 2
    assert q.take_bans() == [(A, 5.0), (B, 5.0)]


# --- BanList ----------------------------------------------------------------------------------


def test_ban_list_basics() -> None:
    bans = BanList()
    assert not bans.is_banned(A, 0.0)
    assert bans.ban(A, 10.0)
    assert bans.is_banned(A, 0.0)
    assert bans.is_banned(A, 10.0)
    assert not bans.is_banned(A, 10.01)
    assert bans.until(A) == 10.0
    assert bans.ban(A, 5.0)  # never shortened
    assert bans.until(A) == 10.0
    assert bans.ban(A, 20.0)
    assert bans.until(A) == 20.0
    assert A in bans
    assert bans.unban(A)
    assert not bans.unban(A)
    assert not bans.is_banned(A, 0.0)
    with pytest.raises(ValueError, match="16 bytes"):
        bans.ban(b"x", 1.0)
    with pytest.raises(ValueError, match="NaN"):
        bans.ban(A, float("nan"))
    with pytest.raises(ValueError, match="capacity"):
        BanList(0)


def test_ban_list_expiry() -> None:
    bans = BanList()
    bans.ban(A, 10.0)
    bans.ban(B, 20.0)
    bans.ban(C, 30.0)
    assert bans.expire(10.0) == 0  # until is inclusive
    assert bans.expire(20.5) == 2
    assert len(bans) == 1
    assert bans.is_banned(C, 20.5)
    assert bans.until(A) is None


def test_ban_list_evicts_the_soonest_expiring() -> None:
    bans = BanList(capacity=2)
    bans.ban(A, 10.0)
    bans.ban(B, 30.0)
    assert bans.ban(C, 20.0)  # A (10) gives way
    assert A not in bans
    assert not bans.ban(A, 15.0)  # would itself be the soonest: refused
    assert A not in bans
    assert bans.evicted == 2
    assert sorted(bans._deadlines._at) == sorted([B, C])


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 4),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["ban", "expire", "unban"]), st.integers(0, 5), st.integers(0, 50)
        ),
        max_size=60,
    ),
)
def test_ban_list_matches_model(capacity: int, ops: list[tuple[str, int, int]]) -> None:
    ids = [bytes([i]) * 16 for i in range(6)]
    bans = BanList(capacity)
    model: dict[bytes, float] = {}
    now = 0.0
    for op, who, amount in ops:
        cid = ids[who]
        if op == "ban":
            until = now + amount
            if cid in model:
                model[cid] = max(model[cid], until)
                assert bans.ban(cid, until)
            elif len(model) < capacity:
                model[cid] = until
                assert bans.ban(cid, until)
            else:
                soonest = min(model.values())
                stored = bans.ban(cid, until)
                assert stored == (until > soonest)
                if stored:
                    # Ties between equal deadlines may evict either: follow the real choice.
                    gone = next(c for c in model if c not in bans)
                    assert model.pop(gone) == soonest
                    model[cid] = until
        elif op == "expire":
            now += amount
            assert bans.expire(now) == sum(1 for u in model.values() if u < now)
            model = {c: u for c, u in model.items() if u >= now}
        else:
            assert bans.unban(cid) == (cid in model)
            model.pop(cid, None)
        assert len(bans) == len(model) <= capacity
        for c in ids:
            assert bans.is_banned(c, now) == (c in model and now <= model[c])


# --- the documentation's example runs ---------------------------------------------------------


def test_docs_example_runs_and_prints_what_the_docs_say(capsys: pytest.CaptureFixture[str]) -> None:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/inspection.md has no python example"
    namespace: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(blocks[0], str(DOCS), "exec"), namespace)
    printed = re.search(r"It prints:\n\n```\n(.*?)```", text, re.S)
    assert printed is not None
    out = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert out == printed.group(1).splitlines()


def test_protocol_is_structural() -> None:
    plugins: list[Inspector] = [SizeShapeValidator(1), ThreatList(), Scripted("s"), Exploding()]
    assert [p.name for p in plugins] == ["size_shape", "threat_list", "s", "exploding"]
