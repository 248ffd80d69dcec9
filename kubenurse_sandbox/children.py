"""Child processes of the sandbox (probes, Prometheus): started in their own session so a
terminal's Ctrl-C reaches only the sandbox, which then stops them in order; and, on Linux,
killed by the kernel should the sandbox itself die without cleaning up."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def spawn(argv: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # only prctl, resolved before the fork
        )


async def stop(process: subprocess.Popen[bytes], *, grace: float) -> int:
    """SIGTERM, then SIGKILL to the whole session after `grace` seconds; returns the exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while process.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
    kill(process)
    return process.wait()


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child and its process group (its own session) if it is still running.
    Once reaped its pid may belong to someone else, so nothing is sent then."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(path: Path, lines: int = 5) -> list[str]:
    """The last lines of a log file (for saying why a child died)."""
    try:
        data = path.read_bytes()[-8192:]
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-lines:]
