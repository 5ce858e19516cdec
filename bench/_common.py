"""Shared helpers for the cellmesh benchmarks: argument parsing, timing, percentiles, child
processes that always die, and one result printer (aligned text, optional JSON lines).

Every benchmark compares a figure of ours with a baseline measured in the same invocation, on the
same machine, at the same moment, so the ratio stays meaningful on a noisy machine even when the
absolute figures wander.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import errno
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

LOOPBACK = "127.0.0.1"
CHILD_MAX_LIFETIME = 120.0
"""A child process exits by itself after this many seconds, whatever the parent does."""

Connection = multiprocessing.connection.Connection
_START_CPUS: tuple[int, ...] = (
    tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (0,)
)
Better = Literal["lower", "higher"]
_RUN_INFO: dict[str, object] = {}
"""Facts about this run that every JSON record carries (e.g. how busy the machine was)."""


# ------------------------------------------------------------------------------ arguments


def parse_args(
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """The options every benchmark takes (--quick, --json PATH), plus what `extra` adds."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="short run (under 10 s), coarser figures")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="append one JSON line per result to PATH",
    )
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks (child clean-up) run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------ timing


def now_ns() -> int:
    """Monotonic high-resolution clock, nanoseconds."""
    return time.perf_counter_ns()


def time_calls(fn: Callable[[], object], n: int, warmup: int = 0) -> list[float]:
    """Call `fn` `warmup` times untimed, then `n` times; return each call's duration in seconds."""
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    out: list[float] = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) * 1e-9)
    return out


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Summary:
    """Distribution of a series of durations (seconds)."""

    n: int
    median: float
    p99: float
    mean: float
    minimum: float
    maximum: float

    @property
    def per_second(self) -> float:
        """Sequential operations per second (1 / mean)."""
        return 1.0 / self.mean if self.mean > 0 else math.inf


def summarize(samples: Sequence[float]) -> Summary:
    """Median, p99, mean, min and max of `samples`."""
    return Summary(
        n=len(samples),
        median=statistics.median(samples),
        p99=percentile(samples, 99.0),
        mean=statistics.fmean(samples),
        minimum=min(samples),
        maximum=max(samples),
    )


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class Metric:
    """One figure of ours next to the same figure of the baseline.

    `value` and `baseline` are in SI base units (seconds, packets/s, bytes/s); `unit` picks how
    they are printed. `better` says which direction is good, which orients the ratio's wording.
    """

    name: str
    value: float
    baseline: float | None
    unit: str
    better: Better

    @property
    def ratio(self) -> float | None:
        """ours / baseline (None without a baseline)."""
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


@dataclass(frozen=True, slots=True)
class Target:
    """A claim to check, e.g. 'median under 1.5 ms'."""

    description: str
    met: bool


@dataclass(slots=True)
class Result:
    """What one benchmark case prints and records."""

    bench: str
    case: str
    ours: str
    baseline: str
    metrics: list[Metric]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)


_SCALE: dict[str, float] = {
    "s": 1.0,
    "ms": 1e3,
    "us": 1e6,
    "ns": 1e9,
    "/s": 1.0,
    "pps": 1.0,
    "kpps": 1e-3,
    "MB/s": 1e-6,
    "x": 1.0,
    "%": 100.0,
}


def fmt(value: float, unit: str) -> str:
    """`value` (SI base units) printed in `unit` with 3-4 significant digits."""
    v = value * _SCALE.get(unit, 1.0)
    if v == 0 or not math.isfinite(v):
        text = f"{v:g}"
    elif abs(v) >= 1000:
        text = f"{v:,.0f}"
    elif abs(v) >= 100:
        text = f"{v:.1f}"
    elif abs(v) >= 10:
        text = f"{v:.2f}"
    else:
        text = f"{v:.3f}"
    return f"{text} {unit}"


def _ratio_text(m: Metric) -> str:
    r = m.ratio
    if r is None:
        return ""
    if m.better == "lower":
        word = "faster" if r < 1 else "slower"
        factor = 1 / r if r < 1 else r
    else:
        word = "of baseline"
        return f"{r:.2f}x ({r * 100:.0f}% {word})"
    return f"{r:.2f}x ({factor:.2f}x {word})"


