"""The Grafana dashboard, and the alert rules, against a real Prometheus scraping real probes.

A small cluster on loopback: the Kubernetes API-server stand-in (kubenurse_sandbox.standin) with two
nodes and a probe pod on each, labelled as k8s/base labels them; two real probes
(`python -m probe`), one per "node" address (127.0.0.2, 127.0.0.3) on the same port, that
discover each other through the stand-in with the manifest's neighbour filter and check the
API server (directly and by name), each other (as "service", "ingress" and neighbour) and,
on one of them, a refused port, so the error series exist too. A real Prometheus (Debian's
/usr/bin/prometheus) scrapes them every second as job "kubenurse" with a `node` label, as
the ServiceMonitor does, and loads deploy/prometheus/kubenurse-rules.yaml. Every PromQL
expression of the dashboard, with its template variables substituted by the values
Prometheus offers for them, must parse and return data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "kubenurse.json"
RULES = ROOT / "deploy" / "prometheus" / "kubenurse-rules.yaml"
DAEMONSET = ROOT / "k8s" / "base" / "daemonset.yaml"
PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
JOB = "kubenurse"
NAMESPACE = "kubenurse"
# What Grafana would put for its built-in interval variables with a 1 s scrape interval.
BUILTINS = {"__rate_interval": "5s", "__interval": "2s", "__range": "1m", "__range_s": "60"}
DEADLINE_SECONDS = 40

Panel = dict[str, Any]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> Iterator[Panel]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside (collapsed) rows


def query_panels(dashboard: dict[str, Any]) -> list[Panel]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def exprs(panel: Panel) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


# --- the dashboard on its own ------------------------------------------------------------------


def test_every_panel_uses_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    datasource = variables(dashboard)["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for panel in query_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_panel_ids_and_layout_are_sound() -> None:
    dashboard = load_dashboard()
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dashboard["uid"] and dashboard["title"]
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    dashboard = load_dashboard()
    panels = query_panels(dashboard)
    text = "\n".join(e for p in panels for e in exprs(p))
    duration_bucket = "kubenurse_httpclient_request_duration_seconds_bucket"
    for quantile in ("0.5", "0.95", "0.99"):
        assert re.search(rf"histogram_quantile\({quantile}, sum by \(type, le\) \(rate\({duration_bucket}", text)
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert heatmaps and all(duration_bucket in e for p in heatmaps for e in exprs(p))
    assert all(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])
    assert any(p.get("repeat") for p in heatmaps), "one heatmap per path"
    assert re.search(r"by \([^)]*event[^)]*\)[^\n]*kubenurse_httpclient_trace_request_duration_seconds", text)
    assert re.search(r"by \(type, event\) \(rate\(kubenurse_errors_total", text)
    assert re.search(r"by \(node[^)]*\) \(kubenurse_neighbourhood_incoming_checks", text)
    assert "process_resident_memory_bytes" in text
    trace_bucket = "kubenurse_httpclient_trace_request_duration_seconds_bucket"
    dns_p95 = rf'histogram_quantile\(0.95, sum by \(type, le\) \(rate\({trace_bucket}\{{[^}}]*event="dns_done"'
    assert re.search(dns_p95, text), "a DNS panel"
    assert 'code="ok"' in text, "a panel for the kinds without an HTTP status (dns, tcp)"
    assert "kubenurse_tls_certificate_expiry_timestamp_seconds" in text
    # Loss: UDP loss share, retransmissions per check, UDP round trips, MTU failures.
    udp_share = r"rate\(kubenurse_udp_packets_lost_total[^\n]*\n\s*/\s*\nsum by \(type\) \(rate\("
    udp_share += "kubenurse_udp_packets_sent"
    assert re.search(udp_share, text)
    assert re.search(r"rate\(kubenurse_tcp_retransmits_total", text)
    assert "kubenurse_udp_rtt_seconds_bucket" in text
    assert 'event="mtu"' in text
    assert {"datasource", "job", "node", "type"} <= set(variables(dashboard))


def test_latency_queries_ask_for_exemplars_and_say_how_to_link_them() -> None:
    dashboard = load_dashboard()
    latency = [
        t for p in query_panels(dashboard) for t in p["targets"] if "duration_seconds_bucket" in t.get("expr", "")
    ]
    assert latency
    assert all(t.get("exemplar") is True for t in latency)
    assert "exemplarTraceIdDestinations" in dashboard["description"]


# --- template variables, as Grafana resolves them ----------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_REGEX_SPECIAL = re.compile(r"([.+*?()|\[\]{}^$\\])")


def regex_value(values: list[str]) -> str:
    """A multi-value variable inside =~"...", escaped as Grafana escapes it (for PromQL strings)."""
    escaped = [_REGEX_SPECIAL.sub(r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(expr: str, values: dict[str, list[str]]) -> str:
    for name, value in BUILTINS.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)

    def one(m: re.Match[str]) -> str:
        name = m[1] or m[2] or m[3]
        assert name in values, f"unknown variable ${name} in {expr}"
        return regex_value(values[name])

    out = _VARIABLE.sub(one, expr)
    assert "$" not in out, f"unresolved variable in {out}"
    return out


def test_interpolation_escapes_and_refuses_unknown_variables() -> None:
    values = {"type": ["me_service", "path_a.b"], "job": ["kubenurse"]}
    assert interpolate('x{type=~"$type", job=~"${job}"}[$__rate_interval]', values) == (
        'x{type=~"(me_service|path_a\\\\.b)", job=~"kubenurse"}[5s]'
    )
    with pytest.raises(AssertionError):
        interpolate('x{node=~"$node"}', values)


# --- the live setup ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, ready: Callable[[], bool], deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@dataclass
class Live:
    prometheus: str
    deadline: float

    def until(self) -> float:
        """Deadline for one test: the setup's, or a few seconds if an earlier test used it up."""
        return max(self.deadline, time.monotonic() + 5)

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url, timeout=5)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{expr}\n-> {answer.get('error')}"
        return answer["data"]

    def series_label_values(self, selector: str, label: str) -> list[str]:
        url = f"{self.prometheus}/api/v1/series?" + urllib.parse.urlencode({"match[]": selector})
        status, body = http_get(url, timeout=5)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{selector}\n-> {answer.get('error')}"
        return sorted({s[label] for s in answer["data"] if label in s})


