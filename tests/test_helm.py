"""The Helm chart (charts/kubenurse), rendered by a real `helm`.

A kubenurse v1.15.3 user's values file must render unchanged with every key reaching the
object it configures; the chart's defaults must be the kustomize base (k8s/base) object
for object, and each overlay's option a value that renders that overlay.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from probe.settings import Settings, load_settings
from tests.netpol import address, allowed, pod
from tests.test_deploy import (
    KUBECTL,
    NAMESPACE,
    POD_FIELDS,
    build,
    crd_problems,
    find,
    pod_security_violations,
    probe_env_on_disk,
    resolved_env,
    the,
    write_secret_files,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubenurse"
RELEASE = "kubenurse"

Obj = dict[str, Any]


def find_helm() -> str | None:
    """The helm that .ci/components builds, else one on PATH."""
    components = Path(os.environ.get("KUBENURSE_COMPONENTS") or Path.home() / ".cache" / "kubenurse-components")
    built = components / "bin" / "helm"
    if built.is_file() and os.access(built, os.X_OK):
        return str(built)
    return shutil.which("helm")


HELM = find_helm()
pytestmark = pytest.mark.skipif(HELM is None, reason="helm not installed (.ci/components builds it)")


# --- rendering -------------------------------------------------------------------------------


def helm(*args: str, values: Mapping[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    command = [HELM or "helm", *args]
    if values is not None:
        command += ["--values", "-"]
    return subprocess.run(
        command,
        input=yaml.safe_dump(dict(values)) if values is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        # No repository cache or config of the machine's user.
        env={**os.environ, "HELM_CACHE_HOME": "/nonexistent", "HELM_CONFIG_HOME": "/nonexistent"},
    )


@functools.cache
def _render(values_json: str, release: str) -> tuple[Obj, ...]:
    values = json.loads(values_json)
    result = helm("template", release, str(CHART), "--namespace", NAMESPACE, values=values)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(values: Mapping[str, Any] | None = None, release: str = RELEASE) -> tuple[Obj, ...]:
    return _render(json.dumps(values or {}, sort_keys=True), release)


def refused(values: Mapping[str, Any]) -> str:
    """helm's error text for values the chart must refuse."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)
    assert result.returncode != 0, f"rendered, but should have been refused:\n{result.stdout[:2000]}"
    return result.stderr


def daemonset(objects: tuple[Obj, ...]) -> Obj:
    (ds,) = find(objects, "DaemonSet")
    return ds


def container(objects: tuple[Obj, ...]) -> Obj:
    (c,) = daemonset(objects)["spec"]["template"]["spec"]["containers"]
    return c


def env(objects: tuple[Obj, ...]) -> dict[str, str]:
    return resolved_env(daemonset(objects), container(objects))


# --- kubenurse v1.15.3 -----------------------------------------------------------------------

#: Every key of kubenurse v1.15.3's helm/kubenurse/values.yaml (maps and lists as one key).
KUBENURSE_KEYS = {
    "daemonset.image.repository", "daemonset.image.tag", "daemonset.extraEnvs", "daemonset.podLabels",
    "daemonset.podAnnotations", "daemonset.podSecurityContext", "daemonset.containerSecurityContext",
    "daemonset.containerResources", "daemonset.containerImagePullPolicy", "daemonset.tolerations",
    "daemonset.dnsConfig", "daemonset.volumeMounts", "daemonset.volumes", "daemonset.priorityClassName",
    "daemonset.rollingUpdate.maxUnavailable", "daemonset.rollingUpdate.maxSurge",
    "serviceMonitor.enabled", "serviceMonitor.labels", "serviceMonitor.relabelings",
    "insecure", "service_url", "kubernetes_service_dns", "allow_unschedulable", "neighbour_filter",
    "neighbour_limit", "histogram_buckets", "expose_metadata", "victoriametrics_histogram", "extra_ca",
    "extra_checks", "check_api_server_direct", "check_api_server_dns", "check_me_ingress", "check_me_service",
    "check_neighbourhood", "check_interval", "reuse_connections", "shutdown_duration", "use_tls", "cert_file",
    "cert_key", "nameOverride", "fullnameOverride", "imagePullSecrets", "serviceAccount.create",
    "serviceAccount.name", "service.name", "service.port", "service.labels", "ingress.enabled",
    "ingress.className", "ingress.annotations", "ingress.tlsSecretName", "ingress.url", "extraObjects",
}  # fmt: skip

