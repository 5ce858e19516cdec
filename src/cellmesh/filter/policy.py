"""The ring-1 policy language: a small, readable rule file compiled to a fast matcher.

```
# comments run to the end of the line
group ops = 9dfe6bc24576a9e4fefe7b303f792766, b1a9d515abddbb717a18408ff792f255
rule "ops may publish telemetry": from @ops channel telemetry/** right publish -> pass
rule "slow strangers": from * trust < 0.3 -> throttle(10/s)
default -> drop
```

One statement per line: `group NAME = MEMBER, ...`, `rule "NAME": CONDITION... -> ACTION` and exactly
one `default -> ACTION`. Conditions in a rule are AND-ed; the first rule (in file order) whose
conditions all hold decides; when none does, `default` decides. docs/policy.md is the reference.

`parse_policy` raises `PolicyError` (a `ConfigError`) whose message starts with `source:line:col:`, and
never anything else. Rules are indexed by source CellID (groups expanded) and exact channel, so a
decision looks at the few rules that can apply plus the rules that name no CellID, not at every rule.
The module is pure: no I/O and no clocks (`Throttles.allow` takes `now` from the caller).
"""

from __future__ import annotations

import heapq
import math
import operator
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from cellmesh.errors import ConfigError
from cellmesh.filter.buckets import TokenBucket

Action = Literal["pass", "drop", "throttle", "tag", "mirror", "redirect-to-inspection"]
"""What a decision tells the filter to do with the traffic."""

RIGHTS = frozenset({"publish", "subscribe", "admin", "delegate"})
"""Token rights a `right` condition may name."""

_CELL_ID_HEX = 32

__all__ = [
    "RIGHTS",
    "Action",
    "Context",
    "Decision",
    "Policy",
    "PolicyError",
    "PolicyHolder",
    "Rule",
    "Throttles",
    "check_policy",
    "parse_policy",
]


class PolicyError(ConfigError):
    """A policy file is invalid. The message reads `source:line:col: what is wrong`."""

    def __init__(self, source: str, line: int, col: int, message: str) -> None:
        super().__init__(f"{source}:{line}:{col}: {message}")
        self.source = source
        self.line = line
        self.col = col
        self.reason = message


@dataclass(frozen=True, slots=True)
class Context:
    """What the filter knows about one piece of traffic when it asks the policy."""

    source: bytes
    channel: str
    capabilities: frozenset[str] = frozenset()
    rights: frozenset[str] = frozenset()
    trust: float = 0.0
    session_age: float = 0.0
    """Seconds since the session was established."""
    rate: float = 0.0
    """Messages per second the source is currently sending."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of `Policy.decide`.

    `argument` is the rate in messages per second for `throttle`, the name for `tag` and `mirror`,
    and None otherwise. `rule` is the rule's name (`"default"` for the default), `line` its line.
    `reasons` lists, in order, why each condition of the deciding rule held.
    """

    action: Action
    argument: float | str | None
    rule: str
    line: int
    reasons: tuple[str, ...] = ()
    index: int = -1
    """Position of the deciding rule in the file's rule list; -1 for the default."""


# ---------------------------------------------------------------------------------------------
# Conditions


_Test = Callable[["Context"], bool]
_Why = Callable[["Context"], str]


