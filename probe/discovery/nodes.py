"""NodeFacts: what discovery knows of the nodes, watched as narrowly as selection allows.

Kubelets rewrite their Node's status every few minutes (more often while a condition
flaps), so a watch of every Node costs each probe ~17 full objects a second at 5,000
nodes. Selection needs far less: whether the nodes at the front of this node's hash ring
exist and are schedulable, and readiness the same of this pod's own node. So, by mode:

- "front": one cluster-wide metadata-only watch of the nodes selected by
  `spec.unschedulable=true` (an object there is a cordoned node; its heartbeats arrive as
  metadata only, and there are few such nodes), plus one full watch per wanted node by
  `metadata.name` (existence, `spec.unschedulable`, the unschedulable taint): the ring
  front and a few spares, and this pod's node. Each such node sends a heartbeat about
  every 5 minutes.
- "own": only the per-node watches (readiness alone, or ALLOW_UNSCHEDULABLE, where
  selection reads no node).
- "all": one full watch of every node (KUBENURSE_NEIGHBOUR_LIMIT=0 checks every node,
  so selection needs every node's facts: today's cost, and the check load dwarfs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal
from urllib.parse import quote

from probe.discovery.cache import Reflector, Timing
from probe.discovery.kube import KubeClient
from probe.neighbours import UNSCHEDULABLE_TAINT, NodeInfo

Mode = Literal["front", "own", "all"]
NODES = "/api/v1/nodes"


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def node_info(obj: Mapping[str, Any]) -> NodeInfo:
    """The fields of a Node that selection and readiness read."""
    spec = obj.get("spec") or {}
    taints = spec.get("taints") or ()
    name = _text((obj.get("metadata") or {}).get("name"))
    if not name:
        raise ValueError("node without metadata.name")
    return NodeInfo(
        name=name,
        unschedulable=bool(spec.get("unschedulable")),
        unschedulable_taint=any(
            isinstance(t, dict) and t.get("key") == UNSCHEDULABLE_TAINT and t.get("effect") == "NoSchedule"
            for t in taints
        ),
    )


def cordoned_info(obj: Mapping[str, Any]) -> NodeInfo:
    """A node of the `spec.unschedulable=true` watch: only its name is read (metadata only)."""
    name = _text((obj.get("metadata") or {}).get("name"))
    if not name:
        raise ValueError("node without metadata.name")
    return NodeInfo(name=name, unschedulable=True)


class NodeFacts:
    """Node facts for selection and readiness; read any time, from the loop's thread."""

    def __init__(
        self,
        client: KubeClient,
        mode: Mode,
        *,
        timing: Timing,
        rng: random.Random,
    ) -> None:
        self.mode = mode
        self._client = client
        self._timing = timing
        self._rng = rng
        #: Bumped whenever any fact or the watched set changes.
        self.revision = 0
        self._wanted: dict[str, frozenset[str]] = {}
        self._per_node: dict[str, Reflector[NodeInfo]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopped = False
        self.cluster: Reflector[NodeInfo] | None = None
        if mode == "all":
            self.cluster = self._reflector("nodes", node_info)
        elif mode == "front":
            self.cluster = self._reflector(
                "cordoned nodes", cordoned_info, field_selector="spec.unschedulable=true", metadata_only=True
            )

    def _reflector(
        self, kind: str, decode: Callable[[Mapping[str, Any]], NodeInfo], **kwargs: Any
    ) -> Reflector[NodeInfo]:
        return Reflector(
            self._client, kind, NODES, decode, timing=self._timing, rng=self._rng, on_change=self._bump, **kwargs
        )

    def _bump(self) -> None:
        self.revision += 1

    # Lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.cluster is not None and "" not in self._tasks:
            self._tasks[""] = asyncio.create_task(self.cluster.run(), name=f"discovery-{self.cluster.kind}")

    async def stop(self) -> None:
        self._stopped = True  # a late current() must not start watches again
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._per_node.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def want(self, owner: str, names: Iterable[str]) -> None:
        """The nodes `owner` ("neighbours", "readiness") needs facts of; the union is watched
        one by one (not in mode "all", where every node is)."""
        wanted = frozenset(n for n in names if n)
        if self._wanted.get(owner) == wanted or self._stopped:
            return
        self._wanted[owner] = wanted
        if self.mode == "all":
            return
        union = frozenset().union(*self._wanted.values())
        for name in [n for n in self._per_node if n not in union]:
            del self._per_node[name]
            self._tasks.pop(name).cancel()  # closes its connection
        for name in sorted(union - self._per_node.keys()):
            reflector = self._reflector(f"node {name}", node_info, field_selector=f"metadata.name={name}")
            self._per_node[name] = reflector
            self._tasks[name] = asyncio.create_task(reflector.run(), name=f"discovery-node-{quote(name)}")
        self.revision += 1

    # Reads ------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every node is watched (mode "all"): an unknown node does not exist."""
        return self.mode == "all"

    @property
    def all_nodes(self) -> Mapping[str, NodeInfo]:
        assert self.cluster is not None and self.mode == "all"
        return self.cluster.items

    def cordoned(self) -> Collection[str]:
        """Nodes known to have spec.unschedulable (mode "front")."""
        return self.cluster.items.keys() if self.cluster is not None and self.mode == "front" else ()

    def facts(self) -> dict[str, NodeInfo | None]:
        """The nodes watched one by one whose first list is in: their facts, None when gone."""
        return {name: r.items.get(name) for name, r in self._per_node.items() if r.synced.is_set()}

    def known(self, name: str) -> tuple[bool, NodeInfo | None]:
        """(known?, the node or None when it does not exist)."""
        if self.mode == "all":
            assert self.cluster is not None
            return self.cluster.synced.is_set(), self.cluster.items.get(name)
        reflector = self._per_node.get(name)
        if reflector is None or not reflector.synced.is_set():
            return False, None
        return True, reflector.items.get(name)

    def facts_wanted(self) -> frozenset[str]:
        return frozenset().union(*self._wanted.values())

    def reflectors(self) -> list[Reflector[NodeInfo]]:
        return ([self.cluster] if self.cluster is not None else []) + list(self._per_node.values())

    def watching(self) -> int:
        """Node watches wanted now (the cluster-wide one included)."""
        return len(self.reflectors())

    async def synced(self, names: Iterable[str] = ()) -> None:
        """Wait until the cluster-wide list and those per-node lists are in."""
        waits = [r.synced.wait() for n, r in self._per_node.items() if n in set(names)]
        if self.cluster is not None and "" in self._tasks:  # started
            waits.append(self.cluster.synced.wait())
        await asyncio.gather(*waits)