#: kubenurse v1.15.3's own default values.yaml, as users copy it into their repositories.
KUBENURSE_DEFAULTS = yaml.safe_load("""
daemonset:
  image: {repository: postfinance/kubenurse}
  extraEnvs: []
  podLabels: {}
  podAnnotations: {}
  podSecurityContext: {}
  containerSecurityContext: {}
  containerResources: {}
  containerImagePullPolicy: IfNotPresent
  tolerations:
  - {effect: NoSchedule, key: node-role.kubernetes.io/master, operator: Equal}
  - {effect: NoSchedule, key: node-role.kubernetes.io/control-plane, operator: Equal}
  dnsConfig: {}
  volumeMounts: []
  volumes: []
  priorityClassName: ""
  rollingUpdate: {maxUnavailable: 34%}
serviceMonitor: {enabled: false, labels: {}, relabelings: []}
insecure: true
service_url: ""
kubernetes_service_dns: "kubernetes.default.svc.cluster.local"
allow_unschedulable: false
neighbour_filter: app.kubernetes.io/name=kubenurse
neighbour_limit: 10
histogram_buckets: ""
expose_metadata: false
victoriametrics_histogram: false
extra_ca: ""
extra_checks: ""
check_api_server_direct: true
check_api_server_dns: true
check_me_ingress: true
check_me_service: true
check_neighbourhood: true
check_interval: 5s
reuse_connections: false
shutdown_duration: 5s
use_tls: false
cert_file: ""
cert_key: ""
nameOverride: ""
fullnameOverride: ""
imagePullSecrets: []
serviceAccount: {create: true, name: null}
service: {name: 8080-8080, port: 8080, labels: {}}
ingress: {enabled: true, className: nginx, annotations: {}, tlsSecretName: "", url: dummy-kubenurse.example.com}
extraObjects: []
""")

#: A kubenurse user's values file with every key off kubenurse's default.
EVERY_KEY = yaml.safe_load("""
daemonset:
  image: {repository: registry.example.com/mirror/kubenurse, tag: 0.1.0-corp}
  extraEnvs: [{name: TZ, value: Europe/Zurich}]
  podLabels: {team: network}
  podAnnotations: {example.com/owner: network-team}
  podSecurityContext: {runAsUser: 10001, runAsGroup: 10001, fsGroup: 10001}
  containerSecurityContext: {runAsUser: 10001, runAsGroup: 10001}
  containerResources: {requests: {cpu: 50m, memory: 128Mi}, limits: {memory: 256Mi}}
  containerImagePullPolicy: Always
  tolerations: [{operator: Exists}]
  dnsConfig: {options: [{name: ndots, value: "1"}]}
  volumeMounts: [{name: corp-ca, mountPath: /etc/corp-ca, readOnly: true}]
  volumes: [{name: corp-ca, configMap: {name: corp-ca}}]
  priorityClassName: system-node-critical
  rollingUpdate: {maxUnavailable: 0, maxSurge: 2}  # the API server allows no surge beside unavailable pods
serviceMonitor:
  enabled: true
  labels: {release: kube-prometheus-stack}
  relabelings: [{sourceLabels: [__meta_kubernetes_pod_node_name], targetLabel: nodename, action: replace}]
insecure: false
service_url: http://nurse.corp.svc.cluster.local:80
kubernetes_service_dns: kubernetes.default.svc.corp.local
allow_unschedulable: true
neighbour_filter: app.kubernetes.io/name=nurse,team=network
neighbour_limit: 3
histogram_buckets: ".0005,.001,.0025,.005,.01,.025,.05,0.1,0.25,0.5,1"
expose_metadata: true
victoriametrics_histogram: false
extra_ca: /etc/corp-ca/ca.crt
extra_checks: "google:https://www.google.com|corp_api:http://api.corp.example:8081/health"
check_api_server_direct: false
check_api_server_dns: false
check_me_ingress: false
check_me_service: false
check_neighbourhood: false
check_interval: 15s
reuse_connections: true
shutdown_duration: 10s
use_tls: true
cert_file: /etc/corp-ca/tls.crt
cert_key: /etc/corp-ca/tls.key
nameOverride: nurse
fullnameOverride: nurse-prod
imagePullSecrets: [{name: regcred}]
serviceAccount: {create: false, name: nurse-sa}
service: {name: web, port: 80, labels: {exposed: "no"}}
ingress:
  enabled: true
  className: traefik
  annotations: {cert-manager.io/cluster-issuer: letsencrypt}
  tlsSecretName: nurse-ingress-tls
  url: nurse.apps.example.com
extraObjects:
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: "{{ .Release.Name }}-extra-map"}
    data: {a: b}
  - |
    apiVersion: v1
    kind: Secret
    metadata:
      name: {{ .Release.Name }}-extra-string
    stringData: {c: d}
""")