@dataclass(frozen=True, slots=True)
class _Cond:
    text: str
    test: _Test
    why: _Why


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule. `sources` is None when the rule matches any source."""

    name: str
    line: int
    conditions: tuple[_Cond, ...]
    action: Action
    argument: float | str | None
    sources: frozenset[bytes] | None = None
    channel_exact: str | None = None
    channel_any: bool = True
    index: int = -1

    def text(self) -> str:
        conds = " ".join(c.text for c in self.conditions)
        return f"{conds} -> {_action_text(self.action, self.argument)}".strip()


def _action_text(action: Action, argument: float | str | None) -> str:
    if action == "throttle":
        assert isinstance(argument, float)
        return f"throttle({argument:g}/s)"
    if action in ("tag", "mirror"):
        return f"{action}({argument})"
    return action


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}
_NOT = {"<": "not <", "<=": "not <=", ">": "not >", ">=": "not >=", "==": "!="}


def _numeric(
    text: str, label: str, get: Callable[[Context], float], op: str, limit: float, unit: str
) -> _Cond:
    fn = _OPS[op]

    def test(ctx: Context) -> bool:
        return fn(get(ctx), limit)

    def why(ctx: Context) -> str:
        ok = fn(get(ctx), limit)
        shown = op if ok else _NOT[op]
        return f"{label} {get(ctx):g}{unit} is {shown} {limit:g}{unit}"

    return _Cond(text, test, why)


# ---------------------------------------------------------------------------------------------
# Lexer


class _Tok(NamedTuple):
    kind: str  # word, string, arrow, op, or the punctuation character itself
    text: str
    col: int  # 1-based
    end: int  # 1-based column just after the token


_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t]+)
  | (?P<comment>\#.*)
  | (?P<string>"[^"]*")
  | (?P<arrow>->)
  | (?P<op><=|>=|==|<|>)
  | (?P<punct>[:,=()@])
  | (?P<word>(?:[A-Za-z0-9_.*/]|-(?!>))+)
    """,
    re.VERBOSE,
)


def _show(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


class _Line:
    """The tokens of one line, with a cursor and error helpers."""

    def __init__(self, source: str, lineno: int, text: str) -> None:
        self.source = source
        self.lineno = lineno
        self.toks: list[_Tok] = []
        self.pos = 0
        i = 0
        while i < len(text):
            m = _TOKEN.match(text, i)
            if m is None:
                ch = text[i]
                if ch == '"':
                    raise self.error_at(i + 1, "unterminated string")
                raise self.error_at(i + 1, f"unexpected character {ch!r}")
            kind = m.lastgroup
            assert kind is not None
            if kind == "punct":
                self.toks.append(_Tok(m.group(), m.group(), i + 1, m.end() + 1))
            elif kind not in ("ws", "comment"):
                self.toks.append(_Tok(kind, m.group(), i + 1, m.end() + 1))
            i = m.end()
        self.eol = self.toks[-1].end if self.toks else 1

    def error_at(self, col: int, message: str) -> PolicyError:
        return PolicyError(self.source, self.lineno, col, message)

    def error(self, tok: _Tok | None, message: str) -> PolicyError:
        return self.error_at(self.eol if tok is None else tok.col, message)

    def peek(self) -> _Tok | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self, what: str) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise self.error(None, f"expected {what}, got end of line")
        self.pos += 1
        return tok

    def expect(self, kind: str, what: str) -> _Tok:
        tok = self.take(what)
        if tok.kind != kind:
            raise self.error(tok, f"expected {what}, got {_show(tok.text)}")
        return tok

    def word(self, what: str) -> _Tok:
        return self.expect("word", what)

    def done(self) -> None:
        tok = self.peek()
        if tok is not None:
            raise self.error(tok, f"expected end of line, got {_show(tok.text)}")


# ---------------------------------------------------------------------------------------------
# Value parsers


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_HEX = re.compile(r"[0-9A-Fa-f]{32}")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)/(s|m|h)")
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _finite(line: _Line, tok: _Tok, value: float) -> float:
    if not math.isfinite(value):
        raise line.error(tok, f"number {_show(tok.text)} is too large")
    return value


def _number(line: _Line) -> float:
    tok = line.word("a number")
    if not _NUMBER.fullmatch(tok.text):
        raise line.error(tok, f"expected a number, got {_show(tok.text)}")
    return _finite(line, tok, float(tok.text))


def _duration(line: _Line) -> float:
    tok = line.word("a duration like 60s")
    m = _DURATION.fullmatch(tok.text)
    if m is None:
        raise line.error(tok, f"expected a duration like 60s or 5m, got {_show(tok.text)}")
    return _finite(line, tok, float(m.group(1)) * _DURATION_UNIT[m.group(2)])


