"""Who to check: the neighbour model, the seam discovery plugs into, and pure selection.

Selection follows CONTRACT.md: Running, not terminating, not this pod, on a present and
schedulable node (unless unschedulable nodes are allowed), then the hash ring so every
node receives exactly `limit` incoming checks.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
_RING = 1 << 64


@dataclass(frozen=True, slots=True)
class Neighbour:
    """One pod to check, as shown in /alive."""

    pod_name: str
    pod_ip: str
    host_ip: str
    node_name: str
    phase: str = "Running"

    def as_alive(self) -> dict[str, str]:
        return {
            "PodName": self.pod_name,
            "PodIP": self.pod_ip,
            "HostIP": self.host_ip,
            "NodeName": self.node_name,
            "Phase": self.phase,
        }


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What selection needs of a pod; discovery decodes nothing more."""

    name: str
    node_name: str
    pod_ip: str
    host_ip: str
    phase: str
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    unschedulable: bool = False
    unschedulable_taint: bool = False

    @property
    def schedulable(self) -> bool:
        return not (self.unschedulable or self.unschedulable_taint)


@dataclass(frozen=True)
class Neighbourhood:
    """A snapshot of what discovery knows, read once per round and by /alive and /ready."""

    neighbours: tuple[Neighbour, ...] = ()
    #: "ok", or why there is no neighbourhood (then the path checks report `skipped`).
    state: str = "ok"
    skipped: bool = False
    #: Discovery lost the API server; the neighbours are the last known ones.
    stale: bool = False
    #: False while this pod's node is unschedulable, cordoned or gone (/ready answers 503).
    node_schedulable: bool = True
    #: Free-form facts for /alive (last sync, errors ...).
    details: Mapping[str, object] = field(default_factory=dict)


class NeighbourSource(Protocol):
    """The seam between discovery and the checks."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def current(self) -> Neighbourhood: ...


class StaticNeighbours:
    """A fixed neighbourhood: for tests, and for running with no Kubernetes at all."""

    def __init__(self, neighbourhood: Neighbourhood) -> None:
        self.neighbourhood = neighbourhood

    @classmethod
    def unavailable(cls, reason: str) -> StaticNeighbours:
        return cls(Neighbourhood(state=f"skipped: {reason}", skipped=True))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def current(self) -> Neighbourhood:
        return self.neighbourhood


@functools.lru_cache(maxsize=1 << 16)
def ring_hash(node_name: str) -> int:
    """First 8 bytes of sha256(nodeName), big-endian unsigned. Cached: the same few
    thousand node names are hashed on every selection."""
    return int.from_bytes(hashlib.sha256(node_name.encode()).digest()[:8], "big")


def eligible(
    pods: Iterable[PodInfo],
    nodes: Mapping[str, NodeInfo],
    *,
    own_pod: str,
    allow_unschedulable: bool,
) -> list[PodInfo]:
    """Pods that may be checked at all, before the limit applies."""
    chosen = []
    for pod in pods:
        if pod.phase != "Running" or pod.terminating or pod.name == own_pod or not pod.pod_ip:
            continue
        if not allow_unschedulable:
            node = nodes.get(pod.node_name)
            if node is None or not node.schedulable:
                continue
        chosen.append(pod)
    return chosen


def ring_order(pods: Iterable[PodInfo], own_node: str, limit: int = 0) -> list[PodInfo]:
    """Pods ordered by their node's distance after `own_node` on the hash ring,
    (h(theirs) - h(mine)) mod 2^64, ties by pod name; the first `limit` only when it is not 0."""
    mine = ring_hash(own_node)
    keyed = [((ring_hash(p.node_name) - mine) % _RING, p.name, i, p) for i, p in enumerate(pods)]
    chosen = heapq.nsmallest(limit, keyed) if limit else sorted(keyed)
    return [entry[3] for entry in chosen]


def select_neighbours(
    pods: Iterable[PodInfo],
    nodes: Mapping[str, NodeInfo],
    *,
    own_pod: str,
    own_node: str,
    limit: int,
    allow_unschedulable: bool = False,
) -> tuple[Neighbour, ...]:
    """The neighbours this pod checks: eligible pods, the next `limit` on the ring (0 = all)."""
    candidates = eligible(pods, nodes, own_pod=own_pod, allow_unschedulable=allow_unschedulable)
    candidates = ring_order(candidates, own_node, limit)
    return tuple(Neighbour(p.name, p.pod_ip, p.host_ip, p.node_name, p.phase) for p in candidates)
