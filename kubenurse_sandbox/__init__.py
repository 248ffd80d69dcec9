"""`kubenurse sandbox`: a pretend cluster on this machine, to try the probe without one.

An API-server stand-in, N probe processes on their own loopback addresses (one per stand-in
node), a Service and an ingress stand-in, and Prometheus when installed; then commands to
cordon, stop or slow down a node and watch the others notice.

- cluster.py: the pieces, their addresses, and what each command does to them
- proxy.py: the delaying TCP proxy at every node's address
- children.py: starting and stopping the child processes
- control.py: the command language, the control endpoint and its client, the prompt
- session.py: one run, from start to a clean stop
- options.py: what the command line asked for
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from kubenurse_sandbox.control import HELP, send
from kubenurse_sandbox.options import DEFAULT_PORT, MAX_NODES, Options

USAGE = """\
kubenurse sandbox [--nodes N] [--port P] [--interval D] [--timeout D] [--neighbour-limit K] [--no-prometheus] [--no-udp]
       kubenurse sandbox [--port P] <command>     (act on a running sandbox; `help` lists the commands)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubenurse sandbox",
        usage=USAGE,
        description="Run N probes as a small pretend cluster on loopback (no root, no cluster needed).",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nodes", metavar="N", type=int, default=5, help=f"how many nodes/probes, 1-{MAX_NODES} (default 5)"
    )
    parser.add_argument(
        "--port",
        metavar="P",
        type=int,
        default=DEFAULT_PORT,
        help=f"control endpoint and probe port; the stand-ins use the next four (default {DEFAULT_PORT}; 0: any free)",
    )
    parser.add_argument(
        "--interval", metavar="D", default="1s", help="KUBENURSE_CHECK_INTERVAL of every probe (default 1s)"
    )
    parser.add_argument(
        "--timeout", metavar="D", default="", help="KUBENURSE_CHECK_TIMEOUT of every probe (default: the probe's, 6s)"
    )
    parser.add_argument(
        "--neighbour-limit",
        metavar="K",
        type=int,
        default=3,
        help="KUBENURSE_NEIGHBOUR_LIMIT: neighbours each probe checks",
    )
    parser.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus even if installed")
    parser.add_argument(
        "--no-udp", action="store_true", help="KUBENURSE_CHECK_NEIGHBOURHOOD_UDP=false: no UDP trains between probes"
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="a real etcd + kube-apiserver instead of the stand-in, and Jaeger for the traces where built "
        "(.ci/components in a checkout builds them)",
    )
    parser.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command:
        return _remote(args.port, args.command)
    if not 0 <= args.port <= 65535 - 4:
        parser.error("--port must be 0-65531")
    if not 1 <= args.nodes <= MAX_NODES:
        parser.error(f"--nodes must be 1-{MAX_NODES}")
    if args.neighbour_limit < 0:
        parser.error("--neighbour-limit must be 0 (all) or more")
    from probe.settings import parse_positive_duration

    for option, value in (("--interval", args.interval), ("--timeout", args.timeout or "6s")):
        try:
            parse_positive_duration(value)
        except ValueError as e:
            parser.error(f"{option} {value!r}: {e}")
    options = Options(
        nodes=args.nodes,
        port=args.port,
        interval=args.interval,
        timeout=args.timeout,
        neighbour_limit=args.neighbour_limit,
        prometheus=not args.no_prometheus,
        real=args.real,
        udp=not args.no_udp,
    )
    try:
        from kubenurse_sandbox.session import run
    except ModuleNotFoundError as e:
        if e.name != "trustme":
            raise
        print(
            "kubenurse sandbox: the API-server stand-in needs trustme: pip install 'kubenurse-otel[sandbox]'",
            file=sys.stderr,
        )
        return 1
    return asyncio.run(run(options))


def _remote(port: int, words: list[str]) -> int:
    """A command for the sandbox listening on `port` (`help` is answered here)."""
    if words[0].lower() in ("help", "?"):
        print(HELP)
        return 0
    return send(port, words)


__all__ = ["main"]