def _rate(line: _Line, positive: bool = False) -> float:
    tok = line.word("a rate like 10/s")
    m = _RATE.fullmatch(tok.text)
    if m is None:
        raise line.error(tok, f"expected a rate like 10/s, got {_show(tok.text)}")
    value = _finite(line, tok, float(m.group(1)) / _RATE_UNIT[m.group(2)])
    if positive and value <= 0:
        raise line.error(tok, "a throttle rate must be greater than zero")
    return value


def _name(line: _Line, what: str) -> str:
    tok = line.word(what)
    if not _NAME.fullmatch(tok.text):
        raise line.error(tok, f"expected {what}, got {_show(tok.text)}")
    return tok.text


def _op(line: _Line) -> str:
    return line.expect("op", "a comparison (< <= > >= ==)").text


def _channel_pattern(line: _Line, tok: _Tok) -> tuple[str | None, re.Pattern[str] | None]:
    """(exact channel, None) or (None, compiled pattern); `**` (any depth) only as the last segment."""
    segments = tok.text.split("/")
    parts: list[str] = []
    wild = False
    for i, seg in enumerate(segments):
        if seg == "**":
            if i != len(segments) - 1:
                raise line.error(tok, "'**' may only be the last segment of a channel pattern")
            parts.append(".+")
            wild = True
        elif seg == "*":
            parts.append("[^/]+")
            wild = True
        elif _SEGMENT.fullmatch(seg):
            parts.append(re.escape(seg))
        else:
            raise line.error(
                tok,
                f"bad channel pattern {_show(tok.text)}: a segment is a name, '*' or a final '**'",
            )
    if not wild:
        return tok.text, None
    return None, re.compile("/".join(parts))


# ---------------------------------------------------------------------------------------------
# Parser


@dataclass
class _RuleDraft:
    conditions: list[_Cond] = field(default_factory=list)
    sources: frozenset[bytes] | None = None
    source_text: str | None = None
    channel_exact: str | None = None
    channel_any: bool = True
    has_channel: bool = False


def _parse_from(
    line: _Line, kw: _Tok, draft: _RuleDraft, groups: dict[str, frozenset[bytes]]
) -> None:
    if draft.source_text is not None:
        raise line.error(kw, "a rule may have only one 'from'")
    tok = line.take("a CellID, @group or *")
    if tok.kind == "@":
        gtok = line.word("a group name")
        members = groups.get(gtok.text)
        if members is None:
            raise line.error(gtok, f"unknown group {_show(gtok.text)}")
        gname = gtok.text
        draft.sources = members
        draft.source_text = f"@{gname}"

        def in_group(ctx: Context) -> bool:
            return ctx.source in members

        def why_group(ctx: Context) -> str:
            verb = "is" if ctx.source in members else "is not"
            return f"source {ctx.source.hex()} {verb} in group {gname}"

        draft.conditions.append(_Cond(f"from @{gname}", in_group, why_group))
    elif tok.kind == "word" and tok.text == "*":
        draft.source_text = "*"
        draft.conditions.append(_Cond("from *", lambda ctx: True, lambda ctx: "any source"))
    elif tok.kind == "word" and _HEX.fullmatch(tok.text):
        cid = bytes.fromhex(tok.text)
        draft.sources = frozenset({cid})
        draft.source_text = cid.hex()

        def is_cid(ctx: Context) -> bool:
            return ctx.source == cid

        def why_cid(ctx: Context) -> str:
            verb = "is" if ctx.source == cid else "is not"
            return f"source {ctx.source.hex()} {verb} {cid.hex()}"

        draft.conditions.append(_Cond(f"from {cid.hex()}", is_cid, why_cid))
    else:
        raise line.error(
            tok, f"expected a CellID (32 hex digits), @group or *, got {_show(tok.text)}"
        )


