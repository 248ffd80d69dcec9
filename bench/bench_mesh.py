"""/mesh.json under load: what 200 concurrent viewers cost a probe at 200 and 1,000 peers.

Three processes besides this one:
- peers: one report server per pretend pod IP (127.0.4.1 ...), all on one port, each checking
  the next 10 on the ring as KUBENURSE_NEIGHBOUR_LIMIT=10 does;
- the probe: the probe's own server (`build_app` + `start_servers`, the connection guard,
  the mesh routes) whose discovery lists every peer;
- a pinger: GET /alwayshappy every 50 ms, as a neighbour's check would, timing each answer.
This process is the viewers: CONCURRENCY clients asking /mesh.json back to back (half of
them with gzip) for LOAD_SECONDS. Printed: /alwayshappy latency under that load, the probe's
RSS before, at its peak and after, how many answers were 200 and 429, and the view's build
time and size.

`python -m bench.bench_mesh` runs it (about a minute on two cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.core import free_port, percentile

SIZES = (200, 1000)
LIMIT = 10
CONCURRENCY = 200
LOAD_SECONDS = 10.0
PING_INTERVAL = 0.05


def ip(i: int) -> str:
    return f"127.0.{4 + i // 250}.{i % 250 + 1}"


def report(i: int, nodes: int) -> bytes:
    from probe.mesh.report import Report, ReportResult

    results = [
        ReportResult(f"path_node-{j}", True, 0.0012, None, "0af7651916cd43dd8448eb211c80319c", f"node-{j}")
        for j in ((i + k) % nodes for k in range(1, LIMIT + 1))
    ]
    checks = ("api_server_direct", "api_server_dns", "me_ingress", "me_service")
    results += [ReportResult(t, True, 0.004) for t in checks]
    return Report(f"node-{i}", f"kubenurse-{i}", round_age=1.0, results=tuple(results)).encode()


async def serve_peers(port: int, nodes: int) -> None:
    from aiohttp import web

    runners = []
    for i in range(1, nodes):
        body = report(i, nodes)

        async def handler(_request: web.Request, body: bytes = body) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/mesh/report", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip(i), port).start()
        runners.append(runner)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def serve_probe(port: int, nodes: int) -> None:
    from probe.app import SWITCH_INTERVAL
    from probe.neighbours import Neighbour, Neighbourhood
    from probe.server import ServerState, build_app, start_servers
    from probe.settings import Settings
    from probe.telemetry.metrics import Metrics

    sys.setswitchinterval(SWITCH_INTERVAL)  # as `serve` sets it
    settings = Settings(listen_host=ip(0), http_port=port, pod_name="kubenurse-0", node_name="node-0")
    peers = tuple(Neighbour(f"kubenurse-{j}", ip(j), "", f"node-{j}") for j in range(1, nodes))
    state = ServerState(last_round=lambda: None, neighbourhood=Neighbourhood, eligible=lambda: peers)
    metrics = Metrics(buckets=settings.histogram_buckets, incoming=lambda: 0)
    servers = await start_servers(settings, build_app(settings, state, metrics))
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await servers.cleanup()


def ping(url: str, seconds: float) -> None:
    """Time /alwayshappy every PING_INTERVAL for `seconds`; print the times as JSON."""
    import http.client

    times: list[float] = []
    failures = 0
    end = time.monotonic() + seconds
    host, port = url.removeprefix("http://").split(":")
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", "/alwayshappy")
            conn.getresponse().read()
            conn.close()
            times.append(time.perf_counter() - started)
        except OSError:
            failures += 1
        time.sleep(max(0.0, PING_INTERVAL - (time.perf_counter() - started)))
    print(json.dumps({"times": times, "failures": failures}), flush=True)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(*args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "bench.bench_mesh", *args], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if args[0] != "--ping":
        line = process.stdout.readline().strip()
        assert line == "ready", line
    return process


async def view(base: str, pid: int, seconds: float) -> dict[str, Any]:
    """Load /mesh.json from CONCURRENCY clients for `seconds`; sample the probe's RSS."""
    import aiohttp

    statuses: dict[int, int] = {}
    size = 0
    peak = rss_mb(pid)
    end = time.monotonic() + seconds

    async def viewer(session: aiohttp.ClientSession, gzip: bool) -> None:
        nonlocal size
        headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
        while time.monotonic() < end:
            try:
                async with session.get(base + "/mesh.json", headers=headers, auto_decompress=False) as response:
                    body = await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if response.status == 429:
                        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                    elif not gzip:
                        size = len(body)
            except (aiohttp.ClientError, TimeoutError):
                statuses[0] = statuses.get(0, 0) + 1

    async def sample() -> None:
        nonlocal peak
        while time.monotonic() < end:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(sample(), *(viewer(session, i % 2 == 0) for i in range(CONCURRENCY)))
    return {"statuses": statuses, "size": size, "peak": peak}


