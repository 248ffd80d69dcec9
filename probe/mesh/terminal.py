"""`kubenurse mesh [URL]`: the verdicts and a compact matrix in the terminal.

Exit status: 0 when the only verdict is `ok`, 1 otherwise, 2 when no probe answers.
Standard library only, so the command starts fast.
"""

from __future__ import annotations

import json
import sys
import unicodedata
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
. ok, s slow, X failing, blank not checked, ? no answer). Without URL: the local sandbox, else
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


def safe(value: object, limit: int = 300) -> str:
    """Text from the document as the terminal may print it: control and format characters
    (escape sequences, bidi overrides) become `?`, and it is cut at `limit`. The document
    comes over the network; its strings must not drive the operator's terminal."""
    text = str(value)
    cleaned = "".join("?" if unicodedata.category(c)[0] == "C" else c for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


#: The path states of the document (the verdicts' slowness rule), as matrix cells.
SYMBOLS = {"ok": ".", "slow": "s", "failing": "X"}


def _symbol(path: Mapping[str, Any]) -> str:
    state = path.get("state")
    if state not in SYMBOLS:  # a document from before `state`: pass or fail only
        state = "ok" if path.get("ok") else "failing"
    return SYMBOLS[state]


def _note(state: Mapping[str, Any]) -> str:
    if not state.get("reached", True):
        return f"  (no answer: {safe(state.get('unreached_reason') or 'did not answer', 80)})"
    if not state.get("ready", True):
        return f"  (not checked: {safe(state.get('not_ready_reason') or 'not ready', 80)})"
    return ""


def render(document: Mapping[str, Any]) -> str:
    lines = [
        f"mesh as seen by {safe(document.get('source'))} at {safe(document.get('generated_at'))}: "
        f"{_count(len(document.get('nodes', [])), 'node')}, {_count(len(document.get('paths', [])), 'path')}",
        "",
    ]
    for v in document["verdicts"]:
        lines.append(f"[{safe(v.get('confidence'))}] {safe(v.get('kind'))} {safe(v.get('subject'))}: "
                     f"{safe(v.get('summary'), 1000)}")
        lines += [f"    - {safe(e, 1000)}" for e in v.get("evidence", [])]
    states = {str(n.get("node")): n for n in document.get("nodes", []) if isinstance(n, Mapping)}
    nodes = list(states)
    paths = [p for p in document.get("paths", []) if isinstance(p, Mapping)]
    if len(nodes) < 2 or len(nodes) > MATRIX_MAX_NODES:
        if len(nodes) == 1:  # a 1x1 matrix shows nothing: one probe has no path to another
            lines += ["", "(one probe: no path between nodes to show)"]
        elif nodes:
            lines += ["", f"({len(nodes)} nodes: the matrix is on the /mesh page)"]
        return "\n".join(lines) + "\n"
    cells = {(str(p.get("from")), str(p.get("to"))): _symbol(p) for p in paths}
    shown = [safe(n, 60) for n in nodes]
    width = max(len(n) for n in shown)
    lines += ["", " " * (width + 2) + " ".join(f"{i % 100:>2}" for i in range(1, len(nodes) + 1))]
    for i, (source, name) in enumerate(zip(nodes, shown, strict=True), 1):
        silent = not states[source].get("reached", True)
        # A probe that did not answer has no row of its own: '?' rather than a blank.
        row = " ".join(
            f"{'' if source == t else '?' if silent else cells.get((source, t), ''):>2}" for t in nodes
        )
        lines.append(f"{name:>{width}}  {row}   {i}{_note(states[source])}")
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
            failures.append(f"{safe(base)}: {safe(getattr(e, 'reason', e))}")
            continue
        out.write(render(document))
        return 0 if healthy(document) else 1
    shown = failures if args else failures[-1:]
    print(f"kubenurse mesh: no probe answered ({'; '.join(shown)})", file=err)
    return 2
