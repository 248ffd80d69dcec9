"""The probe's own figures: CPU per check, memory, /metrics and /alwayshappy speed (accuracy is
bench/bench_accuracy.py).

Everything runs on loopback against real servers and a real probe process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

Row = tuple[str, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def running(
    argv: list[str], ready_url: str, *, env: dict[str, str] | None = None, stop_signal: int = signal.SIGTERM
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` until the block ends; yield once `ready_url` answers."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                fetch(ready_url)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def delay_server(delay: float) -> Iterator[str]:
    """A target answering after `delay`, in a process of its own (bench/delay_server.py)."""
    url = f"http://127.0.0.1:{free_port()}"
    port = url.rsplit(":", 1)[1]
    with running([sys.executable, "-m", "bench.delay_server", port, str(delay)], f"{url}/reset"):
        yield url


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextmanager
def probe_process(
    port: int, targets: str, extra_env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A real probe process checking `targets` (KUBENURSE_EXTRA_CHECKS) every 100 ms."""
    env = {
        **os.environ,
        "KUBENURSE_LISTEN_HOST": "127.0.0.1",
        "KUBENURSE_HTTP_PORT": str(port),
        "KUBENURSE_CHECK_INTERVAL": "100ms",
        "KUBENURSE_EXTRA_CHECKS": targets,
        "KUBENURSE_SHUTDOWN_DURATION": "0s",
        **(extra_env or {}),
    }
    with running([sys.executable, "-m", "probe"], f"http://127.0.0.1:{port}/alwayshappy", env=env) as proc:
        yield proc


def process_cost(target_url: str, checks_per_round: int = 10, seconds: float = 8.0,
                 extra_env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(CPU seconds per 1,000 checks, steady RSS in MB, checks performed) of a probe process."""
    port = free_port()
    targets = "|".join(f"t{i}:{target_url}/alwayshappy" for i in range(checks_per_round))
    with probe_process(port, targets, extra_env) as proc:
        time.sleep(2.0)  # warm up: imports done, first rounds run
        text = fetch(f"http://127.0.0.1:{port}/metrics")
        checks0, cpu0 = scrape_value(text, "kubenurse_httpclient_requests_total"), cpu_seconds(proc.pid)
        time.sleep(seconds)
        text = fetch(f"http://127.0.0.1:{port}/metrics")
        checks1, cpu1 = scrape_value(text, "kubenurse_httpclient_requests_total"), cpu_seconds(proc.pid)
        rss = scrape_value(text, "process_resident_memory_bytes") / 1e6
    checks = checks1 - checks0
    return (cpu1 - cpu0) / checks * 1000, rss, checks


async def endpoint_speed(port: int, seconds: float = 3.0, concurrency: int = 32) -> tuple[float, float]:
    """(/metrics p50 ms, /alwayshappy requests per second) against a running probe."""
    async with aiohttp.ClientSession() as session:
        timings = []
        for _ in range(30):
            started = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                await resp.read()
            timings.append(time.perf_counter() - started)
        done = 0
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                async with session.get(f"http://127.0.0.1:{port}/alwayshappy") as resp:
                    await resp.read()
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rate = done / (time.monotonic() - started)
    return statistics.median(timings) * 1000, rate


async def run_async() -> list[Row]:
    rows: list[Row] = []
    with delay_server(0) as url:
        cpu, rss, checks = await asyncio.to_thread(process_cost, url)
        rows.append(("CPU seconds per 1,000 checks", f"{cpu:.3f}  ({checks:.0f} checks)"))
        rows.append(("steady RSS (MB), OTLP off", f"{rss:.1f}"))
        port = free_port()
        # Started and stopped from this (async) function: a blocking wait of about a second.
        with probe_process(port, f"t:{url}/alwayshappy"):
            await asyncio.sleep(1.0)
            metrics_ms, rate = await endpoint_speed(port)
    rows.append(("/metrics time p50 (ms)", f"{metrics_ms:.2f}"))
    rows.append(("/alwayshappy requests per second", f"{rate:.0f}"))
    return rows


def run() -> list[Row]:
    return asyncio.run(run_async())
