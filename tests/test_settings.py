"""Settings: every variable in KNOWN_VARIABLES parsed, its bad values rejected with a
message naming the variable and the value, and the real command exiting 2 on them."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import trustme

import probe
from probe.checks.result import CheckResult
from probe.settings import (
    DEFAULT_BUCKETS,
    DEFAULT_SERVICE_DNS,
    DEFAULT_SERVICEACCOUNT_DIR,
    KNOWN_VARIABLES,
    ExtraCheck,
    Settings,
    SettingsError,
    load_settings,
    parse_bool,
    parse_buckets,
    parse_duration,
    parse_extra_checks,
    parse_selector_text,
)
from probe.telemetry.metrics import Metrics
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(30)


# --- files the table refers to ---------------------------------------------------------


@pytest.fixture(scope="module")
def files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Placeholders used in the table: a CA bundle, a matching cert/key pair, a key that
    belongs to another cert, a file that is not PEM, a directory and a missing path."""
    d = tmp_path_factory.mktemp("settings")
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    other = ca.issue_cert("other.example")
    paths = {
        "ca": d / "ca.pem",
        "cert": d / "cert.pem",
        "key": d / "key.pem",
        "other_key": d / "other-key.pem",
        "garbage": d / "garbage.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    paths["garbage"].write_text("this is not a certificate\n")
    paths["kubeconfig"] = d / "kubeconfig"
    paths["kubeconfig"].write_text(KUBECONFIG)
    paths["empty"] = d / "empty"
    paths["empty"].write_text("")
    return {**{k: str(v) for k, v in paths.items()}, "dir": str(d), "missing": str(d / "does-not-exist.pem")}


KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: ctx, context: {cluster: c, user: u}}]
current-context: ctx
"""


def fill(value: object, files: dict[str, str]) -> object:
    return value.format(**files) if isinstance(value, str) else value


# --- the table: one row per variable ---------------------------------------------------


class Row(NamedTuple):
    variable: str
    good: str
    field: str
    expected: object
    #: A value that must be rejected, or None when every non-blank value is acceptable.
    bad: str | None
    #: Other variables the good value needs (KUBENURSE_USE_TLS=true needs a cert and key).
    also: tuple[tuple[str, str], ...] = ()


TABLE: list[Row] = [
    Row("KUBENURSE_INGRESS_URL", "https://ingress.example.com/", "ingress_url", "https://ingress.example.com",
        "ingress.example.com"),
    Row("KUBENURSE_SERVICE_URL", "http://kubenurse.kube-system.svc:8080", "service_url",
        "http://kubenurse.kube-system.svc:8080", "http://kubenurse:99999"),
    Row("KUBENURSE_INSECURE", "true", "insecure", True, "yes"),
    Row("KUBENURSE_EXTRA_CA", "{ca}", "extra_ca_file", "{ca}", "{missing}"),
    Row("KUBENURSE_EXTRA_CHECKS", "google:https://google.com|api:http://10.0.0.1:8080/healthz", "extra_checks",
        (ExtraCheck("google", "https://google.com"), ExtraCheck("api", "http://10.0.0.1:8080/healthz")), "google"),
    Row("KUBENURSE_NAMESPACE", "kube-system", "namespace", "kube-system", "Bad_Namespace!"),
    Row("KUBENURSE_NEIGHBOUR_FILTER", "app.kubernetes.io/name=kubenurse", "neighbour_filter",
        "app.kubernetes.io/name=kubenurse", "app in (kubenurse"),
    Row("KUBENURSE_NEIGHBOUR_LIMIT", "0", "neighbour_limit", 0, "-1"),
    Row("KUBENURSE_ALLOW_UNSCHEDULABLE", "1", "allow_unschedulable", True, "on"),
    Row("KUBENURSE_CHECK_API_SERVER_DIRECT", "false", "check_api_server_direct", False, "no"),
    Row("KUBENURSE_CHECK_API_SERVER_DNS", "F", "check_api_server_dns", False, "off"),
    Row("KUBENURSE_CHECK_ME_INGRESS", "FALSE", "check_me_ingress", False, "disabled"),
    Row("KUBENURSE_CHECK_ME_SERVICE", "0", "check_me_service", False, "fals"),
    Row("KUBENURSE_CHECK_NEIGHBOURHOOD", "False", "check_neighbourhood", False, "2"),
    Row("KUBENURSE_CHECK_NEIGHBOURHOOD_UDP", "false", "check_neighbourhood_udp", False, "nope"),
    Row("KUBENURSE_CHECK_DNS_CLUSTER", "false", "check_dns_cluster", False, "nein"),
    Row("KUBENURSE_CHECK_INTERVAL", "1m30s", "check_interval", 90.0, "5"),
    Row("KUBENURSE_CHECK_TIMEOUT", "2s", "check_timeout", 2.0, "0"),
    Row("KUBENURSE_CHECK_CONNECT_TIMEOUT", "500ms", "check_connect_timeout", 0.5, "-1s"),
    Row("KUBENURSE_REUSE_CONNECTIONS", "T", "reuse_connections", True, "y"),
    Row("KUBENURSE_HISTOGRAM_BUCKETS", "0.1,1,10", "histogram_buckets", (0.1, 1, 10), "1,1"),
    Row("KUBENURSE_EXPOSE_METADATA", "false", "expose_metadata", False, "nope"),
    Row("KUBENURSE_USE_TLS", "true", "use_tls", True, "maybe",
        (("KUBENURSE_CERT_FILE", "{cert}"), ("KUBENURSE_CERT_KEY", "{key}"))),
    Row("KUBENURSE_CERT_FILE", "{cert}", "cert_file", "{cert}", "{missing}"),
    Row("KUBENURSE_CERT_KEY", "{key}", "cert_key", "{key}", "{dir}"),
    Row("KUBENURSE_SHUTDOWN_DURATION", "0", "shutdown_duration", 0.0, "5x"),
    Row("KUBERNETES_SERVICE_HOST", "10.96.0.1", "kubernetes_service_host", "10.96.0.1", None),
    Row("KUBERNETES_SERVICE_PORT", "6443", "kubernetes_service_port", 6443, "https"),
    Row("KUBERNETES_SERVICE_DNS", "kubernetes.default.svc", "kubernetes_service_dns", "kubernetes.default.svc", None),
    Row("POD_NAME", "kubenurse-7d9f-abcde", "pod_name", "kubenurse-7d9f-abcde", None),
    Row("NODE_NAME", "node-a", "node_name", "node-a", None),
    Row("POD_NAMESPACE", "monitoring", "pod_namespace", "monitoring", None),
    Row("KUBENURSE_LISTEN_HOST", "127.0.0.1", "listen_host", "127.0.0.1", None),
    Row("KUBENURSE_HTTP_PORT", "18080", "http_port", 18080, "0"),
    Row("KUBENURSE_HTTPS_PORT", "18443", "https_port", 18443, "65536"),
    Row("KUBENURSE_MESH_PORT", "18081", "mesh_port", 18081, "0"),
    Row("KUBENURSE_SERVICEACCOUNT_DIR", "{dir}", "serviceaccount_dir", "{dir}", "{missing}"),
    Row("KUBECONFIG", "{kubeconfig}", "kubeconfig", "{kubeconfig}", "{empty}"),
    Row("KUBENURSE_LOG_FORMAT", "logfmt", "log_format", "logfmt", "text"),
    Row("KUBENURSE_LOG_LEVEL", "debug", "log_level", "DEBUG", "verbose"),
    Row("KUBENURSE_TRACE_URL_TEMPLATE", "https://tempo.example/trace/{{trace_id}}", "trace_url_template",
        "https://tempo.example/trace/{{trace_id}}", "https://tempo.example/trace/"),
    Row("KUBENURSE_NODE_EVENTS", "true", "node_events", True, "sometimes"),
]
BY_VARIABLE = {row.variable: row for row in TABLE}
BAD_ROWS = [row for row in TABLE if row.bad is not None]


def test_table_covers_every_known_variable() -> None:
    assert len(BY_VARIABLE) == len(TABLE), "a variable is listed twice"
    assert set(BY_VARIABLE) == KNOWN_VARIABLES, "add a row for every variable load_settings reads"
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {row.field for row in TABLE} <= fields


@pytest.mark.parametrize("row", TABLE, ids=lambda r: r.variable)
def test_good_value_sets_its_field_and_nothing_else(row: Row, files: dict[str, str]) -> None:
    env = {row.variable: str(fill(row.good, files)), **{k: str(fill(v, files)) for k, v in row.also}}
    settings = load_settings(env)
    assert getattr(settings, row.field) == fill(row.expected, files)
    if not row.also:
        # Only this field moved: put the default back and the whole object is the default.
        default = getattr(Settings(), row.field)
        assert dataclasses.replace(settings, **{row.field: default}) == Settings()


@pytest.mark.parametrize("row", BAD_ROWS, ids=lambda r: r.variable)
def test_bad_value_names_variable_and_value(row: Row, files: dict[str, str]) -> None:
    bad = str(fill(row.bad, files))
    with pytest.raises(SettingsError) as info:
        load_settings({row.variable: bad})
    assert info.value.variable == row.variable
    assert info.value.value == bad
    message = str(info.value)
    assert row.variable in message and bad in message
    assert "\n" not in message


@pytest.mark.parametrize("variable", sorted(KNOWN_VARIABLES))
def test_blank_means_unset(variable: str) -> None:
    assert load_settings({variable: "  "}) == Settings()


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_settings({}).check_interval = 1.0  # type: ignore[misc]


def test_defaults_are_the_contracts() -> None:
    s = load_settings({})
    assert s == Settings()
    assert (s.ingress_url, s.service_url, s.extra_ca_file, s.extra_checks) == (None, None, None, ())
    assert s.insecure is False and s.allow_unschedulable is False and s.reuse_connections is False
    assert s.namespace is None and s.neighbour_filter == "" and s.neighbour_limit == 10
    assert s.check_api_server_direct and s.check_api_server_dns and s.check_me_ingress
    assert s.check_me_service and s.check_neighbourhood and s.expose_metadata
    assert s.check_interval == 5.0 and s.shutdown_duration == 5.0
    assert (s.check_connect_timeout, s.check_timeout) == (5.0, 6.0)
    assert s.histogram_buckets == DEFAULT_BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    assert (s.use_tls, s.cert_file, s.cert_key) == (False, None, None)
    assert (s.http_port, s.https_port, s.listen_host) == (8080, 8443, None)
    assert s.kubernetes_service_host is None and not s.in_cluster
    assert s.api_server_dns_name == DEFAULT_SERVICE_DNS == "kubernetes.default.svc.cluster.local"
    assert s.serviceaccount_dir == DEFAULT_SERVICEACCOUNT_DIR == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert s.kubeconfig is None and s.node_name is None
    assert s.pod_name == __import__("socket").gethostname()
    assert (s.log_format, s.log_level) == ("json", "INFO")
    assert not s.otlp_traces_enabled and not s.otlp_metrics_enabled


def test_pod_namespace_defaults_to_kubenurse_namespace() -> None:
    assert load_settings({"KUBENURSE_NAMESPACE": "kube-system"}).own_namespace == "kube-system"
    both = load_settings({"KUBENURSE_NAMESPACE": "kube-system", "POD_NAMESPACE": "monitoring"})
    assert both.own_namespace == "monitoring"


@pytest.mark.parametrize(
    ("pod_namespace", "namespace", "found", "own", "neighbours"),
    [
        # POD_NAMESPACE, KUBENURSE_NAMESPACE, the credentials' -> this pod's, the neighbours'
        (None, None, None, None, None),
        (None, None, "sa", "sa", "sa"),
        (None, "kn", None, "kn", "kn"),
        (None, "kn", "sa", "sa", "kn"),
        ("pod", None, None, "pod", "pod"),
        ("pod", None, "sa", "pod", "pod"),
        ("pod", "kn", None, "pod", "kn"),
        ("pod", "kn", "sa", "pod", "kn"),
    ],
)
def test_one_namespace_rule(
    pod_namespace: str | None, namespace: str | None, found: str | None, own: str | None, neighbours: str | None
) -> None:
    """Every place that needs a namespace asks Settings.namespaces: this pod's is
    POD_NAMESPACE, then the credentials', then KUBENURSE_NAMESPACE; the neighbours' is
    KUBENURSE_NAMESPACE, then this pod's."""
    settings = Settings(pod_namespace=pod_namespace, namespace=namespace)
    got = settings.namespaces(found)
    assert (got.own, got.neighbours) == (own, neighbours)
    assert settings.own_namespace == settings.namespaces().own


