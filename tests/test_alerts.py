"""Alerting rules: promtool checks them, its unit tests fire and silence every alert, and the
PrometheusRule of the prometheus-operator overlay carries exactly the same rules."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from probe import names

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "kubenurse-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "kubenurse-rules.test.yaml"
PROMETHEUS_RULE = ROOT / "k8s" / "overlays" / "prometheus-operator" / "prometheusrule.yaml"
RENDERER = ROOT / "deploy" / "prometheus" / "render_prometheusrule.py"
PROMTOOL = shutil.which("promtool")
KUBECTL = shutil.which("kubectl")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")

# Every alert the issue asks for.
EXPECTED_ALERTS = {
    "KubenursePathErroring",
    "KubenursePathSlow",
    "KubenurseAPIServerDNSBroken",
    "KubenurseNodeUnreachable",
    "KubenurseProbeDown",
    "KubenurseProbeAbsent",
    "KubenurseChecksStalled",
    "KubenurseClusterDNSFailing",
    "KubenurseTLSCertificateExpiring",
    "KubenursePathLossy",
    "KubenursePathMTU",
    "KubenurseTCPRetransmits",
}


def rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def all_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in doc["groups"] for rule in group["rules"]]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL or "promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_rules_passes() -> None:
    result = promtool("check", "rules", str(RULES), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_rules(rules()))} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS), cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_asked_for_exists_with_severity_and_text() -> None:
    alerts = {rule["alert"]: rule for rule in all_rules(rules()) if "alert" in rule}
    assert set(alerts) == EXPECTED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule.get("for"), f"{name} needs a `for` so one bad scrape does not page"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fires == EXPECTED_ALERTS, f"never seen firing: {EXPECTED_ALERTS - fires}"
    assert quiet == EXPECTED_ALERTS, f"never seen quiet: {EXPECTED_ALERTS - quiet}"


@needs_promtool
@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
@pytest.mark.parametrize("mutation", ["never fires", "always fires"])
def test_unit_tests_catch_a_broken_alert(alert: str, mutation: str, tmp_path: Path) -> None:
    """The promtool tests can fail: break one alert and they must notice."""
    doc = copy.deepcopy(rules())
    for rule in all_rules(doc):
        if rule.get("alert") == alert:
            rule["expr"] = "vector(0) > 1" if mutation == "never fires" else "vector(1)"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
    # Only the cases that test this alert: promtool checks no other case's view of it (an
    # alert_rule_test names its alert), so only these can notice; the rest took the time.
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["tests"] = [case for case in tests["tests"]
                      if any(check["alertname"] == alert for check in case.get("alert_rule_test", []))]
    assert tests["tests"], f"no unit test names {alert}"
    (tmp_path / RULE_TESTS.name).write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, f"unit tests did not notice {alert} {mutation}"
    assert alert in result.stdout + result.stderr


def contract_series() -> set[str]:
    """Series names the probe exposes (docs/reference.md), built from the probe's own names."""
    histograms = [f"{names.REQUEST_DURATION}_seconds", f"{names.TRACE_REQUEST_DURATION}_seconds"]
    series = {f"{h}{suffix}" for h in histograms for suffix in ("_bucket", "_sum", "_count")}
    series |= {f"{names.REQUESTS}_total", f"{names.ERRORS}_total", names.INCOMING_CHECKS}
    series.add(f"{names.TLS_CERT_EXPIRY}_seconds")
    series |= {f"{names.TCP_RETRANSMITS}_total", f"{names.UDP_PACKETS_SENT}_total", f"{names.UDP_PACKETS_LOST}_total"}
    series |= {f"{names.UDP_RTT}_seconds{suffix}" for suffix in ("_bucket", "_sum", "_count")}
    return series


def test_rules_use_only_series_and_labels_the_probe_exposes() -> None:
    known_labels = {names.LABEL_TYPE, names.LABEL_EVENT, names.LABEL_CODE, "le", "instance", "job", "node"}
    recorded = {rule["record"] for rule in all_rules(rules()) if "record" in rule}
    for rule in all_rules(rules()):
        expr = rule["expr"]
        for metric in re.findall(r"(?<![:\w])(kubenurse_\w+)", expr):
            assert metric in contract_series(), f"{metric} is not on /metrics"
        for metric in re.findall(r"[\w]*:[\w:]+", expr):
            assert metric in recorded, f"{metric} is recorded by no rule"
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr):
            assert label in known_labels, f"unknown label {label} in {rule.get('alert') or rule.get('record')}"
        for grouping in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in known_labels, f"unknown label {label}"


def test_expected_incoming_checks_follow_the_manifests_neighbour_limit() -> None:
    """The 10 in the recording rule (and the dashboard's "expected" line) is the neighbour limit."""
    daemonset = yaml.safe_load((ROOT / "k8s" / "base" / "daemonset.yaml").read_text())
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    limit = int(env.get("KUBENURSE_NEIGHBOUR_LIMIT") or 10)
    (expected,) = [r["expr"] for r in all_rules(rules()) if r.get("record", "").endswith(":expected")]
    dashboard = (ROOT / "dashboards" / "kubenurse.json").read_text()
    pattern = r"clamp_max\(count\(kubenurse_neighbourhood_incoming_checks[^)]*\) - 1, (\d+)\)"
    assert [int(n) for n in re.findall(pattern, expected)] == [limit]
    assert {int(n) for n in re.findall(pattern, dashboard)} == {limit}


def rendered_prometheus_rule() -> str:
    spec = importlib.util.spec_from_file_location("render_prometheusrule", RENDERER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render(rules()["groups"])


def test_prometheus_rule_is_generated_from_the_plain_rules() -> None:
    assert PROMETHEUS_RULE.read_text() == rendered_prometheus_rule(), (
        "k8s/overlays/prometheus-operator/prometheusrule.yaml is stale: "
        "run python deploy/prometheus/render_prometheusrule.py"
    )


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_the_applied_prometheus_rule_holds_the_same_rules() -> None:
    built = subprocess.run(
        [KUBECTL or "kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / "prometheus-operator")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (rule,) = [doc for doc in yaml.safe_load_all(built) if doc and doc["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "kubenurse"
    assert rule["spec"]["groups"] == rules()["groups"]
