"""`cellmesh chaos-relay`: an impairing UDP relay for tests and benchmarks (node/chaos.py).

Defined here and registered on the main group by cli/main.py. It does not import cli/main.py (which
imports this module), so it has its own one-line `fail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import signal
import sys
from typing import NoReturn

import click
from rich.console import Console

from cellmesh.config import parse_host_port
from cellmesh.errors import CellmeshError
from cellmesh.node.chaos import BurstLoss, Impairment, RelayStats, UdpChaosRelay
from cellmesh.node.udp import format_addr

EXIT_ERROR = 1
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
}


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one line to stderr and exit."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


def parse_size(text: str) -> float:
    """'10M' -> 10_000_000.0. Suffixes K, M, G are powers of 1000; Ki, Mi, Gi of 1024; B optional.

    Raises ValueError for anything else (including zero and negative numbers).
    """
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size: use a number with an optional K, M or G suffix")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{text!r} must be greater than zero")
    return value


def _probability(option: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        fail(f"{option} must be a probability between 0 and 1, got {value:g}")


def _millis(option: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 60_000.0):
        fail(f"{option} must be between 0 and 60000 ms, got {value:g}")
    return value / 1000.0


def _size(option: str, text: str) -> float:
    try:
        return parse_size(text)
    except ValueError as exc:
        fail(f"{option}: {exc}")


def _side(base: Impairment, loss: float, burst: float | None) -> Impairment:
    """`base` with this direction's loss: independent, or bursty with the same long-run rate."""
    if burst is None or loss == 0:
        return dataclasses.replace(base, loss=loss)
    return dataclasses.replace(base, burst_loss=BurstLoss.from_average(loss, burst))