def report(result: Result, json_path: Path | None, quick: bool) -> None:
    """Print `result` as aligned lines; with `json_path`, append it as one JSON line."""
    print(f"\n{result.bench} :: {result.case}")
    print(f"  ours:     {result.ours}")
    print(f"  baseline: {result.baseline}")
    rows = [("metric", "ours", "baseline", "ratio ours/baseline")]
    for m in result.metrics:
        rows.append(
            (
                m.name,
                fmt(m.value, m.unit),
                "-" if m.baseline is None else fmt(m.baseline, m.unit),
                _ratio_text(m),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
    for t in result.targets:
        print(f"  target: {t.description}: {'MET' if t.met else 'MISSED'}")
    for n in result.notes:
        print(f"  note: {n}")
    sys.stdout.flush()
    if json_path is None:
        return
    record: dict[str, object] = {
        "bench": result.bench,
        "case": result.case,
        "ours": result.ours,
        "baseline": result.baseline,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": quick,
        **_RUN_INFO,
        "metrics": [
            {
                "name": m.name,
                "unit": m.unit,
                "value": m.value,
                "baseline": m.baseline,
                "ratio": m.ratio,
                "better": m.better,
            }
            for m in result.metrics
        ],
        "targets": [{"description": t.description, "met": t.met} for t in result.targets],
        "notes": result.notes,
        "extra": result.extra,
    }
    with json_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------ processes


_MP = multiprocessing.get_context("spawn")


def _lifeline(parent_pid: int, deadline: float) -> None:
    """In a child: exit at once when the parent is gone or the lifetime is over."""
    while True:
        if os.getppid() != parent_pid or time.monotonic() > deadline:
            os._exit(3)
        time.sleep(0.2)


def _child_entry(
    target: Callable[[Connection], None], conn: Connection, parent_pid: int, lifetime: float
) -> None:
    deadline = time.monotonic() + lifetime
    threading.Thread(target=_lifeline, args=(parent_pid, deadline), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    try:
        target(conn)
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class Child:
    """A running child process: our end of its pipe and its pid (for CPU pinning)."""

    conn: Connection
    pid: int


def can_pin() -> bool:
    """True where processes can be pinned to CPUs (Linux) and there are at least 2 CPUs."""
    return hasattr(os, "sched_setaffinity") and len(_START_CPUS) >= 2


def pin(pid: int, cpu: int) -> None:
    """Pin process `pid` (0 = this one; its main thread) to CPU `cpu`."""
    os.sched_setaffinity(pid, {cpu})


def cpus() -> list[int]:
    """The CPUs this process was allowed to run on when the benchmark started, in order."""
    return list(_START_CPUS)


def unpin(pid: int = 0) -> None:
    """Let process `pid` run on every CPU this benchmark started with again."""
    os.sched_setaffinity(pid, _START_CPUS)


@contextlib.contextmanager
def child_process(
    target: Callable[[Connection], None],
    name: str,
    lifetime: float = CHILD_MAX_LIFETIME,
) -> Iterator[Child]:
    """Run `target(conn)` in a fresh interpreter (spawn); yield it as a `Child`.

    The child is always reaped: on leaving the block (normally or by an exception) the pipe is
    closed, the child gets a moment to exit, then SIGTERM, then SIGKILL. The child also exits by
    itself if this process dies or after `lifetime` seconds. `target` must be a module-level
    function.
    """
    ours, theirs = _MP.Pipe()
    proc = _MP.Process(
        target=_child_entry,
        args=(target, theirs, os.getpid(), lifetime),
        name=name,
        daemon=True,
    )
    proc.start()
    theirs.close()
    try:
        assert proc.pid is not None
        yield Child(ours, proc.pid)
    finally:
        ours.close()
        proc.join(1.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


def expect(conn: Connection, timeout: float, what: str) -> object:
    """Receive one message from a child within `timeout` seconds, or raise TimeoutError."""
    if not conn.poll(timeout):
        raise TimeoutError(f"child did not send {what} within {timeout:g} s")
    msg: object = conn.recv()
    if isinstance(msg, BaseException):
        raise RuntimeError(f"child failed while {what}") from msg
    return msg


def run_child(conn: Connection, body: Callable[[], object]) -> None:
    """Run a child process's body; any failure is reported to the parent, then re-raised."""
    try:
        body()
    except BaseException as exc:
        send_error(conn, exc)
        raise


def send_error(conn: Connection, exc: BaseException) -> None:
    """In a child: hand an exception to the parent (best effort)."""
    with contextlib.suppress(Exception):
        conn.send(RuntimeError(f"{type(exc).__name__}: {exc}"))


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies over all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields)


def busy_fraction(interval: float = 0.3) -> float | None:
    """Fraction of all CPUs busy (with other work) during `interval` seconds, or None."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[1] == a[1]:
        return None
    return 1.0 - (b[0] - a[0]) / (b[1] - a[1])


BUSY_WARNING = 0.15


def machine_line() -> str:
    """One line describing where the figures come from."""
    return (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    )


def cellmesh_source() -> str:
    """Where `cellmesh` is imported from and, in a git checkout, its commit and whether src/ has
    uncommitted changes (the figures belong to that code, not to a commit, when it has)."""
    import cellmesh

    pkg = Path(cellmesh.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(pkg), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"cellmesh from {pkg} (not a git checkout)"
    state = "with uncommitted changes" if dirty else "clean"
    return f"cellmesh from {pkg} (git {head}, {state})"


def print_header(bench: str, detail: str) -> float | None:
    """Print what runs where, and warn when other processes keep the CPUs busy.

    Returns the busy fraction measured just before the start (None where unknown).
    """
    busy = busy_fraction()
    _RUN_INFO["busy_before_start"] = busy
    load = "" if busy is None else f", {busy:.0%} busy before start"
    source = cellmesh_source()
    _RUN_INFO["cellmesh"] = source
    print(f"{bench}: {machine_line()}{load}; {detail}")
    print(f"  {source}")
    if busy is not None and busy > BUSY_WARNING:
        print(
            "  WARNING: other processes are using the CPUs; absolute figures will be low and "
            "noisy (ratios less so, since both sides are interleaved)"
        )
    sys.stdout.flush()
    return busy


# ------------------------------------------------------------------------------ floods


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_IoVec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _sendmmsg() -> Callable[..., int] | None:
    """libc's sendmmsg(2) where there is one (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sendmmsg
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    result: Callable[..., int] = fn
    return result


class Blaster:
    """Sends a fixed pool of pre-built datagrams round and round to one address, as fast as the
    kernel takes them (a flood). `sock` must be a connected UDP socket.

    On Linux it uses sendmmsg(2) through ctypes, `batch` datagrams per system call: each is still
    a separate datagram on the wire (no GSO), but the interpreter is out of the per-datagram path,
    so one Python process can outpace a Python receiver. Elsewhere: one `send` per datagram.
    """

    def __init__(self, sock: socket.socket, pool: Sequence[bytes], batch: int = 256) -> None:
        if not pool:
            raise ValueError("empty datagram pool")
        self.sock = sock
        self.pool = list(pool)
        self.batch = max(1, min(batch, len(self.pool)))
        self.mmsg = _sendmmsg()
        n = len(self.pool)
        self._bufs = [ctypes.create_string_buffer(d, len(d)) for d in self.pool]
        self._iov = (_IoVec * n)()
        self._msgs = (_MMsgHdr * n)()
        for i, b in enumerate(self._bufs):
            self._iov[i].iov_base = ctypes.addressof(b)
            self._iov[i].iov_len = len(self.pool[i])
            self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iov[i])
            self._msgs[i].msg_hdr.msg_iovlen = 1
        self._base = ctypes.addressof(self._msgs)
        self._pos = 0

    @property
    def method(self) -> str:
        return f"sendmmsg x{self.batch}" if self.mmsg is not None else "send per datagram"

    def blast(self, seconds: float, rate: float = 0.0) -> int:
        """Send for `seconds` at full speed, or paced at `rate` datagrams/s when `rate` > 0;
        return how many datagrams the kernel accepted."""
        clock = time.perf_counter
        start = clock()
        deadline = start + seconds
        sent = 0
        n = len(self.pool)
        fd = self.sock.fileno()
        size = ctypes.sizeof(_MMsgHdr)
        mmsg = self.mmsg
        send = self.sock.send
        pool = self.pool
        batch = self.batch if rate <= 0 else max(1, min(self.batch, int(rate / 2000) or 1))
        while (now := clock()) < deadline:
            count = min(batch, n - self._pos)
            if rate > 0:
                due = int((now - start) * rate) + 1 - sent
                if due <= 0:
                    time.sleep(min(-due / rate + 1e-4, 0.002))
                    continue
                count = min(count, due)
            if mmsg is not None:
                r = mmsg(fd, self._base + self._pos * size, count, 0)
                if r < 0:
                    err = ctypes.get_errno()
                    if err in (errno.ECONNREFUSED, errno.EAGAIN, errno.ENOBUFS, errno.EINTR):
                        continue  # an ICMP error from an earlier datagram, or a full queue
                    raise OSError(err, f"sendmmsg: {os.strerror(err)}")
                sent += r
                self._pos = (self._pos + r) % n
            else:
                for _ in range(count):
                    try:
                        send(pool[self._pos])
                        sent += 1
                    except (ConnectionRefusedError, BlockingIOError):
                        pass
                    self._pos = (self._pos + 1) % n
        return sent


def udp_socket_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at the UDP socket(s) bound to local `port` because the
    receive buffer was full (the `drops` column of /proc/net/udp and udp6); None off Linux."""
    total: int | None = None
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 13:
                continue
            try:
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    total = (total or 0) + int(fields[-1])
            except ValueError:
                continue
    return total


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_task_seconds() -> float | None:
    """CPU seconds all CPUs have spent running tasks, or lost to other virtual machines (user +
    nice + system + steal in /proc/stat; not idle, I/O wait or interrupts) since boot; None off
    Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:3]) + steal) / _CLK_TCK


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads), from /proc; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class OtherLoad:
    """How much CPU processes other than `pids` (and this one) used between `start()` and
    `stop()`, steal by the hypervisor included, as a fraction of all CPUs (the figures of a run
    are only as good as the machine was quiet)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._t0 = 0.0
        self._m0: float | None = None
        self._p0 = 0.0

    def _ours(self) -> float:
        return sum(process_cpu_seconds(p) or 0.0 for p in [os.getpid(), *self.pids])

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._m0 = machine_task_seconds()
        self._p0 = self._ours()

    def stop(self) -> float | None:
        """The other processes' share of all CPUs since `start()`, or None where unknown."""
        m1 = machine_task_seconds()
        wall = time.monotonic() - self._t0
        if self._m0 is None or m1 is None or wall <= 0:
            return None
        other = (m1 - self._m0) - (self._ours() - self._p0)
        return max(0.0, other / (wall * len(_START_CPUS)))


def bench_main(
    bench: str,
    doc: str | None,
    options: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> int:
    """The `main()` of a benchmark with child processes: parse options, run, and turn a dead
    child or a failed setup into one clear FAILED line and exit status 1."""
    exit_on_sigterm()
    args = parse_args(doc or bench, options)
    try:
        return run(args)
    except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
        print(
            f"\n{bench}: FAILED: a child process exited unexpectedly ({type(exc).__name__}); "
            "its traceback, if any, is above",
            file=sys.stderr,
        )
        return 1
    except (TimeoutError, RuntimeError, OSError, TypeError) as exc:
        cause = f" (cause: {exc.__cause__})" if exc.__cause__ is not None else ""
        print(f"\n{bench}: FAILED: {type(exc).__name__}: {exc}{cause}", file=sys.stderr)
        return 1
