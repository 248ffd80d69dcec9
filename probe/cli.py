"""The `kubenurse` command: parse settings (exit 2 on a bad one), then run."""

from __future__ import annotations

import asyncio
import os
import sys

from probe import logs
from probe.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print("usage: kubenurse            run the probe (configured by environment variables)")
        print("       kubenurse sandbox    try it: N probes as a pretend cluster on loopback (sandbox --help)")
        print("       kubenurse mesh [URL] where the cluster's network is broken; exit 1 if anywhere (mesh --help)")
        return 0
    if args and args[0] == "mesh":
        from probe.mesh.terminal import main as mesh

        return mesh(args[1:])
    if args and args[0] == "sandbox":
        from probe.sandbox import main as sandbox

        return sandbox(args[1:])
    if args:
        print(f"kubenurse: unknown command {args[0]!r} (try --help)", file=sys.stderr)
        return 2
    try:
        settings = load_settings(os.environ)
    except SettingsError as e:
        print(f"kubenurse: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    from probe.app import serve  # after validation: bad settings exit fast, without heavy imports

    try:
        asyncio.run(serve(settings))
    except OSError as e:  # e.g. the port is taken: one clear line, not a traceback
        print(f"kubenurse: {e}", file=sys.stderr)
        return 1
    return 0
