"""Minimal but realistic Pod and Node JSON, and the edits the stand-in can make to them.

Objects are shaped like what the API server returns for list items (no `kind`/`apiVersion`;
those are added where the real server adds them). Empty optional fields are omitted, as Go's
`omitempty` does. Pod specs carry one container because kubernetes_asyncio's models
refuse a PodSpec without `containers`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]
TaintSpec = Mapping[str, str] | str

UNSCHEDULABLE_TAINT_KEY = "node.kubernetes.io/unschedulable"
#: As kube-apiserver's pod and node strategies (ToSelectableFields) expose them.
POD_FIELDS = frozenset({
    "metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
    "spec.serviceAccountName", "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
})
NODE_FIELDS = frozenset({"metadata.name", "spec.unschedulable"})
KIND_NAMES = {"pods": "Pod", "nodes": "Node"}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _metadata(name: str, namespace: str | None, labels: Mapping[str, str] | None) -> Obj:
    meta: Obj = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now()
    if labels:
        meta["labels"] = dict(labels)
    return meta


def new_pod(
    name: str,
    namespace: str,
    node_name: str | None,
    pod_ip: str | None,
    host_ip: str | None,
    labels: Mapping[str, str] | None,
    phase: str,
) -> Obj:
    # With the defaults kube-apiserver fills in on create (compared in tests/real).
    container = {"name": "main", "image": "registry.k8s.io/pause:3.10", "resources": {},
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                 "imagePullPolicy": "IfNotPresent"}
    spec: Obj = {
        "containers": [container], "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst", "serviceAccountName": "default", "serviceAccount": "default",
        "securityContext": {}, "schedulerName": "default-scheduler",
        "tolerations": [
            {"key": f"node.kubernetes.io/{key}", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            for key in ("not-ready", "unreachable")
        ],
        "priority": 0, "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
    }
    if node_name:
        spec["nodeName"] = node_name
    status: Obj = {"phase": phase, "qosClass": "BestEffort"}
    if host_ip:
        status["hostIP"] = host_ip
        status["hostIPs"] = [{"ip": host_ip}]
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return {"metadata": _metadata(name, namespace, labels), "spec": spec, "status": status}


def new_node(
    name: str,
    unschedulable: bool,
    taints: Iterable[TaintSpec],
    labels: Mapping[str, str] | None,
    internal_ip: str,
) -> Obj:
    all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}
    stamp = now()
    node: Obj = {
        "metadata": _metadata(name, None, all_labels),
        "spec": {},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ],
        },
    }
    for taint in taints:
        add_taint(node, parse_taint(taint))
    set_unschedulable(node, unschedulable)
    return node


def parse_taint(taint: TaintSpec) -> dict[str, str]:
    """Accept `{"key":..,"value":..,"effect":..}` or kubectl's `key[=value]:Effect`."""
    if isinstance(taint, str):
        key_value, _, effect = taint.rpartition(":")
        key, _, value = key_value.partition("=")
        taint = {"key": key, "value": value, "effect": effect}
    if not taint.get("key") or taint.get("effect") not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(f"invalid taint {taint!r}")
    return {k: v for k, v in taint.items() if v}


def add_taint(node: Obj, taint: Mapping[str, str]) -> None:
    taints = node["spec"].setdefault("taints", [])
    # Same key and effect replaces, as `kubectl taint --overwrite` does.
    taints[:] = [t for t in taints if (t["key"], t["effect"]) != (taint["key"], taint["effect"])]
    taints.append(dict(taint))


def remove_taint(node: Obj, key: str, effect: str | None = None) -> None:
    kept = [t for t in node["spec"].get("taints", []) if t["key"] != key or effect not in (None, t["effect"])]
    if kept:
        node["spec"]["taints"] = kept
    else:
        node["spec"].pop("taints", None)


def set_unschedulable(node: Obj, unschedulable: bool) -> None:
    if unschedulable:
        node["spec"]["unschedulable"] = True
    else:
        node["spec"].pop("unschedulable", None)


def cordon(node: Obj) -> None:
    """kubectl cordon sets spec.unschedulable; the node controller then adds the taint."""
    set_unschedulable(node, True)
    add_taint(node, {"key": UNSCHEDULABLE_TAINT_KEY, "effect": "NoSchedule"})


def uncordon(node: Obj) -> None:
    set_unschedulable(node, False)
    remove_taint(node, UNSCHEDULABLE_TAINT_KEY, "NoSchedule")