@click.command(
    "chaos-relay",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    metavar="HOST:PORT",
    help="Where clients send (port 0 picks a free one; the bound address is printed on stdout).",
)
@click.option(
    "--target",
    required=True,
    metavar="HOST:PORT",
    help="Where every datagram is forwarded (for example a node's --listen address).",
)
@click.option(
    "--loss",
    type=float,
    default=0.0,
    show_default=True,
    metavar="P",
    help="Probability a datagram is dropped, each way (0-1).",
)
@click.option("--up-loss", type=float, metavar="P", help="Override --loss for client -> target.")
@click.option("--down-loss", type=float, metavar="P", help="Override --loss for target -> client.")
@click.option(
    "--burst",
    type=float,
    metavar="N",
    help="Make loss bursty (Gilbert-Elliott): runs of N lost datagrams on average, same long-run "
    "loss rate.",
)
@click.option(
    "--delay",
    type=float,
    default=0.0,
    show_default=True,
    metavar="MS",
    help="One-way delay each way in ms (RTT grows by twice this).",
)
@click.option(
    "--jitter",
    type=float,
    default=0.0,
    show_default=True,
    metavar="MS",
    help="Uniform ±MS added to each delay (order is kept; use --reorder to reorder).",
)
@click.option(
    "--dup",
    type=float,
    default=0.0,
    show_default=True,
    metavar="P",
    help="Probability a datagram is delivered twice.",
)
@click.option(
    "--reorder",
    type=float,
    default=0.0,
    show_default=True,
    metavar="P",
    help="Probability a datagram is held back --reorder-gap ms so later ones overtake it.",
)
@click.option(
    "--reorder-gap",
    type=float,
    default=5.0,
    show_default=True,
    metavar="MS",
    help="Extra delay of a reordered datagram.",
)
@click.option(
    "--rate",
    metavar="BYTES/S",
    help="Bottleneck rate each way, e.g. 1.25M (K/M/G = 1000^n, Ki/Mi/Gi = 1024^n). Default: none.",
)
@click.option(
    "--queue",
    default="256Ki",
    show_default=True,
    metavar="BYTES",
    help="Bottleneck queue behind --rate; datagrams that do not fit are tail-dropped.",
)
@click.option("--seed", type=int, metavar="N", help="Seed the random streams (reproducible runs).")
@click.option(
    "--duration",
    type=float,
    metavar="SECONDS",
    help="Stop after SECONDS. Default: run until SIGINT or SIGTERM.",
)
@click.option(
    "--stats-interval",
    type=float,
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Print the counters to stderr every SECONDS (0: only at exit).",
)
@click.option(
    "--max-clients",
    type=int,
    default=64,
    show_default=True,
    metavar="N",
    help="Client addresses remembered at once (least recently active evicted).",
)
def chaos_relay(
    listen: str,
    target: str,
    loss: float,
    up_loss: float | None,
    down_loss: float | None,
    burst: float | None,
    delay: float,
    jitter: float,
    dup: float,
    reorder: float,
    reorder_gap: float,
    rate: str | None,
    queue: str,
    seed: int | None,
    duration: float | None,
    stats_interval: float,
    max_clients: int,
) -> None:
    """Relay UDP from --listen to --target through loss, delay, jitter, duplication and reordering.

    Each client address gets its own upstream socket, so the target's replies return to the
    right client (like a NAT). Both directions get the same settings from independent random
    streams, except for --up-loss/--down-loss. The bound address is printed on stdout; counters
    go to stderr. For testing and benchmarks only: it is not part of a node.

    \b
    Example: node a reaches node b over a lossy path with a 20 ms RTT
      cellmesh --home /tmp/b node --listen 127.0.0.1:7002
      cellmesh chaos-relay --listen 127.0.0.1:7100 --target 127.0.0.1:7002 \\
          --loss 0.05 --delay 10 --stats-interval 5
      cellmesh --home /tmp/a node --listen 127.0.0.1:7001 --peer 127.0.0.1:7100
      cellmesh --home /tmp/a ping <CellID of b>
    """
    for option, p in (
        ("--loss", loss),
        ("--up-loss", up_loss),
        ("--down-loss", down_loss),
        ("--dup", dup),
        ("--reorder", reorder),
    ):
        _probability(option, p)
    if burst is not None and not (math.isfinite(burst) and burst >= 1):
        fail(f"--burst must be at least 1 (datagrams per loss run), got {burst:g}")
    delay_s = _millis("--delay", delay)
    jitter_s = _millis("--jitter", jitter)
    gap_s = _millis("--reorder-gap", reorder_gap)
    rate_bps = None if rate is None else _size("--rate", rate)
    queue_bytes = int(_size("--queue", queue))
    if not 1 <= queue_bytes <= 1 << 30:
        fail(f"--queue must be between 1 byte and 1Gi, got {queue}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        fail(f"--duration must be a positive number of seconds, got {duration:g}")
    if not (math.isfinite(stats_interval) and stats_interval >= 0):
        fail(f"--stats-interval must be 0 or a positive number of seconds, got {stats_interval:g}")
    if stats_interval and stats_interval < 0.05:
        fail("--stats-interval must be at least 0.05 s (or 0 for none)")
    if not 1 <= max_clients <= 65536:
        fail(f"--max-clients must be between 1 and 65536, got {max_clients}")
    for option, spec in (("--listen", listen), ("--target", target)):
        try:
            parse_host_port(spec)
        except CellmeshError as exc:
            fail(f"{option}: {exc}")
    if parse_host_port(target)[1] == 0:
        fail("--target needs a port other than 0")

    try:
        base = Impairment(
            delay=delay_s,
            jitter=jitter_s,
            duplicate=dup,
            reorder=reorder,
            reorder_gap=gap_s,
            rate=rate_bps,
            queue_bytes=queue_bytes,
        )
        up = _side(base, loss if up_loss is None else up_loss, burst)
        down = _side(base, loss if down_loss is None else down_loss, burst)
        relay = UdpChaosRelay(listen, target, up, down, seed=seed, max_clients=max_clients)
    except CellmeshError as exc:
        fail(str(exc))

    async def main() -> None:
        await relay.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            click.echo(format_addr(relay.address))
            sys.stdout.flush()
            err.print(
                f"chaos relay {format_addr(relay.address)} -> {format_addr(relay.target)}\n"
                f"  up (client -> target):   {up.describe()}\n"
                f"  down (target -> client): {down.describe()}",
                soft_wrap=True,
            )
            started = loop.time()
            deadline = math.inf if duration is None else started + duration
            next_stats = started + stats_interval if stats_interval else math.inf
            while not stop.is_set():
                now = loop.time()
                if now >= deadline:
                    break
                if now >= next_stats:
                    _print_stats(relay.stats(), f"t={now - started:.1f}s")
                    next_stats += stats_interval
                    continue
                wake = min(deadline, next_stats)
                timeout = None if math.isinf(wake) else wake - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            final = relay.stats()
            await relay.stop()
        _print_stats(final, "final")

    try:
        asyncio.run(main())
    except CellmeshError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(str(exc))


def _print_stats(s: RelayStats, label: str) -> None:
    err.print(
        f"{label} clients {s.clients}: up {s.up.summary()} | down {s.down.summary()}",
        soft_wrap=True,
    )
