"""The real OpenTelemetry Collector (agent and gateway, from otel-collector/*.yaml) and a real
Jaeger v2, as processes on loopback addresses of their own (a "pod IP" each).

The shipped configs are used as they are; only what names another host changes (the
pod's IP comes through ${env:MY_POD_IP} as in the cluster):
- agent: the loadbalancing exporter's DNS resolver of the headless Service becomes a static
  list of the gateway's address, and otlp/gateway's Service name its address;
- both: the collector's own telemetry listens on the pod IP (in a pod it has the pod's
  network namespace to itself; here three processes share the host's).
The agent's k8sattributes keeps `auth_type: serviceAccount`: it runs in a mount namespace
where the service-account files sit at the path a pod has them.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.services import Process, wait_port
from tests.real.cluster import RealCluster
from tests.real.conftest import ROOT, wait_for

SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
TELEMETRY_PORT = 8888


def _telemetry(config: dict[str, Any], host: str) -> None:
    service = config.setdefault("service", {})
    service["telemetry"] = {"metrics": {"readers": [
        {"pull": {"exporter": {"prometheus": {"host": host, "port": TELEMETRY_PORT}}}}]}}


def agent_config(gateway_ip: str) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "otel-collector/agent.yaml").read_text())
    exporter = config["exporters"]["loadbalancing"]
    exporter["resolver"] = {"static": {"hostnames": [f"{gateway_ip}:4317"]}}
    config["exporters"]["otlp/gateway"]["endpoint"] = f"{gateway_ip}:4317"
    _telemetry(config, "${env:MY_POD_IP}")
    return dict(config)


def gateway_config() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "otel-collector/gateway.yaml").read_text())
    _telemetry(config, "${env:MY_POD_IP}")
    return dict(config)


def jaeger_config(ip: str) -> dict[str, Any]:
    """Jaeger v2 (itself a collector distribution) with in-memory storage."""
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                     "exporters": ["jaeger_storage_exporter"]}},
            "telemetry": {"metrics": {"level": "none"}, "resource": {"service.name": "jaeger"}},
        },
        "extensions": {
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"{ip}:13133"}},
            "jaeger_query": {"storage": {"traces": "memstore"},
                             "http": {"endpoint": f"{ip}:16686"}, "grpc": {"endpoint": f"{ip}:16685"}},
            "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 100000}}}},
        },
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"{ip}:4317"}}}},
        "processors": {"batch": {"timeout": "200ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
    }


def start_collector(name: str, binary: Path, config: dict[str, Any], workdir: Path, env: dict[str, str],
                    ip: str, *, serviceaccount: Path | None = None) -> Process:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [str(binary), f"--config={path}"]
    if serviceaccount is not None:
        # A private mount namespace where the pod's service-account path exists (tmpfs over
        # /var/run/secrets's parent as seen by this process only).
        unshare = shutil.which("unshare") or "unshare"
        script = (
            'set -e; mount -t tmpfs tmpfs "$1"; mkdir -p "$2"; cp "$3"/token "$3"/ca.crt "$3"/namespace "$2"/; '
            'shift 3; exec "$@"'
        )
        secrets_parent = str(Path("/var/run/secrets").resolve().parent) if Path("/var/run").exists() else "/run"
        argv = [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                secrets_parent, SA_PATH, str(serviceaccount), *argv]
    process = Process(name, argv, workdir / f"{name}.log", env)
    wait_port(ip, 13133, timeout=30, process=process)
    return process


def start_jaeger(binary: Path, workdir: Path, ip: str) -> Process:
    path = workdir / "jaeger.yaml"
    path.write_text(yaml.safe_dump(jaeger_config(ip), sort_keys=False))
    process = Process("jaeger", [str(binary), f"--config={path}"], workdir / "jaeger.log")
    wait_port(ip, 16686, timeout=30, process=process)
    wait_port(ip, 4317, timeout=30, process=process)
    return process


def http_get(url: str, accept: str = "*/*") -> str:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def jaeger_traces(ip: str, service: str = "kubenurse", **params: str) -> list[dict[str, Any]]:
    query = "&".join(f"{k}={v}" for k, v in {"service": service, "limit": "2000", "lookback": "1h", **params}.items())
    try:
        return list(json.loads(http_get(f"http://{ip}:16686/api/traces?{query}"))["data"] or [])
    except urllib.error.HTTPError:
        return []


def agent_serviceaccount(cluster: RealCluster, workdir: Path) -> Path:
    """The otel-agent's service account (otel-collector/k8s/agent) as a pod would have it."""
    cluster.kubectl("apply", "-k", str(ROOT / "otel-collector/k8s/agent"))
    token = cluster.token("kubenurse", "otel-agent")
    return cluster.write_serviceaccount(workdir / "otel-agent-sa", token, "kubenurse")


def wait_until(check: Any, what: str, timeout: float) -> Any:
    """Poll every half second (the Jaeger and Prometheus queries are not free)."""
    return wait_for(check, what, timeout, every=0.5)