# --- durations (Go's time.ParseDuration) -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("2h45m", 9900.0),
        ("1h0m0s", 3600.0),
        (".5s", 0.5),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("100ns", 100e-9),
        ("+5s", 5.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "5x", "-1s", "", "s", "1.5", "00", "1h 30m", "5 s", "1d", "5S", "ms"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_interval_must_be_positive_but_shutdown_may_be_zero() -> None:
    with pytest.raises(SettingsError, match="KUBENURSE_CHECK_INTERVAL"):
        load_settings({"KUBENURSE_CHECK_INTERVAL": "0s"})
    assert load_settings({"KUBENURSE_SHUTDOWN_DURATION": "0s"}).shutdown_duration == 0.0
    assert load_settings({"KUBENURSE_CHECK_INTERVAL": "200ms"}).check_interval == pytest.approx(0.2)


# --- booleans (Go's strconv.ParseBool) ---------------------------------------------------


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_go_true(text: str) -> None:
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_go_false(text: str) -> None:
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "tRUE", "2", "", "truee"])
def test_bad_booleans(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bool(text)


# --- histogram buckets ---------------------------------------------------------------------


def test_buckets_keep_integers_integral() -> None:
    buckets = parse_buckets("0.005, 0.5,1,2.5,10")
    assert buckets == (0.005, 0.5, 1, 2.5, 10)
    assert [type(b) for b in buckets] == [float, float, int, float, int]
    assert type(parse_buckets("1.0")[0]) is int


def test_integral_bucket_prints_as_le_1() -> None:
    metrics = Metrics(buckets=parse_buckets("0.5,1,2"), incoming=lambda: 0)
    try:
        metrics.record(CheckResult(check_type="extra", status_code=200, duration=0.7))
        body, _ = metrics.exposition("")
    finally:
        metrics.shutdown()
    text = body.decode()
    assert 'le="1"' in text and 'le="1.0"' not in text
    assert 'le="0.5"' in text and 'le="2"' in text


@pytest.mark.parametrize("text", ["1,1", "2,1", "0.1,0.05", "a,b", "", "1,,2", "1,2,", "1,nan", "1,inf", "1;2"])
def test_bad_buckets(text: str) -> None:
    with pytest.raises(ValueError):
        parse_buckets(text)


def test_bad_buckets_name_the_variable() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBENURSE_HISTOGRAM_BUCKETS": "1,0.5"})
    assert "KUBENURSE_HISTOGRAM_BUCKETS" in str(info.value) and "'1,0.5'" in str(info.value)


# --- extra checks --------------------------------------------------------------------------


def test_extra_checks() -> None:
    # An extra check's URL is used as given: trailing slashes stay, also in the query.
    assert parse_extra_checks("a:http://x|b:https://y:8443/healthz/|c:http://z/?b=/") == (
        ExtraCheck("a", "http://x"),
        ExtraCheck("b", "https://y:8443/healthz/"),
        ExtraCheck("c", "http://z/?b=/"),
    )
    assert parse_extra_checks(" a:http://x ") == (ExtraCheck("a", "http://x"),)


@pytest.mark.parametrize(
    "text",
    [
        "google",  # no url
        "google:",  # empty url
        ":http://x",  # no name
        "google:google.com",  # not a URL
        "google:ftp://google.com",  # not http(s)
        "google:http://",  # no host
        "google:http://x:http",  # bad port
        "a:http://x|a:http://y",  # duplicate name
        "me_ingress:http://x",  # would overwrite a built-in check's result and series
        "path_node-a:http://x",
        "bad name:http://x",  # name unfit for a label value
    ],
)
def test_bad_extra_checks(text: str) -> None:
    with pytest.raises(ValueError):
        parse_extra_checks(text)
    with pytest.raises(SettingsError, match="KUBENURSE_EXTRA_CHECKS"):
        load_settings({"KUBENURSE_EXTRA_CHECKS": text})


# --- label selectors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "app=kubenurse",
        "app==kubenurse",
        "app!=kubenurse",
        "app in (a, b)",
        "tier notin (frontend)",
        "canary",
        "!canary",
        "app.kubernetes.io/name=kubenurse,env",
        "app=",
        "generation>5",
        "generation<3",
        "generation > -1,app=kubenurse",
    ],
)
def test_good_selectors(text: str) -> None:
    assert parse_selector_text(text) == text.strip()
    assert load_settings({"KUBENURSE_NEIGHBOUR_FILTER": text}).neighbour_filter == text


