"""OTLP through the real collector into real Jaeger: two probes (each with the agent of its
node) -> gateway (tail sampling, spanmetrics, servicegraph) -> Jaeger v2, as in
otel-collector/, with a real API server behind the agents' k8sattributes."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.services import Process
from tests.real.cluster import RealCluster
from tests.real.components import need
from tests.real.conftest import LABELS, NS, ROOT, ProbeProcess, probe_env, wait_for
from tests.real.telemetry import (
    agent_config,
    agent_serviceaccount,
    gateway_config,
    http_get,
    jaeger_traces,
    start_collector,
    start_jaeger,
    wait_until,
)

JAEGER, GATEWAY = "127.0.26.100", "127.0.26.101"
AGENTS = {"otel-a": "127.0.26.102", "otel-b": "127.0.26.103"}
PROBES = {"otel-a": "127.0.26.1", "otel-b": "127.0.26.2"}
SLOW_NODE, SLOW_IP = "otel-slow", "127.0.26.3"
DEAD_NODE, DEAD_IP = "otel-dead", "127.0.26.4"
PORT = 18080


@dataclass
class Pipeline:
    cluster: RealCluster
    workdir: Path
    probes: dict[str, ProbeProcess]
    agents: dict[str, Process]
    gateway: Process
    jaeger: Process
    otelcol: Path
    agent_sa: Path

    def start_agent(self, node: str) -> Process:
        env = {"MY_POD_IP": AGENTS[node], "K8S_NODE_NAME": node,
               "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.cluster.port)}
        self.agents[node] = start_collector(f"agent-{node}", self.otelcol, agent_config(GATEWAY), self.workdir, env,
                                            AGENTS[node], serviceaccount=self.agent_sa)
        return self.agents[node]


@pytest.fixture(scope="module")
def pipeline(real_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    otelcol, jaeger = need("otelcol"), need("jaeger")
    workdir = tmp_path_factory.mktemp("otlp")
    agent_sa = agent_serviceaccount(real_cluster, workdir)
    token = real_cluster.token(NS, "kubenurse")
    sa_dir = real_cluster.write_serviceaccount(workdir / "probe-sa", token, NS)
    stack = contextlib.ExitStack()
    with stack:
        for node, ip in {**PROBES, SLOW_NODE: SLOW_IP, DEAD_NODE: DEAD_IP}.items():
            real_cluster.add_node(node)
            real_cluster.add_pod(f"kubenurse-{node}", namespace=NS, node=node, ip=ip, labels=LABELS)
            stack.callback(real_cluster.delete_node, node)
            stack.callback(real_cluster.delete_pod, f"kubenurse-{node}", namespace=NS)
        slow = Process("slow neighbour", [sys.executable, "-c", SLOW_SERVER, SLOW_IP, str(PORT)], workdir / "slow.log")
        stack.callback(slow.stop)
        jaeger_process = start_jaeger(jaeger, workdir, JAEGER)
        stack.callback(jaeger_process.stop)
        gateway = start_collector("gateway", otelcol, gateway_config(), workdir,
                                  {"MY_POD_IP": GATEWAY, "TRACES_OTLP_ENDPOINT": f"{JAEGER}:4317"}, GATEWAY)
        stack.callback(gateway.stop)
        result = Pipeline(real_cluster, workdir, {}, {}, gateway, jaeger_process, otelcol, agent_sa)
        for node in PROBES:
            result.start_agent(node)
        stack.callback(stop_all, result.agents)
        for node, ip in PROBES.items():
            env = probe_env(real_cluster, sa_dir, pod=f"kubenurse-{node}", node=node, ip=ip, port=PORT, extra={
                **overlay_env(),
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{AGENTS[node]}:4317",
                "OTEL_BSP_SCHEDULE_DELAY": "300",
                "OTEL_METRIC_EXPORT_INTERVAL": "2000",
                "KUBENURSE_CHECK_INTERVAL": "500ms",
                "KUBENURSE_CHECK_TIMEOUT": "1500ms",
            })
            result.probes[node] = ProbeProcess(node, env, workdir / f"probe-{node}.log")
            stack.callback(result.probes[node].stop)
        yield result


def overlay_env() -> dict[str, str]:
    """The probe's OTLP settings as k8s/overlays/otlp ships them (the endpoint is set apart)."""
    patch = yaml.safe_load((ROOT / "k8s/overlays/otlp/otlp-env.yaml").read_text())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]
            if "value" in e and e["name"] != "OTEL_EXPORTER_OTLP_ENDPOINT"}


