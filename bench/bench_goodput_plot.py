"""Goodput vs random loss at 20 ms RTT, cellmesh (bbr) vs TCP+TLS, plotted to docs/goodput_vs_loss.png.

The path is the one `bench_lossy.py` builds (see its docstring): two network namespaces joined by
TUN devices (MTU 1500) and a forwarder thread applying `ChaosModel` per IP packet, 10 ms each way,
and random loss of 0, 1, 2, 5, 10, 15 and 20% per packet in each direction (`--quick`: 0, 5, 20%).
Every kind crosses the same path: a cellmesh stream (`max_datagram=1472`, bbr), and TCP + TLS 1.3
with the kernel's CUBIC and with its BBR. At each loss rate every kind makes one transfer of
deterministic data for a fixed time (3 s;
`--quick` 0.8 s) and is then cut off as in `bench_lossy.py` (the sender stops, the receiver
reports at once what it got in order; TCP reconnects for the next transfer, untimed): goodput =
the verified bytes received in order / (first write to last byte). Kinds alternate at
every loss rate, so a burst of noise hits one point of one curve, not one whole curve.

The figure goes to docs/goodput_vs_loss.png (`--quick`: a temporary file, unless `--out`), with
a log-scale goodput axis; a transfer that stalled is drawn at the bottom edge as an open marker.
Without root or TUN there is no honest TCP-under-loss baseline: the reason is printed and only
cellmesh through `UdpChaosRelay` is measured and plotted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from _common import Metric, Result, exit_on_sigterm, parse_args, print_header, report
from bench_bulk import Payload, self_signed_pem
from bench_lossy import (
    CHUNK,
    DELAY,
    TUN_DATAGRAM,
    Case,
    cellmesh_case,
    default_tcp_cc,
    maybe_tun,
    run_transfer,
    set_loss,
    start_case,
    tcp_case,
    tun_problem,
)
from cellmesh.node.chaos import Impairment

BENCH = "bench_goodput_plot"
LOSSES = (0.0, 0.01, 0.02, 0.05, 0.10, 0.15, 0.20)
QUICK_LOSSES = (0.0, 0.05, 0.20)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "goodput_vs_loss.png"
STYLE = {
    "cellmesh-bbr": ("cellmesh stream, bbr (max_datagram 1472)", "tab:blue", "o"),
    "tcp-cubic": ("TCP+TLS 1.3, CUBIC", "tab:red", "s"),
    "tcp-bbr": ("TCP+TLS 1.3, kernel BBR", "tab:orange", "^"),
}


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write the PNG (default: {DEFAULT_OUT}; with --quick a temporary file)",
    )
    p.add_argument("--no-tun", action="store_true", help="do not build the TUN path")


def plot(
    out: Path,
    losses: tuple[float, ...],
    curves: dict[str, list[float]],
    stalled: dict[str, list[bool]],
    subtitle: str,
) -> None:
    import matplotlib  # here, so the measurements still run (and say so) without matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.0), dpi=110)
    positive = [v for vs in curves.values() for v in vs if v > 0]
    floor = min(positive) / 2 if positive else 1e4
    xs = [p * 100 for p in losses]
    for label, values in curves.items():
        name, color, marker = STYLE.get(label, (label, "tab:gray", "x"))
        ys = [v if v > 0 else floor for v in values]
        ax.plot(xs, [y / 1e6 for y in ys], marker=marker, color=color, label=name)
        for x, y, s in zip(xs, ys, stalled[label], strict=True):
            if s:
                ax.plot([x], [y / 1e6], marker=marker, color=color, markerfacecolor="white", ms=10)
    ax.set_yscale("log")
    ax.set_xlabel("random loss per packet, each direction (%)")
    ax.set_ylabel("goodput (MB/s, log scale)")
    fig.suptitle("Goodput vs random loss, 20 ms RTT, 1500-byte MTU", fontsize=12)
    ax.set_title(subtitle, fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xticks(xs)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH, options)
    losses, seconds, warm = (QUICK_LOSSES, 0.8, 0.3) if args.quick else (LOSSES, 3.0, 0.5)
    out: Path = args.out or (
        Path(tempfile.gettempdir()) / "cellmesh_goodput_vs_loss_quick.png"
        if args.quick
        else DEFAULT_OUT
    )
    problem = "--no-tun given" if args.no_tun else tun_problem()
    use_tun = problem is None
    print_header(
        BENCH,
        f"loss {', '.join(f'{p:.0%}' for p in losses)}; {DELAY * 1e3:g} ms each way; "
        f"{seconds:g} s per transfer; kernel default TCP congestion control: {default_tcp_cc()}",
    )
    pem = self_signed_pem()
    if use_tun:
        cases = [
            cellmesh_case("cellmesh-bbr", "tun", "bbr", TUN_DATAGRAM),
            tcp_case("tcp-cubic", "tun", "cubic", pem),
            tcp_case("tcp-bbr", "tun", "bbr", pem),
        ]
    else:
        print(f"  NO TUN PATH: {problem}. No honest TCP-under-loss baseline: cellmesh only.")
        cases = [cellmesh_case("cellmesh-bbr", "relay", "bbr", TUN_DATAGRAM)]
    t_start = time.monotonic()
    payload = Payload(CHUNK)
    digests: dict[int, str] = {}
    first = Impairment(loss=losses[0], delay=DELAY)
    with maybe_tun(use_tun, first, BENCH) as tun, contextlib.ExitStack() as stack:
        for c in cases:
            start_case(c, stack, tun, first)
        for c in cases:
            run_transfer(c, warm, payload, digests, tun, keep=False)
        for loss in losses:
            set_loss(cases, tun, Impairment(loss=loss, delay=DELAY))
            row = []
            for c in cases:
                t = run_transfer(c, seconds, payload, digests, tun)
                row.append(f"{c.label} {t.goodput / 1e6:.2f}{' (stalled)' if t.stalled else ''}")
            print(f"  loss {loss:5.0%}: " + ", ".join(row) + " MB/s")
            sys.stdout.flush()
    curves = {c.label: [t.goodput for t in c.transfers] for c in cases}
    stalled = {c.label: [t.stalled for t in c.transfers] for c in cases}
    done = [c for c in cases if len(c.transfers) == len(losses)]
    by = {c.label: c for c in done}
    subtitle = (
        "two netns + TUN (MTU 1500), ChaosModel per IP packet both ways, 10 ms each way; "
        f"{seconds:g} s transfers, BLAKE3-verified"
        if use_tun
        else "cellmesh via UdpChaosRelay on loopback; no TCP baseline (no TUN)"
    )
    try:
        plot(out, losses, {c.label: curves[c.label] for c in done}, stalled, subtitle)
        wrote = f"wrote {out}"
    except ImportError as exc:
        wrote = f"NO FIGURE: {exc} (install matplotlib: .venv/bin/pip install matplotlib)"
    ours = by.get("cellmesh-bbr")
    for i, loss in enumerate(losses):
        if ours is None:
            break
        metrics = []
        for base_label in ("tcp-cubic", "tcp-bbr"):
            base = by.get(base_label)
            metrics.append(
                Metric(
                    f"goodput vs {base_label}",
                    ours.transfers[i].goodput,
                    base.transfers[i].goodput if base is not None else None,
                    "MB/s",
                    "higher",
                )
            )
        report(
            Result(
                bench=BENCH,
                case=f"loss {loss:.0%}, 20 ms RTT",
                ours=ours.describe(),
                baseline="TCP+TLS 1.3 across the same TUN path (CUBIC; BBR)"
                if use_tun
                else "none (no TUN path)",
                metrics=metrics,
                notes=[_note(c, i) for c in done],
                extra={c.label: c.transfers[i].goodput for c in done},
            ),
            args.json,
            args.quick,
        )
    print(f"\n{wrote}")
    print(f"({time.monotonic() - t_start:.1f} s)")
    unverified = [t for c in cases for t in c.transfers if not t.verified and not t.stalled]
    return 0 if not unverified else 1


def _note(c: Case, i: int) -> str:
    t = c.transfers[i]
    offered, dropped = c.losses[i]
    seen = f", path dropped {dropped / offered:.1%}" if offered else ""
    state = "STALLED" if t.stalled else ("verified" if t.verified else "NOT verified")
    return f"{c.label}: {t.nbytes / 1e6:.1f} MB in {t.seconds:.2f} s, {state}{seen}"


if __name__ == "__main__":
    sys.exit(main())
