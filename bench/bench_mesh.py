"""/mesh.json for a 200-node cluster: how long the walk + verdicts + document take.

A child process plays 199 probes (one report server per pod IP, 127.0.4.x, all on one
port, each checking the next 10 on the ring, as KUBENURSE_NEIGHBOUR_LIMIT=10 does); this
process is probe 0 and builds the view with the probe's own MeshView, as `/mesh.json` does,
then serialises it. Also: the page's size, and the view with 20 probes not answering.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from bench.core import free_port, percentile

NODES = 200
LIMIT = 10
SILENT = 20  # for the second figure: this many probes refuse connections


def ip(i: int) -> str:
    return f"127.0.4.{i + 1}"


def report(i: int, silent: int = 0) -> dict[str, Any]:
    """Probe i's report; the paths towards probes 1..silent fail (they are down)."""
    neighbours = [(i + k) % NODES for k in range(1, LIMIT + 1)]
    results: list[dict[str, Any]] = [
        {"type": f"path_node-{j}", "to": f"node-{j}", "ok": not 1 <= j <= silent,
         "latency_seconds": 0.0012 if not 1 <= j <= silent else None,
         "error_event": "connect_done" if 1 <= j <= silent else None, "trace_id": "0af7651916cd43dd8448eb211c80319c"}
        for j in neighbours
    ]
    results += [
        {"type": t, "ok": True, "latency_seconds": 0.004, "error_event": None, "trace_id": None}
        for t in ("api_server_direct", "api_server_dns", "me_ingress", "me_service")
    ]
    return {
        "node": f"node-{i}", "pod": f"kubenurse-{i}", "ready": True, "round_age_seconds": 1.0,
        "neighbours": [{"node": f"node-{j}", "pod": f"kubenurse-{j}", "pod_ip": ip(j)} for j in neighbours],
        "results": results,
    }


async def serve(port: int, silent: int) -> None:
    from aiohttp import web

    runners = []
    for i in range(1 + silent, NODES):
        body = json.dumps(report(i, silent))

        async def handler(_request: web.Request, body: str = body) -> web.Response:
            return web.Response(text=body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/mesh/report", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip(i), port).start()
        runners.append(runner)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def measure(port: int, rounds: int, silent: int) -> tuple[list[float], int, list[str]]:
    from probe.mesh.collect import MeshView, Peer

    # The seeds are what discovery hands over: every eligible pod.
    seeds = [Peer(f"node-{j}", f"kubenurse-{j}", ip(j)) for j in range(1, NODES)]
    view = MeshView(lambda: report(0, silent), seeds=lambda: seeds, source="kubenurse-0", port=port, max_age=0)
    times, size, kinds = [], 0, []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            document = await view.document()
            body = json.dumps(document, separators=(",", ":"))
            times.append(time.perf_counter() - started)
            size = len(body)
            kinds = sorted({f"{v['kind']}/{v['confidence']}" for v in document["verdicts"]})  # type: ignore[union-attr]
    finally:
        await view.close()
    return times, size, kinds


def with_cluster(silent: int, rounds: int) -> tuple[list[float], int, list[str]]:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_mesh", "--serve", str(port), str(silent)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        return asyncio.run(measure(port, rounds, silent))
    finally:
        child.terminate()
        child.wait()


def run() -> list[tuple[str, str]]:
    from probe.mesh.routes import PAGE

    times, size, kinds = with_cluster(0, 12)
    warm = times[1:]
    silent_times, _, silent_kinds = with_cluster(SILENT, 5)
    return [
        ("mesh page size", f"{len(PAGE) / 1024:.1f} KB"),
        (f"/mesh.json {NODES} nodes (limit {LIMIT}): first", f"{times[0] * 1000:.0f} ms"),
        (f"/mesh.json {NODES} nodes: p50 / max of {len(warm)}",
         f"{percentile(warm, 0.5) * 1000:.0f} / {max(warm) * 1000:.0f} ms"),
        (f"/mesh.json {NODES} nodes: body", f"{size / 1024:.0f} KB, verdicts {', '.join(kinds)}"),
        (f"/mesh.json {NODES} nodes, {SILENT} in a row down: p50",
         f"{percentile(silent_times, 0.5) * 1000:.0f} ms, verdicts {', '.join(silent_kinds)}"),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(serve(int(sys.argv[2]), int(sys.argv[3])))
    else:
        for label, value in run():
            print(f"{label}: {value}")
