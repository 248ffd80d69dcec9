"""Kubernetes Events on the culprit node (KUBENURSE_NODE_EVENTS=true), so that
`kubectl describe node` tells the story.

Only a few probes report, so that a cluster of N probes does not build N views and post N
copies: the probes on the REPORTERS first nodes by name (every probe knows every eligible
pod, so each decides alone, without a request). Several reporters, because a reporter may be
the node that is down. Their copies collapse into one: the Event's name is made of the node,
the verdict kind and a 10-minute window, and a second create of the same name is a 409.

Events live in the probe's own namespace; `involvedObject` is the Node with the node's name
as uid, as the kubelet reports node events, which `kubectl describe node` looks up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from probe.discovery.kube import ConfigError, Credentials
from probe.mesh.collect import MeshView
from probe.mesh.loss import NODE_LOSSY, NODE_MTU
from probe.mesh.verdicts import LIKELY, NODE_ISOLATED, NODE_SLOW, NODE_UNREACHABLE, SURE, Verdict

log = logging.getLogger("probe.mesh")

REASONS = {
    NODE_UNREACHABLE: "KubenurseNodeUnreachable",
    NODE_ISOLATED: "KubenurseNodeIsolated",
    NODE_SLOW: "KubenurseNodeSlow",
    NODE_LOSSY: "KubenurseNodeLossy",
    NODE_MTU: "KubenurseNodeMTU",
}
REPORTERS = 3
PERIOD_SECONDS = 60.0
WINDOW_SECONDS = 600
MAX_MESSAGE = 1024
COMPONENT = "kubenurse"


def is_reporter(own_node: str, eligible_nodes: Iterable[str], reporters: int = REPORTERS) -> bool:
    return own_node in sorted({own_node, *eligible_nodes})[:reporters]


def _rfc3339(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def node_events(
    verdicts: Iterable[Verdict], *, namespace: str, reporter_node: str, reporter_pod: str, now: float
) -> list[dict[str, Any]]:
    """One core/v1 Event per node verdict we are sure or fairly sure of (never `unsure`)."""
    events = []
    for v in verdicts:
        reason = REASONS.get(v.kind)
        if reason is None or v.confidence not in (SURE, LIKELY):
            continue
        message = f"{v.summary} Evidence: {'; '.join(v.evidence)} (confidence: {v.confidence})"
        window = int(now // WINDOW_SECONDS)
        events.append(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{v.subject}.kubenurse-{v.kind.replace('_', '-')}-{window:x}"[:253],
                    "namespace": namespace,
                    "labels": {"app.kubernetes.io/name": COMPONENT},
                },
                "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": v.subject, "uid": v.subject},
                "reason": reason,
                "message": message[:MAX_MESSAGE],
                "type": "Warning",
                "source": {"component": COMPONENT, "host": reporter_node},
                "reportingComponent": COMPONENT,
                "reportingInstance": reporter_pod,
                "firstTimestamp": _rfc3339(now),
                "lastTimestamp": _rfc3339(now),
                "count": 1,
            }
        )
    return events


class NodeEventReporter:
    """Every PERIOD_SECONDS, on a reporter probe: build the view, post the node events."""

    def __init__(
        self,
        credentials: Credentials,
        view: MeshView,
        *,
        namespace: str,
        pod: str,
        own_node: Callable[[], str],
        eligible_nodes: Callable[[], Iterable[str]],
        period: float = PERIOD_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credentials = credentials
        self._view = view
        self._namespace = namespace
        self._pod = pod
        self._own_node = own_node
        self._eligible_nodes = eligible_nodes
        self._period = period
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self.posted: dict[str, int] = {}  # event name -> last HTTP status

    async def run_once(self) -> list[str]:
        """Post this round's events; the names of those created (not already there)."""
        node = self._own_node()
        if not is_reporter(node, self._eligible_nodes()):
            return []
        view = await self._view.view()
        events = node_events(
            view.verdicts, namespace=self._namespace, reporter_node=node, reporter_pod=self._pod,
            now=self._clock(),
        )
        created = []
        for event in events:
            status = await self._post(event)
            self.posted[event["metadata"]["name"]] = status
            if status == 201:
                created.append(event["metadata"]["name"])
                log.info("node event posted", extra={"node": event["involvedObject"]["name"],
                                                      "reason": event["reason"]})
            elif status != 409:  # 409: another reporter posted it first
                log.warning("node event not posted", extra={"status": status, "event": event["metadata"]["name"]})
        return created

    async def _post(self, event: Mapping[str, Any]) -> int:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"Accept": "application/json"})
        url = f"{self._credentials.server.rstrip('/')}/api/v1/namespaces/{quote(self._namespace, safe='')}/events"
        try:
            headers = {}
            authorization = await self._credentials.authorization()
            if authorization:
                headers["Authorization"] = authorization
            # The token goes to the API server only: a redirect is an answer, never followed.
            async with self._session.post(
                url, json=event, headers=headers, ssl=self._credentials.ssl_context(),
                timeout=aiohttp.ClientTimeout(total=10), allow_redirects=False,
            ) as response:
                if response.status == 401:
                    self._credentials.rejected()
                return response.status
        except (TimeoutError, aiohttp.ClientError, OSError, ConfigError) as e:
            log.warning("node event not posted", extra={"error": f"{type(e).__name__}: {e}"})
            return 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            try:
                await self.run_once()
            except Exception:  # a broken view must not end the reporting, nor the probe
                log.exception("node events failed")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