def stop_all(processes: dict[str, Process]) -> None:
    for process in processes.values():
        process.stop()


#: A neighbour pod's server that answers after 700 ms (over the 500 ms latency policy).
SLOW_SERVER = """
import asyncio, sys
from aiohttp import web
async def slow(request):
    await asyncio.sleep(0.7)
    return web.Response(text="I'm happy\\n")
app = web.Application()
app.router.add_get("/alwayshappy", slow)
web.run_app(app, host=sys.argv[1], port=int(sys.argv[2]), print=None)
"""


def spans_by_pod(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The trace's spans grouped by the k8s.pod.name of their resource (Jaeger's process)."""
    pods: dict[str, list[dict[str, Any]]] = {}
    for span in trace["spans"]:
        tags = {t["key"]: t["value"] for t in trace["processes"][span["processID"]].get("tags", [])}
        pods.setdefault(str(tags.get("k8s.pod.name", "?")), []).append(span)
    return pods


def tag(span: dict[str, Any], key: str) -> Any:
    return next((t["value"] for t in span.get("tags", []) if t["key"] == key), None)


def neighbour_trace(traces: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A trace of a check between the two probes: a CLIENT span on one, SERVER on the other."""
    for trace in traces:
        pods = spans_by_pod(trace)
        if {"kubenurse-otel-a", "kubenurse-otel-b"} <= pods.keys():
            kinds = {tag(s, "span.kind") for s in trace["spans"]}
            if {"client", "server"} <= kinds:
                return trace
    return None


def test_a_neighbour_checks_trace_holds_both_pods_spans_with_their_resources(pipeline: Pipeline) -> None:
    trace = wait_until(lambda: neighbour_trace(jaeger_traces(JAEGER)), "a probe-to-probe trace in Jaeger", 60)
    spans = {s["spanID"]: s for s in trace["spans"]}
    client = next(s for s in trace["spans"] if tag(s, "span.kind") == "client")
    server = next(s for s in trace["spans"] if tag(s, "span.kind") == "server")
    # The SERVER span is the CLIENT span's child, through the traceparent header.
    assert any(r["spanID"] == client["spanID"] for r in server.get("references", [])), server
    # Phase children under the CLIENT span (connect, request ...).
    children = [s for s in trace["spans"] if any(r["spanID"] == client["spanID"] for r in s.get("references", []))
                and s is not server]
    assert children, f"no phase spans under {client['operationName']}: {[s['operationName'] for s in spans.values()]}"
    process = {t["key"]: t["value"] for t in trace["processes"][client["processID"]]["tags"]}
    assert process["k8s.namespace.name"] == NS
    assert process["k8s.node.name"] in PROBES
    # Added by the agent's k8sattributes from the real API server.
    assert process.get("k8s.pod.uid"), process
    assert process.get("k8s.pod.ip") in PROBES.values(), process