#: What kubenurse v1.15.3's own chart renders for the two files above (`helm template kubenurse
#: helm/kubenurse -n kubenurse -f FILE`, run once against its tagged source): the probe's
#: env and the DaemonSet's selector. TZ is the every-key file's extraEnvs entry.
KUBENURSE_RENDERED: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "defaults": (
        {
            "KUBENURSE_INGRESS_URL": "https://dummy-kubenurse.example.com",
            "KUBENURSE_SERVICE_URL": "http://kubenurse.kubenurse.svc.cluster.local:8080",
            "KUBENURSE_INSECURE": "true",
            "KUBERNETES_SERVICE_DNS": "kubernetes.default.svc.cluster.local",
            "KUBENURSE_ALLOW_UNSCHEDULABLE": "false",
            "KUBENURSE_NAMESPACE": "kubenurse",
            "KUBENURSE_NEIGHBOUR_FILTER": "app.kubernetes.io/name=kubenurse",
            "KUBENURSE_NEIGHBOUR_LIMIT": "10",
            "KUBENURSE_EXPOSE_METADATA": "false",
            "KUBENURSE_VICTORIAMETRICS_HISTOGRAM": "false",
            "KUBENURSE_CHECK_API_SERVER_DIRECT": "true",
            "KUBENURSE_CHECK_API_SERVER_DNS": "true",
            "KUBENURSE_CHECK_ME_INGRESS": "true",
            "KUBENURSE_CHECK_ME_SERVICE": "true",
            "KUBENURSE_CHECK_NEIGHBOURHOOD": "true",
            "KUBENURSE_CHECK_INTERVAL": "5s",
            "KUBENURSE_REUSE_CONNECTIONS": "false",
            "KUBENURSE_SHUTDOWN_DURATION": "5s",
            "KUBENURSE_USE_TLS": "false",
        },
        {"app.kubernetes.io/name": "kubenurse", "app.kubernetes.io/instance": "kubenurse"},
    ),
    "every key": (
        {
            "KUBENURSE_INGRESS_URL": "https://nurse.apps.example.com",
            "KUBENURSE_SERVICE_URL": "http://nurse.corp.svc.cluster.local:80",
            "KUBENURSE_INSECURE": "false",
            "KUBERNETES_SERVICE_DNS": "kubernetes.default.svc.corp.local",
            "KUBENURSE_ALLOW_UNSCHEDULABLE": "true",
            "KUBENURSE_NAMESPACE": "kubenurse",
            "KUBENURSE_NEIGHBOUR_FILTER": "app.kubernetes.io/name=nurse,team=network",
            "KUBENURSE_NEIGHBOUR_LIMIT": "3",
            "KUBENURSE_EXTRA_CA": "/etc/corp-ca/ca.crt",
            "KUBENURSE_EXTRA_CHECKS": "google:https://www.google.com|corp_api:http://api.corp.example:8081/health",
            "KUBENURSE_HISTOGRAM_BUCKETS": ".0005,.001,.0025,.005,.01,.025,.05,0.1,0.25,0.5,1",
            "KUBENURSE_EXPOSE_METADATA": "true",
            "KUBENURSE_VICTORIAMETRICS_HISTOGRAM": "false",
            "KUBENURSE_CHECK_API_SERVER_DIRECT": "false",
            "KUBENURSE_CHECK_API_SERVER_DNS": "false",
            "KUBENURSE_CHECK_ME_INGRESS": "false",
            "KUBENURSE_CHECK_ME_SERVICE": "false",
            "KUBENURSE_CHECK_NEIGHBOURHOOD": "false",
            "KUBENURSE_CHECK_INTERVAL": "15s",
            "KUBENURSE_REUSE_CONNECTIONS": "true",
            "KUBENURSE_SHUTDOWN_DURATION": "10s",
            "KUBENURSE_USE_TLS": "true",
            "KUBENURSE_CERT_FILE": "/etc/corp-ca/tls.crt",
            "KUBENURSE_CERT_KEY": "/etc/corp-ca/tls.key",
            "TZ": "Europe/Zurich",
        },
        {"app.kubernetes.io/name": "nurse", "app.kubernetes.io/instance": "kubenurse"},
    ),
}


def leaf_keys(values: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in KUBENURSE_KEYS:
            keys |= leaf_keys(value, path + ".")
        else:
            keys.add(path)
    return keys


def test_the_every_key_file_sets_every_kubenurse_key_off_its_default() -> None:
    assert leaf_keys(KUBENURSE_DEFAULTS) | {"daemonset.image.tag", "daemonset.rollingUpdate.maxSurge"} == KUBENURSE_KEYS
    assert leaf_keys(EVERY_KEY) == KUBENURSE_KEYS

    def get(values: Mapping[str, Any], path: str) -> Any:
        for part in path.split("."):
            values = values.get(part) if isinstance(values, Mapping) else None  # type: ignore[assignment]
        return values

    same = {k for k in KUBENURSE_KEYS if get(EVERY_KEY, k) == get(KUBENURSE_DEFAULTS, k)}
    # True would be refused; ingress.enabled=false is rendered on its own below.
    assert same == {"victoriametrics_histogram", "ingress.enabled"}


def test_chart_lints_strict() -> None:
    for values in (None, EVERY_KEY, KUBENURSE_DEFAULTS):
        result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, values=values)
        assert result.returncode == 0, result.stdout + result.stderr


