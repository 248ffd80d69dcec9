"""The collector-based deploy in otel-collector/: configs, their wiring, and the manifests.

No collector binary can run here, so these tests check what a collector would refuse at
start-up (unknown component types, undefined or unused components, connectors not wired
on both sides, unknown config keys of the components relied on) and what would only show up
in a cluster (an ${env:...} the pod does not set, a port the pod does not expose, a
load-balancing hostname no Service answers to).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent / "otel-collector"
CONFIGS = {"agent": ROOT / "agent.yaml", "gateway": ROOT / "gateway.yaml"}
KUSTOMIZE_DIRS = {"agent": ROOT / "k8s" / "agent", "gateway": ROOT / "k8s" / "gateway"}
WORKLOADS = {"agent": ("DaemonSet", "otel-agent"), "gateway": ("Deployment", "otel-gateway")}
NAMESPACE = "kubenurse"
KUBERNETES_VERSION = "1.32"

# --------------------------------------------------------------------------------------------
# What the otelcol-contrib distribution contains.
#
# Source: open-telemetry/opentelemetry-collector-releases,
#   distributions/otelcol-contrib/manifest.yaml at commit 008cde8ca78cc0286ee3f0de92fa95e1641a445a
#   (the release-0.136.0 preparation: every component module at v0.136.0; its dist.version
#   line still read 0.135.0). Listed as Go module basenames, in manifest order.
# The images in otel-collector/k8s/ are pinned to the same version (checked below).
CONTRIB_VERSION = "0.136.0"


def _words(text: str) -> set[str]:
    return set(text.split())


CONTRIB_MODULES: dict[str, set[str]] = {
    "extensions": _words(
        """
        zpagesextension ackextension asapauthextension awsproxy azureauthextension
        basicauthextension bearertokenauthextension cgroupruntimeextension datadogextension
        awscloudwatchmetricstreamsencodingextension awslogsencodingextension
        googlecloudlogentryencodingextension jaegerencodingextension jsonlogencodingextension
        otlpencodingextension skywalkingencodingextension textencodingextension
        zipkinencodingextension googleclientauthextension headerssetterextension
        healthcheckextension httpforwarderextension jaegerremotesampling
        oauth2clientauthextension dockerobserver ecsobserver ecstaskobserver hostobserver
        k8sobserver kafkatopicsobserver oidcauthextension opampextension pprofextension
        sigv4authextension filestorage dbstorage redisstorageextension sumologicextension
        k8sleaderelector
        """
    ),
    "exporters": _words(
        """
        debugexporter nopexporter otlpexporter otlphttpexporter alibabacloudlogserviceexporter
        awscloudwatchlogsexporter awsemfexporter awskinesisexporter awsxrayexporter
        awss3exporter azureblobexporter azuredataexplorerexporter azuremonitorexporter
        bmchelixexporter carbonexporter cassandraexporter clickhouseexporter coralogixexporter
        datadogexporter datasetexporter dorisexporter elasticsearchexporter faroexporter
        fileexporter googlecloudexporter googlecloudpubsubexporter
        googlemanagedprometheusexporter honeycombmarkerexporter influxdbexporter kafkaexporter
        loadbalancingexporter logicmonitorexporter logzioexporter mezmoexporter
        opensearchexporter otelarrowexporter prometheusexporter prometheusremotewriteexporter
        pulsarexporter rabbitmqexporter sapmexporter sentryexporter signalfxexporter
        splunkhecexporter stefexporter sumologicexporter syslogexporter
        tencentcloudlogserviceexporter tinybirdexporter zipkinexporter
        """
    ),
    "processors": _words(
        """
        batchprocessor memorylimiterprocessor attributesprocessor cumulativetodeltaprocessor
        coralogixprocessor deltatocumulativeprocessor deltatorateprocessor filterprocessor
        geoipprocessor groupbyattrsprocessor groupbytraceprocessor intervalprocessor
        isolationforestprocessor k8sattributesprocessor logdedupprocessor
        metricsgenerationprocessor metricstarttimeprocessor metricstransformprocessor
        probabilisticsamplerprocessor redactionprocessor remotetapprocessor
        resourcedetectionprocessor resourceprocessor schemaprocessor spanprocessor
        sumologicprocessor tailsamplingprocessor transformprocessor
        """
    ),
    "receivers": _words(
        """
        nopreceiver otlpreceiver activedirectorydsreceiver aerospikereceiver apachereceiver
        apachesparkreceiver awscloudwatchreceiver awscontainerinsightreceiver
        awsecscontainermetricsreceiver awsfirehosereceiver awss3receiver awsxrayreceiver
        azureblobreceiver azureeventhubreceiver azuremonitorreceiver bigipreceiver
        carbonreceiver chronyreceiver cloudflarereceiver cloudfoundryreceiver collectdreceiver
        couchdbreceiver datadogreceiver dockerstatsreceiver elasticsearchreceiver
        envoyalsreceiver expvarreceiver faroreceiver filelogreceiver filestatsreceiver
        flinkmetricsreceiver fluentforwardreceiver githubreceiver
        googlecloudmonitoringreceiver googlecloudpubsubreceiver googlecloudspannerreceiver
        haproxyreceiver hostmetricsreceiver httpcheckreceiver influxdbreceiver iisreceiver
        jaegerreceiver jmxreceiver journaldreceiver k8sclusterreceiver k8seventsreceiver
        k8sobjectsreceiver kafkametricsreceiver kafkareceiver kubeletstatsreceiver
        libhoneyreceiver lokireceiver memcachedreceiver mongodbatlasreceiver mongodbreceiver
        mysqlreceiver namedpipereceiver netflowreceiver nginxreceiver nsxtreceiver ntpreceiver
        oracledbreceiver otlpjsonfilereceiver otelarrowreceiver podmanreceiver
        postgresqlreceiver prometheusreceiver prometheusremotewritereceiver purefareceiver
        purefbreceiver pulsarreceiver rabbitmqreceiver receivercreator redisreceiver
        riakreceiver saphanareceiver signalfxreceiver simpleprometheusreceiver
        skywalkingreceiver snowflakereceiver solacereceiver splunkenterprisereceiver
        splunkhecreceiver stefreceiver sqlqueryreceiver sqlserverreceiver sshcheckreceiver
        statsdreceiver syslogreceiver tcpcheckreceiver tcplogreceiver tlscheckreceiver
        udplogreceiver vcenterreceiver wavefrontreceiver snmpreceiver webhookeventreceiver
        windowseventlogreceiver windowsperfcountersreceiver zipkinreceiver zookeeperreceiver
        """
    ),
    "connectors": _words(
        """
        forwardconnector countconnector datadogconnector exceptionsconnector failoverconnector
        grafanacloudconnector otlpjsonconnector roundrobinconnector routingconnector
        servicegraphconnector spanmetricsconnector sumconnector signaltometricsconnector
        """
    ),
}

# Config type names (what goes before the "/" in a component ID) differ from module names
# (memory_limiter vs memorylimiterprocessor), so only types whose metadata.yaml `type:` was
# read are listed. To use another component, read its metadata.yaml and add it here.
TYPE_TO_MODULE: dict[str, dict[str, str]] = {
    "receivers": {"otlp": "otlpreceiver"},
    "processors": {
        "batch": "batchprocessor",
        "memory_limiter": "memorylimiterprocessor",
        "k8sattributes": "k8sattributesprocessor",  # renamed k8s_attributes (alias kept) after 0.136
        "resourcedetection": "resourcedetectionprocessor",
        "tail_sampling": "tailsamplingprocessor",
        "resource": "resourceprocessor",
        "transform": "transformprocessor",
        "filter": "filterprocessor",
        "probabilistic_sampler": "probabilisticsamplerprocessor",
    },
    "exporters": {
        "otlp": "otlpexporter",
        "otlphttp": "otlphttpexporter",
        "debug": "debugexporter",
        "loadbalancing": "loadbalancingexporter",
        "prometheus": "prometheusexporter",
        "prometheusremotewrite": "prometheusremotewriteexporter",
    },
    "connectors": {
        "spanmetrics": "spanmetricsconnector",
        "servicegraph": "servicegraphconnector",
        "forward": "forwardconnector",
    },
    "extensions": {"health_check": "healthcheckextension", "pprof": "pprofextension", "zpages": "zpagesextension"},
}

# Config keys of the components relied on, as documented for this release line (component
# READMEs and config.go in open-telemetry/opentelemetry-collector-contrib). An unknown key
# makes the collector refuse to start, so a typo here is a crash-looping pod there.
KNOWN_KEYS: dict[tuple[str, str], set[str]] = {
    ("receivers", "otlp"): {"protocols"},
    ("processors", "memory_limiter"): {
        "check_interval",
        "limit_mib",
        "spike_limit_mib",
        "limit_percentage",
        "spike_limit_percentage",
    },
    ("processors", "batch"): {
        "send_batch_size",
        "send_batch_max_size",
        "timeout",
        "metadata_keys",
        "metadata_cardinality_limit",
    },
    ("processors", "k8sattributes"): {
        "auth_type",
        "passthrough",
        "filter",
        "extract",
        "pod_association",
        "exclude",
        "wait_for_metadata",
        "wait_for_metadata_timeout",
    },
    ("processors", "resourcedetection"): {"detectors", "timeout", "override", "env", "system", "k8snode"},
    ("processors", "tail_sampling"): {
        "decision_wait",
        "num_traces",
        "expected_new_traces_per_sec",
        "decision_cache",
        "policies",
        "sample_on_first_match",
        "drop_pending_traces_on_shutdown",
    },
    ("exporters", "loadbalancing"): {
        "routing_key",
        "protocol",
        "resolver",
        "timeout",
        "sending_queue",
        "retry_on_failure",
    },
    ("exporters", "otlp"): {
        "endpoint",
        "tls",
        "headers",
        "compression",
        "timeout",
        "sending_queue",
        "retry_on_failure",
        "balancer_name",
        "keepalive",
        "auth",
    },
    ("exporters", "prometheus"): {
        "endpoint",
        "tls",
        "const_labels",
        "namespace",
        "send_timestamps",
        "metric_expiration",
        "resource_to_telemetry_conversion",
        "enable_open_metrics",
        "add_metric_suffixes",
        "without_scope_info",
    },
    ("connectors", "spanmetrics"): {
        "histogram",
        "dimensions",
        "exclude_dimensions",
        "dimensions_cache_size",
        "resource_metrics_cache_size",
        "resource_metrics_key_attributes",
        "aggregation_temporality",
        "namespace",
        "metrics_flush_interval",
        "metrics_expiration",
        "exemplars",
        "events",
        "delta_temporality",
    },
    ("connectors", "servicegraph"): {
        "latency_histogram_buckets",
        "exponential_histogram_max_size",
        "dimensions",
        "store",
        "cache_loop",
        "store_expiration_loop",
        "virtual_node_peer_attributes",
        "metrics_flush_interval",
        "database_name_attributes",
    },
    ("processors", "transform"): {"error_mode", "trace_statements", "metric_statements", "log_statements"},
    ("extensions", "health_check"): {"endpoint", "path", "tls", "check_collector_pipeline", "response_body"},
}

# tail_sampling policy types that exist in 0.136 (README of tailsamplingprocessor; newer
# releases add more, e.g. bytes_limiting). Each policy's settings sit under its type's name.
TAIL_SAMPLING_POLICY_TYPES = {
    "always_sample",
    "latency",
    "numeric_attribute",
    "probabilistic",
    "status_code",
    "string_attribute",
    "trace_state",
    "rate_limiting",
    "span_count",
    "boolean_attribute",
    "ottl_condition",
    "and",
    "composite",
}
# k8sattributes extract.metadata values (processor README, "Available attributes").
K8SATTRIBUTES_METADATA = {
    "k8s.namespace.name",
    "k8s.pod.name",
    "k8s.pod.hostname",
    "k8s.pod.ip",
    "k8s.pod.start_time",
    "k8s.pod.uid",
    "k8s.replicaset.uid",
    "k8s.replicaset.name",
    "k8s.deployment.uid",
    "k8s.deployment.name",
    "k8s.daemonset.uid",
    "k8s.daemonset.name",
    "k8s.statefulset.uid",
    "k8s.statefulset.name",
    "k8s.cronjob.name",
    "k8s.job.uid",
    "k8s.job.name",
    "k8s.node.name",
    "k8s.cluster.uid",
}


@dataclass(frozen=True)
class ProbeOutput:
    """What a real probe sends the agent for one neighbour check: the client span's
    attribute keys and its resource's attributes (not a list copied from the contract)."""

    span_attributes: frozenset[str]
    resource: dict[str, Any]


