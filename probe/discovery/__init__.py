"""Discovery: who the neighbours are and whether this node takes work (Kubernetes list+watch).

- kube.py: the connection (service account or KUBECONFIG), auth, token rotation, pacing
- cache.py: a generic list+watch cache of one collection, with backoff
- nodes.py: NodeFacts, the node watches (only the nodes selection and readiness read)
- source.py: KubeDiscovery with its two concerns, KubeNeighbours and KubeReadiness
"""

from __future__ import annotations

from dataclasses import dataclass, field

from probe.discovery.cache import Timing
from probe.discovery.kube import locate
from probe.discovery.source import KubeDiscovery
from probe.neighbours import NeighbourSource, Readiness, StaticNeighbours, StaticReadiness
from probe.settings import Settings


@dataclass
class Fixed:
    """Discovery with given answers (tests, and no Kubernetes at all)."""

    neighbours: NeighbourSource
    readiness: Readiness = field(default_factory=StaticReadiness)

    async def start(self) -> None:
        await self.neighbours.start()

    async def stop(self) -> None:
        await self.neighbours.stop()


Discovery = KubeDiscovery | Fixed


def make_discovery(settings: Settings, *, timing: Timing | None = None) -> Discovery:
    """Discovery for these settings: the Kubernetes API when reachable by configuration
    (readiness always, the neighbours unless turned off), else `skipped` saying why and a
    node that counts as schedulable. `timing`: tests pace it."""
    credentials = locate(settings)
    if isinstance(credentials, str):
        reason = "disabled by KUBENURSE_CHECK_NEIGHBOURHOOD" if not settings.check_neighbourhood else credentials
        return Fixed(StaticNeighbours.unavailable(reason))
    return KubeDiscovery(settings, credentials, timing=timing or Timing())