def test_kubenurse_default_values_file_renders() -> None:
    objects = render(KUBENURSE_DEFAULTS)
    e = env(objects)
    # Their placeholder is a URL they gave: we check it (and make the Ingress), as kubenurse did.
    assert e["KUBENURSE_INGRESS_URL"] == "https://dummy-kubenurse.example.com"
    assert the(objects, "Ingress")["spec"]["rules"][0]["host"] == "dummy-kubenurse.example.com"
    assert e["KUBENURSE_INSECURE"] == "true"
    assert container(objects)["image"] == "postfinance/kubenurse:0.1.0"
    # Their empty security contexts merge into ours: still restricted.
    assert pod_security_violations(daemonset(objects)["spec"]["template"]["spec"], "restricted") == []
    assert find(objects, "Service")[0]["spec"]["ports"][0]["name"] == "8080-8080"


@functools.cache
def every_key(release: str = RELEASE) -> tuple[Obj, ...]:
    return render(EVERY_KEY, release)


def test_every_kubenurse_key_reaches_its_object(tmp_path: Path) -> None:
    objects = every_key()
    ds = daemonset(objects)
    assert ds["metadata"]["name"] == "nurse-prod"  # fullnameOverride
    spec = ds["spec"]["template"]["spec"]
    c = container(objects)
    e = env(objects)
    # daemonset.*
    assert c["image"] == "registry.example.com/mirror/kubenurse:0.1.0-corp"
    assert e["TZ"] == "Europe/Zurich"
    assert ds["spec"]["template"]["metadata"]["labels"]["team"] == "network"
    assert ds["spec"]["template"]["metadata"]["annotations"]["example.com/owner"] == "network-team"
    assert spec["securityContext"]["runAsUser"] == 10001 and spec["securityContext"]["fsGroup"] == 10001
    assert c["securityContext"]["runAsUser"] == 10001
    assert c["resources"] == EVERY_KEY["daemonset"]["containerResources"]
    assert c["imagePullPolicy"] == "Always"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["dnsConfig"] == {"options": [{"name": "ndots", "value": "1"}]}
    assert {"name": "corp-ca", "mountPath": "/etc/corp-ca", "readOnly": True} in c["volumeMounts"]
    assert {"name": "corp-ca", "configMap": {"name": "corp-ca"}} in spec["volumes"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 2}
    # serviceMonitor.*: and no scrape annotations besides it (each probe would count twice)
    monitor = the(objects, "ServiceMonitor", "nurse-prod")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert EVERY_KEY["serviceMonitor"]["relabelings"][0] in endpoint["relabelings"]
    assert endpoint["port"] == "web"
    assert not any(k.startswith("prometheus.io/") for k in ds["spec"]["template"]["metadata"]["annotations"])
    # the probe's settings
    expected = {
        "KUBENURSE_SERVICE_URL": "http://nurse.corp.svc.cluster.local:80",
        "KUBERNETES_SERVICE_DNS": "kubernetes.default.svc.corp.local",
        "KUBENURSE_ALLOW_UNSCHEDULABLE": "true",
        "KUBENURSE_NEIGHBOUR_FILTER": "app.kubernetes.io/name=nurse,team=network",
        "KUBENURSE_NEIGHBOUR_LIMIT": "3",
        "KUBENURSE_HISTOGRAM_BUCKETS": EVERY_KEY["histogram_buckets"],
        "KUBENURSE_EXTRA_CA": "/etc/corp-ca/ca.crt",
        "KUBENURSE_EXTRA_CHECKS": EVERY_KEY["extra_checks"],
        "KUBENURSE_CHECK_API_SERVER_DIRECT": "false",
        "KUBENURSE_CHECK_API_SERVER_DNS": "false",
        "KUBENURSE_CHECK_ME_INGRESS": "false",
        "KUBENURSE_CHECK_ME_SERVICE": "false",
        "KUBENURSE_CHECK_NEIGHBOURHOOD": "false",
        "KUBENURSE_CHECK_INTERVAL": "15s",
        "KUBENURSE_REUSE_CONNECTIONS": "true",
        "KUBENURSE_SHUTDOWN_DURATION": "10s",
        "KUBENURSE_USE_TLS": "true",
        "KUBENURSE_CERT_FILE": "/etc/corp-ca/tls.crt",
        "KUBENURSE_CERT_KEY": "/etc/corp-ca/tls.key",
        "KUBENURSE_INGRESS_URL": "https://nurse.apps.example.com",
    }
    assert {k: e.get(k) for k in expected} == expected
    assert "KUBENURSE_VICTORIAMETRICS_HISTOGRAM" not in e
    # expose_metadata true and insecure false are the probe's own defaults: left unset.
    assert "KUBENURSE_EXPOSE_METADATA" not in e and "KUBENURSE_INSECURE" not in e
    # ... and the probe itself accepts them (the mounted files made real).
    secret = tmp_path / "corp-ca"
    write_secret_files(secret, ["tls.crt", "tls.key", "ca.crt"])
    on_disk = {k: v.replace("/etc/corp-ca", str(secret)) for k, v in e.items()}
    settings = load_settings(on_disk)
    assert settings.insecure is False and settings.expose_metadata is True
    assert settings.use_tls and settings.neighbour_limit == 3
    assert not (settings.check_me_ingress or settings.check_me_service or settings.check_neighbourhood)
    assert settings.check_interval == 15 and settings.shutdown_duration == 10
    assert [check.name for check in settings.extra_checks] == ["google", "corp_api"]
    assert settings.histogram_buckets[0] == 0.0005
    # HTTPS on 8443, in the Service too
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "udp-echo": 8080, "https": 8443}
    service = the(objects, "Service", "nurse-prod")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("web", 80),
        ("udp-echo", 8080),
        ("https", 8443),
    ]
    assert service["metadata"]["labels"]["exposed"] == "no"
    # nameOverride: the name label and the container
    assert ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "nurse"
    assert c["name"] == "nurse"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    # serviceAccount: create false uses the given account everywhere, creates none
    assert spec["serviceAccountName"] == "nurse-sa" and not find(objects, "ServiceAccount")
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nurse-sa", "namespace": NAMESPACE}]
    # ingress.*
    ingress = the(objects, "Ingress", "nurse-prod")
    assert ingress["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt"}
    assert ingress["spec"]["ingressClassName"] == "traefik"
    assert ingress["spec"]["tls"] == [{"hosts": ["nurse.apps.example.com"], "secretName": "nurse-ingress-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "nurse.apps.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "nurse-prod", "port": {"number": 80}}
    # extraObjects, map and string, both through tpl
    assert the(objects, "ConfigMap", "kubenurse-extra-map")["data"] == {"a": "b"}
    assert the(objects, "Secret", "kubenurse-extra-string")["stringData"] == {"c": "d"}


@pytest.mark.parametrize("name", sorted(KUBENURSE_RENDERED))
def test_the_probe_runs_as_kubenurse_ran_with_the_same_values(name: str, tmp_path: Path) -> None:
    """Our render of a kubenurse values file gives the probe the settings kubenurse's own
    chart gave it (we leave out what equals the probe's default), and keeps the DaemonSet's
    selector, so `helm upgrade` of a kubenurse release rolls its pods in place."""
    objects = render(KUBENURSE_DEFAULTS if name == "defaults" else EVERY_KEY)
    theirs_env, theirs_selector = KUBENURSE_RENDERED[name]
    assert daemonset(objects)["spec"]["selector"]["matchLabels"] == theirs_selector
    ours = env(objects)
    # What the downward API and our own additions give both alike.
    shared = {k: ours[k] for k in ("POD_NAME", "NODE_NAME", "POD_NAMESPACE", "KUBENURSE_LOG_FORMAT")}
    shared["KUBERNETES_SERVICE_HOST"] = "10.96.0.1"  # in a cluster
    write_secret_files(tmp_path, ["tls.crt", "tls.key", "ca.crt"])

    def on_disk(variables: Mapping[str, str]) -> dict[str, str]:
        return {k: v.replace("/etc/corp-ca", str(tmp_path)) for k, v in variables.items()}

    def settings(variables: Mapping[str, str]) -> Settings:
        loaded = load_settings({**shared, **on_disk(variables)})
        # Unset and set to the default name are the same in a cluster.
        return dataclasses.replace(loaded, kubernetes_service_dns=loaded.api_server_dns_name)

    assert settings(ours) == settings(theirs_env)
    assert ours.get("TZ") == theirs_env.get("TZ")


def test_ingress_enabled_false_keeps_the_check_and_drops_the_ingress() -> None:
    """kubenurse: the Ingress is yours to make, the check still goes to ingress.url."""
    values = {"ingress": {"enabled": False, "url": "nurse.apps.example.com"}}
    objects = render(values)
    assert not find(objects, "Ingress")
    assert env(objects)["KUBENURSE_INGRESS_URL"] == "https://nurse.apps.example.com"


def test_service_account_name_with_create_true() -> None:
    objects = render({"serviceAccount": {"create": True, "name": "nurse-sa"}})
    the(objects, "ServiceAccount", "nurse-sa")
    assert daemonset(objects)["spec"]["template"]["spec"]["serviceAccountName"] == "nurse-sa"


@pytest.mark.parametrize("spelling", ["check_api_me", "check_me"])
@pytest.mark.parametrize("value", [False, "false"])
def test_pre_1_14_1_spellings_turn_the_me_checks_off(spelling: str, value: object) -> None:
    objects = render({f"{spelling}_ingress": value, f"{spelling}_service": value, "ingress": {"url": "n.example"}})
    e = env(objects)
    assert e["KUBENURSE_CHECK_ME_INGRESS"] == e["KUBENURSE_CHECK_ME_SERVICE"] == "false"
    settings = load_settings(e)
    assert not settings.check_me_ingress and not settings.check_me_service
    # And their egress rule goes with the check.
    probe = pod(NAMESPACE, daemonset(objects)["spec"]["template"]["metadata"]["labels"])
    assert not allowed(objects, probe, address("203.0.113.5"), 80)


@pytest.mark.parametrize("value", [True, "true"])
def test_victoriametrics_histogram_true_is_refused_with_a_reason(value: object) -> None:
    error = refused({"victoriametrics_histogram": value})
    assert "victoriametrics_histogram: true is not supported" in error
    assert "OTLP" in error, "say what to do instead"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"neighbor_limit": 5}, "neighbor_limit"),
        ({"daemonset": {"imagee": {"repository": "x"}}}, "imagee"),
        ({"ingress": {"host": "n.example"}}, "host"),
        ({"otel": {"endpiont": "http://c:4317"}}, "endpiont"),
        ({"use_tls": "yes"}, "use_tls"),
        ({"log_format": "text"}, "log_format"),
    ],
)
def test_schema_rejects_unknown_keys_and_bad_values(values: Mapping[str, Any], named: str) -> None:
    error = refused(values)
    assert "don't meet the specifications of the schema" in error
    assert named in error