@pytest.fixture(scope="module")
def probe_output() -> ProbeOutput:
    from probe.app import Probe
    from probe.checks.spans import span_name
    from probe.neighbours import Neighbour, Neighbourhood, StaticNeighbours
    from probe.settings import load_settings
    from tests.conftest import free_port
    from tests.otlp_receiver import OtlpReceiver

    port = free_port()
    with OtlpReceiver() as rx, pytest.MonkeyPatch.context() as mp:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.http_endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        for key, value in otel.items():
            mp.setenv(key, value)  # the SDK exporter reads them too
        settings = load_settings(
            {
                **otel,
                "KUBENURSE_LISTEN_HOST": "127.0.0.1",
                "KUBENURSE_HTTP_PORT": str(port),
                "KUBENURSE_CHECK_INTERVAL": "200ms",
                "POD_NAME": "kubenurse-a",
                "NODE_NAME": "node-a",
                "POD_NAMESPACE": NAMESPACE,
            }
        )
        # The neighbour on node-b is this very probe: a real pod-to-pod check, both ends.
        hood = Neighbourhood(neighbours=(Neighbour("kubenurse-b", "127.0.0.1", "10.0.0.2", "node-b"),))

        def path_span() -> Any:
            return next((s for s in rx.spans() if s.name == span_name("path_node-b") and s.kind == "CLIENT"), None)

        async def run() -> Any:
            probe = Probe(settings, StaticNeighbours(hood))
            await probe.start()
            try:
                return await rx.async_wait_for(path_span, timeout=15)
            finally:
                await probe.stop()

        span = asyncio.run(run())
    return ProbeOutput(frozenset(span.attributes), dict(span.resource))

KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")
ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


# --------------------------------------------------------------------------------------------
# helpers


@cache
def config(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load(CONFIGS[name].read_text())
    assert isinstance(loaded, dict), f"{CONFIGS[name]} is not a YAML mapping"
    return loaded


def component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def pipelines(cfg: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    return cfg["service"]["pipelines"]


def signal(pipeline_id: str) -> str:
    return pipeline_id.split("/", 1)[0]


def components(cfg: dict[str, Any], kind: str, type_: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for component_id, settings in (cfg.get(kind) or {}).items():
        if component_type(component_id) == type_:
            yield component_id, settings or {}


def env_refs(node: Any) -> set[str]:
    if isinstance(node, str):
        return set(ENV_REF.findall(node))
    if isinstance(node, dict):
        return set().union(*(env_refs(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node)) if node else set()
    return set()


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@cache
def built(name: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: cannot run `kubectl kustomize`")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE_DIRS[name])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {KUSTOMIZE_DIRS[name]} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def the(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workload_container(name: str) -> dict[str, Any]:
    kind, workload = WORKLOADS[name]
    [container] = the(built(name), kind, workload)["spec"]["template"]["spec"]["containers"]
    return container


# --------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_a_yaml_mapping_with_a_service(name: str) -> None:
    cfg = config(name)
    assert set(cfg) <= {*KINDS, "service"}, f"unknown top-level keys: {set(cfg) - {*KINDS, 'service'}}"
    assert pipelines(cfg), "no pipelines"
    for pipeline_id, pipeline in pipelines(cfg).items():
        assert signal(pipeline_id) in {"traces", "metrics", "logs"}, pipeline_id
        assert set(pipeline) <= {"receivers", "processors", "exporters"}, pipeline_id
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"{pipeline_id} needs both ends"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_component_is_defined_and_used(name: str) -> None:
    cfg = config(name)
    defined = {kind: set(cfg.get(kind) or {}) for kind in KINDS}
    used: dict[str, set[str]] = {kind: set() for kind in KINDS}
    used["extensions"] = set(cfg["service"].get("extensions") or [])
    for pipeline in pipelines(cfg).values():
        for role in ("receivers", "processors", "exporters"):
            for component_id in pipeline.get(role) or []:
                # A connector is referenced as a receiver or exporter but defined under connectors.
                kind = "connectors" if component_id in defined["connectors"] else role
                used[kind].add(component_id)
    for kind in KINDS:
        assert used[kind] <= defined[kind], f"{kind} used but not defined: {used[kind] - defined[kind]}"
        assert defined[kind] <= used[kind], f"{kind} defined but never used: {defined[kind] - used[kind]}"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_component_type_is_in_otelcol_contrib(name: str) -> None:
    cfg = config(name)
    for kind in KINDS:
        for component_id in cfg.get(kind) or {}:
            type_ = component_type(component_id)
            module = TYPE_TO_MODULE[kind].get(type_)
            assert module, f"{kind[:-1]} type {type_!r} unknown: check its metadata.yaml, add it to TYPE_TO_MODULE"
            assert module in CONTRIB_MODULES[kind], f"{module} is not in otelcol-contrib {CONTRIB_VERSION}"


@pytest.mark.parametrize("name", CONFIGS)
def test_connectors_are_exporter_in_one_pipeline_and_receiver_in_another(name: str) -> None:
    cfg = config(name)
    for connector in cfg.get("connectors") or {}:
        exported_by = {p for p, pl in pipelines(cfg).items() if connector in (pl.get("exporters") or [])}
        received_by = {p for p, pl in pipelines(cfg).items() if connector in (pl.get("receivers") or [])}
        assert exported_by and received_by, f"{connector}: exporter in {exported_by}, receiver in {received_by}"
        assert not exported_by & received_by, f"{connector} loops inside {exported_by & received_by}"
        if component_type(connector) in {"spanmetrics", "servicegraph"}:
            # Both turn spans into metrics.
            assert {signal(p) for p in exported_by} == {"traces"}, connector
            assert {signal(p) for p in received_by} == {"metrics"}, connector


@pytest.mark.parametrize("name", CONFIGS)
def test_component_settings_use_only_known_keys(name: str) -> None:
    cfg = config(name)
    checked = 0
    for kind in KINDS:
        for component_id, settings in (cfg.get(kind) or {}).items():
            known = KNOWN_KEYS.get((kind, component_type(component_id)))
            assert known is not None, f"no documented keys recorded for {kind}/{component_id}"
            unknown = set(settings or {}) - known
            assert not unknown, f"{component_id}: unknown keys {unknown}"
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("name", CONFIGS)
def test_memory_limiter_comes_first_in_every_pipeline(name: str) -> None:
    for pipeline_id, pipeline in pipelines(config(name)).items():
        processors = pipeline.get("processors") or []
        assert processors and component_type(processors[0]) == "memory_limiter", pipeline_id


@pytest.mark.parametrize("name", CONFIGS)
def test_receivers_listen_on_the_pod_ip_at_the_otlp_ports(name: str) -> None:
    for component_id, settings in components(config(name), "receivers", "otlp"):
        protocols = settings["protocols"]
        assert set(protocols) == {"grpc", "http"}, component_id
        assert protocols["grpc"]["endpoint"] == "${env:MY_POD_IP}:4317"
        assert protocols["http"]["endpoint"] == "${env:MY_POD_IP}:4318"


def test_agent_enriches_before_batching_and_associates_by_the_probes_resource(probe_output: ProbeOutput) -> None:
    cfg = config("agent")
    for pipeline_id, pipeline in pipelines(cfg).items():
        processors = [component_type(p) for p in pipeline["processors"]]
        # k8sattributes' connection-IP association needs the request context batching drops.
        assert processors.index("k8sattributes") < processors.index("batch"), pipeline_id
    [(_, k8s)] = components(cfg, "processors", "k8sattributes")
    assert set(k8s["extract"]["metadata"]) <= K8SATTRIBUTES_METADATA
    assert k8s["filter"]["node_from_env_var"] == "K8S_NODE_NAME"
    associations = [[(s["from"], s.get("name")) for s in a["sources"]] for a in k8s["pod_association"]]
    assert all(1 <= len(a) <= 4 for a in associations)  # "The maximum number of sources ... is 4"
    assert all(src in {"connection", "resource_attribute"} for a in associations for src, _ in a)
    assert associations[0] == [
        ("resource_attribute", "k8s.pod.name"),
        ("resource_attribute", "k8s.namespace.name"),
    ]
    # The first association matches on what a real probe's resource carries.
    assert probe_output.resource["k8s.pod.name"] == "kubenurse-a"
    assert probe_output.resource["k8s.namespace.name"] == NAMESPACE
    assert ("connection", None) in [s for a in associations for s in a]
    # Only extracted attributes can be matched on (README: "Only attribute names from metadata").
    for a in associations:
        for src, attr in a:
            assert src == "connection" or attr in k8s["extract"]["metadata"]


def test_agent_routes_traces_by_trace_id_to_the_gateways_headless_service() -> None:
    cfg = config("agent")
    [(lb_id, lb)] = components(cfg, "exporters", "loadbalancing")
    assert lb["routing_key"] == "traceID"
    assert set(lb["protocol"]) == {"otlp"}
    assert "endpoint" not in lb["protocol"]["otlp"], "the resolver sets each backend's endpoint"
    assert set(lb["resolver"]) == {"dns"}
    assert set(lb["resolver"]["dns"]) <= {"hostname", "port", "interval", "timeout"}
    for pipeline_id, pipeline in pipelines(cfg).items():
        if lb_id in pipeline["exporters"]:
            assert signal(pipeline_id) == "traces", "traceID routing is for spans only"
    host = lb["resolver"]["dns"]["hostname"]
    service, namespace = host.split(".")[:2]
    assert host == f"{service}.{namespace}.svc.cluster.local" and namespace == NAMESPACE
    headless = the(built("gateway"), "Service", service)
    assert headless["spec"]["clusterIP"] == "None", "the DNS resolver needs one A record per pod"
    assert lb["resolver"]["dns"]["port"] in [p["port"] for p in headless["spec"]["ports"]]


def test_agent_metrics_go_to_the_gateway_service() -> None:
    [(_, otlp)] = components(config("agent"), "exporters", "otlp")
    host, port = otlp["endpoint"].rsplit(":", 1)
    service = the(built("gateway"), "Service", host.split(".")[0])
    assert host == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


def test_gateway_tail_sampling_keeps_errors_slow_checks_and_a_share_of_the_rest() -> None:
    cfg = config("gateway")
    [(ts_id, ts)] = components(cfg, "processors", "tail_sampling")
    assert set(ts["decision_cache"]) <= {"sampled_cache_size", "non_sampled_cache_size"}
    policies = {p["type"]: p for p in ts["policies"]}
    for policy in ts["policies"]:
        assert policy["type"] in TAIL_SAMPLING_POLICY_TYPES, policy
        assert policy["name"], policy
        settings = set(policy) - {"name", "type"}
        assert settings <= {policy["type"]}, f"{policy['name']}: settings belong under {policy['type']!r}"
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert 0 < policies["latency"]["latency"]["threshold_ms"] <= 500
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] <= 10
    # Sampling sees every span of a trace only if nothing upstream splits traces; the
    # connectors must see all spans, before sampling.
    for pipeline_id, pipeline in pipelines(cfg).items():
        if ts_id in (pipeline.get("processors") or []):
            assert not {"spanmetrics", "servicegraph"} & {component_type(e) for e in pipeline["exporters"]}
            assert pipeline_id.startswith("traces")


def test_gateway_derives_node_to_node_metrics_from_the_probes_attributes(probe_output: ProbeOutput) -> None:
    cfg = config("gateway")
    [(_, spanmetrics)] = components(cfg, "connectors", "spanmetrics")
    dims = {d["name"] for d in spanmetrics["dimensions"]}
    assert {"kubenurse.check.type", "kubenurse.neighbour.node", "k8s.node.name"} <= dims
    # A dimension the probe never sends would be an empty label on every collector metric.
    sent = probe_output.span_attributes | set(probe_output.resource)
    assert dims <= sent, f"dimensions the probe does not send: {dims - sent}"
    histogram = spanmetrics["histogram"]
    assert histogram["unit"] in {"ms", "s"}
    assert len({"explicit", "exponential"} & set(histogram)) == 1
    [(graph_id, graph)] = components(cfg, "connectors", "servicegraph")
    assert "kubenurse.check.type" in graph["dimensions"]
    assert set(graph["dimensions"]) <= probe_output.span_attributes
    assert probe_output.resource["k8s.node.name"] == "node-a", "the graph's node names come from here"
    assert set(graph["store"]) <= {"ttl", "max_items"}
    # The graph's nodes are service.name of the client and server spans; on the graph's own
    # pipeline that is rewritten to the node name, so the edges run node -> node.
    [(graph_pipeline_id, graph_pipeline)] = [(i, p) for i, p in pipelines(cfg).items() if graph_id in p["exporters"]]
    assert graph_pipeline["exporters"] == [graph_id], "the rewrite must not reach other exporters"
    transforms = [p for p in graph_pipeline["processors"] if component_type(p) == "transform"]
    assert len(transforms) == 1, graph_pipeline_id
    transform = cfg["processors"][transforms[0]]
    assert transform["error_mode"] in {"ignore", "silent", "propagate"}
    [group] = transform["trace_statements"]
    assert group["context"] == "resource"
    assert group["statements"] == [
        'set(attributes["service.name"], attributes["k8s.node.name"]) where attributes["k8s.node.name"] != nil'
    ]
    for pipeline_id, pipeline in pipelines(cfg).items():
        if pipeline_id != graph_pipeline_id:
            assert not set(transforms) & set(pipeline.get("processors") or []), pipeline_id


def test_gateway_exports_traces_over_otlp_and_metrics_to_prometheus() -> None:
    cfg = config("gateway")
    by_signal: dict[str, set[str]] = {}
    for pipeline_id, pipeline in pipelines(cfg).items():
        by_signal.setdefault(signal(pipeline_id), set()).update(component_type(e) for e in pipeline["exporters"])
    assert "otlp" in by_signal["traces"]
    assert "prometheus" in by_signal["metrics"]
    ports = [port_of(s["endpoint"]) for _, s in components(cfg, "exporters", "prometheus")]
    assert len(ports) == len(set(ports)), "two Prometheus exporters on one port"


@pytest.mark.parametrize("name", CONFIGS)
def test_image_is_pinned_to_the_checked_contrib_release(name: str) -> None:
    image = workload_container(name)["image"]
    assert image == f"otel/opentelemetry-collector-contrib:{CONTRIB_VERSION}"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_env_reference_is_set_in_the_pod(name: str) -> None:
    cfg = config(name)
    env = {e["name"] for e in workload_container(name).get("env", [])}
    missing = env_refs(cfg) - env
    assert not missing, f"{name}: ${{env:...}} not set on the container: {missing}"
    if name == "agent":
        [(_, k8s)] = components(cfg, "processors", "k8sattributes")
        assert k8s["filter"]["node_from_env_var"] in env


@pytest.mark.parametrize("name", CONFIGS)
def test_every_listening_port_is_a_container_port(name: str) -> None:
    cfg = config(name)
    container = workload_container(name)
    container_ports = {p["containerPort"] for p in container["ports"]}
    endpoints = [s["endpoint"] for _, s in components(cfg, "extensions", "health_check")]
    endpoints += [s["endpoint"] for _, s in components(cfg, "exporters", "prometheus")]
    for _, receiver in components(cfg, "receivers", "otlp"):
        endpoints += [p["endpoint"] for p in receiver["protocols"].values()]
    for endpoint in endpoints:
        assert port_of(endpoint) in container_ports, endpoint
    [(_, health)] = components(cfg, "extensions", "health_check")
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert named[container[probe]["httpGet"]["port"]] == port_of(health["endpoint"]), probe


# --------------------------------------------------------------------------------------------
# manifests


@pytest.mark.parametrize("name", KUSTOMIZE_DIRS)
def test_manifests_are_valid_kubernetes(name: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = built(name)
    assert docs
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            # strict: unknown fields are errors, as `kubectl apply --validate=strict` would say.
            used = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{what}: {err.message} at {'/'.join(map(str, err.absolute_path))}")
        assert used == KUBERNETES_VERSION, f"{what} validated against the {used} schema"
        if doc["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


@pytest.mark.parametrize("name", KUSTOMIZE_DIRS)
def test_configmap_carries_the_config_file(name: str) -> None:
    kind, workload = WORKLOADS[name]
    docs = built(name)
    pod = the(docs, kind, workload)["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "configMap" in v]
    configmap = the(docs, "ConfigMap", volume["configMap"]["name"])  # hash-suffixed name resolves
    assert configmap["data"]["config.yaml"] == CONFIGS[name].read_text()
    [container] = pod["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert f"--config={mount['mountPath']}/config.yaml" in container["args"]


@pytest.mark.parametrize("name", KUSTOMIZE_DIRS)
def test_pods_run_with_a_restricted_security_context(name: str) -> None:
    kind, workload = WORKLOADS[name]
    pod = the(built(name), kind, workload)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "privileged" not in sc
        assert container["resources"]["limits"]["memory"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_agent_is_a_daemonset_on_host_ports_with_read_access_for_k8sattributes() -> None:
    docs = built("agent")
    daemonset = the(docs, "DaemonSet", "otel-agent")
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    host_ports = {p["hostPort"]: p["containerPort"] for p in container["ports"] if "hostPort" in p}
    assert host_ports == {4317: 4317, 4318: 4318}
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["K8S_NODE_NAME"] == "spec.nodeName" and env["MY_POD_IP"] == "status.podIP"

    account = pod["serviceAccountName"]
    the(docs, "ServiceAccount", account)
    [binding] = find(docs, "ClusterRoleBinding")
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding["subjects"]
    role = the(docs, "ClusterRole", binding["roleRef"]["name"])
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for group, resource in [("", "pods"), ("", "namespaces"), ("", "nodes"), ("apps", "replicasets")]:
        for verb in ("get", "list", "watch"):
            assert (group, resource, verb) in granted
    # Read-only: the agent never changes the cluster.
    assert {verb for _, _, verb in granted} == {"get", "list", "watch"}


def test_gateway_is_a_deployment_behind_a_service_and_a_headless_service() -> None:
    docs = built("gateway")
    deployment = the(docs, "Deployment", "otel-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    named_ports = {p["name"] for p in container["ports"]}
    services = find(docs, "Service")
    assert {s["metadata"]["name"] for s in services} == {"otel-gateway", "otel-gateway-headless"}
    for service in services:
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named_ports, port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    derived = [s for i, s in components(config("gateway"), "exporters", "prometheus") if i == "prometheus"]
    assert int(annotations["prometheus.io/port"]) == port_of(derived[0]["endpoint"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TRACES_OTLP_ENDPOINT"], "where sampled traces go"


def test_top_level_config_paths_are_the_files_kustomize_reads() -> None:
    # kustomize only reads files inside a kustomization's directory, so the configs live
    # next to their kustomization and otel-collector/{agent,gateway}.yaml point at them.
    for name, path in CONFIGS.items():
        assert path.resolve() == (KUSTOMIZE_DIRS[name] / path.name).resolve()
