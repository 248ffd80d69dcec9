"""Fixtures for the tests against real components: one etcd + kube-apiserver for the session,
with the project's own manifests (k8s/overlays/node-events: base + the events RBAC) applied."""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.services import Process, wait_port
from tests.real.cluster import RealCluster, running_cluster
from tests.real.components import cache_dir, need

ROOT = Path(__file__).resolve().parents[2]
NS = "kubenurse"
LABELS = {"app.kubernetes.io/name": "kubenurse"}
FILTER = "app.kubernetes.io/name=kubenurse"


def need_kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not on PATH (.ci/run installs it)")
    return found


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    etcd, apiserver = need("etcd"), need("kube-apiserver")
    need_kubectl()
    workdir = tmp_path_factory.mktemp("real-cluster")
    with running_cluster(workdir, etcd, apiserver) as cluster:
        # The project's manifests as a user applies them (the DaemonSet stays without pods:
        # no controller manager runs). The tests create the probe pods themselves.
        cluster.kubectl("apply", "-k", str(ROOT / "k8s/overlays/node-events"))
        yield cluster


@pytest.fixture(scope="session")
def crds(real_cluster: RealCluster) -> None:
    """The prometheus-operator CRDs (.ci/components fetches them from that project's Go module)."""
    directory = cache_dir() / "crds"
    if not (directory / "servicemonitors.yaml").is_file():
        pytest.skip("prometheus-operator CRDs missing: run .ci/components crds")
    for path in sorted(directory.glob("*.yaml")):
        real_cluster.kubectl("apply", "--server-side", "-f", str(path))
    real_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                         "crd/servicemonitors.monitoring.coreos.com", "crd/prometheusrules.monitoring.coreos.com")


def probe_env(cluster: RealCluster, sa_dir: Path, *, pod: str, node: str, ip: str, port: int,
              extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A probe as the DaemonSet runs it, its token and CA in `sa_dir`, on 127.0.0.x:port."""
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(cluster.port),
        "KUBENURSE_SERVICEACCOUNT_DIR": str(sa_dir),
        "POD_NAME": pod,
        "NODE_NAME": node,
        "POD_NAMESPACE": NS,
        "KUBENURSE_NAMESPACE": NS,
        "KUBENURSE_NEIGHBOUR_FILTER": FILTER,
        "KUBENURSE_LISTEN_HOST": ip,
        "KUBENURSE_HTTP_PORT": str(port),
        "KUBENURSE_CHECK_INTERVAL": "500ms",
        "KUBENURSE_CHECK_TIMEOUT": "2s",
        "KUBENURSE_CHECK_CONNECT_TIMEOUT": "1s",
        "KUBENURSE_CHECK_ME_INGRESS": "false",
        "KUBENURSE_CHECK_ME_SERVICE": "false",
        "KUBENURSE_CHECK_DNS_CLUSTER": "false",
        "KUBENURSE_CHECK_API_SERVER_DNS": "false",
        "KUBENURSE_SHUTDOWN_DURATION": "0s",
        "OTEL_SDK_DISABLED": "false",
    }
    env.update(extra or {})
    return env


class ProbeProcess:
    """`python -m probe` as a child process, and its HTTP surface."""

    def __init__(self, name: str, env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.url = f"http://{env['KUBENURSE_LISTEN_HOST']}:{env['KUBENURSE_HTTP_PORT']}"
        self.process = Process(f"probe {name}", [sys.executable, "-m", "probe"], log,
                               {**env, "PYTHONPATH": str(ROOT)})
        wait_port(env["KUBENURSE_LISTEN_HOST"], int(env["KUBENURSE_HTTP_PORT"]), timeout=30, process=self.process)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def alive(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/alive")[1]))

    def ready(self) -> int:
        return self.get("/ready")[0]

    def neighbourhood(self) -> set[str]:
        return {n["PodName"] for n in self.alive()["last_check_result"].get("neighbourhood", [])}

    def stop(self) -> None:
        self.process.stop()


def wait_for(
    check: Any, what: str, timeout: float = 20.0, *, process: ProbeProcess | None = None, every: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    tail = "\n" + process.process.tail(30) if process else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r}){tail}")
