"""`tune_malloc`: glibc's thresholds fixed once per process, the operator's environment kept."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest

from cellmesh.config import NodeConfig
from cellmesh.node import allocator

ON_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_PROBE = """
import ctypes, sys
from cellmesh.node.allocator import tune_malloc
first = tune_malloc()
second = tune_malloc()
# A 1 MiB block comes from the heap once the mmap threshold is 4 MiB (malloc_usable_size of an
# mmapped block is its page-rounded size minus the header; a heap block's is about what was
# asked): tell them apart through mallinfo2's hblkhd, the bytes held in mmapped blocks.
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
before = libc.mallinfo2().hblkhd
p = libc.malloc(1 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(p)
print(first, second, mapped)
"""


def _run(env: dict[str, str]) -> list[str]:
    """Run the probe in a fresh process: mallopt settings last for the whole process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.split()


@pytest.mark.skipif(not ON_GLIBC, reason="glibc malloc only")
def test_thresholds_are_set_once_and_keep_a_megabyte_in_the_heap() -> None:
    first, second, mapped = _run({})
    assert (first, second) == ("True", "True")
    assert mapped == "0"  # the 1 MiB block came from the heap, not a mapping of its own


@pytest.mark.skipif(not ON_GLIBC, reason="glibc malloc only")
def test_an_operators_environment_setting_stands() -> None:
    first, second, mapped = _run({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert (first, second) == ("False", "False")
    assert int(mapped) >= 1 << 20  # glibc's own threshold (128 KiB) applied: mmapped


def test_off_glibc_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    called = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: called.append(a))
    assert allocator.tune_malloc() is False
    assert called == []


def test_the_node_setting_is_on_by_default_and_can_be_turned_off() -> None:
    assert NodeConfig().tune_malloc is True
    assert NodeConfig(tune_malloc=False).tune_malloc is False
