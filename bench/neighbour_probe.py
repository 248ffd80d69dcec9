"""A probe process whose neighbourhood is fixed: BENCH_NEIGHBOURS neighbours on nodes
bench-0 ... bench-N-1, every one at BENCH_NEIGHBOUR_IP (a loopback address where a target probe
listens on the same port), so a benchmark plans a round exactly as a pod in a cluster does:
each neighbour's HTTP check and, unless turned off, its UDP train.

    BENCH_NEIGHBOURS=10 BENCH_NEIGHBOUR_IP=127.0.0.2 KUBENURSE_HTTP_PORT=... python -m bench.neighbour_probe
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from probe.app import Probe
from probe.neighbours import Neighbour, Neighbourhood, StaticNeighbours
from probe.settings import load_settings


async def main() -> None:
    settings = load_settings(os.environ)
    address = os.environ["BENCH_NEIGHBOUR_IP"]
    count = int(os.environ["BENCH_NEIGHBOURS"])
    hood = Neighbourhood(tuple(Neighbour(f"bench-{i}", address, address, f"bench-{i}") for i in range(count)))
    probe = Probe(settings, StaticNeighbours(hood))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await probe.start()
    await stop.wait()
    await probe.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