@pytest.mark.parametrize(
    "text",
    [
        "app in (a", "app)", "a b", "=x", "app=x=y", "app,,env", "-app=x", "app=" + "x" * 64, "app in a",
        "app=(x)", "a>x", "a<", "a>>5", "a>5.5",
    ],
)
def test_malformed_selectors(text: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBENURSE_NEIGHBOUR_FILTER": text})
    assert info.value.variable == "KUBENURSE_NEIGHBOUR_FILTER"


# --- files and TLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["KUBENURSE_EXTRA_CA", "KUBENURSE_CERT_FILE", "KUBENURSE_CERT_KEY"])
@pytest.mark.parametrize("which", ["missing", "dir"])
def test_unreadable_files(variable: str, which: str, files: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({variable: files[which]})
    assert info.value.variable == variable
    assert files[which] in str(info.value) and "cannot read" in str(info.value)


def test_extra_ca_must_be_pem(files: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=r"KUBENURSE_EXTRA_CA.*not a PEM") as info:
        load_settings({"KUBENURSE_EXTRA_CA": files["garbage"]})
    assert "_ssl.c" not in str(info.value)


def test_connect_timeout_must_fit_in_the_check(files: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBENURSE_CHECK_CONNECT_TIMEOUT": "3s", "KUBENURSE_CHECK_TIMEOUT": "2s"})
    assert info.value.variable == "KUBENURSE_CHECK_CONNECT_TIMEOUT" and "KUBENURSE_CHECK_TIMEOUT=2s" in str(info.value)
    # Equal is fine; a short check timeout with the connect timeout left alone cuts it short.
    assert load_settings({"KUBENURSE_CHECK_CONNECT_TIMEOUT": "2s", "KUBENURSE_CHECK_TIMEOUT": "2s"})
    assert load_settings({"KUBENURSE_CHECK_TIMEOUT": "2s"}).check_connect_timeout == 5.0


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "abc"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER_ARG": "-0.1"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER_ARG": "nan"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "garbage"}, "OTEL_RESOURCE_ATTRIBUTES"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "a=b,=c"}, "OTEL_RESOURCE_ATTRIBUTES"),
        ({"KUBENURSE_NAMESPACE": "Bad_Namespace!"}, "KUBENURSE_NAMESPACE"),
        ({"KUBENURSE_NAMESPACE": "a" * 64}, "KUBENURSE_NAMESPACE"),
        ({"KUBENURSE_NAMESPACE": "-kube"}, "KUBENURSE_NAMESPACE"),
    ],
)
def test_otel_and_namespace_values_the_sdk_or_the_api_would_ignore(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.variable == variable


def test_good_sampler_and_resource_values_pass() -> None:
    load_settings({"OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    load_settings({"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_SAMPLER_ARG": "1"})
    load_settings({"OTEL_RESOURCE_ATTRIBUTES": "k8s.cluster.name=lab,team=net%20ops,empty=,"})
    assert load_settings({"KUBENURSE_NAMESPACE": "kube-system"}).namespace == "kube-system"


def test_tls_needs_cert_and_key(files: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBENURSE_USE_TLS": "true"})
    assert info.value.variable == "KUBENURSE_CERT_FILE"
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBENURSE_USE_TLS": "true", "KUBENURSE_CERT_FILE": files["cert"]})
    assert info.value.variable == "KUBENURSE_CERT_KEY"
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBENURSE_USE_TLS": "true", "KUBENURSE_CERT_KEY": files["key"]})
    assert info.value.variable == "KUBENURSE_CERT_FILE"
    # Without TLS the pair is not needed.
    assert load_settings({"KUBENURSE_USE_TLS": "false"}).use_tls is False


def test_tls_cert_and_key_must_match(files: dict[str, str]) -> None:
    env = {"KUBENURSE_USE_TLS": "true", "KUBENURSE_CERT_FILE": files["cert"], "KUBENURSE_CERT_KEY": files["other_key"]}
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.variable == "KUBENURSE_CERT_FILE"
    assert files["cert"] in str(info.value)
    assert "KUBENURSE_CERT_KEY is not the key of this certificate" in str(info.value)
    # A key file that is no key at all, too; in our words, not OpenSSL's "[SSL] PEM lib (_ssl.c:...)".
    with pytest.raises(SettingsError, match="KUBENURSE_CERT_FILE") as info:
        load_settings({**env, "KUBENURSE_CERT_KEY": files["garbage"]})
    assert "_ssl.c" not in str(info.value) and "PEM private key" in str(info.value)
    ok = load_settings({**env, "KUBENURSE_CERT_KEY": files["key"]})
    assert (ok.use_tls, ok.cert_file, ok.cert_key) == (True, files["cert"], files["key"])


# --- OpenTelemetry ---------------------------------------------------------------------------

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


def otlp(env: dict[str, str]) -> tuple[bool, bool, str, str]:
    s = load_settings(env)
    return s.otlp_traces_enabled, s.otlp_metrics_enabled, s.otlp_traces_protocol, s.otlp_metrics_protocol


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (False, False, "http/protobuf", "http/protobuf")),
        (ENDPOINT, (True, True, "http/protobuf", "http/protobuf")),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_ENDPOINT": " "}, (False, False, "http/protobuf", "http/protobuf")),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, (False, False, "grpc", "grpc")),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, (True, True, "grpc", "grpc")),
        (
            {**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"},
            (True, True, "grpc", "http/protobuf"),
        ),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, (True, True, "grpc", "http/protobuf")),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, (True, False, "http/protobuf",
                                                                             "http/protobuf")),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics"}, (False, True, "http/protobuf",
                                                                               "http/protobuf")),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, (False, False, "http/protobuf", "http/protobuf")),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "TRUE"}, (False, False, "http/protobuf", "http/protobuf")),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "false"}, (True, True, "http/protobuf", "http/protobuf")),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, (False, True, "http/protobuf", "http/protobuf")),
        ({**ENDPOINT, "OTEL_METRICS_EXPORTER": "none"}, (True, False, "http/protobuf", "http/protobuf")),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "otlp"}, (True, True, "http/protobuf", "http/protobuf")),
    ],
)
def test_otlp_signals(env: dict[str, str], expected: tuple[bool, bool, str, str]) -> None:
    assert otlp(env) == expected


