"""Header floods against a probe process (issue 23 item 1), with its RSS read from /proc.

- `unfinished_headers`: N connections each send a request line and ~1 MB of headers
  (128 fields of 8,000 bytes, aiohttp's defaults allow 128 x 8,190) and never the blank line
  that ends them, then hold the connection.
- `unread_alive`: N complete `GET /alive` requests with ~1 MB of headers each, whose answers
  are never read.
- Either with `UNDER_LIMIT` headers (14 KB, under the probe's per-request limit) on many
  connections: what the budget across connections is for.

Each returns RSS (MB) before, at the peak (sampled every 50 ms) and after the connections
closed and `settle` seconds passed, plus how many connections the probe cut early (the
peak covers the whole run, closing included).
Used by bench/bench_hostile.py (figures) and tests/test_hostile.py (a ceiling).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

FIELDS = 120  # under aiohttp's 128-field default, so the whole ~1 MB is taken in
FIELD_BYTES = 8000


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class Flood:
    connections: int
    before: float
    peak: float
    after: float
    #: Connections the probe answered with a 4xx or closed (the others were still open, or
    #: answered 200 for a complete request).
    cut: int
    seconds: float

    def row(self) -> str:
        return (f"{self.before:.1f} / {self.peak:.1f} / {self.after:.1f}"
                f"  ({self.connections} connections, {self.cut} refused by the probe, {self.seconds:.1f} s)")


def _header_block(fields: int = FIELDS, size: int = FIELD_BYTES) -> bytes:
    value = b"v" * size
    return b"".join(b"X-Pad-%d: %s\r\n" % (i, value) for i in range(fields))


class _Peak:
    """Samples RSS every 50 ms until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss_mb(pid)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, rss_mb(self.pid))
            await asyncio.sleep(0.05)

    async def stop(self) -> float:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return max(self.peak, rss_mb(self.pid))


async def _send(host: str, port: int, head: bytes, block: bytes, tail: bytes, hold: asyncio.Event,
                writers: list[asyncio.StreamWriter]) -> bool:
    """Send head + block (+ tail) and hold the connection; True if the probe cut it short."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError):
        return False  # never connected (a full listen queue): nothing held, nothing cut
    writers.append(writer)
    try:
        writer.write(head)
        for start in range(0, len(block), 64 * 1024):
            writer.write(block[start:start + 64 * 1024])
            await asyncio.wait_for(writer.drain(), 10)
        if tail:
            writer.write(tail)
            await asyncio.wait_for(writer.drain(), 10)
    except (OSError, TimeoutError):
        return True  # closed on us while sending
    # Never read the answer while the flood lasts: the probe's send buffer (and ours) keeps it.
    await hold.wait()
    try:
        first = await asyncio.wait_for(reader.read(12), 0.5)
    except TimeoutError:
        return False  # still open, nothing said
    except OSError:
        return True
    return not first.startswith(b"HTTP/1.1 2")  # a 4xx, or closed


async def flood(pid: int, host: str, port: int, connections: int, *, complete: bool,
                hold_seconds: float = 2.0, settle: float = 5.0, fields: int = FIELDS,
                field_bytes: int = FIELD_BYTES) -> Flood:
    before = rss_mb(pid)
    peak = _Peak(pid)
    started = time.monotonic()
    hold = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []
    block = _header_block(fields, field_bytes)
    head = f"GET /alive HTTP/1.1\r\nHost: {host}\r\n".encode()
    tasks = [asyncio.create_task(_send(host, port, head, block, b"\r\n" if complete else b"", hold, writers))
             for _ in range(connections)]
    await asyncio.sleep(hold_seconds)
    hold.set()
    cut = sum(await asyncio.gather(*tasks))
    seconds = time.monotonic() - started
    for writer in writers:
        writer.close()
    await asyncio.sleep(settle)
    top = await peak.stop()  # closing costs memory too: the peak is over the whole run
    return Flood(connections, before, top, rss_mb(pid), cut, seconds)


async def unfinished_headers(pid: int, host: str, port: int, connections: int, **kwargs: float) -> Flood:
    return await flood(pid, host, port, connections, complete=False, **kwargs)  # type: ignore[arg-type]


async def unread_alive(pid: int, host: str, port: int, connections: int, **kwargs: float) -> Flood:
    return await flood(pid, host, port, connections, complete=True, **kwargs)  # type: ignore[arg-type]


#: Just under the probe's per-request limit (16 KB): only the budget across connections stops these.
UNDER_LIMIT = {"fields": 2, "field_bytes": 7000}
