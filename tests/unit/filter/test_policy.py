"""The ring-1 policy language: parsing, errors, semantics, the holder, throttles and scale."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.errors import ConfigError
from cellmesh.filter.policy import (
    Context,
    Decision,
    Policy,
    PolicyError,
    PolicyHolder,
    Throttles,
    check_policy,
    parse_policy,
)

A = "9dfe6bc24576a9e4fefe7b303f792766"
B = "b1a9d515abddbb717a18408ff792f255"
C = "00112233445566778899aabbccddeeff"
AB, BB, CB = bytes.fromhex(A), bytes.fromhex(B), bytes.fromhex(C)

EXAMPLE = f"""# the example from docs/policy.md
group ops = {A}, {B}
rule "ops may publish telemetry": from @ops channel telemetry/** right publish -> pass
rule "slow strangers": from * trust < 0.3 -> throttle(10/s)
rule "inspect big": channel files/* capability storage -> redirect-to-inspection
rule "tag new": session-age < 60s -> tag(new)
default -> drop
"""


def ctx(
    source: bytes = CB,
    channel: str = "chat",
    caps: tuple[str, ...] = (),
    rights: tuple[str, ...] = (),
    trust: float = 0.5,
    age: float = 1000.0,
    rate: float = 0.0,
) -> Context:
    return Context(source, channel, frozenset(caps), frozenset(rights), trust, age, rate)


def one(rule_body: str, c: Context, prelude: str = "") -> Decision:
    return parse_policy(f'{prelude}\nrule "r": {rule_body}\ndefault -> drop\n').decide(c)


# --- parser table ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "-> pass",
        f"from {A} -> pass",
        f"from {A.upper()} -> pass",
        "from @ops -> pass",
        "from * -> pass",
        "channel telemetry -> pass",
        "channel telemetry/* -> pass",
        "channel telemetry/** -> pass",
        "channel */x/** -> pass",
        "channel a-b.c_d/e -> pass",
        "capability storage -> pass",
        "right publish -> pass",
        "right subscribe right admin right delegate -> pass",
        "trust < 0.3 -> pass",
        "trust <= 1 -> pass",
        "trust > -0.5 -> pass",
        "trust >= 0.25 trust == 0.25 -> pass",
        "session-age < 60s -> pass",
        "session-age >= 500ms -> pass",
        "session-age > 5m session-age < 2h -> pass",
        "session-age < 1d -> pass",
        "rate > 10/s -> pass",
        "rate <= 600/m -> pass",
        "rate < 3600/h -> pass",
        "-> drop",
        "-> throttle(10/s)",
        "-> throttle(0.5/s)",
        "-> tag(new)",
        "-> mirror(audit-tap)",
        "-> redirect-to-inspection",
        "from @ops channel x/** capability c right publish trust > 0 session-age > 1s rate < 5/s -> pass",
        "from * -> pass   # trailing comment",
    ],
)
def test_valid_forms(body: str) -> None:
    p = parse_policy(f'group ops = {A}\nrule "r": {body}\ndefault -> drop\n')
    assert len(p.rules) == 1
    assert p.rules[0].line == 2


def test_example_parses_and_describes() -> None:
    p = parse_policy(EXAMPLE, "policy.cm")
    assert [r.name for r in p.rules] == [
        "ops may publish telemetry",
        "slow strangers",
        "inspect big",
        "tag new",
    ]
    assert p.groups["ops"] == frozenset({AB, BB})
    assert p.default.action == "drop"
    assert p.default.line == 7
    text = check_policy(EXAMPLE, "policy.cm")
    assert "4 rules" in text
    assert "line 4: rule 'slow strangers': from * trust < 0.3 -> throttle(10/s)" in text


def test_blank_lines_comments_crlf_and_default_anywhere() -> None:
    p = parse_policy('\r\n# c\r\n  \t\ndefault -> pass\r\nrule "x": -> drop # hi\r\n')
    assert p.default.line == 4
    assert p.decide(ctx()).rule == "x"


def test_group_can_include_group() -> None:
    p = parse_policy(
        f'group a = {A}\ngroup b = @a, {B}\nrule "r": from @b -> pass\ndefault -> drop'
    )
    assert p.groups["b"] == frozenset({AB, BB})
    assert p.decide(ctx(source=AB)).action == "pass"
    assert p.decide(ctx(source=CB)).action == "drop"


# --- errors with line and column ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ('default -> drop\n\nrule "x": from * -> dorp', "3:21", "expected an action, got 'dorp'"),
        ("", "1:1", "needs a 'default"),
        ("# only\n", "2:1", "needs a 'default"),
        ("default -> drop\ndefault -> pass", "2:1", "second 'default' (the first is on line 1)"),
        ("default drop", "1:9", "expected '->'"),
        ("default ->", "1:11", "expected an action, got end of line"),
        ("default -> pass extra", "1:17", "expected end of line, got 'extra'"),
        ("allow -> pass", "1:1", "expected 'group', 'rule' or 'default'"),
        ("rule x: -> pass\ndefault -> drop", "1:6", "expected a quoted rule name"),
        ('rule "x -> pass', "1:6", "unterminated string"),
        ('rule "": -> pass', "1:6", "must not be empty"),
        ('rule "x" -> pass', "1:10", "expected ':' after the rule name"),
        ('rule "x": from -> pass', "1:16", "expected a CellID (32 hex digits), @group or *"),
        ('rule "x": from abc -> pass', "1:16", "got 'abc'"),
        ('rule "x": from @nope -> pass', "1:17", "unknown group 'nope'"),
        ('rule "x": from * from * -> pass', "1:18", "only one 'from'"),
        ('rule "x": channel a channel b -> pass', "1:21", "only one 'channel'"),
        ('rule "x": channel a/**/b -> pass', "1:19", "'**' may only be the last segment"),
        ('rule "x": channel a*b -> pass', "1:19", "bad channel pattern 'a*b'"),
        ('rule "x": channel a//b -> pass', "1:19", "bad channel pattern"),
        ('rule "x": right root -> pass', "1:17", "expected a right"),
        ('rule "x": trust 0.3 -> pass', "1:17", "expected a comparison"),
        ('rule "x": trust < high -> pass', "1:19", "expected a number, got 'high'"),
        ('rule "x": trust < nan -> pass', "1:19", "expected a number, got 'nan'"),
        ('rule "x": trust < 1e5 -> pass', "1:19", "expected a number"),
        ('rule "x": trust < ' + "9" * 400 + " -> pass", "1:19", "too large"),
        ('rule "x": session-age < 60 -> pass', "1:25", "expected a duration"),
        ('rule "x": rate > 10 -> pass', "1:18", "expected a rate like 10/s"),
        ('rule "x": colour red -> pass', "1:11", "expected a condition"),
        ('rule "x": trust < 1', "1:20", "expected a condition or '->', got end of line"),
        ('rule "x": -> throttle 10/s', "1:23", "expected '(' after throttle"),
        ('rule "x": -> throttle(10)', "1:23", "expected a rate"),
        ('rule "x": -> throttle(0/s)', "1:23", "greater than zero"),
        ('rule "x": -> throttle(10/s', "1:27", "expected ')'"),
        ('rule "x": -> tag()', "1:18", "expected a tag name, got ')'"),
        ('rule "x": -> mirror(9x)', "1:21", "expected a mirror name"),
        ('rule "x": -> pass!', "1:18", "unexpected character '!'"),
        ("group = x", "1:7", "expected a group name, got '='"),
        ("group 1ops = x", "1:7", "expected a group name, got '1ops'"),
        (f"group g = {A}\ngroup g = {B}", "2:7", "already defined"),
        ("group g", "1:8", "expected '='"),
        ("group g =", "1:10", "expected a CellID or @group, got end of line"),
        (f"group g = {A} {B}", "1:44", "expected ',' or end of line"),
        (f"group g = {A}, zz", "1:45", "expected a CellID (32 hex digits) or @group"),
        ("group g = @h", "1:12", "unknown group 'h'"),
        ("\n\n  \u00e9", "3:3", "unexpected character"),
    ],
)
def test_errors_have_line_and_column(text: str, where: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.cm")
    err = info.value
    assert isinstance(err, ConfigError)
    assert str(err).startswith(f"policy.cm:{where}: "), str(err)
    assert message in str(err)
    line, col = where.split(":")
    assert (err.line, err.col, err.source) == (int(line), int(col), "policy.cm")


def test_error_message_format_exact() -> None:
    text = f'group ops = {A}\n\nrule "r": from @ops   -> dorp\ndefault -> drop'
    with pytest.raises(ConfigError, match=r"^policy\.cm:3:26: expected an action, got 'dorp'$"):
        parse_policy(text, "policy.cm")


_WORDS = [
    "group", "rule", "default", "from", "channel", "capability", "right", "trust",
    "session-age", "rate", "pass", "drop", "throttle", "tag", "mirror",
    "redirect-to-inspection", "publish", "->", "-", ">", "<", "<=", "==", "=", ",", ":",
    "(", ")", "@", "@ops", "*", "**", "a/*", "a/**", "10/s", "0/s", "60s", "0.3", "-1",
    '"n"', '"', "#", "\n", "\r", "\t", " ", A, "ops", "\u00e9", "\x00", "9" * 400,
]  # fmt: skip


def _parse_or_error(text: str) -> Policy | ConfigError:
    try:
        return parse_policy(text)
    except ConfigError as exc:  # anything else escapes and fails the test
        return exc


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    result = _parse_or_error(text)
    assert isinstance(result, Policy) or str(result).startswith("policy:")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=30).map(" ".join))
