"""Hostile peers (issue 11, item 5): a real probe process whose soft file limit is 1,024 (as
under containerd), before, during and after 1,100 idle connections plus one slow-header
client, then 15,000 connections opened at once and closed; once with the hard limit of
this machine, once with a hard limit of 1,024 too (nothing to raise).

Header memory (issue 23, item 1; bench/floods.py): RSS before, at the peak and after for
100 and 400 connections holding ~1 MB of unfinished headers each, 200 `/alive` requests with
~1 MB of headers whose answers are never read, and 4,000 connections with heads just under
the per-request limit (PYTHONMALLOC=malloc, as in the image).

For each phase: /metrics scrape time, /alwayshappy latency, check cadence (checks per
second), RSS, open files, log lines written. Numbers are printed, never asserted.
`BENCH_PROBE_SRC=/path/to/another/checkout` runs that checkout's probe instead (to compare
with an older version).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from bench import floods
from bench.core import Row, delay_server, fetch, free_port, scrape_value

HOST = "127.0.0.1"
SOFT_LIMIT = 1024  # containerd's default soft RLIMIT_NOFILE
IDLE = 1100
WAVE = 15_000  # opened at once (fewer if this process may not open that many files)
CHECKS_PER_ROUND = 5
INTERVAL = 0.5


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _soft_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


@contextmanager
def hostile_probe(
    target_url: str, log_path: str, hard_limit: int | None = None, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A probe process started with a soft file limit of SOFT_LIMIT (and `hard_limit`, or
    this process's hard limit)."""
    port = free_port()
    src = os.environ.get("BENCH_PROBE_SRC")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KUBENURSE_", "OTEL_", "KUBERNETES_"))},
        "KUBENURSE_LISTEN_HOST": HOST,
        "KUBENURSE_HTTP_PORT": str(port),
        "KUBENURSE_CHECK_INTERVAL": f"{int(INTERVAL * 1000)}ms",
        "KUBENURSE_EXTRA_CHECKS": "|".join(f"t{i}:{target_url}/alwayshappy" for i in range(CHECKS_PER_ROUND)),
        "KUBENURSE_SHUTDOWN_DURATION": "0s",
        **({"PYTHONPATH": src} if src else {}),
        **(extra_env or {}),
    }
    hard = hard_limit or resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT_LIMIT, hard))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe"], env=env, stdout=subprocess.DEVNULL, stderr=log,
            preexec_fn=lower_limit, cwd=src or None,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                fetch(f"http://{HOST}:{port}/alwayshappy")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the probe did not start") from None
                time.sleep(0.05)
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _timed_get(url: str, timeout: float = 3.0) -> tuple[float | None, str]:
    """(seconds, body) of one GET on a fresh connection; None on failure or timeout."""
    started = time.perf_counter()
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as resp,
        ):
            body = await resp.text()
            if resp.status != 200:
                return None, ""
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None, ""
    return time.perf_counter() - started, body


def _fmt(values: list[float | None]) -> str:
    ok = [v for v in values if v is not None]
    failed = len(values) - len(ok)
    if not ok:
        return f"all {failed} failed"
    text = f"p50 {statistics.median(ok) * 1000:.1f} max {max(ok) * 1000:.1f}"
    return text + (f", {failed}/{len(values)} failed" if failed else "")


async def measure(proc: subprocess.Popen[bytes], port: int, log_path: str, seconds: float = 4.0) -> dict[str, str]:
    base = f"http://{HOST}:{port}"
    lines0 = _count_lines(log_path)
    scrapes: list[float | None] = []
    happy: list[float | None] = []
    checks: list[tuple[float, float]] = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        elapsed, text = await _timed_get(base + "/metrics")
        scrapes.append(elapsed)
        if elapsed is not None:
            checks.append((time.monotonic(), scrape_value(text, "kubenurse_httpclient_requests_total")))
        for _ in range(3):
            happy.append((await _timed_get(base + "/alwayshappy"))[0])
        await asyncio.sleep(0.2)
    if len(checks) >= 2:
        (t0, c0), (t1, c1) = checks[0], checks[-1]
        cadence = f"{(c1 - c0) / (t1 - t0):.1f}"
    else:
        cadence = "no scrape"
    return {
        "/metrics ms": _fmt(scrapes),
        "/alwayshappy ms": _fmt(happy),
        "checks/s": f"{cadence} (expected {CHECKS_PER_ROUND / INTERVAL:.0f})",
        "RSS MB": f"{_rss_mb(proc.pid):.1f}",
        "open files": str(_open_files(proc.pid)),
        "log lines": str(_count_lines(log_path) - lines0),
    }


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


async def _open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    """Up to n connections that say nothing; gives up after 10 failures in a row."""
    writers: list[asyncio.StreamWriter] = []
    failures = 0
    while len(writers) < n and failures < 10:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
        except (OSError, TimeoutError):
            failures += 1
            continue
        failures = 0
        writers.append(writer)
    return writers