# --- defaults: the kustomize base, object for object ----------------------------------------

#: Helm's bookkeeping: labels the chart adds and kustomize does not. app.kubernetes.io/instance
#: is in kubenurse's selectors, so a kubenurse release upgrades in place (selectors are immutable).
HELM_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
}


def without_helm_labels(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in ("labels", "matchLabels", "selector") and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in HELM_LABELS}
            out[key] = without_helm_labels(value)
        return out
    if isinstance(node, list):
        return [without_helm_labels(v) for v in node]
    return node


def comparable(objects: tuple[Obj, ...], *, patched: bool = False) -> dict[tuple[str, str], Obj]:
    out = {}
    for obj in objects:
        if obj["kind"] == "Namespace":
            continue  # helm install -n NS --create-namespace; the chart does not own it
        obj = without_helm_labels(copy.deepcopy(obj))
        if patched:
            # kustomize's strategic merge puts an overlay's list entries where it likes; the
            # order of named entries means nothing (env aside, for $(VAR) references, which
            # test_deploy.py checks).
            named_lists: list[list[Obj]] = []
            if obj["kind"] == "DaemonSet":
                pod_spec = obj["spec"]["template"]["spec"]
                named_lists.append(pod_spec.get("volumes", []))
                for c in pod_spec["containers"]:
                    named_lists += [c.get("env", []), c.get("ports", []), c.get("volumeMounts", [])]
            if obj["kind"] == "Service":
                named_lists.append(obj["spec"]["ports"])
            for entries in named_lists:
                entries.sort(key=lambda item: str(item.get("name")))
        out[(obj["kind"], obj["metadata"]["name"])] = obj
    return out


