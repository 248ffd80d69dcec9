"""Deployment artefacts: the kustomize base and overlays, the Dockerfile, its lock file.

Everything is checked on what a user would apply: the output of `kubectl kustomize`,
validated against the Kubernetes schemas, with the settings it gives the probe parsed
by the probe's own settings loader.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from kubenurse_sandbox.standin.selectors import parse_label_selector
from probe.settings import KNOWN_VARIABLES, Settings, load_settings
from tests.netpol import address, allowed, pod

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = (
    "base", "overlays/otlp", "overlays/tls", "overlays/prometheus-operator", "overlays/node-events", "overlays/ingress",
)
NAMESPACE = "kubenurse"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with `kubectl kustomize`) not installed")

Obj = dict[str, Any]

#: The otlp overlay's collector agent needs hostPorts (Pod Security "privileged"): it gets a
#: namespace of its own, so the probe's keeps enforcing "restricted".
AGENT_NAMESPACE = "kubenurse-otel-agent"

# What the downward API would give the pod, for resolving env values.
POD_FIELDS = {
    "metadata.name": "kubenurse-x7k2p",
    "spec.nodeName": "node-1",
    "status.hostIP": "192.0.2.10",
    "status.podIP": "10.244.1.7",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
WORKLOADS = {"DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"}


# --- building --------------------------------------------------------------------------------


@functools.cache
def build(overlay: str) -> tuple[Obj, ...]:
    result = subprocess.run(
        [KUBECTL or "kubectl", "kustomize", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    if KUBECTL is None:
        pytest.skip("kubectl (with `kubectl kustomize`) not installed")
    return request.param


@pytest.fixture
def objects(overlay: str) -> tuple[Obj, ...]:
    return build(overlay)


def find(objects: tuple[Obj, ...], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def the(objects: tuple[Obj, ...], kind: str, name: str = "kubenurse") -> Obj:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def probe_daemonset(objects: tuple[Obj, ...]) -> Obj:
    return the(objects, "DaemonSet")


def probe_container(objects: tuple[Obj, ...]) -> Obj:
    containers = probe_daemonset(objects)["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "kubenurse"]
    assert len(found) == 1, "the DaemonSet needs one container named kubenurse"
    return found[0]


def pod_templates(objects: tuple[Obj, ...]) -> Iterator[tuple[Obj, Obj]]:
    for o in objects:
        if o["kind"] in WORKLOADS:
            yield o, o["spec"]["template"]


# --- env resolution, as the kubelet does it ----------------------------------------------------

_EXPANSION = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, defined: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: only variables defined earlier in the list; $$ escapes."""

    def one(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        return defined.get(m[1], m[0])

    return _EXPANSION.sub(one, value)


def references(value: str) -> set[str]:
    return {m[1] for m in _EXPANSION.finditer(value) if m[1]}


def resolved_env(workload: Obj, container: Obj) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        field_ref = item.get("valueFrom", {}).get("fieldRef")
        assert field_ref, f"{name}: only literal values and downward-API fieldRefs are expected"
        path = field_ref["fieldPath"]
        if path == "metadata.namespace":
            env[name] = workload["metadata"]["namespace"]
        else:
            assert path in POD_FIELDS, f"{name}: unexpected fieldPath {path}"
            env[name] = POD_FIELDS[path]
    return env


def otel_sdk_variables() -> frozenset[str]:
    """The OTEL_* variables the OpenTelemetry SDK and its exporters read."""
    import opentelemetry.environment_variables as api_env
    import opentelemetry.sdk.environment_variables as sdk_env

    return frozenset(
        value
        for module in (api_env, sdk_env)
        for value in vars(module).values()
        if isinstance(value, str) and value.startswith("OTEL_")
    )


def write_secret_files(directory: Path, keys: list[str]) -> None:
    """Throwaway TLS material under the Secret's key names (as cert-manager writes them)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("kubenurse.kubenurse.svc.cluster.local", POD_FIELDS["status.podIP"])
    material = {
        "tls.crt": b"".join(blob.bytes() for blob in cert.cert_chain_pems),
        "tls.key": cert.private_key_pem.bytes(),
        "ca.crt": ca.cert_pem.bytes(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key in keys:
        (directory / key).write_bytes(material.get(key, b"placeholder"))


def probe_env_on_disk(objects: tuple[Obj, ...], tmp_path: Path) -> dict[str, str]:
    """The probe's resolved env, with paths inside mounted Secrets pointing at real files."""
    ds = probe_daemonset(objects)
    container = probe_container(objects)
    env = resolved_env(ds, container)
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        items = secret.get("items")
        keys = [i["path"] for i in items] if items else ["tls.crt", "tls.key", "ca.crt"]
        local = tmp_path / mount["name"]
        write_secret_files(local, keys)
        prefix = mount["mountPath"].rstrip("/") + "/"
        for name, value in env.items():
            if value.startswith(prefix):
                env[name] = str(local / value[len(prefix) :])
    return env


@pytest.fixture
def settings(objects: tuple[Obj, ...], tmp_path: Path) -> Settings:
    """The settings the probe would run with in this overlay, parsed by the probe itself."""
    return load_settings(probe_env_on_disk(objects, tmp_path))


# --- schema validation -----------------------------------------------------------------------


def crd_problems(obj: Obj) -> list[str]:
    """kubernetes_validate has no schemas for CRDs: check the fields that matter by hand."""
    kind, spec = obj["kind"], obj.get("spec", {})
    problems: list[str] = []
    if kind == "ServiceMonitor":
        if not spec.get("selector", {}).get("matchLabels"):
            problems.append("ServiceMonitor without spec.selector.matchLabels")
        endpoints = spec.get("endpoints") or []
        if not endpoints:
            problems.append("ServiceMonitor without endpoints")
        for e in endpoints:
            if not isinstance(e.get("port"), str):
                problems.append(f"ServiceMonitor endpoint needs a named port: {e}")
            for r in e.get("relabelings", []):
                if not set(r) <= {
                    "action",
                    "sourceLabels",
                    "targetLabel",
                    "regex",
                    "replacement",
                    "separator",
                    "modulus",
                }:
                    problems.append(f"unknown relabeling field in {r}")
    elif kind == "PrometheusRule":
        groups = spec.get("groups") or []
        if not groups:
            problems.append("PrometheusRule without groups")
        for group in groups:
            if not group.get("name") or not group.get("rules"):
                problems.append(f"rule group without name or rules: {group.get('name')}")
            for rule in group.get("rules", []):
                if ("alert" in rule) == ("record" in rule) or not isinstance(rule.get("expr"), str):
                    problems.append(f"rule needs exactly one of alert/record and an expr: {rule}")
                if not set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}:
                    problems.append(f"unknown rule field in {rule}")
    else:
        problems.append(f"no schema and no structural check for {kind}")
    return problems