def _parse_channel(line: _Line, kw: _Tok, draft: _RuleDraft) -> None:
    if draft.has_channel:
        raise line.error(kw, "a rule may have only one 'channel'")
    tok = line.word("a channel pattern")
    exact, pattern = _channel_pattern(line, tok)
    draft.has_channel = True
    text = tok.text
    if exact is not None:
        draft.channel_exact = exact
        draft.channel_any = False

        def test(ctx: Context) -> bool:
            return ctx.channel == exact

    else:
        assert pattern is not None
        matcher = pattern.fullmatch

        def test(ctx: Context) -> bool:
            return matcher(ctx.channel) is not None

    def why(ctx: Context) -> str:
        verb = "matches" if test(ctx) else "does not match"
        return f"channel {ctx.channel!r} {verb} {text}"

    draft.conditions.append(_Cond(f"channel {text}", test, why))


def _parse_condition(
    line: _Line, kw: _Tok, draft: _RuleDraft, groups: dict[str, frozenset[bytes]]
) -> None:
    key = kw.text if kw.kind == "word" else ""
    if key == "from":
        _parse_from(line, kw, draft, groups)
    elif key == "channel":
        _parse_channel(line, kw, draft)
    elif key == "capability":
        cap = _name(line, "a capability name")

        def has_cap(ctx: Context) -> bool:
            return cap in ctx.capabilities

        def why_cap(ctx: Context) -> str:
            return f"capability {cap} {'held' if cap in ctx.capabilities else 'not held'}"

        draft.conditions.append(_Cond(f"capability {cap}", has_cap, why_cap))
    elif key == "right":
        tok = line.word("a right (publish, subscribe, admin, delegate)")
        if tok.text not in RIGHTS:
            raise line.error(
                tok,
                f"expected a right (publish, subscribe, admin, delegate), got {_show(tok.text)}",
            )
        right = tok.text

        def has_right(ctx: Context) -> bool:
            return right in ctx.rights

        def why_right(ctx: Context) -> str:
            return f"right {right} {'granted' if right in ctx.rights else 'not granted'}"

        draft.conditions.append(_Cond(f"right {right}", has_right, why_right))
    elif key == "trust":
        op = _op(line)
        v = _number(line)
        draft.conditions.append(
            _numeric(f"trust {op} {v:g}", "trust", lambda c: c.trust, op, v, "")
        )
    elif key == "session-age":
        op = _op(line)
        v = _duration(line)
        draft.conditions.append(
            _numeric(f"session-age {op} {v:g}s", "session age", lambda c: c.session_age, op, v, "s")
        )
    elif key == "rate":
        op = _op(line)
        v = _rate(line)
        draft.conditions.append(
            _numeric(f"rate {op} {v:g}/s", "rate", lambda c: c.rate, op, v, "/s")
        )
    else:
        raise line.error(
            kw,
            "expected a condition (from, channel, capability, right, trust, session-age, rate) "
            f"or '->', got {_show(kw.text)}",
        )


_SIMPLE_ACTIONS: dict[str, Action] = {
    "pass": "pass",
    "drop": "drop",
    "redirect-to-inspection": "redirect-to-inspection",
}


def _parse_action(line: _Line) -> tuple[Action, float | str | None]:
    tok = line.take("an action")
    word = tok.text if tok.kind == "word" else ""
    simple = _SIMPLE_ACTIONS.get(word)
    if simple is not None:
        return simple, None
    if word == "throttle":
        line.expect("(", "'(' after throttle")
        rate = _rate(line, positive=True)
        line.expect(")", "')'")
        return "throttle", rate
    if word in ("tag", "mirror"):
        line.expect("(", f"'(' after {word}")
        name = _name(line, f"a {word} name")
        line.expect(")", "')'")
        return ("tag" if word == "tag" else "mirror"), name
    raise line.error(tok, f"expected an action, got {_show(tok.text)}")