def clean_env() -> dict[str, str]:
    """This machine's env minus anything that would point a probe at a real cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBENURSE_", "KUBERNETES_", "OTEL_"))}
    env.pop("KUBECONFIG", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def manifest_pod() -> tuple[dict[str, str], str]:
    """The probe pods' labels and neighbour filter, as k8s/base ships them."""
    daemonset = yaml.safe_load(DAEMONSET.read_text())
    template = daemonset["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return template["metadata"]["labels"], env["KUBENURSE_NEIGHBOUR_FILTER"]


class Cluster:
    """The API-server stand-in on its own event loop thread: two nodes, a probe pod on each."""

    def __init__(self, directory: Path, pods: dict[str, str]) -> None:
        from kubenurse_sandbox.standin import ApiServerStandin

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="standin", daemon=True)
        self.thread.start()
        self.server = ApiServerStandin("127.0.0.1", 0)
        self.serviceaccount = directory / "serviceaccount"
        labels, _ = manifest_pod()

        async def setup() -> None:
            await self.server.start()
            self.server.write_serviceaccount(self.serviceaccount, NAMESPACE)
            for node, ip in pods.items():
                self.server.add_node(node)
                self.server.add_pod(f"kubenurse-{node}", namespace=NAMESPACE, node_name=node, pod_ip=ip, labels=labels)

        asyncio.run_coroutine_threadsafe(setup(), self.loop).result(timeout=10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    if PROMETHEUS is None:
        pytest.skip("prometheus (Debian package prometheus) not installed")
    deadline = time.monotonic() + DEADLINE_SECONDS
    tmp = tmp_path_factory.mktemp("live")
    processes: list[subprocess.Popen[bytes]] = []
    # One loopback address per "node", so both probes serve the same port, as in a cluster.
    pod_ips = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}
    other = {"node-a": "node-b", "node-b": "node-a"}
    # A bound socket that never listens: connecting to it is refused, for sure, all along.
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    closed_port = refused.getsockname()[1]
    port = free_port()
    cluster = None
    try:
        cluster = Cluster(tmp, pod_ips)
        _, neighbour_filter = manifest_pod()
        for node, ip in pod_ips.items():
            peer = pod_ips[other[node]]
            env = clean_env() | {
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(cluster.server.port),
                # A name, so the DNS phases are measured too.
                "KUBERNETES_SERVICE_DNS": "localhost",
                "KUBENURSE_SERVICEACCOUNT_DIR": str(cluster.serviceaccount),
                "KUBENURSE_NAMESPACE": NAMESPACE,
                "KUBENURSE_NEIGHBOUR_FILTER": neighbour_filter,
                "KUBENURSE_LISTEN_HOST": ip,
                "KUBENURSE_HTTP_PORT": str(port),
                "KUBENURSE_CHECK_INTERVAL": "500ms",
                # "Service" and "ingress": the other probe, straight.
                "KUBENURSE_SERVICE_URL": f"http://{peer}:{port}",
                "KUBENURSE_INGRESS_URL": f"http://{peer}:{port}",
                "KUBENURSE_SHUTDOWN_DURATION": "0s",
                # dns_cluster would ask this machine's nameserver, off loopback; the DNS
                # panels get their data from api_server_dns, the DNS/TCP one from "peer".
                "KUBENURSE_CHECK_DNS_CLUSTER": "false",
                "POD_NAME": f"kubenurse-{node}",
                "NODE_NAME": node,
                "POD_NAMESPACE": NAMESPACE,
            }
            if node == "node-a":
                env["KUBENURSE_EXTRA_CHECKS"] = f"broken:http://127.0.0.1:{closed_port}/|peer:tcp://{peer}:{port}"
            log = (tmp / f"probe-{node}.log").open("wb")
            processes.append(
                subprocess.Popen([sys.executable, "-m", "probe"], cwd=ROOT, env=env, stdout=log, stderr=log)
            )
        for node, ip in pod_ips.items():
            wait_for(
                f"probe on {node} (log: {tmp}/probe-{node}.log)",
                lambda ip=ip: http_get(f"http://{ip}:{port}/alwayshappy")[0] == 200,
                deadline,
            )

        prometheus_port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    # The `node` label, as the ServiceMonitor's relabeling adds it.
                    "static_configs": [
                        {"targets": [f"{ip}:{port}"], "labels": {"node": node}} for node, ip in pod_ips.items()
                    ],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (tmp / "prometheus.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                stdout=log,
                stderr=log,
            )
        )
        url = f"http://127.0.0.1:{prometheus_port}"
        wait_for("prometheus ready", lambda: http_get(f"{url}/-/ready")[0] == 200, deadline)
        yield Live(url, deadline)
    finally:
        for process in processes:
            stop(process)
        if cluster is not None:
            cluster.close()
        refused.close()


