"""`kubenurse mesh [URL]`: the verdicts and a compact matrix in the terminal.

Exit status: 0 when the only verdict is `ok`, 1 otherwise, 2 when no probe answers.
Standard library only, so the command starts fast.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

#: Tried in order without a URL: the sandbox's first nodes (default port), then a local probe.
DEFAULT_URLS = (*(f"http://127.0.0.{i}:24080" for i in range(2, 7)), "http://localhost:8080")
TIMEOUT_SECONDS = 10.0
#: Wider than this, the matrix is left out (the verdicts say what matters; /mesh has the rest).
MATRIX_MAX_NODES = 60

USAGE = """usage: kubenurse mesh [URL | --port P]

Print where the cluster's network is broken, as the probe at URL sees it (its /mesh.json):
the verdicts, then a matrix of every checked path (rows: from, columns: to;
. ok, s slow, X failing, blank not checked). Without URL: the local sandbox, else
http://localhost:8080; --port P: the sandbox started with --port P. Exit status 0 when
nothing is wrong, 1 otherwise, 2 when no probe answers."""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def sandbox_urls(port: int) -> tuple[str, ...]:
    """The first nodes of a sandbox listening on `port` (node-1 is 127.0.0.2)."""
    return tuple(f"http://127.0.0.{i}:{port}" for i in range(2, 7))


def fetch(base: str, timeout: float = TIMEOUT_SECONDS) -> Mapping[str, Any]:
    url = base.rstrip("/")
    if not url.endswith("/mesh.json"):
        url += "/mesh.json"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        document = json.loads(response.read())
    if not isinstance(document, dict) or not isinstance(document.get("verdicts"), list):
        raise ValueError(f"{url} did not answer a mesh document")
    return document


def _symbol(path: Mapping[str, Any], slow_limit: float) -> str:
    if not path.get("ok"):
        return "X"
    latency = path.get("latency_seconds")
    return "s" if isinstance(latency, int | float) and latency > slow_limit else "."


def _slow_limit(paths: Sequence[Mapping[str, Any]]) -> float:
    """The page's and the verdicts' rule: several times, and 100 ms over, the median path."""
    latencies = sorted(
        p["latency_seconds"] for p in paths if p.get("ok") and isinstance(p.get("latency_seconds"), int | float)
    )
    if not latencies:
        return float("inf")
    mid = len(latencies) // 2
    median = latencies[mid] if len(latencies) % 2 else (latencies[mid - 1] + latencies[mid]) / 2
    return max(4 * median, median + 0.1)


def render(document: Mapping[str, Any]) -> str:
    lines = [
        f"mesh as seen by {document.get('source')} at {document.get('generated_at')}: "
        f"{_count(len(document.get('nodes', [])), 'node')}, {_count(len(document.get('paths', [])), 'path')}",
        "",
    ]
    for v in document["verdicts"]:
        lines.append(f"[{v.get('confidence')}] {v.get('kind')} {v.get('subject')}: {v.get('summary')}")
        lines += [f"    - {e}" for e in v.get("evidence", [])]
    nodes = [n["node"] for n in document.get("nodes", [])]
    paths = document.get("paths", [])
    if len(nodes) < 2 or len(nodes) > MATRIX_MAX_NODES:
        if len(nodes) == 1:  # a 1x1 matrix shows nothing: one probe has no path to another
            lines += ["", "(one probe: no path between nodes to show)"]
        elif nodes:
            lines += ["", f"({len(nodes)} nodes: the matrix is on the /mesh page)"]
        return "\n".join(lines) + "\n"
    limit = _slow_limit(paths)
    cells = {(p["from"], p["to"]): _symbol(p, limit) for p in paths}
    states = {n["node"]: n for n in document.get("nodes", [])}
    width = max(len(n) for n in nodes)
    lines += ["", " " * (width + 2) + " ".join(f"{i % 100:>2}" for i in range(1, len(nodes) + 1))]
    for i, source in enumerate(nodes, 1):
        row = " ".join(f"{'' if source == t else cells.get((source, t), ''):>2}" for t in nodes)
        state = states[source]
        note = "" if state.get("reached") else "  (no answer)"
        note += "" if state.get("ready", True) else "  (not ready)"
        lines.append(f"{source:>{width}}  {row}   {i}{note}")
    return "\n".join(lines) + "\n"


def healthy(document: Mapping[str, Any]) -> bool:
    verdicts = document["verdicts"]
    return len(verdicts) == 1 and verdicts[0].get("kind") == "ok"


def main(args: Sequence[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    if args and args[0] in ("-h", "--help"):
        print(USAGE, file=out)
        return 0
    port = None
    if args and args[0].startswith("--port"):
        value = args[0].partition("=")[2] or (args[1] if len(args) > 1 else "")
        args = args[2:] if "=" not in args[0] else args[1:]
        if not value.isdigit() or not 0 < int(value) < 65536:
            print(f"kubenurse mesh: --port needs a port number, not {value!r}", file=err)
            return 2
        port = int(value)
    if len(args) > 1 or (port and args):
        print("kubenurse mesh: one URL or --port P (try --help)", file=err)
        return 2
    candidates = [args[0]] if args else list(sandbox_urls(port) if port else DEFAULT_URLS)
    failures = []
    for base in candidates:
        try:
            document = fetch(base)
        except (OSError, ValueError, urllib.error.URLError) as e:
            failures.append(f"{base}: {getattr(e, 'reason', e)}")
            continue
        out.write(render(document))
        return 0 if healthy(document) else 1
    shown = failures if args else failures[-1:]
    print(f"kubenurse mesh: no probe answered ({'; '.join(shown)})", file=err)
    return 2
