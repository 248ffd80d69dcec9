"""Discovery: who the neighbours are (Kubernetes list+watch), behind the NeighbourSource seam."""

from __future__ import annotations

from probe.neighbours import NeighbourSource, StaticNeighbours
from probe.settings import Settings


def make_source(settings: Settings) -> NeighbourSource:
    """The neighbour source for these settings."""
    if not settings.check_neighbourhood:
        return StaticNeighbours.unavailable("disabled by KUBENURSE_CHECK_NEIGHBOURHOOD")
    return StaticNeighbours.unavailable("Kubernetes discovery not available")
