"""`python -m kubenurse_sandbox.standin`: run the API-server stand-in as a process (for the sandbox).

Prints one line, the server URL, once it serves and the credential files are written;
stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from .apiserver import ApiServerStandin


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubenurse_sandbox.standin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--serviceaccount-dir", type=Path, help="write token, ca.crt and namespace here")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig here")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--nodes", type=int, default=0, help="pre-populate node-0 .. node-(K-1)")
    parser.add_argument("--extra-name", action="append", default=[], help="extra certificate name or IP")
    parser.add_argument("--realistic-nodes", action="store_true", help="nodes with images, conditions (~14 KB)")
    parser.add_argument("--heartbeat-period", type=float, default=0.0,
                        help="seconds between two status updates of each node, as kubelets send (0: none)")
    parser.add_argument("--flapping", type=float, default=0.01, help="fraction of nodes flapping a condition")
    parser.add_argument("--flap-period", type=float, default=10.0, help="seconds between two flaps")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    server = ApiServerStandin(args.host, args.port, extra_names=args.extra_name, realistic_nodes=args.realistic_nodes)
    for i in range(args.nodes):
        server.add_node(f"node-{i}")
    await server.start()
    if args.heartbeat_period > 0:
        server.start_heartbeats(period=args.heartbeat_period, flapping=args.flapping, flap_period=args.flap_period)
    try:
        if args.serviceaccount_dir:
            server.write_serviceaccount(args.serviceaccount_dir, args.namespace)
        if args.kubeconfig:
            server.write_kubeconfig(args.kubeconfig, args.namespace)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(server.url, flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(_serve(_parse(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
