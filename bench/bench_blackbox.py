"""The probe next to prometheus-blackbox-exporter, on the same targets in the same run:
measurement accuracy against a server with a known delay, CPU per 1,000 checks, RSS.

What is compared with what:

- Accuracy. The probe reports the time from the start of a request to its response
  headers (kubenurse's request duration). The blackbox exporter's nearest figure is the sum
  of its `probe_http_duration_seconds` phases up to the first response byte: resolve +
  connect + tls + processing (everything but `transfer`, the reading of the rest of the
  answer). Each is taken minus the server's true delay for that very request (the delay
  server reports what each answer really took). `probe_duration_seconds` is shown too but
  is not comparable: it is the whole /probe handling (config lookup, registry, the request,
  the transfer), which no network latency figure should contain. The two probers' checks
  alternate, one each, so drift on the machine hits both alike.
- CPU and RSS. The probe runs as its own process with 10 targets checked every 100 ms
  (bench.core.process_cost). The blackbox exporter is driven the way Prometheus drives it:
  one /probe request per check, 10 targets every 100 ms; only the exporter's own CPU counts
  (not the client's), although it includes serving /probe, which is how every check of it
  is paid for.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.core import (
    DELAY,
    Row,
    cpu_seconds,
    delay_server,
    fetch,
    free_port,
    percentile,
    process_cost,
    running,
    served,
)
from probe.checks.http import HttpChecker
from probe.checks.result import Target
from probe.settings import Settings

BLACKBOX = shutil.which("prometheus-blackbox-exporter")
MODULE = "http_2xx"
CONFIG = f"""
modules:
  {MODULE}:
    prober: http
    timeout: 5s
    http:
      method: GET
      valid_status_codes: [200]
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
"""
#: The phases up to the first response byte: what the probe's request duration measures.
COMPARABLE_PHASES = ("resolve", "connect", "tls", "processing")
#: Checks per round and interval, as bench.core.process_cost runs the probe.
TARGETS, INTERVAL = 10, 0.1


@contextmanager
def blackbox_exporter() -> Iterator[tuple[str, int]]:
    """(base URL, pid) of a blackbox exporter on loopback with the http_2xx module."""
    assert BLACKBOX, "prometheus-blackbox-exporter is not installed"
    with tempfile.TemporaryDirectory(prefix="blackbox-") as tmp:
        config = Path(tmp) / "blackbox.yml"
        config.write_text(CONFIG)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [BLACKBOX, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        with running(argv, f"{url}/metrics") as proc:
            yield url, proc.pid


def blackbox_probe(exporter: str, target: str) -> tuple[float, float]:
    """One check through /probe: (sum of the phases up to the first byte, probe_duration_seconds)."""
    query = urllib.parse.urlencode({"target": target, "module": MODULE})
    phases: dict[str, float] = {}
    total = None
    success = False
    for line in fetch(f"{exporter}/probe?{query}").splitlines():
        if line.startswith('probe_http_duration_seconds{phase="'):
            phase = line.split('"', 2)[1]
            phases[phase] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("probe_duration_seconds "):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("probe_success "):
            success = line.endswith(" 1")
    assert success and total is not None, "blackbox probe failed"
    return sum(phases.get(p, 0.0) for p in COMPARABLE_PHASES), total


async def interleaved_accuracy(exporter: str, n: int = 200) -> tuple[list[float], list[float], list[float]]:
    """Reported minus true latency per check: (probe, blackbox phases, blackbox probe_duration)."""
    probe: list[float] = []
    phases: list[float] = []
    totals: list[float] = []
    with delay_server(DELAY) as url:
        target = f"{url}/alwayshappy"
        checker = HttpChecker(Settings())
        await checker.start()
        try:
            for _ in range(5):  # warm both up (first connections, lazy imports), then start counting
                await checker.check(Target("bench", target))
                blackbox_probe(exporter, target)
            fetch(f"{url}/reset")
            for _ in range(n):
                result = await checker.check(Target("bench", target))
                assert result.duration is not None, result.summary
                probe.append(result.duration)
                reported, total = blackbox_probe(exporter, target)
                phases.append(reported)
                totals.append(total)
        finally:
            await checker.close()
        true = served(url)
    assert len(true) == 2 * n, "the delay server saw other requests"
    probe_true, blackbox_true = true[0::2], true[1::2]
    return (
        [r - t for r, t in zip(probe, probe_true, strict=True)],
        [r - t for r, t in zip(phases, blackbox_true, strict=True)],
        [r - t for r, t in zip(totals, blackbox_true, strict=True)],
    )


def blackbox_cost(exporter: str, pid: int, target_url: str, seconds: float = 8.0) -> tuple[float, float, int]:
    """(CPU seconds per 1,000 checks, RSS in MB, checks) of the exporter, driven like the probe runs."""
    count = 0
    lock = threading.Lock()
    measuring = threading.Event()
    stop_at = time.monotonic() + 2.0 + seconds  # 2 s warm-up, as process_cost does

    def worker(i: int) -> None:
        nonlocal count
        target = f"{target_url}/alwayshappy?t={i}"
        next_at = time.monotonic()
        while next_at < stop_at:
            blackbox_probe(exporter, target)
            if measuring.is_set():
                with lock:
                    count += 1
            next_at += INTERVAL
            time.sleep(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(TARGETS)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    cpu0 = cpu_seconds(pid)
    measuring.set()
    time.sleep(seconds)
    measuring.clear()
    cpu1 = cpu_seconds(pid)
    rss = _rss_mb(pid)
    for thread in threads:
        thread.join(timeout=15)
    return (cpu1 - cpu0) / max(count, 1) * 1000, rss, count


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def _pair(probe: float, blackbox: float, unit_format: str = "{:.3f}") -> str:
    ratio = f"x{probe / blackbox:.2f}" if blackbox else "n/a"
    return f"{unit_format.format(probe)} / {unit_format.format(blackbox)}  ({ratio})"


def run() -> list[Row]:
    if not BLACKBOX:
        return [("vs blackbox exporter", "skipped: prometheus-blackbox-exporter is not installed")]
    rows: list[Row] = []
    with blackbox_exporter() as (exporter, pid):
        probe_err, phase_err, total_err = asyncio.run(interleaved_accuracy(exporter))
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            rows.append((
                f"vs blackbox: reported - true {name} (ms), probe / blackbox phases to first byte",
                _pair(percentile(probe_err, q) * 1000, percentile(phase_err, q) * 1000),
            ))
        rows.append((
            "  blackbox probe_duration_seconds - true p50 / p99 (ms; whole /probe, not comparable)",
            f"{percentile(total_err, 0.5) * 1000:.3f} / {percentile(total_err, 0.99) * 1000:.3f}",
        ))
        with delay_server(0) as url:
            probe_cpu, probe_rss, probe_checks = process_cost(url, checks_per_round=TARGETS)
            bb_cpu, bb_rss, bb_checks = blackbox_cost(exporter, pid, url)
    rows.append((
        "vs blackbox: CPU s per 1,000 checks, probe / blackbox",
        _pair(probe_cpu, bb_cpu) + f"  ({probe_checks:.0f} / {bb_checks} checks)",
    ))
    rows.append(("vs blackbox: RSS MB, probe / blackbox", _pair(probe_rss, bb_rss, "{:.1f}")))
    return rows


if __name__ == "__main__":
    for label, value in run():
        print(f"{label}: {value}")