def test_fuzz_token_soup(text: str) -> None:
    for candidate in (
        text,
        text + "\ndefault -> pass",
        f"group ops = {A}\n{text}\ndefault -> pass",
    ):
        p = _parse_or_error(candidate)
        if isinstance(p, ConfigError):
            assert str(p).startswith("policy:")
        else:
            d = p.decide(ctx(source=AB, channel="a/b", trust=0.1, age=1.0, rate=20.0))
            assert isinstance(d, Decision)
            assert isinstance(p.explain(ctx()), str)


# --- semantics -------------------------------------------------------------------------------


def test_first_match_wins_and_default() -> None:
    p = parse_policy(
        f'rule "one": from {A} -> tag(first)\n'
        'rule "two": from * -> tag(second)\n'
        f'rule "three": from {A} -> tag(third)\n'
        "default -> drop\n"
    )
    assert p.decide(ctx(source=AB)).argument == "first"
    assert p.decide(ctx(source=BB)).argument == "second"
    q = parse_policy(f'rule "only": from {A} -> pass\ndefault -> mirror(tap)')
    d = q.decide(ctx(source=BB))
    assert (d.action, d.argument, d.rule, d.line, d.reasons) == (
        "mirror",
        "tap",
        "default",
        2,
        ("no rule matched",),
    )


