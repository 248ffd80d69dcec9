"""The house stays one-way: every module of probe/ sits in a layer, imports only from its
own layer or the ones before it, and no imports go round in a circle; the runtime package
reaches the sandbox (and its API-server stand-in) only through the lazy import behind
`kubenurse sandbox`.

The layers, in the order data flows (each named for the code it holds):

    vocabulary   probe (the version), names, labels, checkurls, ratelimit, logs, resources
    settings     probe.settings: the environment, parsed once
    discovery    probe.neighbours (the model and pure selection), probe.discovery
    checks       probe.checks: measure each path
    telemetry    probe.telemetry: record it
    mesh         probe.mesh: the cluster-wide view and its verdicts
    server       probe.server: show it
    app          probe.app: wires the rooms together
    cli          probe.cli, probe.__main__: the entry point

A new module must be given its layer here; a package listed here takes in every module
under it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "probe"
SANDBOX = "kubenurse_sandbox"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocabulary", (
        "probe", "probe.names", "probe.labels", "probe.checkurls", "probe.ratelimit", "probe.logs", "probe.resources",
    )),
    ("settings", ("probe.settings",)),
    ("discovery", ("probe.neighbours", "probe.discovery")),
    ("checks", ("probe.checks",)),
    ("telemetry", ("probe.telemetry",)),
    ("mesh", ("probe.mesh",)),
    ("server", ("probe.server", "probe.udpecho")),
    ("app", ("probe.app",)),
    ("cli", ("probe.cli", "probe.__main__")),
)

#: The one way from probe/ into the sandbox: `kubenurse sandbox`, imported when it runs.
LAZY_SANDBOX_IMPORT = "probe/cli.py"


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (or the package, for a name defined in its __init__)
    path: str  # file, relative to the repository
    line: int
    lazy: bool  # inside a function: runs only when that function does


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str, source: str, path: str, *, is_package: bool, known: Collection[str]) -> Iterator[Import]:
    """The imports in `source`, the text of `module` (file `path`); `known`: every module
    name, to tell `from probe import names` (a module) from `from probe import __version__`."""
    tree = ast.parse(source, path)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    lazy = {
        id(inner)
        for node in ast.walk(tree) if isinstance(node, functions)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif (
            isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            targets = [node.args[0].value]  # importlib.import_module("x"), __import__("x")
        else:
            continue
        for target in dict.fromkeys(targets):
            yield Import(module, target, path, node.lineno, id(node) in lazy)


def all_imports() -> list[Import]:
    known = modules()
    return [
        i
        for name, path in known.items()
        for i in imports_of(
            name, path.read_text(), str(path.relative_to(ROOT)), is_package=path.name == "__init__.py", known=known
        )
    ]


def layer_of(module: str) -> int | None:
    """Index of the layer holding `module`: the longest entry naming it or a package above
    it (the root package only names its own __init__)."""
    matches = [
        (len(entry), index)
        for index, (_, entries) in enumerate(LAYERS)
        for entry in entries
        if module == entry or (entry != PACKAGE and module.startswith(entry + "."))
    ]
    return max(matches)[1] if matches else None


def upward(imports: list[Import]) -> list[str]:
    """Imports that run against the flow, as readable lines."""
    found = []
    for i in imports:
        if not (i.target == PACKAGE or i.target.startswith(PACKAGE + ".")):
            continue
        mine, theirs = layer_of(i.source), layer_of(i.target)
        if mine is not None and theirs is not None and theirs > mine:
            found.append(
                f"{i.path}:{i.line}: {i.source} ({LAYERS[mine][0]}) imports {i.target} ({LAYERS[theirs][0]})"
            )
    return found


def cycles(imports: list[Import]) -> list[list[str]]:
    """Every strongly connected group of modules (Tarjan), i.e. each circle of imports."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.target != i.source:
            graph.setdefault(i.source, set()).add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


# The real package ------------------------------------------------------------------------


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in modules() if layer_of(m) is None]
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"
    gone = [e for _, entries in LAYERS for e in entries if e not in modules()]
    assert not gone, f"LAYERS names modules that are gone: {gone}"


def test_no_import_runs_against_the_flow() -> None:
    assert upward(all_imports()) == []


def test_no_imports_go_round_in_a_circle() -> None:
    assert cycles(all_imports()) == []


def test_the_runtime_package_reaches_the_sandbox_only_through_the_lazy_cli_import() -> None:
    into_sandbox = [i for i in all_imports() if i.target == SANDBOX or i.target.startswith(SANDBOX + ".")]
    assert [(i.path, i.lazy) for i in into_sandbox] == [(LAZY_SANDBOX_IMPORT, True)], into_sandbox


def test_importing_every_probe_module_loads_no_sandbox_code() -> None:
    # The static test reads the source; this one runs it: a fresh interpreter imports every
    # module of the runtime package (not __main__, which would start the probe).
    names = sorted(m for m in modules() if not m.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m == {SANDBOX!r} or m.startswith({SANDBOX + '.'!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# The checker itself can fail -------------------------------------------------------------


def _imports(*edges: tuple[str, str]) -> list[Import]:
    return [Import(a, b, f"{a}.py", 1, False) for a, b in edges]


def test_the_checker_sees_an_upward_import() -> None:
    assert upward(_imports(("probe.checks.http", "probe.settings"), ("probe.server", "probe.checks.rounds"))) == []
    found = upward(_imports(("probe.discovery.kube", "probe.checks.result")))
    assert found == ["probe.discovery.kube.py:1: probe.discovery.kube (discovery) imports probe.checks.result (checks)"]
    assert upward(_imports(("probe.settings", "probe.telemetry.metrics")))


def test_the_checker_sees_a_circle() -> None:
    assert cycles(_imports(("probe.a", "probe.b"), ("probe.b", "probe.c"))) == []
    assert cycles(_imports(("probe.a", "probe.b"), ("probe.b", "probe.c"), ("probe.c", "probe.a"))) == [
        ["probe.a", "probe.b", "probe.c"]
    ]


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("probe", "vocabulary"), ("probe.names", "vocabulary"), ("probe.discovery", "discovery"),
        ("probe.discovery.kube", "discovery"), ("probe.checks.some_new_kind", "checks"), ("probe.cli", "cli"),
    ],
)
def test_layers_are_found_by_the_longest_entry(module: str, layer: str) -> None:
    found = layer_of(module)
    assert found is not None and LAYERS[found][0] == layer


def test_a_new_top_level_module_has_no_layer_until_given_one() -> None:
    assert layer_of("probe.something_new") is None


def test_the_parser_reads_lazy_relative_and_dynamic_imports() -> None:
    source = (
        "import probe.names as n\n"
        "from probe import logs, __version__\n"
        "from . import settings\n"
        "from .discovery import kube\n"
        "def later():\n"
        "    from kubenurse_sandbox import main\n"
        "    importlib.import_module('kubenurse_sandbox.standin')\n"
    )
    found = imports_of("probe.example", source, "probe/example.py", is_package=False, known=modules())
    assert {(i.target, i.line, i.lazy) for i in found} == {
        ("probe.names", 1, False), ("probe.logs", 2, False), ("probe", 2, False), ("probe.settings", 3, False),
        ("probe.discovery.kube", 4, False), ("kubenurse_sandbox", 6, True), ("kubenurse_sandbox.standin", 7, True),
    }
