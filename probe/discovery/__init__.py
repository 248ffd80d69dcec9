"""Discovery: who the neighbours are (Kubernetes list+watch), behind the NeighbourSource seam.

- kube.py: the connection (service account or KUBECONFIG), auth and token rotation
- cache.py: a generic list+watch cache of one collection
- source.py: KubeNeighbours, pods + nodes -> Neighbourhood
"""

from __future__ import annotations

from probe.discovery.cache import Timing
from probe.discovery.kube import locate
from probe.discovery.source import KubeNeighbours
from probe.neighbours import NeighbourSource, StaticNeighbours
from probe.settings import Settings


def make_source(settings: Settings, *, timing: Timing | None = None) -> NeighbourSource:
    """The neighbour source for these settings: the Kubernetes API when reachable by
    configuration, else a `skipped` neighbourhood saying why. `timing`: tests pace it."""
    if not settings.check_neighbourhood:
        return StaticNeighbours.unavailable("disabled by KUBENURSE_CHECK_NEIGHBOURHOOD")
    credentials = locate(settings)
    if isinstance(credentials, str):
        return StaticNeighbours.unavailable(credentials)
    return KubeNeighbours(settings, credentials, timing=timing or Timing())