@pytest.mark.parametrize(
    ("pattern", "channel", "hit"),
    [
        ("telemetry", "telemetry", True),
        ("telemetry", "telemetry/cpu", False),
        ("telemetry/*", "telemetry/cpu", True),
        ("telemetry/*", "telemetry/cpu/0", False),
        ("telemetry/*", "telemetry", False),
        ("telemetry/**", "telemetry/cpu", True),
        ("telemetry/**", "telemetry/cpu/0/x", True),
        ("telemetry/**", "telemetry", False),
        ("telemetry/**", "telemetryx/cpu", False),
        ("*/cpu", "host/cpu", True),
        ("*/cpu", "host/mem", False),
        ("**", "anything/at/all", True),
        ("*", "one", True),
        ("*", "one/two", False),
        ("a.b", "axb", False),
    ],
)
def test_channel_patterns(pattern: str, channel: str, hit: bool) -> None:
    assert (one(f"channel {pattern} -> pass", ctx(channel=channel)).action == "pass") is hit


@pytest.mark.parametrize(
    ("cond", "c", "hit"),
    [
        ("trust < 0.3", ctx(trust=0.29), True),
        ("trust < 0.3", ctx(trust=0.3), False),
        ("trust <= 0.3", ctx(trust=0.3), True),
        ("trust > 0.3", ctx(trust=0.3), False),
        ("trust >= 0.3", ctx(trust=0.3), True),
        ("trust == 0.5", ctx(trust=0.5), True),
        ("trust == 0.5", ctx(trust=0.6), False),
        ("session-age < 60s", ctx(age=59.9), True),
        ("session-age < 60s", ctx(age=60.0), False),
        ("session-age < 1m", ctx(age=59.0), True),
        ("session-age >= 500ms", ctx(age=0.5), True),
        ("session-age > 2h", ctx(age=7200.0), False),
        ("session-age < 1d", ctx(age=86399.0), True),
        ("rate > 10/s", ctx(rate=10.5), True),
        ("rate > 10/s", ctx(rate=10.0), False),
        ("rate >= 60/m", ctx(rate=1.0), True),
        ("capability storage", ctx(caps=("storage", "x")), True),
        ("capability storage", ctx(caps=("x",)), False),
        ("right publish", ctx(rights=("publish",)), True),
        ("right publish", ctx(rights=("subscribe",)), False),
        ("right publish right admin", ctx(rights=("publish",)), False),
        ("right publish right admin", ctx(rights=("publish", "admin")), True),
        ("trust > 0.1 trust < 0.9", ctx(trust=0.5), True),
        ("trust > 0.1 trust < 0.9", ctx(trust=0.95), False),
        (f"from {A}", ctx(source=AB), True),
        (f"from {A}", ctx(source=BB), False),
        (f"from {A.upper()}", ctx(source=AB), True),
        ("from @ops", ctx(source=BB), True),
        ("from @ops", ctx(source=CB), False),
        ("from *", ctx(source=b"short"), True),
        (f"from {A} channel x trust > 0.4", ctx(source=AB, channel="x", trust=0.5), True),
        (f"from {A} channel x trust > 0.4", ctx(source=AB, channel="y", trust=0.5), False),
        (f"from {A} channel x trust > 0.4", ctx(source=AB, channel="x", trust=0.3), False),
    ],
)
def test_condition_semantics(cond: str, c: Context, hit: bool) -> None:
    d = one(f"{cond} -> pass", c, prelude=f"group ops = {A}, {B}")
    assert (d.action == "pass") is hit
    if hit:
        keywords = {"from", "channel", "capability", "right", "trust", "session-age", "rate"}
        assert (d.rule, d.line) == ("r", 2)
        assert len(d.reasons) == sum(word in keywords for word in cond.split())


