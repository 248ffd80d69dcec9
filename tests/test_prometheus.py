"""A real Prometheus scrapes real probes and answers the dashboards' kind of query."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import free_port
from tests.prometheus_server import PROMETHEUS, run_prometheus

pytestmark = pytest.mark.skipif(not PROMETHEUS, reason="prometheus not installed (Debian package prometheus)")

QUERY = "histogram_quantile(0.95, sum by (le, type) (rate(kubenurse_httpclient_request_duration_seconds_bucket[30s])))"


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered (e.g. /alive 500 before the first round)
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)


@pytest.fixture
def two_probes() -> Iterator[list[int]]:
    """Two probe processes checking each other through their 'Service' and 'ingress' URLs."""
    ports = [free_port(), free_port()]
    procs = []
    for mine, other in (ports, ports[::-1]):
        env = {
            **os.environ,
            "KUBENURSE_LISTEN_HOST": "127.0.0.1",
            "KUBENURSE_HTTP_PORT": str(mine),
            "KUBENURSE_CHECK_INTERVAL": "200ms",
            "KUBENURSE_SERVICE_URL": f"http://127.0.0.1:{other}",
            "KUBENURSE_INGRESS_URL": f"http://localhost:{other}",
            "KUBENURSE_EXTRA_CHECKS": f"self:http://127.0.0.1:{mine}/alwayshappy",
            "KUBENURSE_SHUTDOWN_DURATION": "0s",
        }
        procs.append(subprocess.Popen([sys.executable, "-m", "probe"], env=env, stderr=subprocess.DEVNULL))
    try:
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/alwayshappy")
        yield ports
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=15) == 0


def test_prometheus_scrapes_and_answers_p95_per_check_type(two_probes: list[int]) -> None:
    with run_prometheus([f"127.0.0.1:{p}" for p in two_probes]) as prometheus:
        up = prometheus.wait_for('up{job="kubenurse"} == 1', min_results=2)
        assert len(up) == 2
        result = prometheus.wait_for(QUERY, min_results=3, timeout=40)
        by_type = {r["metric"]["type"]: float(r["value"][1]) for r in result}
        assert set(by_type) == {"me_service", "me_ingress", "self"}
        for check_type, p95 in by_type.items():
            assert 0 < p95 < 0.5, (check_type, p95)  # loopback: far below the upper buckets