def test_every_object_validates_against_the_kubernetes_schemas(objects: tuple[Obj, ...]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.utils.latest_version()
    problems: list[str] = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            problems += [f"{where}: {p}" for p in crd_problems(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not problems, "\n".join(problems)


def test_everything_lives_in_its_own_namespace(objects: tuple[Obj, ...]) -> None:
    the(objects, "Namespace", NAMESPACE)
    namespaces = {o["metadata"]["name"] for o in find(objects, "Namespace")}
    assert namespaces <= {NAMESPACE, AGENT_NAMESPACE}
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            name = obj["metadata"]["name"]
            # Save the node-events grant: Events about Nodes can only live in "default".
            expected = (
                AGENT_NAMESPACE if name.startswith("otel-agent")
                else "default" if name == "kubenurse-node-events" else NAMESPACE
            )
            assert obj["metadata"].get("namespace") == expected, f"{obj['kind']}/{name}"
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
        for subject in binding["subjects"]:
            # A subject in a namespace that is not shipped binds nobody.
            assert subject.get("namespace") in namespaces, f"{binding['metadata']['name']}: {subject}"


@needs_kubectl
def test_otlp_agent_has_its_own_namespace_and_the_probes_stays_restricted() -> None:
    objects = build("overlays/otlp")
    probe_labels = the(objects, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert probe_labels["pod-security.kubernetes.io/enforce"] == "restricted"
    agent = the(objects, "DaemonSet", "otel-agent")
    assert agent["metadata"]["namespace"] == AGENT_NAMESPACE
    agent_labels = the(objects, "Namespace", AGENT_NAMESPACE)["metadata"]["labels"]
    assert agent_labels["pod-security.kubernetes.io/enforce"] == "privileged", "hostPort needs it"


# --- pod security ----------------------------------------------------------------------------

_BASELINE_CAPS = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def pod_security_violations(pod: Obj, level: str) -> list[str]:
    """The Pod Security Standards (baseline, restricted) as the admission controller checks them."""
    if level == "privileged":
        return []
    assert level in ("baseline", "restricted"), level
    out: list[str] = []
    psc = pod.get("securityContext", {})
    containers = [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", [])]
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            out.append(f"{host}: true")
    for volume in pod.get("volumes", []):
        types = set(volume) - {"name"}
        if "hostPath" in types:
            out.append(f"hostPath volume {volume['name']}")
        if level == "restricted" and not types <= _RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']} of type {types - _RESTRICTED_VOLUMES}")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in _SAFE_SYSCTLS:
            out.append(f"unsafe sysctl {sysctl['name']}")
    if psc.get("seccompProfile", {}).get("type") == "Unconfined":
        out.append("pod seccompProfile Unconfined")
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = psc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
    if psc.get("runAsUser") == 0 and level == "restricted":
        out.append("pod runAsUser 0")
    for c in containers:
        sc, name = c.get("securityContext", {}), c["name"]
        caps = sc.get("capabilities", {})
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            out.append(f"{name}: seccompProfile Unconfined")
        extra_caps = set(caps.get("add", [])) - _BASELINE_CAPS
        if extra_caps:
            out.append(f"{name}: adds capabilities {extra_caps}")
        if level != "restricted":
            continue
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot") is False or not (pod_nonroot or sc.get("runAsNonRoot") is True):
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        if not (pod_seccomp or sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: restricted allows adding only NET_BIND_SERVICE")
    return out


def test_pod_security_check_catches_violations() -> None:
    """The checker itself: a root, privileged, hostPath pod fails restricted and baseline."""
    bad = {
        "hostNetwork": True,
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "ports": [{"containerPort": 1, "hostPort": 1}],
                "securityContext": {"privileged": True, "runAsUser": 0},
            }
        ],
    }
    assert len(pod_security_violations(bad, "baseline")) == 4
    assert len(pod_security_violations(bad, "restricted")) >= 9
    assert pod_security_violations(bad, "privileged") == []


def test_namespace_enforces_restricted_and_every_pod_meets_it(objects: tuple[Obj, ...]) -> None:
    labels = the(objects, "Namespace", NAMESPACE)["metadata"].get("labels", {})
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted"
    # The probe itself must always be restricted-clean, whatever the namespace enforces.
    probe_pod = probe_daemonset(objects)["spec"]["template"]["spec"]
    assert pod_security_violations(probe_pod, "restricted") == []
    # Anything else (e.g. the collector agent) must pass what its namespace enforces, or
    # the API server rejects its pods.
    enforcing = {
        ns["metadata"]["name"]: ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
        for ns in find(objects, "Namespace")
    }
    for workload, template in pod_templates(objects):
        enforced = enforcing[workload["metadata"]["namespace"]]
        assert enforced in ("restricted", "baseline", "privileged"), "namespace must enforce a PSS level"
        problems = pod_security_violations(template["spec"], enforced)
        assert not problems, f"{workload['kind']}/{workload['metadata']['name']} vs {enforced}: {problems}"


def test_probe_container_is_hardened(objects: tuple[Obj, ...]) -> None:
    pod = probe_daemonset(objects)["spec"]["template"]["spec"]
    sc = probe_container(objects)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    # Numeric and non-zero: runAsNonRoot can only verify a numeric user.
    for context in (pod["securityContext"], sc):
        assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert context["runAsNonRoot"] is True
    # Service links would inject KUBENURSE_PORT, KUBENURSE_SERVICE_HOST... from the Service
    # named kubenurse into the probe's own variable namespace.
    assert pod["enableServiceLinks"] is False
    assert pod.get("hostNetwork") is not True
    assert pod.get("automountServiceAccountToken") is not False, "the probe needs its token"


def quantity(text: str | int) -> float:
    """A Kubernetes quantity in base units (bytes, cores)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert m, f"bad quantity {text}"
    return float(m[1]) * units.get(m[2], 1)


def test_probe_resources_fit_the_measured_footprint(objects: tuple[Obj, ...]) -> None:
    resources = probe_container(objects)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    measured_rss = 80 * 10**6  # steady RSS of the Python probe, from the benchmark
    assert measured_rss <= quantity(requests["memory"]) <= 2 * measured_rss
    assert quantity(limits["memory"]) >= 2 * quantity(requests["memory"]), "room for bursts and imports"
    assert 0 < quantity(requests["cpu"]) <= 0.1
    # No CPU limit: throttling would be measured as network latency.
    assert "cpu" not in limits


def test_probe_runs_on_every_node_and_rolls_gently(objects: tuple[Obj, ...]) -> None:
    ds = probe_daemonset(objects)
    tolerations = ds["spec"]["template"]["spec"]["tolerations"]
    for key in ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"):
        assert {"key": key, "operator": "Exists", "effect": "NoSchedule"} in tolerations
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] not in (None, 0, "0", "0%")


def test_health_probes_hit_the_right_endpoints(objects: tuple[Obj, ...], settings: Settings) -> None:
    c = probe_container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    readiness, liveness, startup = c["readinessProbe"], c["livenessProbe"], c["startupProbe"]
    assert readiness["httpGet"]["path"] == "/ready"
    assert (readiness["periodSeconds"], readiness["failureThreshold"]) == (3, 1)
    assert liveness["httpGet"]["path"] == "/alwayshappy"
    assert startup["httpGet"]["path"] == "/alwayshappy"
    for probe in (readiness, liveness, startup):
        port = probe["httpGet"]["port"]
        assert ports.get(port, port) == settings.http_port, "health probes go to the plain HTTP port"
        assert probe.get("scheme", "HTTP") == "HTTP"


# --- settings --------------------------------------------------------------------------------


def test_every_variable_set_is_one_the_probe_reads(objects: tuple[Obj, ...]) -> None:
    env = probe_container(objects).get("env", [])
    names = [item["name"] for item in env]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"
    readable = KNOWN_VARIABLES | otel_sdk_variables()
    defined: set[str] = set()
    for item in env:
        used = references(str(item.get("value", "")))
        # $(VAR) only expands if VAR comes earlier in the list; otherwise it stays literal.
        assert used <= defined, f"{item['name']} refers to {used - defined} before it is defined"
        defined.add(item["name"])
    helpers = {n for n in names if n not in readable}
    referenced = set().union(*(references(str(item.get("value", ""))) for item in env))
    # A variable the probe does not read is only allowed as the source of a $(VAR).
    assert helpers <= referenced, f"set but never read by the probe: {sorted(helpers - referenced)}"


def test_the_probe_accepts_the_settings(settings: Settings) -> None:
    # load_settings raised on anything it would exit 2 for; spot-check what matters.
    assert settings.namespace == NAMESPACE
    assert settings.pod_namespace == NAMESPACE
    assert settings.pod_name == POD_FIELDS["metadata.name"]
    assert settings.node_name == POD_FIELDS["spec.nodeName"]
    assert settings.neighbour_filter
    assert settings.service_url
    assert settings.insecure is False, "certificate verification stays on in every overlay"


def test_unknown_variables_would_be_caught() -> None:
    """The check above can fail: a typo is neither read by the probe nor a $(VAR) source."""
    readable = KNOWN_VARIABLES | otel_sdk_variables()
    assert "KUBENURSE_NEIGHBOR_FILTER" not in readable
    assert "OTEL_EXPORTER_OTLP_ENDPIONT" not in readable
    assert {"KUBENURSE_NEIGHBOUR_FILTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "POD_NAME"} <= readable


# --- ports, names and selectors agree ----------------------------------------------------------


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_pick_exactly_the_probe_pods(objects: tuple[Obj, ...], settings: Settings) -> None:
    ds = probe_daemonset(objects)
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selects(ds["spec"]["selector"]["matchLabels"], labels)
    service = the(objects, "Service")
    neighbour_filter = parse_label_selector(settings.neighbour_filter)
    for workload, template in pod_templates(objects):
        is_probe = workload is ds
        template_labels = template["metadata"].get("labels", {})
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        assert selects(service["spec"]["selector"], template_labels) == is_probe, f"Service vs {name}"
        if workload["metadata"]["namespace"] == settings.namespace:
            assert neighbour_filter.matches(template_labels) == is_probe, f"neighbour filter vs {name}"
    for other in find(objects, "Service"):
        if other is not service and other["spec"].get("selector"):
            assert not selects(other["spec"]["selector"], labels), f"{other['metadata']['name']}"


def service_port_to_container_port(service: Obj, container: Obj, port: int | str, protocol: str = "TCP") -> int:
    """Follow a Service port (number or name, and protocol) to the container port it lands on."""
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    matches = [
        p for p in service["spec"]["ports"]
        if port in (p["port"], p.get("name")) and (p.get("protocol", "TCP") == protocol or port == p.get("name"))
    ]
    assert len(matches) == 1, f"Service {service['metadata']['name']} has no port {port}"
    target = matches[0].get("targetPort", matches[0]["port"])
    assert target in by_name or target in by_name.values(), f"targetPort {target} is no container port"
    return by_name.get(target, target)


def test_service_url_reaches_the_probe_through_its_service(objects: tuple[Obj, ...], settings: Settings) -> None:
    service = the(objects, "Service")
    url = urlsplit(settings.service_url or "")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert url.hostname == f"{name}.{namespace}.svc.cluster.local"
    expected = settings.https_port if url.scheme == "https" else settings.http_port
    assert url.port is not None
    assert service_port_to_container_port(service, probe_container(objects), url.port) == expected


def test_container_and_service_ports_match_the_probe(objects: tuple[Obj, ...], settings: Settings) -> None:
    container = probe_container(objects)
    service = the(objects, "Service")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.http_port
    assert service_port_to_container_port(service, container, "http") == settings.http_port
    for p in service["spec"]["ports"]:
        service_port_to_container_port(service, container, p["name"])  # every port lands somewhere
    # Neighbours' UDP checks reach the echo on the HTTP port number.
    assert service_port_to_container_port(service, container, settings.http_port, "UDP") == settings.http_port
    assert {(p["containerPort"], p["protocol"]) for p in container["ports"] if p["name"] == "udp-echo"} == {
        (settings.http_port, "UDP")
    }
    if settings.use_tls:
        assert ports["https"] == settings.https_port
        assert service_port_to_container_port(service, container, "https") == settings.https_port
    else:
        assert "https" not in ports, "nothing listens on 8443 without KUBENURSE_USE_TLS"


def test_ingress_publishes_only_alwayshappy_for_the_ingress_url(objects: tuple[Obj, ...], settings: Settings) -> None:
    if not find(objects, "Ingress"):
        # No Ingress, no ingress URL: me_ingress is skipped rather than failing on a placeholder.
        assert settings.ingress_url is None
        return
    ingress = the(objects, "Ingress")
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    url = urlsplit(settings.ingress_url or "")
    assert url.scheme == "https"
    (rule,) = spec["rules"]
    assert rule["host"] == url.hostname
    assert any(url.hostname in tls["hosts"] and tls.get("secretName") for tls in spec["tls"])
    service = the(objects, "Service")
    for path in rule["http"]["paths"]:
        # /alive echoes headers and lists pod IPs: not for a public ingress.
        assert (path["path"], path["pathType"]) == ("/alwayshappy", "Exact")
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        port = backend["port"].get("name", backend["port"].get("number"))
        assert service_port_to_container_port(service, probe_container(objects), port) == settings.http_port


def test_scrape_annotations_point_at_metrics(overlay: str, objects: tuple[Obj, ...], settings: Settings) -> None:
    annotations = probe_daemonset(objects)["spec"]["template"]["metadata"].get("annotations") or {}
    scrape = {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")}
    if overlay.endswith("prometheus-operator"):
        # The ServiceMonitor scrapes; annotations too would count every probe twice.
        assert scrape == {}
        return
    assert scrape == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.http_port),
        "prometheus.io/path": "/metrics",
    }


# --- RBAC ------------------------------------------------------------------------------------


def test_rbac_grants_exactly_pods_and_nodes_read(overlay: str, objects: tuple[Obj, ...], settings: Settings) -> None:
    ds = probe_daemonset(objects)
    account = ds["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = ds["metadata"]["namespace"]
    the(objects, "ServiceAccount", account)
    subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
    granted: set[tuple[str | None, str, str, str]] = set()
    for binding in [*find(objects, "RoleBinding"), *find(objects, "ClusterRoleBinding")]:
        if subject not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        (role,) = find(objects, ref["kind"], ref["name"])  # the role ships with the binding
        scope = binding["metadata"]["namespace"] if binding["kind"] == "RoleBinding" else None
        for rule in role["rules"]:
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((scope, group, resource, verb))
    read = ("get", "list", "watch")
    expected = {(settings.namespace, "", "pods", v) for v in read} | {(None, "", "nodes", v) for v in read[1:]}
    if overlay == "overlays/node-events":  # and creating Events on the culprit node, in "default"
        expected.add(("default", "", "events", "create"))
    assert granted == expected


# --- overlay specifics -----------------------------------------------------------------------


def test_image_tag_is_the_project_version(objects: tuple[Obj, ...]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert probe_container(objects)["image"] == f"ghcr.io/kubenurse-otel/kubenurse:{version}"


@needs_kubectl
def test_base_exports_nothing_over_otlp(tmp_path: Path) -> None:
    settings = load_settings(probe_env_on_disk(build("base"), tmp_path))
    assert not settings.otlp_traces_enabled and not settings.otlp_metrics_enabled


@needs_kubectl
def test_otlp_overlay_sends_to_the_agent_on_its_node(tmp_path: Path) -> None:
    objects = build("overlays/otlp")
    env = probe_env_on_disk(objects, tmp_path)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{POD_FIELDS['status.hostIP']}:4317"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    settings = load_settings(env)
    assert settings.otlp_traces_enabled and settings.otlp_metrics_enabled
    assert settings.otlp_traces_protocol == settings.otlp_metrics_protocol == "grpc"
    agent_dir = ROOT / "otel-collector" / "k8s" / "agent"
    if agent_dir.is_dir():
        # Shipped together: some workload must listen on the node's port 4317.
        host_ports = {
            p.get("hostPort")
            for _, template in pod_templates(objects)
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert 4317 in host_ports, "the otlp overlay should include otel-collector/k8s/agent"


@needs_kubectl
def test_tls_overlay_serves_https_from_a_mounted_secret(tmp_path: Path) -> None:
    objects = build("overlays/tls")
    settings = load_settings(probe_env_on_disk(objects, tmp_path))
    assert settings.use_tls and settings.cert_file and settings.cert_key and settings.extra_ca_file
    ds = probe_daemonset(objects)
    container = probe_container(objects)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"]
    # Readable by the non-root user through the fsGroup, by nobody else.
    assert volume["secret"]["defaultMode"] & 0o007 == 0
    assert ds["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == container["securityContext"]["runAsUser"]
    env = resolved_env(ds, container)
    for variable in ("KUBENURSE_CERT_FILE", "KUBENURSE_CERT_KEY", "KUBENURSE_EXTRA_CA"):
        assert env[variable].startswith(mount["mountPath"] + "/")


@needs_kubectl
def test_node_events_overlay_turns_events_on(tmp_path: Path) -> None:
    objects = build("overlays/node-events")
    assert load_settings(probe_env_on_disk(objects, tmp_path)).node_events is True
    assert not load_settings(probe_env_on_disk(build("base"), tmp_path)).node_events


@needs_kubectl
def test_prometheus_operator_overlay_scrapes_through_the_service() -> None:
    objects = build("overlays/prometheus-operator")
    service = the(objects, "Service")
    monitor = the(objects, "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert "namespaceSelector" not in monitor["spec"], "own namespace, whatever kustomize sets it to"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    # No other Service is picked up.
    for other in find(objects, "Service"):
        if other is not service:
            assert not selects(monitor["spec"]["selector"]["matchLabels"], other["metadata"].get("labels", {}))
    (endpoint,) = monitor["spec"]["endpoints"]
    container = probe_container(objects)
    assert service_port_to_container_port(service, container, endpoint["port"]) == Settings().http_port
    assert endpoint["path"] == "/metrics"
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel["node"] == ["__meta_kubernetes_pod_node_name"], "dashboards group by node"
    # Alerts select job="kubenurse": the ServiceMonitor's job is the Service's name.
    assert "jobLabel" not in monitor["spec"] and service["metadata"]["name"] == "kubenurse"
    the(objects, "PrometheusRule")


# --- Dockerfile, lock file, .dockerignore -----------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def test_dockerfile_is_multistage_on_a_pinned_python_311_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build dependencies stay out of the runtime image"
    # The runtime stage is `scratch` plus what the build stage gathered (tests/test_image.py).
    assert stages[-1][0] == ("FROM", "scratch")
    for stage in stages[:-1]:
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), image
    assert len({stage[0][1].split()[0] for stage in stages[:-1]}) == 1, "same base: the venv links into it"


def test_dockerfile_runtime_stage_runs_read_only_as_the_daemonset_user() -> None:
    final = dict(dockerfile_stages()[-1][1:])  # last instruction of each kind wins
    user = final["USER"].split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), "numeric, non-root"
    env = dict(item.split("=", 1) for item in shlex.split(final["ENV"]))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/nonexistent", "nothing may expect a writable HOME"
    assert env["PYTHONMALLOC"] == "malloc", "pymalloc keeps what a burst of connections used"
    assert final["ENTRYPOINT"] == '["kubenurse"]', "exec form, the console script"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "kubenurse" in scripts
    assert sorted(final["EXPOSE"].split()) == sorted(
        {f"{Settings().http_port}/tcp", f"{Settings().https_port}/tcp", f"{Settings().http_port}/udp"}
    )
    if KUBECTL is not None:
        container = probe_container(build("overlays/tls"))
        assert container["securityContext"]["runAsUser"] == int(user[0])
        assert container["securityContext"]["runAsGroup"] == int(user[1])
        exposed = sorted(final["EXPOSE"].split())
        assert sorted(f"{p['containerPort']}/{p['protocol'].lower()}" for p in container["ports"]) == exposed


def test_dockerfile_installs_only_the_pinned_lock() -> None:
    runs = [rest for stage in dockerfile_stages() for keyword, rest in stage if keyword == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert any("-r /src/requirements.lock" in r and "--no-deps" in r for r in installs)
    for command in installs:
        assert "--no-deps" in command, f"every install must stay inside the lock: {command}"
    assert any("pip check" in r for r in runs), "prove the lock is a complete closure"


def runtime_closure() -> dict[str, str]:
    """pyproject's runtime dependencies and everything they pull in, at installed versions."""
    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    roots = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pending = [Requirement(r) for r in roots]
    pinned: dict[str, str] = {}
    while pending:
        requirement = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        if norm(requirement.name) in pinned:
            continue
        dist = metadata.distribution(requirement.name)
        assert dist.version in requirement.specifier or requirement.specifier.contains(
            dist.version, prereleases=True
        ), f"installed {requirement.name} {dist.version} does not satisfy {requirement}"
        pinned[norm(requirement.name)] = dist.version
        pending += [Requirement(r) for r in dist.requires or []]
    return pinned


def test_requirements_lock_pins_the_runtime_closure() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    locked = {}
    for line in lines:
        m = re.fullmatch(r"([a-z0-9-]+)==([A-Za-z0-9.+!-]+)", line)
        assert m, f"not an exact, normalised pin: {line!r}"
        locked[m[1]] = m[2]
    expected = runtime_closure()
    wanted = "\n".join(f"{name}=={version}" for name, version in sorted(expected.items()))
    assert locked == expected, f"requirements.lock is stale; its pins should be:\n{wanted}"
    assert list(locked) == sorted(locked), "keep it sorted, so diffs stay readable"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small_and_complete() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for unwanted in (
        ".git/HEAD",
        "venv/bin/python",
        ".venv/bin/python",
        "tests/test_deploy.py",
        ".pytest_cache/v/x",
        "probe/__pycache__/app.cpython-311.pyc",
        "k8s/base/daemonset.yaml",
        "dashboards/kubenurse.json",
        ".mypy_cache/x",
        "build/lib/x.py",
    ):
        assert dockerignore_excludes(unwanted, patterns), f"{unwanted} would be sent to the builder"
    copied = [
        source
        for stage in dockerfile_stages()
        for keyword, rest in stage
        if keyword == "COPY" and "--from=" not in rest
        for source in rest.split()[:-1]
    ]
    assert copied
    for source in copied:
        path = ROOT / source
        files = list(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignore_excludes(relative, patterns), f"{relative} is copied but ignored"
    missing = [source for source in copied if not (ROOT / source).exists()]
    assert not missing, f"the Dockerfile copies {missing}, which do not exist"


# --- NetworkPolicy -------------------------------------------------------------------------


def test_network_policy_lets_in_and_out_only_what_the_probe_needs(
    overlay: str, objects: tuple[Obj, ...], settings: Settings
) -> None:
    ds = probe_daemonset(objects)
    namespace = ds["metadata"]["namespace"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    probe, neighbour = pod(namespace, labels, "10.244.1.7"), pod(namespace, labels, "10.244.2.8")
    stranger = pod("default", {"app": "curl"})
    prometheus = pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    nginx = pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    http, https = settings.http_port, settings.https_port
    the(objects, "NetworkPolicy")
    # Neighbour checks and UDP echo, both ways; HTTPS only with TLS.
    assert allowed(objects, probe, neighbour, http, "TCP")
    assert allowed(objects, probe, neighbour, http, "UDP")
    assert allowed(objects, probe, neighbour, https) == settings.use_tls
    # /alive, /metrics and /mesh* are closed to any other pod; Prometheus scrapes.
    assert not allowed(objects, stranger, probe, http)
    assert not allowed(objects, stranger, probe, http, "UDP")
    assert allowed(objects, prometheus, probe, http)
    assert not allowed(objects, prometheus, probe, https)
    # The ingress controller only where an Ingress is the target of me_ingress.
    assert allowed(objects, nginx, probe, http) == (settings.ingress_url is not None)
    # Out: DNS and the API server anywhere, the ingress URL's port, nothing else.
    somewhere = address("203.0.113.5")
    assert allowed(objects, probe, somewhere, 53, "UDP") and allowed(objects, probe, somewhere, 53, "TCP")
    assert allowed(objects, probe, somewhere, 443) and allowed(objects, probe, somewhere, 6443)
    assert not allowed(objects, probe, somewhere, 80)
    assert not allowed(objects, probe, stranger, http)
    agent = pod(AGENT_NAMESPACE, {"app.kubernetes.io/name": "otel-agent"})
    assert allowed(objects, probe, agent, 4317) == (overlay == "overlays/otlp")
    if overlay == "overlays/otlp":
        # The agent's own namespace, not just its labels.
        assert not allowed(objects, probe, pod("default", {"app.kubernetes.io/name": "otel-agent"}), 4317)


def test_network_policy_model_can_say_no() -> None:
    """The evaluator itself: an isolating policy without rules admits nothing."""
    deny = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "a"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }
    x, y = pod("a", {"k": "x"}), pod("b", {"k": "y"})
    assert allowed([], x, y, 80)
    assert not allowed([deny], x, y, 80) and not allowed([deny], y, x, 80)
    assert allowed([deny], y, pod("b", {}), 80), "other namespaces are not isolated"
