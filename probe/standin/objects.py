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
POD_FIELDS = frozenset({"metadata.name", "metadata.namespace", "spec.nodeName", "status.phase", "status.podIP"})
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
    spec: Obj = {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]}
    if node_name:
        spec["nodeName"] = node_name
    status: Obj = {"phase": phase}
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
    return {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "spec.nodeName": obj["spec"].get("nodeName", ""),
        "status.phase": obj["status"].get("phase", ""),
        "status.podIP": obj["status"].get("podIP", ""),
    }


def supported_fields(kind: str) -> frozenset[str]:
    return NODE_FIELDS if kind == "nodes" else POD_FIELDS
