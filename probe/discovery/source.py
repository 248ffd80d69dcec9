"""KubeDiscovery: one API connection and the two concerns built on it.

- KubeNeighbours (the checks' NeighbourSource): the pods of KUBENURSE_NAMESPACE matching
  KUBENURSE_NEIGHBOUR_FILTER (selected server-side), cached by list+watch, and the node
  facts selection reads (nodes.py: only the ring front's nodes in the usual case).
  `current()` is called every round and by /alive; it selects again only when a cached
  record changed, and otherwise hands out the same snapshot.
- KubeReadiness (/ready): this pod's own node, watched whatever the checks are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from probe.discovery.cache import Reflector, Timing, describe
from probe.discovery.kube import USER_AGENT, ApiError, ConfigError, Credentials, KubeClient
from probe.discovery.nodes import Mode, NodeFacts, node_info  # noqa: F401 - node_info re-exported
from probe.neighbours import (
    Neighbour,
    Neighbourhood,
    NeighbourSource,
    PodInfo,
    known_eligible,
    ring_front,
    select_neighbours,
    takes_checks,
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
    name = _text(metadata.get("name"))
    if not name:
        raise ValueError("pod without metadata.name")
    return PodInfo(
        name=name,
        # Interned: thousands of pods share a few phase strings.
        node_name=sys.intern(_text(spec.get("nodeName"))),
        pod_ip=_text(status.get("podIP")),
        host_ip=_text(status.get("hostIP")),
        phase=sys.intern(_text(status.get("phase"))),
        terminating=metadata.get("deletionTimestamp") is not None,
    )


def _iso(when: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)) if when else None


#: Ring-front nodes watched beyond the `limit` ones, so a cordon leaves no gap.
SPARES = 1
#: Past this many node watches, one watch of every node is the cheaper choice.
MAX_NODE_WATCHES = 32


def node_mode(settings: Settings) -> Mode:
    """Which nodes discovery watches for these settings (see nodes.py)."""
    if not settings.check_neighbourhood or settings.allow_unschedulable:
        return "own"
    if settings.neighbour_limit == 0 or settings.neighbour_limit + SPARES > MAX_NODE_WATCHES:
        return "all"
    return "front"


class KubeDiscovery:
    """The connection to the API server and what both concerns share: this pod's node and
    the node facts. `neighbours` and `readiness` are the two concerns on top."""

    def __init__(
        self,
        settings: Settings,
        credentials: Credentials,
        *,
        timing: Timing = Timing(),  # noqa: B008 - frozen
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.timing = timing
        self.rng = rng or random.Random()
        self.client = KubeClient(
            credentials,
            connect_timeout=timing.connect_timeout,
            user_agent=f"{USER_AGENT} (pod {settings.pod_name})",
            qps=timing.qps,
            burst=timing.burst,
        )
        self.nodes = NodeFacts(self.client, node_mode(settings), timing=timing, rng=self.rng)
        #: Why the API server cannot be used (bad configuration), or None.
        self.skipped: str | None = None
        #: This pod's namespace (for its own pod), once the credentials are loaded.
        self.own_namespace: str | None = None
        #: This pod's node: NODE_NAME, else spec.nodeName of this pod once seen.
        self.own_node: str | None = settings.node_name
        self.neighbours: NeighbourSource
        self.kube_neighbours: KubeNeighbours | None = None
        if settings.check_neighbourhood:
            self.neighbours = self.kube_neighbours = KubeNeighbours(self)
        else:
            self.neighbours = ReadinessOnly(self)
        self.readiness = KubeReadiness(self)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect and start the watches; wait briefly for the first lists so the first
        round has neighbours. Never raises for configuration trouble: it becomes `skipped`."""
        try:
            await self.credentials.load()
        except ConfigError as e:
            self._skip(str(e))
            return
        s = self.settings
        self.own_namespace = s.namespaces(self.credentials.namespace).own
        hood = self.kube_neighbours if self.kube_neighbours is not None and self.kube_neighbours.begin() else None
        if hood is not None or self.nodes.mode != "front":  # no neighbours: no cordoned-node watch
            self.nodes.start()
        self._watch_own_node()  # readiness, whatever became of the neighbours
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timing.initial_sync):
                await self.nodes.synced([self.own_node or ""])
                if hood is not None:
                    await hood.synced()
        if self.own_node is None:
            self._tasks.append(asyncio.create_task(self._find_own_node(), name="discovery-own-node"))
        log.info(
            "discovery started",
            extra={
                "source": self.credentials.source,
                "server": self.credentials.server,
                "namespace": self.kube_neighbours.namespace if self.kube_neighbours else None,
                "selector": s.neighbour_filter,
                "nodes_watched": self.nodes.mode,
            },
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.kube_neighbours is not None:
            await self.kube_neighbours.stop_watching()
        await self.nodes.stop()
        await self.client.close()

    def _skip(self, reason: str) -> None:
        log.warning("discovery skipped", extra={"reason": reason})
        self.skipped = reason

    def _watch_own_node(self) -> None:
        if self.own_node:
            self.nodes.want("readiness", [self.own_node])

    def own_node_from_cache(self) -> bool:
        hood = self.kube_neighbours
        pods = hood.pods if hood is not None and self.own_namespace == hood.namespace else None
        if self.own_node is None and pods is not None:
            me = pods.items.get(self.settings.pod_name)
            if me is not None and me.node_name:
                self.own_node = me.node_name
                self._watch_own_node()
        return self.own_node is not None

    async def _find_own_node(self) -> None:
        """Without NODE_NAME: this pod's spec.nodeName, from the pod cache when this pod is
        a neighbour candidate itself, else from one GET of this pod."""
        hood = self.kube_neighbours
        if hood is not None and hood.pods is not None:
            await hood.pods.synced.wait()
        if self.own_node_from_cache():
            return
        namespace, name = quote(self.own_namespace or "", safe=""), quote(self.settings.pod_name, safe="")
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        delay = self.timing.backoff_initial
        while self.own_node is None:
            try:
                body = await self.client.get(path, {}, timeout=self.timing.request_timeout)
                node = pod_info(_json(body)).node_name
                if node:
                    self.own_node = node
                    self._watch_own_node()
                    log.info("own node found", extra={"node": node})
                    return
            except ApiError as e:
                if e.code in (403, 404):
                    log.info("own pod not readable; ring position from an empty node name", extra={"error": str(e)})
                    return
                log.debug("own pod lookup failed", extra={"error": str(e)})
            except Exception as e:  # network trouble: the reflectors report it
                log.debug("own pod lookup failed", extra={"error": describe(e)})
            if self.own_node_from_cache():
                return
            await asyncio.sleep(delay * (0.5 + self.rng.random() / 2))
            delay = min(delay * 2, self.timing.backoff_max)


def _retrying(reflectors: list[Reflector[Any]]) -> dict[str, object]:
    """The watches in a failure streak, for /alive: read live on every call (never from a
    cached snapshot), so the count and the last attempt move during an outage."""
    now = time.monotonic()
    return {
        r.kind: {
            "failures_in_a_row": r.failures,
            "error": r.error or r.last_short,
            "last_attempt_at": _iso_ms(r.last_attempt_at),
            "retry_in_seconds": round(max(0.0, r.retry_at - now), 3) if r.retry_at is not None else None,
        }
        for r in reflectors
        if r.failures
    }


def _iso_ms(when: float | None) -> str | None:
    if not when:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


class ReadinessOnly:
    """The neighbourhood check is off: `skipped`, and /alive still shows how the watch of
    this pod's node (readiness) fares."""

    def __init__(self, discovery: KubeDiscovery) -> None:
        self._d = discovery

    async def start(self) -> None:
        """KubeDiscovery.start() does the work."""

    async def stop(self) -> None:
        """KubeDiscovery.stop() does the work."""

    def current(self) -> Neighbourhood:
        reason = "disabled by KUBENURSE_CHECK_NEIGHBOURHOOD"
        details: dict[str, object] = {"node": self._d.own_node, "node_watches": self._d.nodes.watching()}
        if retrying := _retrying(self._d.nodes.reflectors()):
            details["retrying"] = retrying
        return Neighbourhood.skip(reason, details)


class KubeReadiness:
    """/ready's question, answered from the watch of this pod's own node."""

    def __init__(self, discovery: KubeDiscovery) -> None:
        self._discovery = discovery

    def node_schedulable(self) -> bool:
        """False while our node is unschedulable, tainted unschedulable, or gone."""
        d = self._discovery
        if d.own_node is None:
            d.own_node_from_cache()
        if d.own_node is None:
            return True  # unknown: do not take the probe out of service for it
        known, node = d.nodes.known(d.own_node)
        if not known:
            return True  # not listed yet, or never reachable: the same
        return takes_checks(node)


class KubeNeighbours:
    """A NeighbourSource backed by the Kubernetes API: the pods (list once, then watch) and
    the node facts the selection reads."""

    def __init__(self, discovery: KubeDiscovery) -> None:
        self._d = discovery
        self.namespace: str | None = None
        self.pods: Reflector[PodInfo] | None = None
        self._task: asyncio.Task[None] | None = None
        self._skipped: Neighbourhood | None = None
        self._selection_key: tuple[object, ...] | None = None
        self._selection: tuple[Neighbour, ...] = _NO_NEIGHBOURS
        self._snapshot_key: tuple[object, ...] | None = None
        self._eligible_key: tuple[object, ...] | None = None
        self._eligible: tuple[Neighbour, ...] = _NO_NEIGHBOURS
        self._snapshot = Neighbourhood(state="starting", stale=True)

    # Lifecycle (driven by KubeDiscovery) ------------------------------------------------

    async def start(self) -> None:
        """The NeighbourSource seam: KubeDiscovery.start() does the work."""

    async def stop(self) -> None:
        """The NeighbourSource seam: KubeDiscovery.stop() does the work."""

    def begin(self) -> bool:
        d, s = self._d, self._d.settings
        self.namespace = s.namespaces(d.credentials.namespace).neighbours
        if not self.namespace:
            reason = (
                "KUBENURSE_NAMESPACE not set and this pod's namespace is unknown "
                "(no POD_NAMESPACE, no namespace in the service account or kubeconfig)"
            )
            log.warning("neighbour discovery skipped", extra={"reason": reason})
            self._skipped = Neighbourhood.skip(reason)
            return False
        self.pods = Reflector(
            d.client,
            "pods",
            f"/api/v1/namespaces/{quote(self.namespace, safe='')}/pods",
            pod_info,
            label_selector=s.neighbour_filter,
            timing=d.timing,
            rng=d.rng,
        )
        self._task = asyncio.create_task(self.pods.run(), name="discovery-pods")
        return True

    async def synced(self) -> None:
        """The pods are listed, and the nodes selection then wants too."""
        assert self.pods is not None
        await self.pods.synced.wait()
        self.current()
        await self._d.nodes.synced(self._d.nodes.facts_wanted())

    async def stop_watching(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # The seam ---------------------------------------------------------------------------

    def current(self) -> Neighbourhood:
        d = self._d
        if d.skipped is not None:
            return Neighbourhood.skip(d.skipped)
        if self._skipped is not None:
            return self._skipped
        pods = self.pods
        if pods is None:
            return self._snapshot
        if d.own_node is None:
            d.own_node_from_cache()
        reflectors: list[Reflector[Any]] = [pods, *d.nodes.reflectors()]
        now = time.monotonic()
        last_sync = min((r.last_sync or 0.0) for r in reflectors)
        key = (
            pods.data_revision,
            d.nodes.revision,
            tuple((r.status_revision, r.quiet(now)) for r in reflectors),
            d.own_node,
            int(last_sync),
        )
        if key != self._snapshot_key:
            self._snapshot = self._build(pods, reflectors, last_sync, now)
            # Selecting may have widened the node watches: then build again on the next call.
            self._snapshot_key = key if d.nodes.revision == key[1] else None
        if retrying := _retrying(reflectors):  # live, not cached: it changes with every attempt
            return dataclasses.replace(self._snapshot, details={**self._snapshot.details, "retrying": retrying})
        return self._snapshot

    @property
    def _own_pod(self) -> str:
        """This pod's name when it is listed among the candidates (same namespace): the
        selection leaves it out. In another namespace a pod of the same name is someone else."""
        d = self._d
        return d.settings.pod_name if d.own_namespace == self.namespace else ""

    def _neighbours(self, pods: Reflector[PodInfo]) -> tuple[Neighbour, ...]:
        d, s = self._d, self._d.settings
        nodes = d.nodes
        key = (pods.data_revision, nodes.revision, d.own_node)
        if key == self._selection_key:
            return self._selection
        own_pod = self._own_pod
        if nodes.mode == "front":
            front = ring_front(
                pods.items.values(),
                cordoned=nodes.cordoned(),
                facts=nodes.facts(),
                own_pod=own_pod,
                own_node=d.own_node or "",
                limit=s.neighbour_limit,
                spares=SPARES,
                max_wanted=min(s.neighbour_limit + SPARES + 8, MAX_NODE_WATCHES + 8),
            )
            nodes.want("neighbours", front.wanted)  # may bump nodes.revision: selected again next time
            self._selection = front.neighbours
        else:
            self._selection = select_neighbours(
                pods.items.values(),
                nodes.all_nodes if nodes.mode == "all" else {},
                own_pod=own_pod,
                own_node=d.own_node or "",
                limit=s.neighbour_limit,
                allow_unschedulable=s.allow_unschedulable,
            )
        self._selection_key = (pods.data_revision, nodes.revision, d.own_node)
        return self._selection

    def pod_ip(self, name: str) -> str | None:
        """The IP of the pod of that name among those discovery lists (any phase), or None:
        /alwayshappy counts an incoming check only from a pod known here, at its own address."""
        record = self.pods.items.get(name) if self.pods is not None else None
        return record.pod_ip or None if record is not None else None

    def eligible(self) -> tuple[Neighbour, ...]:
        """Every pod that may be checked, before the limit (the mesh view asks them all).
        Exact with every node watched (limit 0); otherwise as far as the narrow node
        watches tell (`known_eligible`). Computed again only when the caches changed."""
        d, s, pods = self._d, self._d.settings, self.pods
        if d.skipped is not None or self._skipped is not None or pods is None:
            return _NO_NEIGHBOURS
        key = (pods.data_revision, d.nodes.revision, d.own_node)
        if key != self._eligible_key:
            own_pod = self._own_pod
            if d.nodes.mode == "front":
                self._eligible = known_eligible(
                    pods.items.values(), cordoned=d.nodes.cordoned(), facts=d.nodes.facts(),
                    own_pod=own_pod, own_node=d.own_node or "",
                )
            else:
                self._eligible = select_neighbours(
                    pods.items.values(),
                    d.nodes.all_nodes if d.nodes.mode == "all" else {},
                    own_pod=own_pod,
                    own_node=d.own_node or "",
                    limit=0,
                    allow_unschedulable=s.allow_unschedulable,
                )
            self._eligible_key = key
        return self._eligible

    def listed(self) -> tuple[tuple[Neighbour, bool], ...]:
        """Every running pod with an IP (this one aside), and whether it may be checked
        (`eligible`): the mesh view asks them all, and shows why the others are not checked."""
        eligible = self.eligible()
        pods = self.pods
        if self._d.skipped is not None or self._skipped is not None or pods is None:
            return ()
        chosen = {n.pod_name for n in eligible}
        own_pod = self._d.settings.pod_name if self._d.own_namespace == self.namespace else ""
        rest = [
            (Neighbour(p.name, p.pod_ip, p.host_ip, p.node_name, p.phase), False)
            for p in pods.items.values()
            if p.phase == "Running" and not p.terminating and p.pod_ip and p.name != own_pod
            and p.name not in chosen
        ]
        return (*((n, True) for n in eligible), *sorted(rest, key=lambda e: e[0].node_name))

    def _build(
        self, pods: Reflector[PodInfo], reflectors: list[Reflector[Any]], last_sync: float, now: float
    ) -> Neighbourhood:
        d = self._d
        cluster = d.nodes.cluster
        synced = pods.synced.is_set() and (cluster is None or cluster.synced.is_set())
        quiet = [r.kind for r in reflectors if r.quiet(now)]
        # A watch just added (a node newly at the ring front) is not connected yet, but
        # nothing is stale until one fails or falls silent.
        stale = bool(quiet) or any(r.error for r in reflectors)
        error = next((r.error for r in reflectors if r.error), None)
        if error is None and quiet:
            error = f"{', '.join(quiet)}: no event or bookmark for {d.timing.quiet_after:g} s"
        details: dict[str, object] = {
            "source": d.credentials.source,
            "namespace": self.namespace,
            "node": d.own_node,
            "pods": len(pods.items),
            "nodes_watched": d.nodes.mode,
            "node_watches": d.nodes.watching(),
            "last_sync": _iso(last_sync) if synced else None,
        }
        if d.nodes.mode == "front":
            details["cordoned_nodes"] = len(d.nodes.cordoned())
        elif d.nodes.mode == "all":
            details["nodes"] = len(d.nodes.all_nodes)
        malformed = sum(r.malformed for r in reflectors)
        if malformed:
            details["malformed_objects_skipped"] = malformed
        if stale:
            details["error"] = error or "connecting to the API server"
            since = [r.disconnected_at for r in reflectors if r.disconnected_at is not None]
            if since:
                details["stale_since"] = _iso(min(since))
        if not synced:
            # Nothing known yet: no neighbours, and say why.
            return Neighbourhood(
                state=f"no neighbourhood yet: {details['error']}" if stale else "listing",
                stale=True,
                details=details,
            )
        return Neighbourhood(neighbours=self._neighbours(pods), state="ok", stale=stale, details=details)


def _json(body: bytes | bytearray) -> Mapping[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value
