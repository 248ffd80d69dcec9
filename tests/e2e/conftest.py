"""The namespace cluster, built once per module and torn down whatever happens (and before
the rest of the suite runs, which it would otherwise load with four probes and a Prometheus).

Skips (with the reason) where it cannot run: not root, no `ip netns`/veth/bridge/nftables,
or one of the programs it drives is missing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e import netns
from tests.e2e.cluster import Cluster

NODES = ["node-1", "node-2", "node-3", "node-4"]
#: Each node checks 2 of the 3 others, so every node has one that does not check it:
#: "exactly the probes that select it" then means something.
NEIGHBOUR_LIMIT = 2


def _missing_program() -> str | None:
    for program in ("dnsmasq", "nginx", "prometheus"):
        if not netns.which(program):
            return f"{program} is not installed"
    return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = netns.unsupported_reason() or _missing_program()
    if reason:
        pytest.skip(f"namespace cluster unavailable: {reason}")
    netns.sweep_leftovers()
    with Cluster.build(NODES, neighbour_limit=NEIGHBOUR_LIMIT) as built:
        yield built
