"""SIGKILL during a burst of appends, then restart: every acknowledged event is present and every
hash chain verifies.

A child process (this file run as a script) appends events to a SqliteLogStore as fast as it can,
one at a time and in small group commits, on two channels, and prints each event id to stdout
(flushed) only after `append`/`append_many` has returned. The test kills it with SIGKILL at random
moments, several times over the same database (each child continues the chains where the last
one's committed events end), then reopens the store and checks.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from cellmesh.identity.keys import Identity
from cellmesh.node.store_sqlite import SqliteLogStore
from cellmesh.state.events import Event, create_event
from cellmesh.state.log import AppendStatus

CHANNELS = ("burst/a", "burst/b")
ROUNDS = 6


def _child(db: str, secret_hex: str, seed: int) -> None:
    """Append forever; print each id once its append has returned."""
    me = Identity.from_secret(bytes.fromhex(secret_hex))
    rng = random.Random(seed)
    store = SqliteLogStore(db)  # synchronous=FULL, the default
    last: dict[str, Event | None] = {}
    for ch in CHANNELS:
        heads = [h for h in store.heads(ch) if h.author == me.cell_id]
        stored = store.get(heads[0].id) if heads else None
        last[ch] = None if stored is None else stored.event
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    i = 0
    while True:
        ch = CHANNELS[i % 2]
        batch = 1 if rng.random() < 0.7 else rng.randint(2, 8)
        events: list[Event] = []
        for _ in range(batch):
            ev = create_event(me, ch, os.urandom(rng.randint(0, 2000)), last[ch], (), i)
            events.append(ev)
            last[ch] = ev
        results = [store.append(events[0])] if batch == 1 else store.append_many(events)
        for r in results:  # acknowledged: the commit returned
            if r.status is not AppendStatus.NEW or r.event_id is None:
                raise SystemExit(f"unexpected append result {r}")
            out.write(r.event_id.hex() + "\n")
        out.flush()
        i += 1


def _read_lines(proc: subprocess.Popen[bytes], deadline: float, want: int) -> list[str]:
    """Read at least `want` lines (or until EOF/deadline) from the child's stdout."""
    assert proc.stdout is not None
    buf = b""
    lines: list[str] = []
    fd = proc.stdout.fileno()
    while len(lines) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        *complete, buf = buf.split(b"\n")
        lines += [c.decode() for c in complete]
    return lines


def test_sigkill_loses_no_acknowledged_event(tmp_path: Path) -> None:
    db = tmp_path / "cellmesh.db"
    me = Identity.generate()
    rng = random.Random(20261122)
    acked: list[str] = []
    for round_ in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(db), me.secret_bytes().hex(), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            first = _read_lines(proc, deadline, 1)
            assert first == ["READY"], proc.stderr.read().decode() if proc.stderr else first
            got = _read_lines(proc, deadline, rng.randint(5, 80))
            time.sleep(rng.uniform(0, 0.05))  # land the kill at an arbitrary point of a commit
            proc.send_signal(signal.SIGKILL)
            assert proc.stdout is not None
            rest = proc.stdout.read().decode()  # acknowledged before the kill, still in the pipe
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        if proc.stderr is not None:
            proc.stderr.close()
        if proc.stdout is not None:
            proc.stdout.close()
        complete = rest.split("\n")[:-1]  # a last line without its newline was cut by the kill
        round_acks = got + complete
        assert round_acks, "the child acknowledged nothing before the kill"
        acked += round_acks

    with SqliteLogStore(db) as store:
        missing = [h for h in acked if store.get(bytes.fromhex(h)) is None]
        assert missing == [], f"{len(missing)} acknowledged events lost"
        for ch in CHANNELS:
            assert store.verify_chain(ch) == []
            seqs = [s.event.seq for s in store.range(ch, me.cell_id)]
            assert seqs == list(range(1, len(seqs) + 1))  # one unbroken chain, no fork
            assert store.stats(ch).pending == 0
            assert store.forks(ch) == []
        total = sum(store.stats(ch).events for ch in CHANNELS)
        assert total >= len(set(acked)) == len(acked)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--child":
    _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