async def _slow_header(port: int) -> float:
    """One header byte a second until the server drops the connection: how long it took."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for byte in f"GET /alive HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode() + b"s" * 10_000:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    break
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return time.monotonic() - started


def _close(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


async def wave(proc: subprocess.Popen[bytes], port: int) -> str:
    """RSS before, during and 3 s after WAVE connections opened at once, then closed."""
    rss_before = _rss_mb(proc.pid)
    connections = await _open_idle(port, WAVE)
    await asyncio.sleep(1.0)
    rss_peak, files_peak = _rss_mb(proc.pid), _open_files(proc.pid)
    _close(connections)
    await asyncio.sleep(3.0)
    return (f"{rss_before:.1f} / {rss_peak:.1f} / {_rss_mb(proc.pid):.1f}"
            f"  ({len(connections)} opened, {files_peak} open files in the probe during)")


async def scenario(url: str, tmp: str, name: str, hard_limit: int | None) -> list[Row]:
    rows: list[Row] = []
    log_path = os.path.join(tmp, f"{name}.log")
    with hostile_probe(url, log_path, hard_limit) as (proc, port):
        await asyncio.sleep(1.5)
        limit = _soft_limit(proc.pid)
        rows.append((f"{name}: soft file limit at start -> in the probe", f"{SOFT_LIMIT} -> {limit}"))
        phases: list[tuple[str, dict[str, str]]] = [("before", await measure(proc, port, log_path))]
        idle = await _open_idle(port, IDLE)
        slow = asyncio.create_task(_slow_header(port))
        await asyncio.sleep(1.0)
        phases.append((f"{IDLE} idle + slow header", await measure(proc, port, log_path)))
        done, _ = await asyncio.wait([slow], timeout=25)
        dropped_after = f"{slow.result():.1f} s" if done else "not within 30 s"
        files_later = _open_files(proc.pid)
        _close(idle)
        slow.cancel()
        await asyncio.sleep(2.0)
        phases.append(("after", await measure(proc, port, log_path)))
        memory = await wave(proc, port)
        phases.append((f"after {WAVE} connections at once", await measure(proc, port, log_path)))
        for phase, figures in phases:
            for figure, value in figures.items():
                rows.append((f"{name}: {phase}: {figure}", value))
        rows.append((f"{name}: slow-header client dropped after", dropped_after))
        rows.append((f"{name}: open files in the probe once the slow client was dropped", str(files_later)))
        rows.append((f"{name}: {WAVE} connections at once: RSS MB before / during / 3 s after", memory))
    return rows


async def header_floods(url: str, tmp: str) -> list[Row]:
    rows: list[Row] = []
    log_path = os.path.join(tmp, "floods.log")
    with hostile_probe(url, log_path, None, {"PYTHONMALLOC": "malloc"}) as (proc, port):
        await asyncio.sleep(1.5)
        label = "header flood: RSS MB before / peak / after"
        for what, flood, connections, shape in (
            ("unfinished ~1 MB headers", floods.unfinished_headers, 100, {}),
            ("unfinished ~1 MB headers", floods.unfinished_headers, 400, {}),
            ("/alive with ~1 MB headers, answers unread", floods.unread_alive, 200, {}),
            ("unfinished 14 KB headers (under the limit)", floods.unfinished_headers, 4000, floods.UNDER_LIMIT),
            ("/alive with 14 KB headers, answers unread", floods.unread_alive, 4000, floods.UNDER_LIMIT),
        ):
            result = await flood(proc.pid, HOST, port, connections, **shape)
            rows.append((f"{label}: {connections} x {what}", result.row()))
        after = await measure(proc, port, log_path, 2.0)
        rows.append(("header flood: /alwayshappy ms afterwards", after["/alwayshappy ms"]))
    return rows


async def run_async() -> list[Row]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this client needs > 15,000 files
    rows: list[Row] = []
    try:
        with delay_server(0) as url, tempfile.TemporaryDirectory() as tmp:
            rows += await scenario(url, tmp, f"hostile, hard limit {hard}", None)
            rows += await scenario(url, tmp, f"hostile, hard limit {SOFT_LIMIT}", SOFT_LIMIT)
            rows += await header_floods(url, tmp)
            # The image runs with PYTHONMALLOC=malloc: pymalloc keeps half-empty arenas.
            log_path = os.path.join(tmp, "malloc.log")
            with hostile_probe(url, log_path, None, {"PYTHONMALLOC": "malloc"}) as (proc, port):
                await asyncio.sleep(1.5)
                rows.append((f"hostile, PYTHONMALLOC=malloc: {WAVE} connections at once: RSS MB before / during"
                             " / 3 s after", await wave(proc, port)))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return rows


def run() -> list[Row]:
    return asyncio.run(run_async())


if __name__ == "__main__":
    for label, value in run():
        print(f"| {label} | {value} |")