@pytest.mark.parametrize(
    ("env", "variable", "value"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "gprc"}, "OTEL_EXPORTER_OTLP_PROTOCOL", "gprc"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "HTTP/protobuf"},
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
            "HTTP/protobuf",
        ),
    ],
)
def test_bad_otlp_protocol(env: dict[str, str], variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert variable in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "not-a-url"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://c/v1/traces"),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://"),
        ("OTEL_TRACES_EXPORTER", "console"),
        ("OTEL_TRACES_EXPORTER", "otlp,zipkin"),
        ("OTEL_TRACES_EXPORTER", "none,otlp"),
        ("OTEL_METRICS_EXPORTER", "console"),
        ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "deltaa"),
        ("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION", "exponential"),
        ("OTEL_SDK_DISABLED", "yes"),
    ],
)
def test_bad_otel_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**ENDPOINT, variable: value})
    assert info.value.variable == variable
    assert variable in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("env", "temporality", "aggregation"),
    [
        ({}, "delta", "base2_exponential_bucket_histogram"),
        ({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "Cumulative"}, "cumulative", None),
        ({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "lowmemory"}, "lowmemory", None),
        (
            {"OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": "explicit_bucket_histogram"},
            "delta",
            "explicit_bucket_histogram",
        ),
    ],
)
def test_otlp_metric_preferences(env: dict[str, str], temporality: str, aggregation: str | None) -> None:
    settings = load_settings({**ENDPOINT, **env})
    assert settings.otlp_metrics_temporality == temporality
    assert settings.otlp_histogram_aggregation == (aggregation or "base2_exponential_bucket_histogram")