@pytest.mark.parametrize(
    ("action", "kind", "argument"),
    [
        ("pass", "pass", None),
        ("drop", "drop", None),
        ("throttle(10/s)", "throttle", 10.0),
        ("throttle(600/m)", "throttle", 10.0),
        ("throttle(0.5/s)", "throttle", 0.5),
        ("tag(new)", "tag", "new"),
        ("mirror(audit)", "mirror", "audit"),
        ("redirect-to-inspection", "redirect-to-inspection", None),
    ],
)
def test_action_arguments(action: str, kind: str, argument: float | str | None) -> None:
    d = one(f"-> {action}", ctx())
    assert (d.action, d.argument) == (kind, argument)
    dd = parse_policy(f"default -> {action}").decide(ctx())
    assert (dd.action, dd.argument) == (kind, argument)


def test_example_decisions_and_explain() -> None:
    p = parse_policy(EXAMPLE, "policy.cm")
    d = p.decide(ctx(source=AB, channel="telemetry/cpu", rights=("publish",)))
    assert (d.action, d.rule, d.line) == ("pass", "ops may publish telemetry", 3)
    assert d.reasons == (
        f"source {A} is in group ops",
        "channel 'telemetry/cpu' matches telemetry/**",
        "right publish granted",
    )
    d = p.decide(ctx(source=AB, channel="telemetry/cpu", trust=0.1))
    assert (d.action, d.argument, d.rule) == ("throttle", 10.0, "slow strangers")
    d = p.decide(ctx(channel="files/big", caps=("storage",)))
    assert d.action == "redirect-to-inspection"
    d = p.decide(ctx(age=5.0))
    assert (d.action, d.argument) == ("tag", "new")
    d = p.decide(ctx())
    assert (d.action, d.rule, d.line) == ("drop", "default", 7)

    text = p.explain(ctx(source=AB, channel="telemetry/cpu", trust=0.1))
    assert text.splitlines()[0] == "rule 'slow strangers' (line 4) decides: throttle(10/s)"
    assert "because trust 0.1 is < 0.3" in text
    assert (
        "line 3 rule 'ops may publish telemetry' does not apply: right publish not granted" in text
    )
    text = p.explain(ctx())
    assert text.splitlines()[0] == "no rule matches; default (line 7) decides: drop"
    assert "session age 1000s is not < 60s" in text


def test_explain_limits_listing() -> None:
    rules = "".join(f'rule "r{i}": trust > 2 -> pass\n' for i in range(30))
    text = parse_policy(rules + "default -> drop").explain(ctx(), limit=5)
    assert "... and 25 more rules that do not apply" in text


# --- holder and throttles ----------------------------------------------------------------------