def differences(chart: dict[tuple[str, str], Obj], kustomize: dict[tuple[str, str], Obj]) -> list[str]:
    problems = [f"only in the chart: {k}" for k in chart.keys() - kustomize.keys()]
    problems += [f"only in kustomize: {k}" for k in kustomize.keys() - chart.keys()]
    for key in chart.keys() & kustomize.keys():
        if chart[key] != kustomize[key]:
            a = yaml.safe_dump(chart[key], sort_keys=True).splitlines()
            b = yaml.safe_dump(kustomize[key], sort_keys=True).splitlines()
            diff = "\n".join(difflib.unified_diff(b, a, "kustomize", "chart", lineterm="", n=2))
            problems.append(f"{key} differs:\n{diff}")
    return problems


needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with `kubectl kustomize`) not installed")


@needs_kubectl
def test_default_render_is_the_kustomize_base() -> None:
    problems = differences(comparable(render()), comparable(build("base")))
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_the_drift_check_sees_a_difference() -> None:
    problems = differences(comparable(render({"neighbour_limit": 11})), comparable(build("base")))
    assert len(problems) == 1 and "KUBENURSE_NEIGHBOUR_LIMIT" in problems[0] and "'11'" in problems[0]


#: Each kustomize overlay as chart values (for otlp: the probe's side; the agent is its own).
OVERLAY_VALUES: dict[str, dict[str, Any]] = {
    "overlays/tls": {"use_tls": True, "tls": {"secretName": "kubenurse-tls"}},
    "overlays/prometheus-operator": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "overlays/node-events": {"node_events": True},
    "overlays/ingress": {"ingress": {"url": "kubenurse.example.com", "tlsSecretName": "kubenurse-ingress-tls"}},
    "overlays/otlp": {
        "otel": {
            "nodeAgent": True,
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubenurse-otel-agent"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "otel-agent"}},
                }
            ],
        }
    },
}


