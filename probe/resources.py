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


def give_memory_back(collect: bool = True) -> bool:
    """Collect cycles (unless `collect` is False: a full collection stalls the loop), then
    hand free heap pages back to the kernel (glibc's malloc_trim): without it, thousands of
    closed connections leave the heap at its high-water mark. Returns whether the allocator
    was asked."""
    if collect:
        gc.collect()
    if _TRIM is None:
        return False
    _TRIM(0)  # type: ignore[operator]
    return True


_PAGE = resource.getpagesize()


def rss_bytes() -> int:
    """This process's resident set size, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


#: Memory ceiling without a container limit: the DaemonSet's 200 MiB limit minus a margin.
DEFAULT_CEILING = 160 * 1024 * 1024
#: Kept free below a container limit: the kernel counts more than RSS (page cache, socket buffers).
CEILING_MARGIN = 40 * 1024 * 1024


def memory_limit() -> int | None:
    """The container's memory limit (cgroup v2 memory.max, or v1), None when unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= 1 << 60:
            return None
        return int(text)
    return None


def memory_ceiling(limit: int | None) -> int:
    """The RSS the server keeps under: the container limit minus a margin (at least 80 %
    of it), or DEFAULT_CEILING without a limit."""
    if limit is None:
        return DEFAULT_CEILING
    return max(limit - CEILING_MARGIN, limit * 4 // 5)
