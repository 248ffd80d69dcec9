"""`kubenurse sandbox --real`: the sandbox on a real etcd + kube-apiserver, with Jaeger."""

from __future__ import annotations

import asyncio
import time

from kubenurse_sandbox.cluster import Sandbox
from kubenurse_sandbox.options import Options
from tests.real.components import need


async def test_sandbox_on_the_real_api_server_links_a_slow_check_to_its_trace() -> None:
    for component in ("etcd", "kube-apiserver", "jaeger"):
        need(component)
    said: list[str] = []
    sandbox = Sandbox(Options(nodes=3, port=0, interval="500ms", neighbour_limit=2, prometheus=False, real=True),
                      say=said.append)
    try:
        await sandbox.start()
        assert await sandbox.wait_healthy(60) == [], await sandbox.status()
        status = await sandbox.status()
        assert "API server (real kube-apiserver): up" in status, status
        assert sandbox.jaeger_url and f"Jaeger: {sandbox.jaeger_url}" in status

        sandbox.slow("node-2", 0.3)
        deadline = time.monotonic() + 30
        while (trace := await sandbox.last_slow_trace()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert trace and trace.startswith(f"{sandbox.jaeger_url}/trace/"), await sandbox.status()
        assert f"last slow check's trace: {sandbox.jaeger_url}/trace/" in await sandbox.status()

        sandbox.cordon("node-1")
        node = sandbox.node("node-1")
        base = f"http://{node.spec.inner_address}:{sandbox.probe_port}"
        deadline = time.monotonic() + 20
        while (await sandbox._get(f"{base}/ready"))[0] != 503 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert (await sandbox._get(f"{base}/ready"))[0] == 503
    finally:
        await sandbox.close()