@needs_kubectl
@pytest.mark.parametrize("overlay", sorted(OVERLAY_VALUES))
def test_each_overlay_is_a_chart_value(overlay: str) -> None:
    chart = comparable(render(OVERLAY_VALUES[overlay]), patched=True)
    kustomize = comparable(build(overlay), patched=True)
    if overlay == "overlays/otlp":  # the collector agent ships beside the probe, not in the chart
        kustomize = {k: v for k, v in kustomize.items() if v["metadata"].get("namespace") != "kubenurse-otel-agent"}
        kustomize = {k: v for k, v in kustomize.items() if not k[1].startswith("kubenurse-otel-agent")}
    problems = differences(chart, kustomize)
    assert not problems, "\n".join(problems)


def test_prometheus_rules_copy_is_the_source() -> None:
    """The chart can only read files inside itself: it carries a copy of the rules."""
    source = (ROOT / "deploy" / "prometheus" / "kubenurse-rules.yaml").read_text()
    assert (CHART / "files" / "kubenurse-rules.yaml").read_text() == source, (
        "cp deploy/prometheus/kubenurse-rules.yaml charts/kubenurse/files/"
    )


# --- what every render must be ---------------------------------------------------------------


#: A port name the API server accepts: up to 15 of a-z, 0-9 and '-', at least one letter.
IANA_SVC_NAME = re.compile(r"(?=.{1,15}$)(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*")


def renders(release: str = RELEASE) -> dict[str, tuple[Obj, ...]]:
    return {
        "defaults": render(release=release),
        "every kubenurse key": every_key(release),
        "kubenurse defaults": render(KUBENURSE_DEFAULTS, release),
        **{overlay: render(values, release) for overlay, values in OVERLAY_VALUES.items()},
    }


