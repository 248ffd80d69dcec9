"""KubeNeighbours: the neighbour pods and the nodes, cached by list+watch, turned into the
Neighbourhood the checks and /ready read.

Two reflectors run in the background: the pods of KUBENURSE_NAMESPACE matching
KUBENURSE_NEIGHBOUR_FILTER (selected server-side) and the nodes. `current()` is called
every round and by every /ready; it recomputes the selection only when a cached record
changed, and otherwise hands out the same snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from probe.discovery.cache import Reflector, Timing, describe
from probe.discovery.kube import ApiError, ConfigError, Credentials, KubeClient
from probe.neighbours import (
    UNSCHEDULABLE_TAINT,
    Neighbour,
    Neighbourhood,
    NodeInfo,
    PodInfo,
    select_neighbours,
)
from probe.settings import Settings

log = logging.getLogger("probe.discovery")

_NO_NEIGHBOURS: tuple[Neighbour, ...] = ()


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def pod_info(obj: Mapping[str, Any]) -> PodInfo:
    """The fields of a Pod that selection reads."""
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    return PodInfo(
        name=_text(metadata.get("name")),
        # Interned: thousands of pods share a few phase strings, and node names with the node cache.
        node_name=sys.intern(_text(spec.get("nodeName"))),
        pod_ip=_text(status.get("podIP")),
        host_ip=_text(status.get("hostIP")),
        phase=sys.intern(_text(status.get("phase"))),
        terminating=metadata.get("deletionTimestamp") is not None,
    )


def node_info(obj: Mapping[str, Any]) -> NodeInfo:
    """The fields of a Node that selection and readiness read."""
    spec = obj.get("spec") or {}
    taints = spec.get("taints") or ()
    return NodeInfo(
        name=sys.intern(_text((obj.get("metadata") or {}).get("name"))),
        unschedulable=bool(spec.get("unschedulable")),
        unschedulable_taint=any(
            isinstance(t, dict) and t.get("key") == UNSCHEDULABLE_TAINT and t.get("effect") == "NoSchedule"
            for t in taints
        ),
    )


def _iso(when: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)) if when else None


class KubeNeighbours:
    """A NeighbourSource backed by the Kubernetes API (list once, then watch)."""

    def __init__(
        self,
        settings: Settings,
        credentials: Credentials,
        *,
        timing: Timing = Timing(),  # noqa: B008 - frozen
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._credentials = credentials
        self._timing = timing
        self._rng = rng or random.Random()
        self._client = KubeClient(credentials, connect_timeout=timing.connect_timeout)
        self._tasks: list[asyncio.Task[None]] = []
        self._skipped: Neighbourhood | None = None
        self.namespace: str | None = None
        self.own_namespace: str | None = None
        #: This pod's node: NODE_NAME, else spec.nodeName of this pod once seen.
        self.own_node: str | None = settings.node_name
        self.pods: Reflector[PodInfo] | None = None
        self.nodes: Reflector[NodeInfo] | None = None
        self._selection_key: tuple[object, ...] | None = None
        self._selection: tuple[Neighbour, ...] = _NO_NEIGHBOURS
        self._snapshot_key: tuple[object, ...] | None = None
        self._eligible_key: tuple[object, ...] | None = None
        self._eligible: tuple[Neighbour, ...] = _NO_NEIGHBOURS
        self._snapshot = Neighbourhood(state="starting", stale=True)

    # Lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start the watches; wait briefly for the first lists so the first
        round has neighbours. Never raises for configuration trouble: it becomes `skipped`."""
        try:
            await self._credentials.load()
        except ConfigError as e:
            self._skip(str(e))
            return
        s = self._settings
        self.namespace = s.namespace or s.pod_namespace or self._credentials.namespace
        if not self.namespace:
            self._skip(
                "KUBENURSE_NAMESPACE not set and this pod's namespace is unknown "
                "(no POD_NAMESPACE, no namespace in the service account or kubeconfig)"
            )
            return
        self.own_namespace = s.pod_namespace or self._credentials.namespace or self.namespace
        self.pods = Reflector(
            self._client,
            "pods",
            f"/api/v1/namespaces/{quote(self.namespace, safe='')}/pods",
            pod_info,
            label_selector=s.neighbour_filter,
            timing=self._timing,
            rng=self._rng,
        )
        # Selection ignores node state with ALLOW_UNSCHEDULABLE; readiness then needs only our own node.
        only_own = f"metadata.name={self.own_node}" if s.allow_unschedulable and self.own_node else ""
        self.nodes = Reflector(
            self._client, "nodes", "/api/v1/nodes", node_info, field_selector=only_own,
            timing=self._timing, rng=self._rng,
        )
        self._tasks = [
            asyncio.create_task(self.pods.run(), name="discovery-pods"),
            asyncio.create_task(self.nodes.run(), name="discovery-nodes"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timing.initial_sync):
                await asyncio.gather(self.pods.synced.wait(), self.nodes.synced.wait())
        if self.own_node is None:
            self._tasks.append(asyncio.create_task(self._find_own_node(), name="discovery-own-node"))
        log.info(
            "discovery started",
            extra={
                "source": self._credentials.source,
                "server": self._credentials.server,
                "namespace": self.namespace,
                "selector": s.neighbour_filter,
                "synced": self.pods.synced.is_set() and self.nodes.synced.is_set(),
            },
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._client.close()

    def _skip(self, reason: str) -> None:
        log.warning("neighbour discovery skipped", extra={"reason": reason})
        self._skipped = Neighbourhood(state=f"skipped: {reason}", skipped=True)

    async def _find_own_node(self) -> None:
        """Without NODE_NAME: this pod's spec.nodeName, from the pod cache when this pod is
        a neighbour candidate itself, else from one GET of this pod."""
        assert self.pods is not None
        await self.pods.synced.wait()
        if self._own_node_from_cache():
            return
        namespace, name = quote(self.own_namespace or "", safe=""), quote(self._settings.pod_name, safe="")
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        delay = self._timing.backoff_initial
        while self.own_node is None:
            try:
                body = await self._client.get(path, {}, timeout=self._timing.request_timeout)
                node = pod_info(_json(body)).node_name
                if node:
                    self.own_node = node
                    log.info("own node found", extra={"node": node})
                    return
            except ApiError as e:
                if e.code in (403, 404):
                    log.info("own pod not readable; ring position from an empty node name", extra={"error": str(e)})
                    return
                log.debug("own pod lookup failed", extra={"error": str(e)})
            except Exception as e:  # network trouble: the reflectors report it
                log.debug("own pod lookup failed", extra={"error": describe(e)})
            if self._own_node_from_cache():
                return
            await asyncio.sleep(delay * (0.5 + self._rng.random() / 2))
            delay = min(delay * 2, self._timing.backoff_max)

    def _own_node_from_cache(self) -> bool:
        if self.own_node is None and self.pods is not None and self.own_namespace == self.namespace:
            me = self.pods.items.get(self._settings.pod_name)
            if me is not None and me.node_name:
                self.own_node = me.node_name
        return self.own_node is not None

    # The seam ---------------------------------------------------------------------------

    def current(self) -> Neighbourhood:
        if self._skipped is not None:
            return self._skipped
        pods, nodes = self.pods, self.nodes
        if pods is None or nodes is None:
            return self._snapshot
        if self.own_node is None:
            self._own_node_from_cache()
        last_sync = min(pods.last_sync or 0.0, nodes.last_sync or 0.0)
        key = (
            pods.data_revision,
            nodes.data_revision,
            pods.status_revision,
            nodes.status_revision,
            self.own_node,
            int(last_sync),
        )
        if key != self._snapshot_key:
            self._snapshot = self._build(pods, nodes, last_sync)
            self._snapshot_key = key
        return self._snapshot

    def _neighbours(self, pods: Reflector[PodInfo], nodes: Reflector[NodeInfo]) -> tuple[Neighbour, ...]:
        s = self._settings
        key = (pods.data_revision, None if s.allow_unschedulable else nodes.data_revision, self.own_node)
        if key != self._selection_key:
            self._selection = select_neighbours(
                pods.items.values(),
                nodes.items,
                own_pod=s.pod_name if self.own_namespace == self.namespace else "",
                own_node=self.own_node or "",
                limit=s.neighbour_limit,
                allow_unschedulable=s.allow_unschedulable,
            )
            self._selection_key = key
        return self._selection

    def eligible(self) -> tuple[Neighbour, ...]:
        """Every pod that may be checked, before the limit: the mesh view asks them all.
        Computed on demand (the rounds never need it), again only when the caches changed."""
        pods, nodes, s = self.pods, self.nodes, self._settings
        if self._skipped is not None or pods is None or nodes is None:
            return _NO_NEIGHBOURS
        key = (pods.data_revision, None if s.allow_unschedulable else nodes.data_revision, self.own_node)
        if key != self._eligible_key:
            self._eligible = select_neighbours(
                pods.items.values(),
                nodes.items,
                own_pod=s.pod_name if self.own_namespace == self.namespace else "",
                own_node=self.own_node or "",
                limit=0,
                allow_unschedulable=s.allow_unschedulable,
            )
            self._eligible_key = key
        return self._eligible

    def _build(self, pods: Reflector[PodInfo], nodes: Reflector[NodeInfo], last_sync: float) -> Neighbourhood:
        synced = pods.synced.is_set() and nodes.synced.is_set()
        stale = not (pods.connected and nodes.connected)
        error = pods.error or nodes.error
        details: dict[str, object] = {
            "source": self._credentials.source,
            "namespace": self.namespace,
            "node": self.own_node,
            "pods": len(pods.items),
            "nodes": len(nodes.items),
            "last_sync": _iso(last_sync) if synced else None,
        }
        if stale:
            details["error"] = error or "connecting to the API server"
            since = [r.disconnected_at for r in (pods, nodes) if r.disconnected_at is not None]
            if since:
                details["stale_since"] = _iso(min(since))
        if not synced:
            # Nothing known yet: no neighbours, and say why.
            return Neighbourhood(
                state=f"no neighbourhood yet: {details['error']}" if stale else "listing",
                stale=True,
                details=details,
            )
        return Neighbourhood(
            neighbours=self._neighbours(pods, nodes),
            state="ok",
            stale=stale,
            node_schedulable=self._node_schedulable(nodes),
            details=details,
        )

    def _node_schedulable(self, nodes: Reflector[NodeInfo]) -> bool:
        """False while our node is unschedulable, tainted unschedulable, or gone."""
        if self.own_node is None:
            return True  # unknown: do not take the probe out of service for it
        node = nodes.items.get(self.own_node)
        return node is not None and node.schedulable


def _json(body: bytes) -> Mapping[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value
