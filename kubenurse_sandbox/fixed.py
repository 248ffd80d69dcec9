"""A probe whose neighbourhood is given on the command line instead of discovered: each
NODE=IP is a neighbour pod on node NODE at IP (checked on KUBENURSE_HTTP_PORT, as in a
cluster), the settings come from the environment as for `kubenurse`. Benchmarks and tests use
it to plan rounds and mesh views exactly as a pod in a cluster does, without an API server.

    NODE_NAME=node-a KUBENURSE_HTTP_PORT=8080 python -m kubenurse_sandbox.fixed node-b=10.0.0.2 node-c=10.0.0.3
"""

from __future__ import annotations

import sys

from probe.cli import run_probe
from probe.neighbours import Neighbour, Neighbourhood, StaticNeighbours


def neighbourhood(words: list[str]) -> Neighbourhood:
    neighbours = []
    for word in words:
        node, _, address = word.partition("=")
        if not node or not address:
            raise ValueError(f"{word!r}: not NODE=IP")
        neighbours.append(Neighbour(f"kubenurse-{node}", address, address, node))
    return Neighbourhood(tuple(neighbours))


def main(words: list[str]) -> int:
    """Runs as `kubenurse` does (the same settings, logs, signals and shutdown)."""
    try:
        given = neighbourhood(words)
    except ValueError as e:
        print(f"kubenurse_sandbox.fixed: {e}", file=sys.stderr)
        return 2
    return run_probe(StaticNeighbours(given), "kubenurse_sandbox.fixed")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
