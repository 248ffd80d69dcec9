"""The `kubenurse` command: parse settings (exit 2 on a bad one), then run.

Subcommands live in COMMANDS: one line each (name -> help, runner), so adding one does
not touch the rest.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from probe import __version__, logs
from probe.settings import SettingsError, load_settings, variable_help

if TYPE_CHECKING:
    from probe.neighbours import NeighbourSource


def _mesh(args: list[str]) -> int:
    from probe.mesh.terminal import main as mesh

    return mesh(args)


def _sandbox(args: list[str]) -> int:
    # The sandbox (and its API-server stand-in) is a separate package that the image does
    # not ship: it is installed with the `sandbox` extra.
    try:
        from kubenurse_sandbox import main as sandbox
    except ImportError as e:
        print(
            f"kubenurse sandbox: not installed ({e.name}); install it with: pip install -e '.[sandbox]'",
            file=sys.stderr,
        )
        return 2
    return sandbox(args)


#: name -> (one line of help, runner taking the remaining arguments and returning the exit status)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "sandbox": ("try it: N probes as a pretend cluster on loopback (sandbox --help)", _sandbox),
    "mesh": ("[URL] where the cluster's network is broken; exit 1 if anywhere (mesh --help)", _mesh),
}


def version_text() -> str:
    return f"kubenurse {__version__} (Python {platform.python_version()})"


def help_text() -> str:
    usage = [
        ("", "run the probe until SIGTERM/SIGINT (a second Ctrl-C stops at once)"),
        *((name, text) for name, (text, _) in COMMANDS.items()),
        ("--version", "print the version"),
        ("--help", "this text"),
    ]
    lines = [
        *(f"{'usage:' if i == 0 else '':<6} kubenurse {name:<10} {text}" for i, (name, text) in enumerate(usage)),
        "",
        "The probe is configured by environment variables (a bad value exits 2 naming it);",
        "their meaning is in docs/reference.md. Variables and defaults:",
        "",
        *(f"  {variable:<34} {default}" for variable, default in variable_help()),
        "",
        "OpenTelemetry: OTEL_EXPORTER_OTLP_ENDPOINT (unset: nothing exported), OTEL_EXPORTER_OTLP_PROTOCOL,",
        "the per-signal variants, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG),",
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, ..._DEFAULT_HISTOGRAM_AGGREGATION, OTEL_SDK_DISABLED.",
        "",
        "Endpoints on KUBENURSE_HTTP_PORT: /alive, /alwayshappy, /ready, /metrics, /mesh (a page of the",
        "whole cluster's paths and verdicts), /mesh.json (the same as JSON).",
    ]
    return "\n".join(lines)


def _printing(command: Callable[[], int]) -> int:
    """Run a command that prints: a reader that goes away early (`kubenurse --help | head -3`)
    is not an error, so no traceback."""
    status = 0
    try:
        status = command()
        sys.stdout.flush()  # most output is still buffered here: a closed pipe shows now
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status


def _say(text: str) -> int:
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help", "help"):
        return _printing(lambda: _say(help_text()))
    if args and args[0] in ("-V", "--version", "version"):
        return _printing(lambda: _say(version_text()))
    if args and args[0] in COMMANDS:
        return _printing(lambda: COMMANDS[args[0]][1](args[1:]))
    if args:
        print(f"kubenurse: unknown command {args[0]!r} (try --help)", file=sys.stderr)
        return 2
    return run_probe()


def run_probe(neighbours: NeighbourSource | None = None, name: str = "kubenurse") -> int:
    """The probe, configured from the environment, until SIGTERM/SIGINT; `neighbours` replaces
    discovery (kubenurse_sandbox.fixed). Returns the exit status."""
    try:
        settings = load_settings(os.environ)
    except SettingsError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    from probe.app import serve  # after validation: bad settings exit fast, without heavy imports
    from probe.server import ListenError

    try:
        asyncio.run(serve(settings, neighbours))
    except ListenError as e:  # the port is taken, not ours, or the host is not here: one line
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    return 0