def test_every_render_validates_and_is_restricted() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.utils.latest_version()
    problems: list[str] = []
    for name, objects in renders().items():
        for obj in objects:
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
            # Events about Nodes are accepted in "default" only: the node-events grant lives there.
            expected = "default" if obj["metadata"]["name"].endswith("-node-events") else NAMESPACE
            assert obj["metadata"].get("namespace", NAMESPACE) == expected, where
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                problems += [f"{where}: {p}" for p in crd_problems(obj)]
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        pod_spec = daemonset(objects)["spec"]["template"]["spec"]
        problems += [f"{name}: {p}" for p in pod_security_violations(pod_spec, "restricted")]
        # What the API server checks beyond the schema: named ports are IANA service names
        # (kubenurse's Service port name 8080-8080 is not one, so nothing may refer to it by name).
        for ingress in find(objects, "Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    port = path["backend"]["service"]["port"]
                    if "name" in port and not IANA_SVC_NAME.fullmatch(port["name"]):
                        problems.append(f"{name}: Ingress backend port name {port['name']!r}")
        for port in container(objects)["ports"]:
            if not IANA_SVC_NAME.fullmatch(port["name"]):
                problems.append(f"{name}: container port name {port['name']!r}")
    assert not problems, "\n".join(problems)


def notes(values: Mapping[str, Any]) -> str:
    result = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", values=values)
    assert result.returncode == 0, result.stderr
    return result.stdout.partition("NOTES:")[2]


def test_notes_say_what_is_off_and_what_differs() -> None:
    fresh = notes({})
    assert "me_ingress is off" in fresh and "dummy-kubenurse.example.com" in fresh
    assert "pod-security.kubernetes.io/enforce=restricted" in fresh
    assert "insecure=false" in fresh and "postfinance/kubenurse" not in fresh
    migrated = notes(KUBENURSE_DEFAULTS)
    assert "me_ingress is off" not in migrated
    assert "postfinance/kubenurse, the Go kubenurse" in migrated, "say they still run the old image"


def test_chart_and_image_carry_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == version
    assert container(render())["image"] == f"ghcr.io/kubenurse-otel/kubenurse:{version}"


# --- our own values ---------------------------------------------------------------------------


def test_our_settings_reach_the_probe(tmp_path: Path) -> None:
    values = {
        "check_dns_cluster": False,
        "shutdown_duration": "20s",
        "daemonset": {"terminationGracePeriodSeconds": 30},
        "check_neighbourhood_udp": False,
        "check_timeout": "4s",
        "check_connect_timeout": "2s",
        "log_format": "logfmt",
        "log_level": "debug",
        "trace_url_template": "https://jaeger.example.com/trace/{trace_id}",
        "mesh": {"port": 9090},
        "otel": {
            "endpoint": "http://otel-collector.observability:4318",
            "protocol": "http/protobuf",
            "tracesSampler": "parentbased_traceidratio",
            "tracesSamplerArg": "0.25",
            "resourceAttributes": "k8s.cluster.name=prod-eu1",
        },
    }
    objects = render(values)
    e = env(objects)
    assert e["KUBENURSE_CHECK_NEIGHBOURHOOD_UDP"] == "false"
    assert e["KUBENURSE_MESH_PORT"] == "9090"
    assert {"name": "mesh", "containerPort": 9090, "protocol": "TCP"} in container(objects)["ports"]
    assert e["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and e["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    settings = load_settings(e)
    assert not settings.check_dns_cluster and not settings.check_neighbourhood_udp
    assert settings.mesh_port == 9090
    assert daemonset(objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_duration
    assert (settings.check_timeout, settings.check_connect_timeout) == (4, 2)
    assert settings.log_format == "logfmt" and settings.log_level == "DEBUG"
    assert settings.trace_url_template == values["trace_url_template"]
    assert settings.otlp_traces_enabled and settings.otlp_traces_protocol == "http/protobuf"
    # Defaults set nothing the probe would not assume by itself.
    defaults = env(render())
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in defaults and "KUBENURSE_MESH_PORT" not in defaults


def test_node_agent_sends_to_the_node_and_node_events_get_their_role(tmp_path: Path) -> None:
    objects = render({"otel": {"nodeAgent": True}, "node_events": True})
    e = env(objects)
    assert e["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{POD_FIELDS['status.hostIP']}:4317"
    settings = load_settings(probe_env_on_disk(objects, tmp_path))
    assert settings.otlp_metrics_enabled and settings.node_events
    role = the(objects, "Role", "kubenurse-node-events")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]


# --- NetworkPolicy -------------------------------------------------------------------------


def test_network_policy_follows_the_settings() -> None:
    values = {
        "ingress": {"url": "nurse.apps.example.com"},
        "extra_checks": "web:https://example.org|alt:http://example.net:8081/x|dns:dns://192.0.2.53:5353/x.example"
        "|db:tcp://db.example:5432|u:udp://192.0.2.7:7000",
        "otel": {"endpoint": "http://otel-collector.observability:4317"},
        "mesh": {"port": 9090, "from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]},
    }
    objects = render(values)
    labels = daemonset(objects)["spec"]["template"]["metadata"]["labels"]
    probe, neighbour = pod(NAMESPACE, labels), pod(NAMESPACE, labels, "10.244.3.3")
    out = address("203.0.113.5")
    for port, protocol in [(443, "TCP"), (8081, "TCP"), (5353, "UDP"), (5353, "TCP"), (5432, "TCP"),
                           (7000, "UDP"), (4317, "TCP")]:  # fmt: skip
        assert allowed(objects, probe, out, port, protocol), (port, protocol)
    for port, protocol in [(80, "TCP"), (7000, "TCP"), (8080, "TCP"), (9090, "TCP"), (8082, "TCP")]:
        assert not allowed(objects, probe, out, port, protocol), (port, protocol)
    # The mesh port: probes and mesh.from only.
    assert allowed(objects, neighbour, probe, 9090)
    assert allowed(objects, address("198.51.100.7"), probe, 9090)
    assert not allowed(objects, pod("default", {"app": "curl"}), probe, 9090)
    assert not allowed(objects, address("198.51.100.7"), probe, 8080)
    # The ingress controller, because an Ingress is rendered.
    assert allowed(objects, pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}), probe, 8080)
    assert not find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")
    # A service_url elsewhere gets its port; turning the check off closes it again.
    elsewhere = {"service_url": "http://nurse.example.net:8082"}
    assert allowed(render(elsewhere), probe, out, 8082)
    assert not allowed(render({**elsewhere, "check_me_service": False}), probe, out, 8082)


# --- documentation --------------------------------------------------------------------------


def values_table(text: str) -> str:
    start = text.index("| key | default | meaning |")
    return text[start : text.index("\n\n", start)]


def test_values_tables_list_every_key() -> None:
    """The chart's README and docs/helm.md carry the same table, with every key of values.yaml."""
    chart_readme = values_table((CHART / "README.md").read_text())
    assert values_table((ROOT / "docs" / "helm.md").read_text()) == chart_readme
    listed = {row.split("|")[1].strip().strip("`") for row in chart_readme.splitlines()[2:]}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    maps = KUBENURSE_KEYS | {"prometheusRule.labels"}  # maps that are one value each

    def keys(node: Mapping[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for key, value in node.items():
            path = prefix + key
            if isinstance(value, dict) and value and path not in maps:
                out |= keys(value, path + ".")
            else:
                out.add(path)
        return out

    expected = keys(values) | {"daemonset.image.tag", "daemonset.rollingUpdate.maxSurge"}
    expected |= {"check_api_me_ingress", "check_api_me_service"}
    assert listed == expected
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]) - {"global"} == {k.split(".")[0] for k in expected}
