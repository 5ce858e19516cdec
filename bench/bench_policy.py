"""Ring 1 policy decision cost per packet, with 10 and 10,000 rules, against the cost of one
ChaCha20-Poly1305 open of a 1,200-byte packet measured in the same run.

Single process, no I/O. Each policy is generated, parsed and compiled once (`parse_policy`,
outside the timing; its compile time is printed), then `Policy.decide(Context)` is timed on
pre-built contexts. A policy of N rules is a realistic mix:

* 3 rules first that name no CellID: `rate > 200/s -> drop`, `trust < 0.1 -> throttle(10/s)`
  and a group rule `from @ops channel telemetry/** right publish -> pass`;
* the body, in file order: per-CellID rules with a channel pattern and a right (60%), per-CellID
  rules on an exact channel (15%), per-CellID trust rules that throttle (10%), group rules on a
  channel pattern needing a right (10%), and any-source rules on an exact channel needing a
  capability (5%); groups have 20 members each (one group per 200 rules);
* 2 rules last that name no CellID: `session-age < 60s -> tag(new)` and
  `channel bulk/** rate > 50/s -> throttle(100/s)`; then `default -> drop`.

Lookups (each decided by the rule named, which the script checks):

* early: a member of @ops publishing telemetry, decided by rule 3;
* late: the CellID of the last per-CellID rule of the body, on its channel, decided by that rule
  (near the end of the file);
* default: a CellID no rule names, on a channel no rule names: every rule that applies to any
  source is tried and fails, and the default decides;
* unindexed (worst case, not a realistic file): a policy of N rules that all name no CellID and no
  exact channel (`channel app/I/** trust > 0.5 -> pass`), and a lookup that none matches, so
  every rule is tried.

Also timed: building a `Context`, and `Throttles.allow` for a pass decision, for a throttle
decision from one source, and for a throttle decision from 10,000 sources in turn (more than the
4,096-bucket LRU holds, so each call makes a new bucket and evicts one).

Baseline: `cryptography`'s `ChaCha20Poly1305.decrypt` (object built once, as a session does) of a
1,200-byte packet: a 64-byte header as associated data and 1,136 bytes of ciphertext (1,120 of
plaintext + 16 of tag). The ratio is ns per decision / ns per open: the fraction of a decrypt
that a decision costs.

Method: every case is a tight loop of n calls (n sized for ~20 ms; `--quick`: ~5 ms), timed
with perf_counter_ns; 15 rounds (`--quick`: 5) with the cases interleaved, the baseline first in
every round; the median round is reported (loop overhead, ~15 ns, is included in all figures).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from _common import (
    Metric,
    Result,
    exit_on_sigterm,
    parse_args,
    print_header,
    report,
)
from cellmesh.filter.access import AccessController
from cellmesh.filter.channels import ChannelSpec, ChannelTable, channel_hash
from cellmesh.filter.policy import Context, Decision, Policy, PolicyHolder, Throttles, parse_policy

BENCH = "bench_policy"
SIZES = (10, 10_000)
PACKET = 1200
HEADER = 64
TAG = 16
GROUP_SIZE = 20
RULES_PER_GROUP = 200

Loop = Callable[[int], None]


# ------------------------------------------------------------------------------ policies


@dataclass(frozen=True, slots=True)
class Generated:
    """A generated policy, compiled, and the contexts that hit it where intended."""

    size: int
    text: str
    policy: Policy
    compile_s: float
    lookups: dict[str, tuple[Context, str]]
    """lookup name -> (context, name of the rule expected to decide)"""


def _cid(rng: random.Random) -> bytes:
    return rng.randbytes(16)


def realistic(n: int, rng: random.Random) -> tuple[str, dict[str, tuple[Context, str]]]:
    """A policy of `n` rules (see the module docstring) and its lookups."""
    if n < 6:
        raise ValueError("a realistic policy needs at least 6 rules")
    ngroups = max(2, n // RULES_PER_GROUP)
    groups = {f"g{k}": [_cid(rng) for _ in range(GROUP_SIZE)] for k in range(ngroups)}
    ops = [_cid(rng) for _ in range(GROUP_SIZE)]
    lines = [f"# generated: {n} rules", f"group ops = {', '.join(c.hex() for c in ops)}"]
    lines += [f"group {g} = {', '.join(c.hex() for c in m)}" for g, m in groups.items()]
    lines += [
        'rule "flooders": rate > 200/s -> drop',
        'rule "strangers are slow": trust < 0.1 -> throttle(10/s)',
        'rule "ops publish telemetry": from @ops channel telemetry/** right publish -> pass',
    ]
    body = n - 5
    last_peer: tuple[bytes, str, str] | None = None
    for i in range(body):
        k = i % 20
        name = f"r{i}"
        if k < 12:
            cid = _cid(rng)
            lines.append(
                f'rule "{name}": from {cid.hex()} channel app/{i}/** right publish -> pass'
            )
            last_peer = (cid, f"app/{i}/data", name)
        elif k < 15:
            cid = _cid(rng)
            lines.append(f'rule "{name}": from {cid.hex()} channel telemetry/node-{i} -> tag(node)')
        elif k < 17:
            cid = _cid(rng)
            lines.append(f'rule "{name}": from {cid.hex()} trust < 0.5 -> throttle(50/s)')
        elif k < 19:
            g = f"g{i % ngroups}"
            lines.append(f'rule "{name}": from @{g} channel ops/*/cmd right admin -> mirror(audit)')
        else:
            lines.append(
                f'rule "{name}": channel files/f-{i} capability storage -> redirect-to-inspection'
            )
    lines += [
        'rule "new sessions": session-age < 60s -> tag(new)',
        'rule "bulk movers": channel bulk/** rate > 50/s -> throttle(100/s)',
        "default -> drop",
    ]
    assert last_peer is not None
    cid, channel, rule = last_peer
    lookups = {
        "early": (
            Context(
                ops[3],
                "telemetry/engine-3",
                rights=frozenset({"publish"}),
                trust=0.9,
                session_age=3600.0,
                rate=5.0,
            ),
            "ops publish telemetry",
        ),
        "late": (
            Context(
                cid, channel, rights=frozenset({"publish"}), trust=0.9, session_age=3600.0, rate=5.0
            ),
            rule,
        ),
        "default": (
            Context(_cid(rng), "misc/thing", trust=0.5, session_age=3600.0, rate=1.0),
            "default",
        ),
    }
    return "\n".join(lines) + "\n", lookups


def unindexed(n: int, rng: random.Random) -> tuple[str, dict[str, tuple[Context, str]]]:
    """`n` rules that no index can skip, and a lookup that none matches."""
    lines = [f'rule "u{i}": channel app/{i}/** trust > 0.5 -> pass' for i in range(n)]
    lines.append("default -> drop")
    ctx = Context(_cid(rng), "app/0/x", trust=0.2, session_age=3600.0, rate=1.0)
    return "\n".join(lines) + "\n", {"unindexed": (ctx, "default")}


def generate(
    n: int,
    rng: random.Random,
    make: Callable[[int, random.Random], tuple[str, dict[str, tuple[Context, str]]]],
) -> Generated:
    text, lookups = make(n, rng)
    t0 = time.perf_counter()
    policy = parse_policy(text, f"generated-{n}")
    compile_s = time.perf_counter() - t0
    if len(policy.rules) != n:
        raise RuntimeError(f"generated {len(policy.rules)} rules, wanted {n}")
    for name, (ctx, expected) in lookups.items():
        got = policy.decide(ctx)
        if got.rule != expected:
            raise RuntimeError(
                f"{n} rules, lookup {name!r}: decided by {got.rule!r} (line {got.line}), "
                f"expected {expected!r}"
            )
    return Generated(n, text, policy, compile_s, lookups)


# ------------------------------------------------------------------------------ loops


def decide_loop(policy: Policy, ctx: Context) -> Loop:
    decide = policy.decide

    def run(n: int) -> None:
        # reasons=False: what the node's access controller asks for (no explanation strings).
        for _ in repeat(None, n):
            decide(ctx, reasons=False)

    return run


def open_loop() -> tuple[Loop, str]:
    """The baseline: ChaCha20-Poly1305 open of one 1,200-byte packet (header as AD)."""
    aead = ChaCha20Poly1305(os.urandom(32))
    nonce = bytes(4) + (12345).to_bytes(8, "little")
    ad = os.urandom(HEADER)
    ct = aead.encrypt(nonce, os.urandom(PACKET - HEADER - TAG), ad)
    assert HEADER + len(ct) == PACKET
    decrypt = aead.decrypt

    def run(n: int) -> None:
        for _ in repeat(None, n):
            decrypt(nonce, ct, ad)

    return run, f"ChaCha20Poly1305.decrypt, {HEADER} B AD + {len(ct)} B ciphertext"


def context_loop(source: bytes) -> Loop:
    rights = frozenset({"publish"})

    def run(n: int) -> None:
        for _ in repeat(None, n):
            Context(source, "telemetry/engine-3", rights=rights, trust=0.9, rate=5.0)

    return run


def allow_loop(decision: Decision, sources: list[bytes]) -> Loop:
    throttles = Throttles()
    allow = throttles.allow
    now = [0.0]
    if len(sources) == 1:
        src = sources[0]

        def run_one(n: int) -> None:
            t = now[0]
            for _ in repeat(None, n):
                t += 1e-6
                allow(decision, src, t)
            now[0] = t

        return run_one
    k = len(sources)
    pos = [0]

    def run_many(n: int) -> None:
        t, i = now[0], pos[0]
        for _ in repeat(None, n):
            t += 1e-6
            allow(decision, sources[i], t)
            i += 1
            if i == k:
                i = 0
        now[0], pos[0] = t, i

    return run_many


def grant_loop(n_rules: int, policy: Policy) -> Loop:
    """The per-packet check the node really makes: a cached verdict (grant) looked up by
    (peer, right, channel hash) and the rule's throttle consulted. The policy and the token were
    consulted once, when the peer asked."""
    table = ChannelTable((ChannelSpec("telemetry/**", "open"),))
    access = AccessController(table, bytes(32), policy=PolicyHolder(policy))
    peer = bytes(range(16))
    verdict = access.request(peer, "telemetry/engine-3", "publish", (), wall=1e9, now=0.0)
    h = channel_hash("telemetry/engine-3")
    grant, admit = access.grant, access.admit
    if not verdict.allowed:
        raise RuntimeError(f"{n_rules} rules: the grant was refused ({verdict.reason})")

    def run(n: int) -> None:
        for _ in repeat(None, n):
            g = grant(peer, "publish", h, 1e9)
            assert g is not None
            admit(g, 0.0)

    return run


def calibrate(loop: Loop, target_s: float) -> int:
    """Calls per round so that one round takes about `target_s`."""
    n = 1
    while True:
        t0 = time.perf_counter_ns()
        loop(n)
        dt = (time.perf_counter_ns() - t0) * 1e-9
        if dt >= target_s / 10 or n >= 1 << 22:
            return max(1, int(n * target_s / max(dt, 1e-9)))
        n *= 4


def measure(cases: dict[str, Loop], rounds: int, target_s: float) -> dict[str, float]:
    """Median ns per call of every case over `rounds` interleaved rounds."""
    sizes = {name: calibrate(loop, target_s) for name, loop in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, loop in cases.items():
            n = sizes[name]
            t0 = time.perf_counter_ns()
            loop(n)
            samples[name].append((time.perf_counter_ns() - t0) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


# ------------------------------------------------------------------------------ main


def options(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # --help shows the docstring as is


def run(args: argparse.Namespace) -> int:
    rounds, target_s = (5, 0.005) if args.quick else (15, 0.02)
    print_header(
        BENCH, f"policies of {' and '.join(f'{n:,}' for n in SIZES)} rules; {rounds} rounds"
    )
    t_start = time.monotonic()
    rng = random.Random(20261122)
    real = {n: generate(n, rng, realistic) for n in SIZES}
    worst = {n: generate(n, rng, unindexed) for n in SIZES}
    for n in SIZES:
        print(
            f"  {n:>6,} rules: parse_policy {real[n].compile_s * 1e3:,.1f} ms "
            f"({len(real[n].text) / 1e3:,.0f} kB of text, {len(real[n].policy.groups)} groups); "
            f"unindexed variant {worst[n].compile_s * 1e3:,.1f} ms"
        )
    base_loop, base_desc = open_loop()
    cases: dict[str, Loop] = {"open": base_loop}
    for n in SIZES:
        for name, (ctx, _) in real[n].lookups.items():
            cases[f"{n}:{name}"] = decide_loop(real[n].policy, ctx)
        ctx, _ = worst[n].lookups["unindexed"]
        cases[f"{n}:unindexed"] = decide_loop(worst[n].policy, ctx)
    throttle = Decision("throttle", 10.0, "strangers are slow", 4, (), 1)
    passing = Decision("pass", None, "ops publish telemetry", 5, (), 2)
    many = [rng.randbytes(16) for _ in range(10_000)]
    cases["ctx"] = context_loop(many[0])
    cases["allow:pass"] = allow_loop(passing, many[:1])
    cases["allow:1"] = allow_loop(throttle, many[:1])
    cases["allow:10k"] = allow_loop(throttle, many)
    for n in SIZES:
        cases[f"grant:{n}"] = grant_loop(n, parse_policy("default -> pass", "pass-all"))
    ns = measure(cases, rounds, target_s)
    base = ns["open"]

    def m(name: str, key: str) -> Metric:
        return Metric(name, ns[key] * 1e-9, base * 1e-9, "ns", "lower")

    labels = {
        "early": "decide: early rule (3rd)",
        "late": "decide: late rule (near the end)",
        "default": "decide: no rule, default",
        "unindexed": "decide: unindexed worst case",
    }
    for n in SIZES:
        report(
            Result(
                bench=BENCH,
                case=f"policy with {n:,} rules",
                ours="Policy.decide(Context, reasons=False) as the node calls it, pre-built context",
                baseline=f"one AEAD open of a {PACKET}-byte packet ({base_desc})",
                metrics=[m(label, f"{n}:{key}") for key, label in labels.items()],
                notes=[
                    f"parse_policy + compile: {real[n].compile_s * 1e3:,.1f} ms",
                    "unindexed: a file of rules that name no CellID and no exact channel, "
                    "and a lookup none matches (every rule is tried); not a realistic file",
                    "ratio = ns per decision / ns per open: the fraction of a decrypt",
                ],
                extra={"rules": n, "ns": {k: ns[f"{n}:{k}"] for k in labels}, "open_ns": base},
            ),
            args.json,
            args.quick,
        )
    report(
        Result(
            bench=BENCH,
            case="per-packet helpers",
            ours="Context construction; Throttles.allow (token bucket per rule and source)",
            baseline=f"one AEAD open of a {PACKET}-byte packet ({base_desc})",
            metrics=[
                m("Context(...) construction", "ctx"),
                m("Throttles.allow: pass decision", "allow:pass"),
                m("Throttles.allow: throttle, 1 source", "allow:1"),
                m("Throttles.allow: throttle, 10k sources", "allow:10k"),
            ],
            notes=[
                "10k sources: more than the 4,096-bucket LRU, so every call makes a bucket "
                "and evicts one (the worst case)"
            ],
            extra={k: ns[k] for k in ("ctx", "allow:pass", "allow:1", "allow:10k")},
        ),
        args.json,
        args.quick,
    )
    print(
        f"\n{BENCH} summary: ns per call (x = fraction of one {PACKET}-byte ChaCha20-Poly1305 "
        f"open, {base:,.0f} ns, measured alongside)"
    )
    rows = [("case", *(f"{n:,} rules" for n in SIZES))]
    for key, label in labels.items():
        rows.append(
            (
                label.removeprefix("decide: "),
                *(f"{ns[f'{n}:{key}']:,.0f} ns  {ns[f'{n}:{key}'] / base:.2f}x" for n in SIZES),
            )
        )
    for key, label in (
        ("ctx", "Context(...) construction"),
        ("allow:pass", "Throttles.allow, pass"),
        ("allow:1", "Throttles.allow, throttle, 1 source"),
        ("allow:10k", "Throttles.allow, throttle, 10k sources"),
        (f"grant:{SIZES[0]}", "per packet: cached grant + admit (node)"),
    ):
        rows.append((label, f"{ns[key]:,.0f} ns  {ns[key] / base:.2f}x", "(same)"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}")
    print(f"\n({time.monotonic() - t_start:.1f} s)")
    return 0


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__ or BENCH, options)
    try:
        return run(args)
    except (RuntimeError, ValueError) as exc:
        print(f"\n{BENCH}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
