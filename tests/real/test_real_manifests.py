"""The manifests against a real kube-apiserver: every kustomize build passes a server-side
dry run (schemas, defaulting, admission including Pod Security), and the probe's RBAC is
exactly enough: each permission is used by a named feature that breaks without it."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from probe.discovery.cache import Reflector, Timing
from probe.discovery.kube import ApiError, KubeClient, ServiceAccount
from probe.discovery.nodes import node_info
from probe.discovery.source import pod_info
from probe.mesh.collect import View
from probe.mesh.events import WINDOW_SECONDS, NodeEventReporter, node_events
from probe.mesh.verdict import Verdict
from probe.mesh.verdicts import NODE_UNREACHABLE, SURE
from tests.real.cluster import ApiError as RealApiError
from tests.real.cluster import RealCluster
from tests.real.conftest import FILTER, NS, ROOT

KUSTOMIZATIONS = sorted(
    str(p.parent.relative_to(ROOT))
    for base in ("k8s", "otel-collector/k8s")
    for p in (ROOT / base).rglob("kustomization.yaml")
)
WINDOWS = itertools.count()
SA_USER = f"system:serviceaccount:{NS}:kubenurse"
FAST = Timing(request_timeout=10.0, connect_timeout=5.0, watch_seconds=5.0, backoff_initial=0.05,
              backoff_max=0.5, healthy_after=0.5, qps=500.0, burst=500)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomize_build_passes_a_server_side_dry_run(
    real_cluster: RealCluster, crds: None, kustomization: str
) -> None:
    built = real_cluster.kubectl("kustomize", str(ROOT / kustomization)).stdout
    # A dry run creates no namespace: the build's own namespaces first, for real (as a first
    # `kubectl apply` would), then everything as a dry run.
    namespaces = [d for d in yaml.safe_load_all(built) if d and d.get("kind") == "Namespace"]
    if namespaces:
        real_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(namespaces))
    done = real_cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=built, check=False)
    assert done.returncode == 0, f"{kustomization}:\n{done.stderr}"
    # Admission warnings (Pod Security "warn", deprecated APIs) count as errors here, but for
    # the one otel-collector/README.md documents: the agent's hostPorts, which "restricted"
    # (still the namespace's warn level under the otlp overlay) names.
    warnings = [line for line in done.stderr.splitlines() if line.startswith("Warning:")]
    expected = 'would violate PodSecurity "restricted:latest": hostPort (container "otel-agent"'
    assert [w for w in warnings if expected not in w] == [], f"{kustomization}:\n{done.stderr}"


# Least privilege ---------------------------------------------------------------------------

#: (namespace or "" for cluster scope, resource, verb) -> the feature that needs it.
NEEDED = {
    (NS, "pods", "list"): "the neighbour list (pods matching KUBENURSE_NEIGHBOUR_FILTER)",
    (NS, "pods", "watch"): "neighbour changes after the first list",
    (NS, "pods", "get"): "finding this pod's node when NODE_NAME is unset",
    ("", "nodes", "list"): "node facts: cordoned / gone nodes, this node's readiness",
    ("", "nodes", "watch"): "node changes after the first list",
    ("default", "events", "create"): "Kubernetes Events on the culprit node (node-events overlay)",
}


def granted_rules(cluster: RealCluster) -> set[tuple[str, str, str]]:
    """Every (namespace, resource, verb) the probe's service account gets from the bindings
    the project's manifests made (the defaults every authenticated user has aside)."""
    granted: set[tuple[str, str, str]] = set()

    def subject_is_probe(binding: dict[str, Any]) -> bool:
        return any(s.get("kind") == "ServiceAccount" and s.get("name") == "kubenurse"
                   and s.get("namespace") == NS for s in binding.get("subjects") or ())

    def rules_of(ref: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
        if ref["kind"] == "ClusterRole":
            return list(cluster.get(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{ref['name']}")["rules"])
        return list(cluster.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{ref['name']}")
                    ["rules"])

    for binding in cluster.get("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings")["items"]:
        if subject_is_probe(binding):
            for rule in rules_of(binding["roleRef"], ""):
                granted |= {("", r, v) for r in rule["resources"] for v in rule["verbs"]}
    for binding in cluster.get("/apis/rbac.authorization.k8s.io/v1/rolebindings")["items"]:
        if subject_is_probe(binding):
            namespace = binding["metadata"]["namespace"]
            for rule in rules_of(binding["roleRef"], namespace):
                granted |= {(namespace, r, v) for r in rule["resources"] for v in rule["verbs"]}
    return granted


def can_i(cluster: RealCluster, namespace: str, resource: str, verb: str) -> bool:
    review = cluster.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": SA_USER, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NS}",
                                             "system:authenticated"],
                 "resourceAttributes": {"namespace": namespace, "resource": resource, "verb": verb}}})
    return bool(review["status"].get("allowed"))


