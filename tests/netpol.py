"""NetworkPolicy semantics, as the API documents them, for checking rendered manifests.

`allowed(policies, source, destination, port, protocol)` answers whether a connection
is let through by every policy that selects either end. Endpoints are pods (namespace,
namespace labels, pod labels, IP) or plain addresses outside the cluster (no namespace).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    ip: str
    namespace: str | None = None  # None: not a pod (a node, the API server, the internet)
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)


def pod(namespace: str, labels: Mapping[str, str], ip: str = "10.244.9.9") -> Endpoint:
    return Endpoint(ip, namespace, dict(labels), {"kubernetes.io/metadata.name": namespace})


def address(ip: str) -> Endpoint:
    return Endpoint(ip)


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector; an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(other.ip)
        if ip not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(ip in ipaddress.ip_network(e) for e in block.get("except") or [])
    if other.namespace is None:
        return False  # pod and namespace selectors select pods only
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other.labels)


def _port_matches(rule_ports: Iterable[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        low = p["port"]
        assert isinstance(low, int), f"named ports are not modelled here: {low}"
        if low <= port <= p.get("endPort", low):
            return True
    return False


def _direction_allows(
    policies: list[Obj], me: Endpoint, other: Endpoint, port: int, protocol: str, direction: str
) -> bool:
    applying = [
        p
        for p in policies
        if me.namespace == p["metadata"]["namespace"]
        and selects(p["spec"]["podSelector"], me.labels)
        and direction.capitalize() in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applying:
        return True  # no policy isolates this pod in this direction
    peers_key = "from" if direction == "ingress" else "to"
    for policy in applying:
        for rule in policy["spec"].get(direction) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers)
            if peer_ok and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(objects: Iterable[Obj], source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether source may open port/protocol on destination under these NetworkPolicies."""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    egress_ok = source.namespace is None or _direction_allows(policies, source, destination, port, protocol, "egress")
    ingress_ok = destination.namespace is None or _direction_allows(
        policies, destination, source, port, protocol, "ingress"
    )
    return egress_ok and ingress_ok