def parse_policy(text: str, source: str = "policy") -> Policy:
    """Parse and compile policy `text`; `source` names it in error messages.

    Raises `PolicyError` (a `ConfigError`) with `source:line:col:` on any fault, and nothing else.
    """
    groups: dict[str, frozenset[bytes]] = {}
    rules: list[Rule] = []
    default: Rule | None = None
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = _Line(source, lineno, raw[:-1] if raw.endswith("\r") else raw)
        first = line.peek()
        if first is None:
            continue
        line.pos = 1
        if first.kind == "word" and first.text == "group":
            gtok = line.word("a group name")
            if not _NAME.fullmatch(gtok.text):
                raise line.error(gtok, f"expected a group name, got {_show(gtok.text)}")
            if gtok.text in groups:
                raise line.error(gtok, f"group {gtok.text!r} is already defined")
            line.expect("=", "'='")
            members: set[bytes] = set()
            while True:
                tok = line.take("a CellID or @group")
                if tok.kind == "@":
                    ref = line.word("a group name")
                    if ref.text not in groups:
                        raise line.error(ref, f"unknown group {_show(ref.text)}")
                    members |= groups[ref.text]
                elif tok.kind == "word" and _HEX.fullmatch(tok.text):
                    members.add(bytes.fromhex(tok.text))
                else:
                    raise line.error(
                        tok, f"expected a CellID (32 hex digits) or @group, got {_show(tok.text)}"
                    )
                if line.peek() is None:
                    break
                line.expect(",", "',' or end of line")
            groups[gtok.text] = frozenset(members)
        elif first.kind == "word" and first.text == "rule":
            stok = line.expect("string", 'a quoted rule name like "ops may publish"')
            name = stok.text[1:-1].strip()
            if not name:
                raise line.error(stok, "a rule name must not be empty")
            line.expect(":", "':' after the rule name")
            draft = _RuleDraft()
            while True:
                kw = line.take("a condition or '->'")
                if kw.kind == "arrow":
                    break
                _parse_condition(line, kw, draft, groups)
            action, argument = _parse_action(line)
            line.done()
            rules.append(
                Rule(
                    name=name,
                    line=lineno,
                    conditions=tuple(draft.conditions),
                    action=action,
                    argument=argument,
                    sources=draft.sources,
                    channel_exact=draft.channel_exact,
                    channel_any=draft.channel_any,
                    index=len(rules),
                )
            )
        elif first.kind == "word" and first.text == "default":
            if default is not None:
                raise line.error(first, f"a second 'default' (the first is on line {default.line})")
            line.expect("arrow", "'->'")
            action, argument = _parse_action(line)
            line.done()
            default = Rule("default", lineno, (), action, argument)
        else:
            raise line.error(
                first, f"expected 'group', 'rule' or 'default', got {_show(first.text)}"
            )
    if default is None:
        last = text.split("\n")
        raise PolicyError(source, len(last), 1, "the policy needs a 'default -> ACTION' line")
    return Policy(rules, default, groups)


# ---------------------------------------------------------------------------------------------
# Compiled policy