def internal_ip(node: Obj) -> str | None:
    return next((a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"), None)


def labels(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = obj["metadata"].get("labels", {})
    return labels


def fields(kind: str, obj: Obj) -> dict[str, str]:
    """The values fieldSelector can test, as the API server exposes them."""
    meta = obj["metadata"]
    if kind == "nodes":
        return {
            "metadata.name": meta["name"],
            "spec.unschedulable": str(bool(obj["spec"].get("unschedulable"))).lower(),
        }
    spec, status = obj["spec"], obj["status"]
    return {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.restartPolicy": spec.get("restartPolicy", ""),
        "spec.schedulerName": spec.get("schedulerName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "spec.hostNetwork": str(bool(spec.get("hostNetwork"))).lower(),
        "status.phase": status.get("phase", ""),
        # The real server reads podIPs[0], not podIP.
        "status.podIP": (status.get("podIPs") or [{}])[0].get("ip", ""),
        "status.nominatedNodeName": status.get("nominatedNodeName", ""),
    }


def supported_fields(kind: str) -> frozenset[str]:
    return NODE_FIELDS if kind == "nodes" else POD_FIELDS


# Realistic nodes and kubelet heartbeats ------------------------------------------------

#: The condition a flapping node turns over (node-problem-detector's, as seen in real clusters).
FLAPPING_CONDITION = "FrequentContainerdRestart"
_CONDITIONS = (
    ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
    ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ("NetworkUnavailable", "False", "RouteCreated", "RouteController created a route"),
    ("KernelDeadlock", "False", "KernelHasNoDeadlock", "kernel has no deadlock"),
    ("ReadonlyFilesystem", "False", "FilesystemIsNotReadOnly", "Filesystem is not read-only"),
    ("FrequentKubeletRestart", "False", "NoFrequentKubeletRestart", "kubelet is functioning properly"),
    ("FrequentContainerdRestart", "False", "NoFrequentContainerdRestart", "containerd is functioning properly"),
    ("CorruptDockerOverlay2", "False", "NoCorruptDockerOverlay2", "docker overlay2 is functioning properly"),
)


def make_realistic(node: Obj, *, seed: int, images: int = 45) -> None:
    """Fill a node the way a kubelet and the cloud controller do: many conditions, ~45
    images with digests and tags, capacity, nodeInfo, annotations and managedFields
    (about 12 KB of JSON, in the 5-20 KB range of real nodes)."""
    stamp = now()
    meta, status = node["metadata"], node["status"]
    meta["labels"].update({
        "beta.kubernetes.io/arch": "amd64", "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "m6i.2xlarge", "topology.kubernetes.io/region": "eu-west-1",
        "topology.kubernetes.io/zone": f"eu-west-1{'abc'[seed % 3]}", "node-role.kubernetes.io/worker": "",
    })
    meta["annotations"] = {
        "node.alpha.kubernetes.io/ttl": "0",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        "csi.volume.kubernetes.io/nodeid": f'{{"ebs.csi.aws.com":"i-{seed:017x}"}}',
    }
    meta["managedFields"] = [
        {"manager": manager, "operation": "Update", "apiVersion": "v1", "time": stamp, "fieldsType": "FieldsV1",
         "fieldsV1": {"f:status": {"f:conditions": {f'k:{{"type":"{c[0]}"}}': {".": {}, "f:lastHeartbeatTime": {},
                                                     "f:status": {}} for c in _CONDITIONS[:4]}}}}
        for manager in ("kubelet", "node-problem-detector", "kube-controller-manager")
    ]
    status["conditions"] = [
        {"type": t, "status": v, "reason": r, "message": m, "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
        for t, v, r, m in _CONDITIONS
    ] + status["conditions"]
    status["capacity"] = {"cpu": "8", "memory": "32386220Ki", "pods": "110", "ephemeral-storage": "104845292Ki"}
    status["allocatable"] = {"cpu": "7910m", "memory": "31369388Ki", "pods": "110",
                             "ephemeral-storage": "95551679124"}
    status["daemonEndpoints"] = {"kubeletEndpoint": {"Port": 10250}}
    status["nodeInfo"] = {
        "machineID": f"{seed:032x}", "systemUUID": f"ec2{seed:05x}-0000-0000-0000-000000000000",
        "bootID": f"{seed:08x}-1111-2222-3333-444455556666", "kernelVersion": "6.1.119-129.201.amzn2023.x86_64",
        "osImage": "Amazon Linux 2023.6.20241212", "containerRuntimeVersion": "containerd://1.7.23",
        "kubeletVersion": "v1.32.0", "kubeProxyVersion": "v1.32.0", "operatingSystem": "linux",
        "architecture": "amd64",
    }
    status["images"] = [
        {"names": [f"registry.example.com/team-{i % 7}/service-{i}@sha256:{(seed * 7919 + i):064x}",
                   f"registry.example.com/team-{i % 7}/service-{i}:v1.{i}.{seed % 10}"],
         "sizeBytes": 10_000_000 + i * 1_234_567}
        for i in range(images)
    ]


def heartbeat(node: Obj, flap: str | None = None) -> None:
    """A kubelet status update: heartbeat times move; `flap` turns that condition over."""
    stamp = now()
    for condition in node["status"].get("conditions", []):
        condition["lastHeartbeatTime"] = stamp
        if condition["type"] == flap:
            condition["status"] = "True" if condition["status"] == "False" else "False"
            condition["lastTransitionTime"] = stamp
