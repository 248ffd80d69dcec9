"""A real Prometheus on loopback for tests: scrapes given targets, answers PromQL."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import free_port

PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; raises on a PromQL error."""
        qs = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def wait_for(self, promql: str, timeout: float = 30.0, min_results: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if len(result) >= min_results:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {promql!r} after {timeout}s")
            time.sleep(0.5)


@contextmanager
def run_prometheus(targets: Sequence[str], scrape_interval: str = "1s") -> Iterator[Prometheus]:
    """Start Prometheus scraping `targets` (host:port); stop it and remove its data after."""
    assert PROMETHEUS, "prometheus is not installed"
    with tempfile.TemporaryDirectory(prefix="prom-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
                    "scrape_configs": [{"job_name": "kubenurse", "static_configs": [{"targets": list(targets)}]}],
                }
            )
        )
        port = free_port()
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            prometheus = Prometheus(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
                assert time.monotonic() < deadline, "prometheus did not get ready"
                time.sleep(0.2)
            yield prometheus
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
