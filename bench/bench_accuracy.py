"""Accuracy under a round's concurrency: what the probe reports minus what really happened,
for K checks at once, over HTTP and HTTPS, next to prometheus-blackbox-exporter driven with
K concurrent /probe requests against the same targets, in the same run.

"True" comes from the target (bench/delay_server.py): how long each answer was really held,
from the kernel receive time of the request to the send of the answer, and over TLS how
long its handshake took on the server's side. Each request carries an id, so every reported
figure is paired with the truth of that very request. The connect phase has no server-side
truth; on loopback the kernel's handshake is ~0.02 ms, so its reading is shown as is.

The probe side is the probe's own check pipeline, recording into the probe's own metrics, with
K checks started at the same instant: the worst case (the scheduler spreads them).
Then a real probe process checking 15 targets every 100 ms is measured twice: alone, and
while `wrk` loads its own server with /alive requests (mean reported minus mean true).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.core import Row, cpu_seconds, fetch, free_port, percentile, probe_process, running, scrape_value
from probe import names
from probe.checks.pipeline import Pipeline
from probe.checks.result import Target
from probe.settings import Settings
from probe.telemetry.metrics import Metrics

DELAY = 0.020
KS = tuple(int(k) for k in os.environ.get("BENCH_KS", "1,15,50,100").split(","))
SAMPLES = int(os.environ.get("BENCH_SAMPLES", "300"))
BLACKBOX = shutil.which("prometheus-blackbox-exporter")
WRK = shutil.which("wrk")


@contextlib.contextmanager
def target(tls_files: tuple[str, str] | None) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.delay_server", str(port), str(DELAY)]
    if tls_files:
        argv += list(tls_files)
    url = f"{'https' if tls_files else 'http'}://127.0.0.1:{port}"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), 1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("delay server did not start") from None
                time.sleep(0.01)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def control(url: str, path: str, ca: str | None) -> str:
    context = ssl.create_default_context(cafile=ca) if ca else None
    with urllib.request.urlopen(f"{url}{path}", timeout=10, context=context) as resp:
        return str(resp.read().decode())


def truth(url: str, ca: str | None) -> dict[str, dict[str, float | None]]:
    return dict(json.loads(control(url, "/served?by=id", ca)))


async def probe_side(url: str, k: int, ca: str | None, tag: str) -> dict[str, dict[str, float]]:
    """K checks at once, repeated: id -> reported figures (seconds)."""
    metrics = Metrics(buckets=Settings().histogram_buckets, incoming=lambda: 0)
    checker = Pipeline(Settings(extra_ca_file=ca), record=metrics.record)
    await checker.start()
    out: dict[str, dict[str, float]] = {}
    try:
        for i in range(3):  # warm up: first connections, lazy imports
            await checker.check(Target("bench", f"{url}/warm?id=w{tag}{i}"))
        waves = max(2, -(-SAMPLES // k))
        for wave in range(waves):
            ids = [f"p{tag}{k}-{wave}-{i}" for i in range(k)]
            results = await asyncio.gather(*(checker.check(Target(f"t{i}", f"{url}/x?id={rid}")) for i, rid in
                                              enumerate(ids)))
            for rid, result in zip(ids, results, strict=True):
                if result.duration is None:
                    continue
                e = result.events
                out[rid] = {
                    "duration": result.duration,
                    "connect": e[names.CONNECT_DONE] - e[names.CONNECT_START],
                    "tls": e.get(names.TLS_HANDSHAKE_DONE, 0.0) - e.get(names.TLS_HANDSHAKE_START, 0.0),
                    "first_byte": e[names.GOT_FIRST_RESP_BYTE] - e[names.WROTE_REQUEST],
                }
            await asyncio.sleep(0.01)  # rounds are apart, as in the probe
    finally:
        await checker.close()
        metrics.shutdown(1.0)
    return out


BLACKBOX_CONFIG = """
modules:
  http:
    prober: http
    timeout: 5s
    http: {{preferred_ip_protocol: ip4, ip_protocol_fallback: false}}
  https:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
      tls_config: {{ca_file: "{ca}"}}
