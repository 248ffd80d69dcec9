"""The probe next to prometheus-blackbox-exporter, on the same targets in the same run: CPU
per 1,000 checks and RSS. (Accuracy side by side, at 1 to 100 checks at once, is in
bench/bench_accuracy.py.)

- CPU and RSS. The probe runs as its own process with 10 targets checked every 100 ms
  (bench.core.process_cost). The blackbox exporter is driven the way Prometheus drives it:
  one /probe request per check, 10 targets every 100 ms; only the exporter's own CPU counts
  (not the client's), although it includes serving /probe, which is how every check of it
  is paid for.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.core import (
    Row,
    cpu_seconds,
    delay_server,
    fetch,
    free_port,
    process_cost,
    running,
)

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
    with blackbox_exporter() as (exporter, pid), delay_server(0) as url:
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