def test_holder_keeps_old_policy_on_error() -> None:
    holder = PolicyHolder(parse_policy("default -> pass"))
    old = holder.policy
    err = holder.reload('rule "x": -> dorp\ndefault -> drop', "policy.cm")
    assert isinstance(err, ConfigError)
    assert str(err) == "policy.cm:1:14: expected an action, got 'dorp'"
    assert holder.policy is old
    assert holder.decide(ctx()).action == "pass"
    assert holder.reload("default -> drop") is None
    assert holder.policy is not old
    assert holder.decide(ctx()).action == "drop"


def test_throttles() -> None:
    p = parse_policy('rule "t": trust < 0.3 -> throttle(2/s)\nrule "ok": -> pass\ndefault -> drop')
    t = Throttles(capacity=2)
    slow = p.decide(ctx(trust=0.1))
    assert [t.allow(slow, CB, 0.0) for _ in range(3)] == [True, True, False]
    assert t.allow(slow, AB, 0.0)  # a separate bucket per source
    assert t.allow(slow, CB, 0.5)  # one token refilled
    assert not t.allow(slow, CB, 0.5)
    assert t.allow(p.decide(ctx(trust=0.9)), CB, 0.5)
    assert not t.allow(parse_policy("default -> drop").decide(ctx()), CB, 0.5)
    t.allow(slow, BB, 0.0)
    assert len(t) == 2


# --- scale -----------------------------------------------------------------------------------


def test_ten_thousand_rules_decide_correctly() -> None:
    n = 10_000
    ids = [i.to_bytes(16, "big") for i in range(n)]
    lines = [f"group evens = {', '.join(ids[i].hex() for i in range(0, 200, 2))}"]
    for i, cid in enumerate(ids):
        if i % 3 == 0:
            lines.append(f'rule "r{i}": from {cid.hex()} channel ch/{i} -> tag(t{i})')
        elif i % 3 == 1:
            lines.append(f'rule "r{i}": from {cid.hex()} channel ch/* trust > 0.5 -> mirror(m{i})')
        else:
            lines.append(f'rule "r{i}": from {cid.hex()} -> throttle({i}/s)')
    lines.append('rule "evens": from @evens -> pass')
    lines.append('rule "any-exact": channel special -> redirect-to-inspection')
    lines.append('rule "any-pattern": from * channel open/** -> pass')
    lines.append("default -> drop")
    p = parse_policy("\n".join(lines))
    assert len(p.rules) == n + 3

    def expected(c: Context) -> str:
        for rule in p.rules:  # the linear reference: first rule whose conditions all hold
            if all(cond.test(c) for cond in rule.conditions):
                return rule.name
        return "default"

    cases = [
        ctx(source=ids[0], channel="ch/0"),
        ctx(source=ids[3], channel="ch/4"),
        ctx(source=ids[3], channel="special"),
        ctx(source=ids[4], channel="ch/x", trust=0.9),
        ctx(source=ids[4], channel="ch/x", trust=0.1),
        ctx(source=ids[4], channel="open/door"),
        ctx(source=ids[5], channel="whatever"),
        ctx(source=ids[9999], channel="ch/9999"),
        ctx(source=ids[9998], channel="ch/1", trust=0.1),
        ctx(source=bytes(15) + b"\xff" * 1, channel="special"),
        ctx(source=b"\xff" * 16, channel="special"),
        ctx(source=b"\xff" * 16, channel="open/x"),
        ctx(source=b"\xff" * 16, channel="nothing"),
    ]
    for c in cases:
        assert p.decide(c).rule == expected(c), c
    assert p.decide(ctx(source=ids[3], channel="special")).rule == "any-exact"
    assert p.decide(ctx(source=ids[9999], channel="ch/9999")).argument == "t9999"
    assert p.decide(ctx(source=ids[9998], channel="x")).argument == 9998.0
    assert p.decide(ctx(source=ids[4], channel="ch/x", trust=0.1)).rule == "evens"
    assert p.decide(ctx(source=b"\xff" * 16, channel="nothing")).rule == "default"
    for i in range(0, n, 97):
        c = ctx(source=ids[i], channel=f"ch/{i}", trust=0.7)
        assert p.decide(c).rule == expected(c)


def test_docs_example_parses_and_explains_as_documented() -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "policy.md").read_text()
    blocks = doc.split("```")
    p = parse_policy(blocks[1], "docs/policy.md")
    assert len(p.rules) == 6
    shown = blocks[-2].strip("\n")
    assert p.explain(ctx(source=AB, channel="telemetry/cpu", trust=0.1)) == shown