def checks_done(probe: ProbeProcess, check_type: str) -> int:
    _, text = probe.get("/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith("kubenurse_httpclient_requests_total{") and f'type="{check_type}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def test_tail_sampling_keeps_slow_and_failing_checks_and_few_healthy_ones(pipeline: Pipeline) -> None:
    def kept(node: str) -> list[dict[str, Any]]:
        """The HTTP checks' traces towards `node` (its UDP trains are traces of their own)."""
        return [t for t in jaeger_traces(JAEGER)
                if any(tag(s, "kubenurse.neighbour.node") == node and not s["operationName"].endswith("(udp)")
                       for s in t["spans"])]

    slow = wait_until(lambda: kept(SLOW_NODE), "a slow check's trace", 60)
    assert all(max(s["duration"] for s in t["spans"]) >= 500_000 for t in slow)
    failing = wait_until(lambda: kept(DEAD_NODE), "a failing check's trace", 60)
    assert any(tag(s, "otel.status_code") == "ERROR" for t in failing for s in t["spans"])
    # Healthy checks between the probes: only the 5% baseline (and a few by chance) survive.
    healthy = len(kept("otel-a")) + len(kept("otel-b"))
    done = sum(checks_done(p, f"path_{n}") for p in pipeline.probes.values() for n in PROBES)
    assert done >= 40, done
    assert healthy < 0.3 * done, (healthy, done)


def scrape(ip: str, port: int) -> str:
    return http_get(f"http://{ip}:{port}/metrics", accept="application/openmetrics-text;version=1.0.0")


def test_servicegraph_and_spanmetrics_from_our_spans(pipeline: Pipeline) -> None:
    def edge() -> str | None:
        text = scrape(GATEWAY, 8889)
        found = re.search(r'^traces_service_graph_request_total\{[^}]*client="otel-a"[^}]*server="otel-b"[^}]*\}.*$',
                          text, re.M)
        return found.group(0) if found else None

    line = wait_until(edge, "the otel-a -> otel-b edge in traces_service_graph_request_total", 60)
    assert 'client_kubenurse_check_type="path_otel-b"' in line or "kubenurse_check_type" in line, line
    text = scrape(GATEWAY, 8889)
    calls = [ln for ln in text.splitlines() if ln.startswith("traces_span_metrics_calls_total{")]
    assert any('kubenurse_check_type="path_otel-b"' in ln for ln in calls), calls[:5]
    # spanmetrics exemplars (trace IDs) ride on the OpenMetrics exposition.
    assert re.search(r"^traces_span_metrics_duration_seconds_bucket\{.*# \{trace_id=\"[0-9a-f]{32}\"", text, re.M)


def test_the_probes_otlp_metrics_reach_prometheus_through_the_gateway(pipeline: Pipeline) -> None:
    def histogram() -> list[str]:
        return [ln for ln in scrape(GATEWAY, 8890).splitlines()
                if ln.startswith("kubenurse_httpclient_request_duration_seconds")]

    lines = wait_until(histogram, "kubenurse_httpclient_request_duration_seconds on :8890", 40)
    assert any('k8s_node_name="otel-a"' in ln for ln in lines), lines[:3]
    # The probe's buckets, as on its own /metrics, with exemplars that name a trace.
    assert any('le="0.005"' in ln for ln in lines), lines[:3]
    exemplars = [ln for ln in lines if "_bucket{" in ln and re.search(r'# \{[^}]*trace_id="[0-9a-f]{32}"', ln)]
    assert exemplars, lines[:5]
    errors = (pipeline.workdir / "gateway.log").read_text()
    assert "failed to convert metric" not in errors


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_collector_down_30s_the_probe_keeps_checking_and_export_resumes(pipeline: Pipeline) -> None:
    probe = pipeline.probes["otel-a"]
    before_checks = checks_done(probe, f"path_{SLOW_NODE}")
    rss_before = rss_kib(probe.process.proc.pid)
    pipeline.agents["otel-a"].stop()
    down_at = time.time()
    time.sleep(30)
    assert probe.process.running
    assert checks_done(probe, f"path_{SLOW_NODE}") >= before_checks + 20  # ~1 a round, 0.5 s rounds
    assert probe.alive()["last_check_result"]["path_otel-b"] == "ok"
    grown = rss_kib(probe.process.proc.pid) - rss_before
    assert grown < 30 * 1024, f"RSS grew by {grown} KiB with the collector down"
    pipeline.start_agent("otel-a")

    def new_slow_trace_from_a() -> bool:
        for trace in jaeger_traces(JAEGER, start=str(int((down_at + 31) * 1e6))):
            pods = spans_by_pod(trace)
            if "kubenurse-otel-a" in pods and any(tag(s, "kubenurse.neighbour.node") == SLOW_NODE
                                                   for s in pods["kubenurse-otel-a"]):
                return True
        return False

    wait_until(new_slow_trace_from_a, "otel-a's traces in Jaeger again after the restart", 60)
    wait_for(lambda: probe.ready() == 200, "probe ready")
