"""What the process asks of the kernel and of the allocator: its file limit, and memory back.

containerd starts containers with a soft RLIMIT_NOFILE of 1,024; every check, server
connection and export needs a file. Go's runtime raises the soft limit to the hard one at
start; so does the probe.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource


def file_limit() -> int:
    """The soft limit on open files, as a number (RLIM_INFINITY counted as very large)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one. Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:  # Linux refuses "infinity"; its real ceiling is nr_open
            with open("/proc/sys/fs/nr_open") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _malloc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None  # glibc only
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def give_memory_back() -> bool:
    """Collect cycles, then hand free heap pages back to the kernel (glibc's malloc_trim):
    without it, thousands of closed connections leave the heap at its high-water mark.
    Returns whether the allocator was asked."""
    gc.collect()
    if _TRIM is None:
        return False
    _TRIM(0)  # type: ignore[operator]
    return True
