"""Who to check: the neighbour model, the seam discovery plugs into, and pure selection.

Selection (docs/reference.md, "Neighbours"): Running, not terminating, not this pod, on a present and
schedulable node (unless unschedulable nodes are allowed), then the hash ring so every
node receives exactly `limit` incoming checks.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import ipaddress
from collections.abc import Collection, Iterable, Mapping
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

    def neighbour(self) -> Neighbour:
        return Neighbour(self.name, self.pod_ip, self.host_ip, self.node_name, self.phase)


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
    #: Free-form facts for /alive (last sync, errors ...).
    details: Mapping[str, object] = field(default_factory=dict)
    #: With `skipped`: why, as /alive's `skipped_checks` shows it.
    skip_reason: str | None = None

    @classmethod
    def skip(cls, reason: str, details: Mapping[str, object] | None = None) -> Neighbourhood:
        """No neighbourhood, and why."""
        return cls(state=f"skipped: {reason}", skipped=True, details=details or {}, skip_reason=reason)


class NeighbourSource(Protocol):
    """The seam between discovery and the checks."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def current(self) -> Neighbourhood: ...


class Readiness(Protocol):
    """Whether this pod's node takes work: its own concern, apart from the neighbours
    (it holds also when the neighbourhood check is off)."""

    def node_schedulable(self) -> bool:
        """False while this pod's node is unschedulable, cordoned or gone (/ready: 503)."""
        ...


class StaticReadiness:
    """A fixed answer: for tests, and when the API server cannot be reached by configuration."""

    def __init__(self, schedulable: bool = True) -> None:
        self.schedulable = schedulable

    def node_schedulable(self) -> bool:
        return self.schedulable


class StaticNeighbours:
    """A fixed neighbourhood: for tests, and for running with no Kubernetes at all."""

    def __init__(self, neighbourhood: Neighbourhood) -> None:
        self.neighbourhood = neighbourhood

    @classmethod
    def unavailable(cls, reason: str) -> StaticNeighbours:
        return cls(Neighbourhood.skip(reason))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def current(self) -> Neighbourhood:
        return self.neighbourhood

    def pod_ip(self, name: str) -> str | None:
        return next((n.pod_ip for n in self.neighbourhood.neighbours if n.pod_name == name), None)


def same_sender(pod_ip: str, sender: str) -> bool:
    """Whether a connection from `sender` comes from the pod at `pod_ip`. Both loopback
    counts too: several probes on one machine (tests, the sandbox) reach each other from
    127.0.0.1 whatever their own address, and a pod IP in a cluster is never loopback."""
    try:
        a, b = ipaddress.ip_address(pod_ip), ipaddress.ip_address(sender.split("%", 1)[0])
    except ValueError:
        return False
    a = a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a
    b = b.ipv4_mapped or b if isinstance(b, ipaddress.IPv6Address) else b
    return a == b or (a.is_loopback and b.is_loopback)


@functools.lru_cache(maxsize=1 << 16)
def ring_hash(node_name: str) -> int:
    """First 8 bytes of sha256(nodeName), big-endian unsigned. Cached: the same few
    thousand node names are hashed on every selection."""
    return int.from_bytes(hashlib.sha256(node_name.encode()).digest()[:8], "big")


def candidate(pod: PodInfo, own_pod: str) -> bool:
    """The pod's own part of eligibility: Running, not terminating, not this pod, with an IP."""
    return pod.phase == "Running" and not pod.terminating and pod.name != own_pod and bool(pod.pod_ip)


def takes_checks(node: NodeInfo | None) -> bool:
    """The node's part (unless unschedulable nodes are allowed): it exists (None: it is
    gone) and is schedulable. /ready reads the same of this pod's own node."""
    return node is not None and node.schedulable


def eligible(
    pods: Iterable[PodInfo],
    nodes: Mapping[str, NodeInfo],
    *,
    own_pod: str,
    allow_unschedulable: bool,
) -> list[PodInfo]:
    """Pods that may be checked at all, before the limit applies."""
    return [
        pod for pod in pods
        if candidate(pod, own_pod) and (allow_unschedulable or takes_checks(nodes.get(pod.node_name)))
    ]


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
    return tuple(p.neighbour() for p in candidates)


_UNKNOWN = NodeInfo("")


@dataclass(frozen=True)
class RingFront:
    """What selection needs to know next, given partial node facts (see `ring_front`)."""

    neighbours: tuple[Neighbour, ...]
    #: Nodes whose facts (exists, schedulable) selection reads, nearest first.
    wanted: tuple[str, ...]


def ring_front(
    pods: Iterable[PodInfo],
    *,
    cordoned: Collection[str],
    facts: Mapping[str, NodeInfo | None],
    own_pod: str,
    own_node: str,
    limit: int,
    spares: int,
    max_wanted: int,
) -> RingFront:
    """`select_neighbours` when only some nodes are known.

    `cordoned`: nodes known to have spec.unschedulable (from a cluster-wide watch of those
    alone). `facts`: the full facts of the nodes watched one by one (None: the node does
    not exist). Walking the candidate pods in ring order, a node's pods are taken when its
    facts say it exists and is schedulable; a node without facts is not taken yet (it may
    be gone or tainted) but is wanted, and its pods count against the limit meanwhile (so
    the first pass wants `limit` nodes, not every node). A node in `cordoned` is skipped
    without waiting for its facts, and stays wanted (its uncordon then needs no new watch).
    The walk stops once `limit` pods are taken and `spares` more nodes are wanted beyond
    them (so one cordon does not leave a gap while a watch starts), or at `max_wanted`
    nodes. With complete facts for the wanted nodes the neighbours equal
    `select_neighbours(...)`'s exactly.
    """
    if limit <= 0:
        raise ValueError("ring_front needs a limit; with 0 every node is needed")
    candidates = [p for p in pods if candidate(p, own_pod)]
    taken: list[PodInfo] = []
    counted = 0  # pods taken, plus those of nodes without facts yet (they may well be taken)
    wanted: list[str] = []
    extra = 0
    node: str | None = None
    usable: bool | None = False  # None: not known yet
    for pod in ring_order(candidates, own_node):
        if pod.node_name != node:
            node = pod.node_name
            full = counted >= limit
            if (full and extra >= spares) or len(wanted) >= max_wanted:
                break
            wanted.append(node)
            if node in cordoned:
                usable = False  # skipped at once; still watched, so its uncordon is seen in full
                continue
            extra += full
            info = facts.get(node, _UNKNOWN)
            usable = None if info is _UNKNOWN else takes_checks(info)
        if usable is not False and counted < limit:
            counted += 1
            if usable:
                taken.append(pod)
    return RingFront(tuple(p.neighbour() for p in taken), tuple(wanted))


def known_eligible(
    pods: Iterable[PodInfo],
    *,
    cordoned: Collection[str],
    facts: Mapping[str, NodeInfo | None],
    own_pod: str,
    own_node: str,
) -> tuple[Neighbour, ...]:
    """Every pod that may be checked as far as partial node facts tell, in ring order:
    pods on nodes known cordoned (`cordoned`) or known gone or unschedulable (`facts`) are
    left out; a node without facts counts as schedulable (a taint-only cordon or a deleted
    node away from the ring front is not known). For views of the whole cluster (the mesh),
    never for the neighbours, which `ring_front` selects exactly."""
    chosen = [
        pod for pod in pods
        if candidate(pod, own_pod) and pod.node_name not in cordoned
        and ((info := facts.get(pod.node_name, _UNKNOWN)) is _UNKNOWN or takes_checks(info))
    ]
    return tuple(p.neighbour() for p in ring_order(chosen, own_node))