class Policy:
    """A compiled policy: `decide` picks the first matching rule, else the default.

    Rules are bucketed by (source CellID | any) x (exact channel | any channel), so a decision
    visits only the rules that could apply to its source and channel, in file order.
    """

    def __init__(
        self, rules: Iterable[Rule], default: Rule, groups: dict[str, frozenset[bytes]]
    ) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.default = default
        self.groups = dict(groups)
        self._src_chan: dict[tuple[bytes, str], list[int]] = {}
        self._src_any: dict[bytes, list[int]] = {}
        self._any_chan: dict[str, list[int]] = {}
        self._any_any: list[int] = []
        for i, rule in enumerate(self.rules):
            if rule.sources is None:
                if rule.channel_exact is not None:
                    self._any_chan.setdefault(rule.channel_exact, []).append(i)
                else:
                    self._any_any.append(i)
            else:
                for cid in rule.sources:
                    if rule.channel_exact is not None:
                        self._src_chan.setdefault((cid, rule.channel_exact), []).append(i)
                    else:
                        self._src_any.setdefault(cid, []).append(i)

    def _candidates(self, ctx: Context) -> Iterator[int]:
        lists = [
            lst
            for lst in (
                self._src_chan.get((ctx.source, ctx.channel)),
                self._src_any.get(ctx.source),
                self._any_chan.get(ctx.channel),
                self._any_any,
            )
            if lst
        ]
        if len(lists) == 1:
            return iter(lists[0])
        return heapq.merge(*lists)

    def _match(self, ctx: Context) -> Rule:
        rules = self.rules
        for i in self._candidates(ctx):
            rule = rules[i]
            if all(c.test(ctx) for c in rule.conditions):
                return rule
        return self.default

    def decide(self, ctx: Context, *, reasons: bool = True) -> Decision:
        """The decision for `ctx`: the first rule whose conditions all hold, else the default.

        With `reasons=False` the decision carries no explanation: building the sentences costs
        more than matching, and the hot path (AccessController) never reads them.
        """
        rule = self._match(ctx)
        if not reasons:
            return Decision(rule.action, rule.argument, rule.name, rule.line, (), rule.index)
        if rule is self.default:
            why: tuple[str, ...] = ("no rule matched",)
        else:
            why = tuple(c.why(ctx) for c in rule.conditions) or ("the rule has no conditions",)
        return Decision(rule.action, rule.argument, rule.name, rule.line, why, rule.index)

    def explain(self, ctx: Context, limit: int = 20) -> str:
        """A human-readable account: which rule decides, why, and why earlier candidates did not."""
        decision = self.decide(ctx)
        out: list[str] = []
        skipped = 0
        for i in self._candidates(ctx):
            if i >= decision.index >= 0:
                break
            rule = self.rules[i]
            failing = next(c for c in rule.conditions if not c.test(ctx))
            if len(out) < limit:
                out.append(
                    f"  line {rule.line} rule {rule.name!r} does not apply: {failing.why(ctx)}"
                )
            else:
                skipped += 1
        if skipped:
            out.append(f"  ... and {skipped} more rules that do not apply")
        action = _action_text(decision.action, decision.argument)
        if decision.index < 0:
            head = f"no rule matches; default (line {decision.line}) decides: {action}"
        else:
            head = f"rule {decision.rule!r} (line {decision.line}) decides: {action}"
        why = [f"  because {r}" for r in decision.reasons] if decision.index >= 0 else []
        return "\n".join([head, *why, *out])

    def describe(self) -> str:
        """A summary of the policy, for `policy check`."""
        out = [
            f"{len(self.groups)} groups, {len(self.rules)} rules, default -> "
            f"{_action_text(self.default.action, self.default.argument)}"
        ]
        for name, members in sorted(self.groups.items()):
            out.append(f"group {name}: {len(members)} members")
        for rule in self.rules:
            out.append(f"line {rule.line}: rule {rule.name!r}: {rule.text()}")
        return "\n".join(out)


def check_policy(text: str, source: str = "policy") -> str:
    """Validate `text` and explain it (`policy check FILE`); raises `PolicyError` when broken."""
    return parse_policy(text, source).describe()


class PolicyHolder:
    """Holds the live policy and swaps in new text atomically; a broken file keeps the old one."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    @property
    def policy(self) -> Policy:
        return self._policy

    def reload(self, text: str, source: str = "policy") -> ConfigError | None:
        """Compile `text` and install it; on error keep the current policy and return the error."""
        try:
            new = parse_policy(text, source)
        except ConfigError as exc:
            return exc
        self._policy = new
        return None

    def decide(self, ctx: Context, *, reasons: bool = True) -> Decision:
        return self._policy.decide(ctx, reasons=reasons)


class Throttles:
    """Token buckets for `throttle` decisions, one per (rule, source), at most `capacity` (LRU)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._buckets: OrderedDict[tuple[int, int, bytes], TokenBucket] = OrderedDict()

    def allow(self, decision: Decision, source: bytes, now: float) -> bool:
        """True when traffic under `decision` may go now; only `throttle` and `drop` limit it."""
        if decision.action == "drop":
            return False
        if decision.action != "throttle":
            return True
        assert isinstance(decision.argument, float)
        rate = decision.argument
        key = (decision.index, decision.line, source)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate:
            bucket = TokenBucket(rate, max(1.0, rate), now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