"""


def blackbox_side(exporter: str, url: str, k: int, tag: str) -> dict[str, dict[str, float]]:
    module = "https" if url.startswith("https") else "http"

    def one(rid: str) -> tuple[str, dict[str, float] | None]:
        query = urllib.parse.urlencode({"target": f"{url}/x?id={rid}", "module": module})
        phases: dict[str, float] = {}
        success = False
        for line in fetch(f"{exporter}/probe?{query}").splitlines():
            if line.startswith('probe_http_duration_seconds{phase="'):
                phases[line.split('"', 2)[1]] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("probe_success "):
                success = line.endswith(" 1")
        if not success:
            return rid, None
        return rid, {
            "duration": sum(phases.get(p, 0.0) for p in ("resolve", "connect", "tls", "processing")),
            "connect": phases.get("connect", 0.0),
            "tls": phases.get("tls", 0.0),
            "first_byte": phases.get("processing", 0.0),
        }

    out: dict[str, dict[str, float]] = {}
    with ThreadPoolExecutor(max_workers=k) as pool:
        waves = max(2, -(-SAMPLES // k))
        for wave in range(waves):
            for rid, figures in pool.map(one, [f"b{tag}{k}-{wave}-{i}" for i in range(k)]):
                if figures is not None:
                    out[rid] = figures
            time.sleep(0.01)
    return out


def errors(reported: dict[str, dict[str, float]], true: dict[str, dict[str, float | None]]) -> dict[str, list[float]]:
    """Per figure, reported minus true (ms); connect as read (no server-side truth)."""
    out: dict[str, list[float]] = {"duration": [], "connect": [], "tls": [], "first_byte": []}
    for rid, r in reported.items():
        t = true.get(rid)
        if t is None or t["hold"] is None:
            continue
        hold, tls = float(t["hold"]), float(t["tls"] or 0.0)
        out["duration"].append((r["duration"] - hold - tls) * 1000)
        out["connect"].append(r["connect"] * 1000)
        out["tls"].append((r["tls"] - tls) * 1000)
        out["first_byte"].append((r["first_byte"] - hold) * 1000)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{_mean(values):.3f} / {percentile(values, 0.99):.3f}"


def accuracy_table(exporter: str | None, ca: str, cert: str, key: str) -> list[str]:
    lines = [
        "| proto | K | request: probe mean / p99 | request: blackbox mean / p99 | connect (read): probe / blackbox "
        "| TLS: probe / blackbox | first byte: probe / blackbox | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for proto, files in (("http", None), ("https", (cert, key))):
        with target(files) as url:
            for k in KS:
                tag = f"{proto}{k}"
                probe = asyncio.run(probe_side(url, k, ca, tag))
                blackbox = blackbox_side(exporter, url, k, tag) if exporter else {}
                true = truth(url, ca if files else None)
                p, b = errors(probe, true), errors(blackbox, true)
                tls_cells = (f"{_mean(p['tls']):.3f} / {_mean(b['tls']):.3f}" if files else "-")
                lines.append(
                    f"| {proto} | {k} | {_cell(p['duration'])} | {_cell(b['duration'])} "
                    f"| {_mean(p['connect']):.3f} / {_mean(b['connect']):.3f} | {tls_cells} "
                    f"| {_mean(p['first_byte']):.3f} / {_mean(b['first_byte']):.3f} "
                    f"| {len(p['duration'])} / {len(b['duration'])} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    return lines


@contextlib.contextmanager
def blackbox(ca: str) -> Iterator[str | None]:
    if not BLACKBOX:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="blackbox-") as tmp:
        config = Path(tmp) / "blackbox.yml"
        config.write_text(BLACKBOX_CONFIG.format(ca=ca))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [BLACKBOX, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        with running(argv, f"{url}/metrics"):
            yield url


def probe_process_error(url: str, seconds: float, load: bool) -> tuple[float, float, float]:
    """(mean reported - mean true in ms, CPU s per 1,000 checks, wrk requests/s) of a real
    probe process checking 15 targets every 100 ms, optionally under wrk load on /alive."""
    port = free_port()
    targets = "|".join(f"t{i}:{url}/x?id=" for i in range(15))
    with probe_process(port, targets) as proc:
        time.sleep(2.0)
        control(url, "/reset", None)
        text = fetch(f"http://127.0.0.1:{port}/metrics")
        s0 = scrape_value(text, "kubenurse_httpclient_request_duration_seconds_sum")
        n0 = scrape_value(text, "kubenurse_httpclient_request_duration_seconds_count")
        cpu0 = cpu_seconds(proc.pid)
        rate = 0.0
        if load and WRK:
            out = subprocess.run(
                [WRK, "-t1", "-c32", f"-d{seconds:.0f}s", f"http://127.0.0.1:{port}/alive"],
                capture_output=True, text=True, check=False,
            ).stdout
            for line in out.splitlines():
                if line.startswith("Requests/sec:"):
                    rate = float(line.split()[1])
        else:
            time.sleep(seconds)
        text = fetch(f"http://127.0.0.1:{port}/metrics")
        s1 = scrape_value(text, "kubenurse_httpclient_request_duration_seconds_sum")
        n1 = scrape_value(text, "kubenurse_httpclient_request_duration_seconds_count")
        cpu1 = cpu_seconds(proc.pid)
        holds = [float(x) for x in json.loads(control(url, "/served", None))]
    reported = (s1 - s0) / max(1.0, n1 - n0)
    # The metrics window and the server's window differ by a scrape; means are robust to it.
    return (reported - _mean(holds)) * 1000, (cpu1 - cpu0) / max(1.0, n1 - n0) * 1000, rate


def run() -> list[Row]:
    import trustme

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        ca_obj = trustme.CA()
        issued = ca_obj.issue_cert("127.0.0.1", "localhost")
        ca, cert, key = (str(Path(tmp) / n) for n in ("ca.pem", "cert.pem", "key.pem"))
        ca_obj.cert_pem.write_to_path(ca)
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        with blackbox(ca) as exporter:
            table = accuracy_table(exporter, ca, cert, key)
    print("\nReported minus true, ms (connect: as read; the kernel's loopback handshake is ~0.02 ms)")
    print("\n".join(table) + "\n")
    with target(None) as url:
        quiet, cpu, _ = probe_process_error(url, 8.0, load=False)
        loaded, _, rate = probe_process_error(url, 8.0, load=True)
    rows.append(("probe process, 15 checks / 100 ms: mean reported - true (ms)", f"{quiet:.3f}"))
    rows.append(("  same, while wrk loads its /alive (ms)",
                 f"{loaded:.3f}  ({rate:,.0f} requests/s)" if WRK else "skipped: wrk not installed"))
    rows.append(("CPU seconds per 1,000 checks (K=15, OTLP off)", f"{cpu:.3f}"))
    return rows


if __name__ == "__main__":
    for label, value in run():
        print(f"{label}: {value}")