def first_view(base: str) -> tuple[float, int]:
    import urllib.request

    started = time.perf_counter()
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(base + "/mesh.json", timeout=60) as r:
        body = r.read()
    return time.perf_counter() - started, len(body)


@dataclass
class Figures:
    nodes: int
    first_seconds: float
    size: int
    statuses: dict[int, int]
    #: /alwayshappy times under load, and how many failed.
    pings: list[float]
    ping_failures: int
    rss_idle: float
    rss_first: float
    rss_peak: float
    rss_after: float


def load(nodes: int, seconds: float = LOAD_SECONDS) -> Figures:
    """The figures for one cluster size (also used by tests/test_mesh_routes.py)."""
    peers_port = free_port()
    peers = child("--peers", str(peers_port), str(nodes))
    probe = child("--probe", str(peers_port), str(nodes))
    base = f"http://{ip(0)}:{peers_port}"
    try:
        idle_rss = rss_mb(probe.pid)
        first, size = first_view(base)
        before = rss_mb(probe.pid)
        pinger = child("--ping", base, str(seconds))
        loaded = asyncio.run(view(base, probe.pid, seconds))
        out, _ = pinger.communicate(timeout=120)
        pings = json.loads(out)
        time.sleep(3.0)
        after = rss_mb(probe.pid)
    finally:
        for p in (probe, peers):
            p.terminate()
            p.wait()
    return Figures(nodes, first, size, loaded["statuses"], pings["times"], pings["failures"],
                   idle_rss, before, loaded["peak"], after)


def measure(nodes: int) -> list[tuple[str, str]]:
    f = load(nodes)
    times, label = f.pings, f"{nodes} peers"
    return [
        (f"{label}: first /mesh.json (asks {nodes - 1})", f"{f.first_seconds * 1000:.0f} ms, {f.size / 1024:.0f} KB"),
        (f"{label}: /mesh.json answers in {LOAD_SECONDS:.0f} s from {CONCURRENCY} viewers",
         ", ".join(f"{'error' if k == 0 else k} x{v}" for k, v in sorted(f.statuses.items()))),
        (f"{label}: /alwayshappy under that load, p50 / p99 / max of {len(times)}",
         f"{percentile(times, 0.5) * 1000:.1f} / {percentile(times, 0.99) * 1000:.1f} / {max(times) * 1000:.1f} ms"
         + (f", {f.ping_failures} failed" if f.ping_failures else "")),
        (f"{label}: probe RSS idle / after first view / peak under load / 3 s after",
         f"{f.rss_idle:.0f} / {f.rss_first:.0f} / {f.rss_peak:.0f} / {f.rss_after:.0f} MB"),
    ]


def run() -> list[tuple[str, str]]:
    from probe.mesh.routes import PAGE

    rows = [("mesh page size", f"{len(PAGE) / 1024:.1f} KB")]
    for nodes in SIZES:
        rows += measure(nodes)
    return rows


if __name__ == "__main__":
    mode = sys.argv[1:2]
    if mode == ["--peers"]:
        asyncio.run(serve_peers(int(sys.argv[2]), int(sys.argv[3])))
    elif mode == ["--probe"]:
        asyncio.run(serve_probe(int(sys.argv[2]), int(sys.argv[3])))
    elif mode == ["--ping"]:
        ping(sys.argv[2], float(sys.argv[3]))
    else:
        os.environ.setdefault("OTEL_SDK_DISABLED", "true")
        for label, value in run():
            print(f"{label}: {value}", flush=True)