def test_the_probe_is_granted_exactly_what_it_needs(real_cluster: RealCluster) -> None:
    assert granted_rules(real_cluster) == set(NEEDED)
    for namespace, resource, verb in NEEDED:
        assert can_i(real_cluster, namespace, resource, verb), (namespace, resource, verb)
    # Nothing more: not other namespaces' pods, not writes, not secrets.
    assert not can_i(real_cluster, "default", "pods", "list")
    assert not can_i(real_cluster, NS, "pods", "delete")
    assert not can_i(real_cluster, NS, "secrets", "get")
    assert not can_i(real_cluster, "", "nodes", "get")
    assert not can_i(real_cluster, NS, "events", "create")


class Revoked:
    """The probe's Role/ClusterRole with one verb taken away (put back afterwards)."""

    def __init__(self, cluster: RealCluster, namespace: str, resource: str, verb: str) -> None:
        self.cluster = cluster
        for path, role in self._roles():
            rules = role["rules"]
            if any(resource in r["resources"] and verb in r["verbs"] for r in rules) and (
                    namespace == "" or f"/namespaces/{namespace}/" in path):
                self.path, self.original = path, role
                break
        else:
            raise AssertionError(f"no role grants {verb} {resource} in {namespace!r}")
        self.resource, self.verb = resource, verb

    def _roles(self) -> Iterator[tuple[str, dict[str, Any]]]:
        rbac = "/apis/rbac.authorization.k8s.io/v1"
        for kind in ("clusterroles", "roles"):
            for role in self.cluster.get(f"{rbac}/{kind}?labelSelector=app.kubernetes.io/name=kubenurse")["items"]:
                namespace = role["metadata"].get("namespace")
                prefix = f"{rbac}/namespaces/{namespace}/roles" if namespace else f"{rbac}/clusterroles"
                yield f"{prefix}/{role['metadata']['name']}", role

    def __enter__(self) -> Revoked:
        role = copy.deepcopy(self.original)
        for rule in role["rules"]:
            if self.resource in rule["resources"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != self.verb]
        role["rules"] = [r for r in role["rules"] if r["verbs"]]
        self.cluster.request("PUT", self.path, role)
        return self

    def __exit__(self, *exc: object) -> None:
        current = self.cluster.get(self.path)
        self.original["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        self.cluster.request("PUT", self.path, self.original)


async def poll_status(action: Callable[[], Awaitable[int]], want: int, timeout: float = 10.0) -> int:
    """Run `action` until it gives `want` (RBAC changes reach the authorizer within ~a second)."""
    deadline = time.monotonic() + timeout
    status = await action()
    while status != want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        status = await action()
    return status


class FixedView:
    """A mesh view whose verdict is fixed: node-x is unreachable, for sure."""

    async def view(self) -> View:
        verdict = Verdict(NODE_UNREACHABLE, "lp-node", SURE, "lp-node answers nobody.", ("3 of 3 peers time out",))
        return View((verdict,), b"", b"", 0.0)


@pytest.fixture(scope="module")
def probe_token_dir(real_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    real_cluster.add_node("lp-node")
    token = real_cluster.token(NS, "kubenurse")
    return real_cluster.write_serviceaccount(tmp_path_factory.mktemp("lp-sa"), token, NS)


async def feature_status(cluster: RealCluster, sa_dir: Path, namespace: str, resource: str, verb: str) -> int:
    """Use the feature as the probe does; the HTTP status it got (200/201 or the error's)."""
    credentials = ServiceAccount(str(sa_dir), "127.0.0.1", cluster.port)
    client = KubeClient(credentials, qps=500, burst=500)
    await credentials.load()
    try:
        if resource == "events":
            shift = next(WINDOWS) * WINDOW_SECONDS  # a new 10-minute window: a new Event, not a 409
            reporter = NodeEventReporter(credentials, FixedView(), namespace=namespace,  # type: ignore[arg-type]
                                         pod="kubenurse-lp", own_node=lambda: "a-node",
                                         eligible_nodes=lambda: ["lp-node"], clock=lambda: time.time() + shift)
            try:
                await reporter.run_once()
                return next(iter(reporter.posted.values()))
            finally:
                await reporter.close()
        if verb == "get":  # the own-pod lookup of KubeDiscovery._find_own_node
            await client.get(f"/api/v1/namespaces/{NS}/pods/kubenurse-lp", {}, timeout=10)
            return 200
        path, decode, selector = (f"/api/v1/namespaces/{NS}/pods", pod_info, {"label_selector": FILTER}) \
            if resource == "pods" else ("/api/v1/nodes", node_info, {"field_selector": "metadata.name=lp-node"})
        reflector = Reflector(client, resource, path, decode, timing=FAST, **selector)  # type: ignore[arg-type]
        try:
            if verb == "list":
                await reflector._list()
            else:
                reflector.resource_version = json.loads(await client.get(path, {"limit": "1"}, timeout=10)
                                                        )["metadata"]["resourceVersion"]
                await asyncio.wait_for(reflector._watch(), 0.5)
        except TimeoutError:
            return 200  # the watch was open and streaming
        return 200
    except ApiError as e:
        return e.code
    finally:
        await client.close()


@pytest.mark.parametrize(("namespace", "resource", "verb"), sorted(NEEDED))
async def test_removing_one_permission_breaks_its_feature(
    real_cluster: RealCluster, probe_token_dir: Path, namespace: str, resource: str, verb: str
) -> None:
    feature = NEEDED[(namespace, resource, verb)]
    if resource == "pods" and verb == "get":
        real_cluster.add_pod("kubenurse-lp", namespace=NS, node="lp-node", ip="127.0.25.1",
                             labels={"app.kubernetes.io/name": "kubenurse"})
    try:
        ok = 201 if verb == "create" else 200
        assert await feature_status(real_cluster, probe_token_dir, namespace, resource, verb) == ok, feature
        with Revoked(real_cluster, namespace, resource, verb):
            status = await poll_status(
                lambda: feature_status(real_cluster, probe_token_dir, namespace, resource, verb), 403)
            assert status == 403, f"{feature}: still works without {verb} {resource}"
        assert await poll_status(
            lambda: feature_status(real_cluster, probe_token_dir, namespace, resource, verb), ok) == ok
    finally:
        if resource == "pods" and verb == "get":
            real_cluster.delete_pod("kubenurse-lp", namespace=NS)


def test_node_events_show_in_kubectl_describe_node(real_cluster: RealCluster, probe_token_dir: Path) -> None:
    status = asyncio.run(feature_status(real_cluster, probe_token_dir, "default", "events", "create"))
    assert status in (201, 409)
    # Why "default": the real server refuses an Event about a Node anywhere else.
    (event,) = node_events(asyncio.run(FixedView().view()).verdicts, namespace=NS, reporter_node="a",
                           reporter_pod="p", now=time.time())
    with pytest.raises(RealApiError) as refused:
        real_cluster.request("POST", f"/api/v1/namespaces/{NS}/events", event)
    assert refused.value.status == 422 and "does not match event.namespace" in str(refused.value)
    described = real_cluster.kubectl("describe", "node", "lp-node").stdout
    assert "KubenurseNodeUnreachable" in described and "lp-node answers nobody." in described