def resolve_variables(live: Live, dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Each query variable's values from Prometheus, in order, the way Grafana fills them."""
    values: dict[str, list[str]] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", query.strip())
        assert m, f"${variable['name']}: only label_values(...) is expected, got {query}"
        selector = interpolate(m[1], values) if m[1] else "{__name__=~'.+'}"
        found = live.series_label_values(selector, m[2])
        assert found, f"${variable['name']} ({query}) offers no values"
        values[variable["name"]] = found
    return values


def expressions_to_check(dashboard: dict[str, Any], values: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(where, PromQL) for every target; a repeated panel once per value of its variable."""
    out = []
    for panel in query_panels(dashboard):
        repeat = panel.get("repeat")
        for value_set in [values | {repeat: [v]} for v in values[repeat]] if repeat else [values]:
            for expr in exprs(panel):
                where = panel["title"] + (f" [{repeat}={value_set[repeat][0]}]" if repeat else "")
                out.append((where, interpolate(expr, value_set)))
    return out


class NotYet(Exception):
    """The queries themselves are not known yet (e.g. a template variable has no values)."""


def until_all_have_data(live: Live, queries: Callable[[], list[tuple[str, str]]]) -> None:
    """Poll until every query returns at least one series; report the empty ones at the deadline."""
    empty: list[str] = []
    deadline = live.until()
    while time.monotonic() < deadline:
        try:
            todo = queries()
        except NotYet as e:
            empty = [str(e)]
        else:
            empty = [f"{where}: {expr}" for where, expr in todo if not live.query(expr)["result"]]
            if not empty:
                return
        time.sleep(0.5)
    pytest.fail("no data for:\n" + "\n".join(empty))


def test_every_dashboard_query_returns_data_from_live_probes(live: Live) -> None:
    dashboard = load_dashboard()

    def queries() -> list[tuple[str, str]]:
        try:
            values = resolve_variables(live, dashboard)
        except AssertionError as e:  # a variable offers no values (yet: nothing scraped so far?)
            raise NotYet(str(e)) from None
        return expressions_to_check(dashboard, values)

    until_all_have_data(live, queries)
    values = resolve_variables(live, dashboard)
    # What two probes checking each other and one refused port look like.
    assert values["job"] == [JOB]
    assert values["node"] == ["node-a", "node-b"]
    assert set(values["type"]) == {
        "api_server_direct",
        "api_server_dns",
        "me_service",
        "me_ingress",
        "path_node-a",
        "path_node-b",
        "broken",
        "peer",
    }
    assert "broken" not in values["path"], "a check that never answers has no latency to draw"
    checked = expressions_to_check(dashboard, values)
    assert len(checked) >= 15


def test_rules_load_and_evaluate_on_live_probes(live: Live) -> None:
    def all_evaluated() -> bool:
        status, body = http_get(f"{live.prometheus}/api/v1/rules")
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        return status == 200 and bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)

    wait_for("every rule evaluated once", all_evaluated, live.until())
    _, body = http_get(f"{live.prometheus}/api/v1/rules")
    groups = json.loads(body)["data"]["groups"]
    problems = [f"{r['name']}: {r.get('lastError')}" for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not problems, problems
    expected = yaml.safe_load(RULES.read_text())["groups"]
    assert sum(len(g["rules"]) for g in groups) == sum(len(g["rules"]) for g in expected)


def alert_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"] if "alert" in r}


def test_alert_expressions_on_live_probes(live: Live) -> None:
    """On real series: the refused port is a failing path, nothing else is alarming."""
    until_all_have_data(
        live,
        lambda: [
            ("errors", "kubenurse_errors_total"),
            ("p99 recording rule", 'type:kubenurse_httpclient_request_duration_seconds:p99_10m{type="path_node-b"}'),
            ("incoming", "kubenurse_neighbourhood_incoming_checks > 0"),
            ("expected incoming", "kubenurse:neighbourhood_incoming_checks:expected"),
        ],
    )
    firing = {name: live.query(expr)["result"] for name, expr in alert_exprs().items()}
    assert [s["metric"]["type"] for s in firing.pop("KubenursePathErroring")] == ["broken"]
    assert all(result == [] for result in firing.values()), {k: v for k, v in firing.items() if v}
    # Two probes checking each other: one incoming check each, exactly the expected number.
    expected = live.query("kubenurse:neighbourhood_incoming_checks:expected")["result"]
    assert [float(s["value"][1]) for s in expected] == [1.0]
    incoming = live.query("kubenurse_neighbourhood_incoming_checks")["result"]
    assert sorted(s["metric"]["node"] for s in incoming) == ["node-a", "node-b"]
    assert all(float(s["value"][1]) == 1.0 for s in incoming)
