"""Fixed glibc malloc thresholds for a process that moves bulk data.

glibc adapts two thresholds as a program runs: blocks from M_MMAP_THRESHOLD up (128 KiB at
first) get their own mmap, and free memory above M_TRIM_THRESHOLD at the top of the heap is given
back to the kernel. A node churns through 64 KB packets and 1 MB application chunks, so with
those defaults it keeps mapping, trimming and faulting the same pages in again: in bulk transfers
on loopback at 64 KB datagrams the receiver spent ~1.1-1.7 ms of CPU per MB instead of ~0.8, and
goodput swung between ~480 and ~900 MB/s from one transfer to the next (docs/benchmarks.md).
Fixing the thresholds at 4 MiB and 64 MiB keeps those blocks in the heap and the heap's pages
mapped. The price is memory: up to 64 MiB of freed heap may stay with the process.

The node calls `tune_malloc` when it starts (config `tune_malloc`, default on). It changes the
whole process, so an application embedding a node can turn it off. Settings already made through
glibc's environment variables are left as they are.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (glibc malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_tuned = False


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True if they are set (now or
    before). A no-op returning False off Linux/glibc or when the environment already sets
    either threshold."""
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _ENVIRONMENT):
        return False  # the operator chose: theirs stands
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _tuned