def test_metrics_exporter_prometheus_means_no_otlp_metrics() -> None:
    settings = load_settings({**ENDPOINT, "OTEL_METRICS_EXPORTER": "prometheus"})
    assert (settings.otlp_traces_enabled, settings.otlp_metrics_enabled) == (True, False)


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty file
        "[]",  # not a mapping
        "apiVersion: v1\nkind: Config\n",  # no current-context
        "current-context: x\ncontexts: []\n",  # current context missing
        "current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\n",  # no such cluster
        "clusters: [\n",  # not YAML
    ],
)
def test_unusable_kubeconfig_exits_2(text: str, tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBECONFIG": str(path)})
    assert info.value.variable == "KUBECONFIG" and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_kubeconfig_list_is_merged_as_kubectl_does(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("current-context: ctx\n")
    second.write_text(KUBECONFIG.replace("current-context: ctx", "current-context: other"))
    value = f"{first}:{second}"
    assert load_settings({"KUBECONFIG": value}).kubeconfig == value
    # kubectl skips the missing files of a list, but one of them must be there.
    assert load_settings({"KUBECONFIG": f"{tmp_path / 'missing'}:{first}:{second}"}).kubeconfig
    with pytest.raises(SettingsError):
        load_settings({"KUBECONFIG": f"{tmp_path / 'missing'}:{tmp_path / 'gone'}"})


# --- the real command --------------------------------------------------------------------------


def clean_env(**settings: str) -> dict[str, str]:
    """The test runner's environment without anything the probe reads, plus `settings`."""
    ours = ("KUBENURSE_", "OTEL_", "KUBERNETES_", "POD_", "NODE_", "KUBECONFIG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    # If a bad value were accepted, the probe would start: keep it off the real ports.
    env.update({"KUBENURSE_LISTEN_HOST": "127.0.0.1", "KUBENURSE_HTTP_PORT": str(free_port()), **settings})
    return env


def run_probe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "probe", *args], env=env, capture_output=True, text=True, timeout=15,
            cwd=Path(__file__).parent,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the probe kept running: the bad value was accepted")


@pytest.mark.parametrize(
    ("variable", "bad"),
    [
        ("KUBENURSE_CHECK_INTERVAL", "5x"),
        ("KUBENURSE_INSECURE", "yes"),
        ("KUBENURSE_HISTOGRAM_BUCKETS", "1,0.5"),
        ("KUBENURSE_EXTRA_CHECKS", "google"),
        ("KUBENURSE_NEIGHBOUR_FILTER", "app in (a"),
        ("KUBENURSE_EXTRA_CA", "/nonexistent/ca.pem"),
        ("KUBENURSE_HTTPS_PORT", "http"),
        ("KUBENURSE_MESH_PORT", "mesh"),
        ("KUBENURSE_MESH_PORT", "70000"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "not-a-url"),
        ("OTEL_TRACES_EXPORTER", "console"),
        ("KUBECONFIG", "/dev/null"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "abc"),
        ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ("OTEL_RESOURCE_ATTRIBUTES", "garbage"),
        ("KUBENURSE_NAMESPACE", "Bad_Namespace!"),
        ("KUBENURSE_SERVICEACCOUNT_DIR", "/nonexistent/serviceaccount"),
        ("KUBENURSE_CHECK_CONNECT_TIMEOUT", "7s"),
        ("KUBENURSE_SERVICE_URL", "http://kubenurse:http"),
    ],
)
def test_command_exits_2_with_one_line(variable: str, bad: str) -> None:
    done = run_probe([], clean_env(**{variable: bad}))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kubenurse: ")
    assert variable in lines[0] and bad in lines[0]
    # Said once, in our words: not the value again, not a library's or OpenSSL's own text.
    assert lines[0].count(repr(bad)) == 1 and lines[0].count(bad) <= 2, lines[0]
    assert not re.search(r"_ssl\.c|PEM lib|could not be cast|Errno", lines[0]), lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_command_tls_without_cert_exits_2() -> None:
    done = run_probe([], clean_env(KUBENURSE_USE_TLS="true"))
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "KUBENURSE_CERT_FILE" in done.stderr


def test_unknown_argument_exits_2() -> None:
    # Decision: a usage error is a configuration error like a bad setting, and 2 is what
    # argparse, Go's flag package and POSIX tools use for it; "nothing else exits 2" keeps
    # runtime failures (port taken ...) apart from it, and those exit 1.
    done = run_probe(["--bogus"], clean_env())
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "--bogus" in lines[0] and "Traceback" not in done.stderr


def test_help_exits_0() -> None:
    done = run_probe(["--help"], clean_env())
    assert done.returncode == 0 and "usage" in done.stdout and done.stderr == ""


@pytest.mark.parametrize(
    "text",
    ["a>5", "a<3", "a > -1", "a>x", "a>", "a=b", "a in (x, y)", "!a", "a", "a=b=c", "a b", "a>5.5", "x/y=z"],
)
def test_selectors_are_accepted_as_the_api_server_stand_in_accepts_them(text: str) -> None:
    from kubenurse_sandbox.standin.selectors import SelectorError as ApiError
    from kubenurse_sandbox.standin.selectors import parse_label_selector

    try:
        parse_label_selector(text)
        api_accepts = True
    except ApiError:
        api_accepts = False
    try:
        load_settings({"KUBENURSE_NEIGHBOUR_FILTER": text})
        we_accept = True
    except SettingsError:
        we_accept = False
    assert we_accept == api_accepts


def test_version() -> None:
    done = run_probe(["--version"], clean_env())
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.strip() == f"kubenurse {probe.__version__} (Python {platform.python_version()})"


def test_help_lists_every_setting_with_its_default() -> None:
    done = run_probe(["--help"], clean_env())
    assert done.returncode == 0 and done.stderr == ""
    rows = {
        line.split()[0]: line.split(None, 1)[1] for line in done.stdout.splitlines() if line.startswith("  ")
        if line.split()[0].isupper()
    }
    assert set(rows) == KNOWN_VARIABLES
    assert rows["KUBENURSE_CHECK_INTERVAL"] == "5s" and rows["KUBENURSE_HTTP_PORT"] == "8080"
    assert "sandbox" in done.stdout and "OTEL_EXPORTER_OTLP_ENDPOINT" in done.stdout


def test_port_in_use_exits_1_naming_the_setting_and_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_probe([], clean_env(KUBENURSE_HTTP_PORT=str(port)))
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last == (
        f"kubenurse: cannot listen on 127.0.0.1:{port} (KUBENURSE_HTTP_PORT={port}, "
        "KUBENURSE_LISTEN_HOST=127.0.0.1): address already in use"
    )
    assert "Traceback" not in done.stderr


def test_listen_host_not_on_this_machine_exits_1_naming_it() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: bind fails locally, nothing is sent.
    done = run_probe([], clean_env(KUBENURSE_LISTEN_HOST="192.0.2.1"))
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("kubenurse: cannot listen on 192.0.2.1:") and "KUBENURSE_LISTEN_HOST=192.0.2.1" in last
    assert "cannot assign requested address" in last and "Traceback" not in done.stderr
